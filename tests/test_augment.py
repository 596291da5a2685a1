"""Edge-condition ops: expected values on small images, eagerly and inside tf.data."""
import importlib.util
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from kd_jax import configs
from kd_jax.data import augment

SEED = tf.constant([3, 4], tf.int64)
RGB = tf.constant([[[200, 100, 50], [180, 120, 60]],
                   [[100, 150, 200], [120, 130, 140]]], tf.float32)


def eager_and_graph(fn, *args):
  """`fn(*args)` run eagerly and inside a tf.data map, as numpy."""
  eager = fn(*args)
  graph = next(iter(tf.data.Dataset.from_tensors(args).map(fn)))
  return np.asarray(eager), np.asarray(graph)


def run_op(name, image, severity, seed=SEED):
  """The registered op, eagerly and in the graph; asserts both agree."""
  eager, graph = eager_and_graph(
      lambda x, s: augment.OPS[name](x, s, severity), tf.constant(image, tf.float32),
      seed)
  np.testing.assert_allclose(eager, graph, rtol=1e-6, atol=1e-4)
  assert eager.shape == np.shape(image) and eager.dtype == np.float32
  return eager


def test_low_light_is_exposure_times_gamma():
  image = np.array([[[0.0], [255.0], [127.5]]])
  # Severity 3: exposure 0.5, gamma 1.6.
  np.testing.assert_allclose(run_op("low_light", image, 3)[..., 0],
                             [[0.0, 127.5, 127.5 * 0.5**1.6]], rtol=1e-5)
  # Severity 5: exposure 0.25, gamma 2.0: 255 -> 63.75, 127.5 -> 63.75 / 4.
  np.testing.assert_allclose(run_op("low_light", image, 5)[..., 0],
                             [[0.0, 63.75, 15.9375]], rtol=1e-5)


def test_motion_blur_kernels():
  third = 1 / 3
  np.testing.assert_allclose(augment.motion_blur_kernel(2.0, 0.0),
                             [[0, 0, 0], [third, third, third], [0, 0, 0]], atol=1e-7)
  np.testing.assert_allclose(augment.motion_blur_kernel(2.0, math.pi / 2),
                             [[0, third, 0], [0, third, 0], [0, third, 0]], atol=1e-7)
  # A trail shorter than a pixel: the neighbours get 1 - 0.6 each, then normalised.
  np.testing.assert_allclose(augment.motion_blur_kernel(0.8, 0.0)[1],
                             np.array([0.4, 1.0, 0.4]) / 1.8, atol=1e-7)
  # The down-right diagonal: corners at distance √2 − 1, edge cells at √½.
  diagonal, edge = 2 - math.sqrt(2), 1 - math.sqrt(0.5)
  expected = np.array([[diagonal, edge, 0], [edge, 1, edge], [0, edge, diagonal]])
  np.testing.assert_allclose(augment.motion_blur_kernel(2.0, math.pi / 4),
                             expected / expected.sum(), atol=1e-6)


def test_blur_mirrors_the_borders():
  image = tf.constant([[0.0, 0.0, 30.0, 0.0]] * 3)[..., None]
  kernel = augment.motion_blur_kernel(2.0, 0.0)
  eager, graph = eager_and_graph(lambda x: augment.blur(x, kernel), image)
  for out in (eager, graph):
    np.testing.assert_allclose(out[..., 0], [[0.0, 10.0, 10.0, 10.0]] * 3, atol=1e-5)


def test_motion_blur_keeps_flat_images_and_depends_on_the_seed():
  flat = np.full((8, 8, 1), 90.0)
  np.testing.assert_allclose(run_op("motion_blur", flat, 5), flat, rtol=1e-5)
  image = np.random.default_rng(0).uniform(0, 255, (8, 8, 3))
  outputs = {run_op("motion_blur", image, 4, tf.constant([s, 0], tf.int64)).tobytes()
             for s in range(4)}
  assert len(outputs) == 4  # a different trail angle for each seed
  np.testing.assert_allclose(run_op("motion_blur", image, 4).mean(), image.mean(),
                             rtol=0.05)


def test_gaussian_noise_statistics():
  out = run_op("gaussian_noise", np.full((64, 64, 1), 128.0), 3)
  assert abs(out.mean() - 128) < 2
  assert out.std() == pytest.approx(255 * 0.18, rel=0.05)


def test_shot_noise_counts_photons():
  assert not run_op("shot_noise", np.zeros((8, 8, 3)), 5).any()  # black stays black
  # Severity 1: λ = 60 photons at full scale; a quarter-grey pixel counts Poisson(15).
  out = run_op("shot_noise", np.full((64, 64, 1), 63.75), 1)
  counts = out / (255 / 60)
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
  assert counts.mean() == pytest.approx(15, rel=0.03)
  assert counts.var() == pytest.approx(15, rel=0.1)


def test_jpeg_keeps_flat_images_and_loses_detail_with_severity():
  flat = np.full((8, 8, 1), 128.0)
  np.testing.assert_allclose(run_op("jpeg", flat, 5), flat, atol=1)
  checkers = np.indices((8, 8)).sum(0)[..., None] % 2 * 255.0
  errors = [np.abs(run_op("jpeg", checkers, s) - checkers).mean() for s in (1, 5)]
  assert 0 < errors[0] < errors[1]
  assert np.all(run_op("jpeg", checkers, 1) == np.round(run_op("jpeg", checkers, 1)))


