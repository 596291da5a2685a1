"""Robustness evaluation: the corrupted eval split and exact accuracies per corruption."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from kd_jax import data, parallel, robustness
from kd_jax.data import augment, pipeline

BATCH = 128


def raw_config():
  """The digits eval split with normalisation turned into the identity on 0..255."""
  config = data.default_data_config()
  config.update(mean=(0.0,), std=(1 / 255,))
  return config


def eval_images(config, corruption=None, process_count=1):
  hosts = [list(data.eval_iterator(config, batch_size=BATCH, process_index=i,
                                   process_count=process_count, corruption=corruption))
           for i in range(process_count)]
  steps = [np.concatenate([host[s]["image"] for host in hosts]) for s in range(len(hosts[0]))]
  mask = np.concatenate([np.concatenate([host[s]["mask"] for host in hosts])
                         for s in range(len(hosts[0]))])
  return np.concatenate(steps)[mask > 0]


def test_corrupted_eval_split_is_the_op_seeded_by_position():
  config = raw_config()
  clean = eval_images(config)
  assert clean.shape == (359, 8, 8, 1)
  # Deterministic op: the clean images through low_light at severity 2.
  np.testing.assert_allclose(eval_images(config, ("low_light", 2)),
                             augment.low_light(tf.constant(clean), None, 2),
                             rtol=1e-5, atol=1e-3)
  # Random op: example p is corrupted with seeds example_seeds(0, 0, [p]), on any
  # number of hosts.
  cutout = augment.corruption("cutout", 4, channels=1)
  seeds = pipeline.example_seeds(0, 0, tf.range(40))
  expected = np.stack([cutout(tf.constant(image), seed) for image, seed in
                       zip(clean, seeds)])
  np.testing.assert_allclose(eval_images(config, ("cutout", 4))[:40], expected, atol=1e-4)
  np.testing.assert_allclose(eval_images(config, ("cutout", 4), process_count=2)[:40],
                             expected, atol=1e-4)


class _PixelVote(nn.Module):
  """Predicts the class nearest to `5 + 8 · mean pixel`: corruptions change its votes."""

  def __call__(self, x, train=False):
    brightness = 5 + 8 * jnp.mean(x, axis=(1, 2, 3))
    logits = -jnp.square(jnp.arange(10, dtype=jnp.float32)[None] - brightness[:, None])
    return logits, {"embedding": logits}


class _Always(nn.Module):
  """Always predicts `label`."""
  label: int

  def __call__(self, x, train=False):
    logits = jax.nn.one_hot(jnp.full(x.shape[:1], self.label), 10)
    return logits, {"embedding": logits}


def test_accuracies_per_corruption_and_severity_are_exact():
  config = data.default_data_config()
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  corruptions = ("low_light",)
  result = robustness.evaluate({"vote": (_PixelVote(), {}), "three": (_Always(3), {})},
                               config, mesh, batch_size=BATCH, num_classes=10,
                               corruptions=corruptions)
  assert result["corruptions"] == list(corruptions)
  assert result["severities"] == [1, 2, 3, 4, 5]
  builder = tfds.builder("kd_digits")
  labels = np.array([ex["label"] for ex in tfds.as_numpy(builder.as_dataset(split="test"))])
  threes = np.mean(labels == 3)
  three = result["models"]["three"]
  assert three["clean"] == three["mean_corrupted"] == threes
  assert three["accuracy"] == {c: [threes] * 5 for c in corruptions}

  def vote_accuracy(corruption):
    images = eval_images(config, corruption)
    brightness = 5 + 8 * images.mean(axis=(1, 2, 3))
    predictions = np.argmin(np.square(np.arange(10)[None] - brightness[:, None]), -1)
    return np.mean(predictions == labels)

  vote = result["models"]["vote"]
  assert vote["clean"] == pytest.approx(vote_accuracy(None), abs=1e-12)
  for c in corruptions:
    expected = [vote_accuracy((c, s)) for s in range(1, 6)]
    np.testing.assert_allclose(vote["accuracy"][c], expected, atol=1e-12)
    assert vote["mean"][c] == pytest.approx(np.mean(expected), abs=1e-12)
  assert vote["mean_corrupted"] == pytest.approx(
      np.mean([vote["accuracy"][c] for c in corruptions]), abs=1e-12)
  assert vote["accuracy"]["low_light"] != [vote["clean"]] * 5  # darker images vote lower


def test_table():
  result = {"corruptions": ["jpeg", "cutout"], "severities": [1, 2, 3, 4, 5],
            "models": {name: {"clean": clean, "mean": {"jpeg": jpeg, "cutout": cutout},
                              "mean_corrupted": (jpeg + cutout) / 2}
                       for name, clean, jpeg, cutout in (("teacher", 0.99, 0.9, 0.8),
                                                         ("distilled", 0.97, 0.7, 0.6))}}
  assert robustness.table(result) == (
      "| accuracy | teacher | distilled |\n"
      "|---|---|---|\n"
      "| clean | 0.9900 | 0.9700 |\n"
      "| jpeg | 0.9000 | 0.7000 |\n"
      "| cutout | 0.8000 | 0.6000 |\n"
      "| **mean corrupted** | **0.8500** | **0.6500** |\n")