def test_grayscale_blends_towards_luma():
  red = np.array([[[255.0, 0.0, 0.0]]])
  luma = 0.2989 * 255  # ITU-R BT.601 weight of red, as tf.image.rgb_to_grayscale
  np.testing.assert_allclose(run_op("grayscale", red, 5), [[[luma] * 3]], rtol=1e-3)
  np.testing.assert_allclose(run_op("grayscale", red, 1),
                             [[[0.8 * 255 + 0.2 * luma, 0.2 * luma, 0.2 * luma]]],
                             rtol=1e-3)
  single = np.arange(4.0).reshape(2, 2, 1)
  np.testing.assert_array_equal(run_op("grayscale", single, 5), single)


def test_chroma_subsampling_is_yuv_420():
  out = run_op("chroma_subsampling", RGB, 1)
  yuv_in = tf.image.rgb_to_yuv(RGB / 255).numpy()
  yuv_out = tf.image.rgb_to_yuv(out / 255).numpy()
  np.testing.assert_allclose(yuv_out[..., 0], yuv_in[..., 0], atol=1e-5)  # luma kept
  for plane in (1, 2):  # one chroma value for the 2x2 block: the mean
    np.testing.assert_allclose(yuv_out[..., plane], yuv_in[..., plane].mean(), atol=1e-5)
  single = np.arange(4.0).reshape(2, 2, 1)
  np.testing.assert_array_equal(run_op("chroma_subsampling", single, 3), single)


def test_cutout_at_clips_the_square_at_the_borders():
  image = tf.ones([4, 4, 1])
  eager, graph = eager_and_graph(lambda x: augment.cutout_at(x, -1, 2, 3), image)
  expected = np.ones((4, 4))
  expected[:2, 2:] = 0
  for out in (eager, graph):
    np.testing.assert_array_equal(out[..., 0], expected)


def test_cutout_blacks_out_one_square():
  for s in range(6):
    out = run_op("cutout", np.ones((8, 8, 1)), 3, tf.constant([s, 1], tf.int64))[..., 0]
    rows, cols = np.nonzero(out == 0)
    # Severity 3: a 4x4 square, clipped where its centre is near a border.
    assert 4 <= len(rows) <= 16
    assert len(rows) == len(set(rows)) * len(set(cols))  # a rectangle
    assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4


def test_compose_applies_ops_in_order():
  image = tf.constant(np.linspace(0, 255, 12).reshape(2, 2, 3), tf.float32)
  twice = augment.compose([{"op": "low_light", "severity": 2}] * 2, channels=3)
  once = augment.low_light(image, SEED, 2)
  eager, graph = eager_and_graph(twice, image, SEED)
  for out in (eager, graph):
    np.testing.assert_allclose(out, augment.low_light(once, SEED, 2), rtol=1e-6)


def test_compose_draws_probability_and_severity_per_seed():
  image = tf.fill([2, 2, 1], 200.0)
  levels = {float(augment.low_light(image, SEED, s)[0, 0, 0]): s for s in range(1, 6)}
  sometimes = augment.compose([{"op": "low_light", "prob": 0.5, "severity": (2, 4)}], 1)
  drawn = [float(sometimes(image, tf.constant([s, 9], tf.int64))[0, 0, 0])
           for s in range(200)]
  applied = [levels[v] for v in drawn if v != 200.0]  # KeyError: not a severity level
  assert 0.4 < len(applied) / len(drawn) < 0.6
  assert set(applied) == {2, 3, 4}
  never = augment.compose([{"op": "gaussian_noise", "prob": 0.0}], 1)
  np.testing.assert_array_equal(never(image, SEED), image)


def test_compose_is_the_same_eagerly_and_in_a_tf_data_map():
  image = tf.constant(np.random.default_rng(1).uniform(0, 255, (8, 8, 3)), tf.float32)
  specs = [{"op": name, "prob": 0.7, "severity": (1, 5)} for name in augment.OPS]
  eager, graph = eager_and_graph(augment.compose(specs, channels=3), image, SEED)
  np.testing.assert_allclose(eager, graph, rtol=1e-5, atol=1e-3)
  assert np.abs(eager - image).max() > 1


def test_corruptions_skip_colour_ops_on_grayscale():
  assert set(augment.corruptions(3)) == set(augment.OPS)
  assert set(augment.corruptions(1)) == set(augment.OPS) - {"grayscale",
                                                             "chroma_subsampling"}
  assert augment.compose((), channels=1) is None


@pytest.mark.parametrize("specs, message", [
    ([{"op": "fog"}], "unknown edge op 'fog'; use one of low_light"),
    ([{"op": "jpeg", "prob": 1.5}], "prob must be a number in [0, 1]"),
    ([{"op": "jpeg", "severity": 6}], "severity must be an int in 1..5"),
    ([{"op": "jpeg", "severity": (4, 2)}], "severity must be an int in 1..5"),
    ([{"op": "jpeg", "strength": 2}], "unknown keys strength"),
    (("(dict(op='jpeg'),)",), "must be a dict such as"),
    ("jpeg", "must be a tuple of dicts"),
])
def test_bad_specs_are_one_line_errors(specs, message):
  with pytest.raises(ValueError) as error:
    augment.compose(specs, channels=3)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_other_channel_counts_are_refused():
  with pytest.raises(ValueError, match="1 or 3 channels"):
    augment.compose([{"op": "jpeg"}], channels=4)


@pytest.mark.parametrize("variant", ["", "tiny"])
def test_digits_robust_config_validates(variant):
  path = os.path.join(configs.EXPERIMENTS_DIR, "digits_robust.py")
  spec = importlib.util.spec_from_file_location("digits_robust", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  configs.validate(config)
  assert [op for op, _, _ in augment.parse(config.data.edge_augment)] == list(
      augment.corruptions(1))  # every op that changes a grayscale digit
