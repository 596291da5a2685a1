"""Tests of kd_jax.data: the offline kd_digits builder, preprocessing ops, pipelines."""

import collections
import contextlib
import copy
import socket
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import array_record as array_record_source

from kd_jax import data
from kd_jax.data import kd_digits
from kd_jax.data import pipeline
from kd_jax.data import preprocess

BATCH = 64
STEPS_PER_EPOCH = 1438 // BATCH  # 22 (kd_digits train split has 1438 examples).


@pytest.fixture(scope="session")
def digits_config(tmp_path_factory):
  """kd_digits config over a fresh data_dir, built here with the network cut off."""
  config = data.default_data_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  offline = OSError("network access attempted while building kd_digits")
  with mock.patch.object(socket.socket, "connect", side_effect=offline):
    data.get_info(config)  # Prepares kd_digits on demand.
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], e[key])


def train_batches(config, n, **kw):
  kw = {"global_batch_size": BATCH, "seed": 0, "process_index": 0, "process_count": 1,
        **kw}
  return take(data.train_iterator(config, **kw), n)


def with_fields(config, **overrides):
  config = copy.deepcopy(config)
  config.update(overrides)
  return config


def raw_pixels(config):
  """`config` with normalisation turned into the identity on 0..255 pixel values."""
  return with_fields(config, mean=(0.0,), std=(1 / 255,))


def train_split_images(config):
  builder = tfds.builder("kd_digits", data_dir=config.data_dir)
  examples = tfds.as_numpy(builder.as_dataset(split="train"))
  return np.stack([ex["image"] for ex in examples])


def as_uint8(images):
  return np.round(images).astype(np.uint8)


# --- kd_digits builder ------------------------------------------------------------


def test_kd_digits_is_a_registered_offline_tfds_dataset(digits_config):
  builder = tfds.builder("kd_digits", data_dir=digits_config.data_dir)
  assert builder.is_prepared()
  assert str(builder.info.version) == "1.0.0"
  assert builder.info.description
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["test"].num_examples == 1797
  assert builder.info.features["label"].num_classes == 10
  image = next(iter(builder.as_dataset(split="test")))["image"]
  assert image.shape == (8, 8, 1) and image.dtype == tf.uint8


def test_kd_digits_split_is_deterministic_and_stratified():
  labels = np.repeat(np.arange(10), 50)
  train, test = kd_digits.stratified_split(labels)
  train_again, test_again = kd_digits.stratified_split(labels)
  np.testing.assert_array_equal(test, test_again)
  np.testing.assert_array_equal(train, train_again)
  assert not set(train) & set(test)
  assert len(train) + len(test) == len(labels)
  np.testing.assert_array_equal(np.bincount(labels[test]), np.full(10, 10))
  assert not np.array_equal(test, kd_digits.stratified_split(labels, seed=1)[1])


def test_kd_digits_pixels_rescale_to_uint8():
  np.testing.assert_array_equal(
      kd_digits.to_uint8(np.array([0.0, 1.0, 8.0, 16.0])), [0, 16, 128, 255])


def test_kd_digits_default_mean_std_are_train_statistics(digits_config):
  pixels = train_split_images(digits_config) / 255.0
  assert pixels.mean() == pytest.approx(0.30553, abs=1e-5)
  assert pixels.std() == pytest.approx(0.37595, abs=1e-5)
  # The pipeline normalises with them by default: one epoch has mean ~0, std ~1.
  batches = train_batches(with_fields(digits_config, augment="none"), STEPS_PER_EPOCH)
  images = np.concatenate([b["image"] for b in batches])
  assert abs(images.mean()) < 0.02 and abs(images.std() - 1) < 0.02


# --- info and errors -----------------------------------------------------------------


def test_get_info(digits_config):
  info = data.get_info(digits_config)
  assert info == data.DatasetInfo(
      num_classes=10, image_shape=(8, 8, 1), num_train=1438, num_eval=359,
      train_split="train", eval_split="test")
  assert info == data.get_info("kd_digits", data_dir=digits_config.data_dir)
  assert data.get_info(with_fields(digits_config, image_size=16)).image_shape == (16, 16, 1)
  assert info.steps_per_epoch(BATCH) == STEPS_PER_EPOCH


def test_unknown_dataset_is_a_one_line_error():
  with pytest.raises(ValueError) as error:
    data.get_info("cifar11")
  message = str(error.value)
  assert "\n" not in message
  assert "'cifar11'" in message and "kd_digits" in message


def test_unprepared_tfds_dataset_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError) as error:
    data.get_info("cifar100", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert "not prepared" in message and "tfds build cifar100" in message
  assert str(tmp_path) in message


# --- train iterator ----------------------------------------------------------------


def test_train_batches_have_shapes_and_dtypes(digits_config):
  (batch,) = train_batches(digits_config, 1)
  assert batch["image"].shape == (BATCH, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
  assert set(batch["label"]) <= set(range(10))
  assert batch["index"].shape == (BATCH,) and batch["index"].dtype == np.int32


def test_index_is_the_position_in_the_train_split(digits_config):
  config = raw_pixels(with_fields(digits_config, augment="none"))
  builder = tfds.builder("kd_digits", data_dir=config.data_dir)
  split = list(tfds.as_numpy(builder.as_dataset(split="train")))
  batches = train_batches(config, STEPS_PER_EPOCH + 1)
  for batch in batches[:3] + batches[-1:]:
    for image, label, index in zip(batch["image"], batch["label"], batch["index"]):
      np.testing.assert_array_equal(as_uint8(image), split[index]["image"])
      assert label == split[index]["label"]
  # One epoch visits distinct examples; the next epoch starts over.
  epoch = np.concatenate([b["index"] for b in batches[:STEPS_PER_EPOCH]])
  assert len(set(epoch)) == len(epoch) == STEPS_PER_EPOCH * BATCH
  assert set(epoch) <= set(range(1438))


def test_same_seed_same_batches_other_seed_different(digits_config):
  first = train_batches(digits_config, 3, seed=7)
  assert_batches_equal(train_batches(digits_config, 3, seed=7), first)
  other = train_batches(digits_config, 3, seed=8)
  assert not np.array_equal(other[0]["image"], first[0]["image"])


@pytest.mark.parametrize("start_step", [5, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3])
def test_resume_yields_the_uninterrupted_batches(digits_config, start_step):
  uninterrupted = train_batches(digits_config, STEPS_PER_EPOCH + 6)
  resumed = train_batches(digits_config, len(uninterrupted) - start_step,
                          start_step=start_step)
  assert_batches_equal(resumed, uninterrupted[start_step:])


@pytest.fixture(scope="session")
def array_record_config(tmp_path_factory):
  """kd_digits prepared as ArrayRecord: a source read by index from disk."""
  config = data.default_data_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds_array_record"))
  tfds.builder("kd_digits", data_dir=config.data_dir).download_and_prepare(
      file_format="array_record")
  return config


@pytest.mark.parametrize("cache", [False, "false", True])
def test_random_access_sources_give_one_stream(digits_config, array_record_config,
                                               cache):
  # The split in memory (TFRecord, cached) and ArrayRecord read by index, with or
  # without its cache: the same batches, across an epoch boundary.
  steps = STEPS_PER_EPOCH + 1
  assert_batches_equal(
      train_batches(with_fields(array_record_config, cache=cache), 2,
                    start_step=steps - 2),
      train_batches(digits_config, steps)[-2:])


def test_array_record_eval_is_read_through_the_data_source(digits_config,
                                                           array_record_config):
  # TFDS cannot `as_dataset` ArrayRecord: the eval split is read by index in file
  # order, and equals the TFRecord copy's.
  def eval_batches(config):
    return list(data.eval_iterator(config, batch_size=BATCH, process_index=0,
                                   process_count=1))
  assert_batches_equal(eval_batches(with_fields(array_record_config, cache=False)),
                       eval_batches(digits_config))


@contextlib.contextmanager
def recorded_reads():
  """The index lists read from ArrayRecord data sources while inside."""
  reads = []
  original = array_record_source.ArrayRecordDataSource.__getitems__

  def getitems(self, keys):
    reads.append(list(keys))
    return original(self, keys)

  with mock.patch.object(array_record_source.ArrayRecordDataSource, "__getitems__",
                         getitems):
    yield reads


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_read_only_their_share_of_the_single_host_stream(array_record_config,
                                                               process_count):
  config = with_fields(array_record_config, cache=False)
  start, steps = STEPS_PER_EPOCH - 2, 4  # Resumed, and across an epoch boundary.
  single = train_batches(config, 40, start_step=start)  # Covers any read-ahead.
  per_host = BATCH // process_count
  for i in range(process_count):
    with recorded_reads() as reads:
      host = train_batches(config, steps, start_step=start, process_index=i,
                           process_count=process_count)
    own = [b["index"][i * per_host:(i + 1) * per_host].tolist() for b in single]
    # Every read is this host's slice of one step: no other host's record is read.
    assert reads and all(keys in own for keys in reads)
    for k in range(steps):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(
            host[k][key], single[k][key][i * per_host:(i + 1) * per_host])


def test_per_host_ranges_where_there_is_no_random_access(digits_config):
  # TFRecord, not held in memory: host i reads examples [i n, (i + 1) n) of the split
  # only; each epoch all hosts together visit distinct examples; resume is exact.
  config = with_fields(digits_config, cache=False)
  n = 1438 // 2
  hosts = [train_batches(config, STEPS_PER_EPOCH + 2, process_index=i,
                         process_count=2) for i in range(2)]
  for i, host in enumerate(hosts):
    seen = np.concatenate([b["index"] for b in host[:STEPS_PER_EPOCH]])
    assert seen.min() >= i * n and seen.max() < (i + 1) * n
  epoch = np.concatenate([b["index"] for h in hosts for b in h[:STEPS_PER_EPOCH]])
  assert len(set(epoch)) == len(epoch) == STEPS_PER_EPOCH * BATCH
  resumed = train_batches(config, 3, start_step=STEPS_PER_EPOCH - 1, process_index=1,
                          process_count=2)
  assert_batches_equal(resumed, hosts[1][-3:])


def test_bad_cache_option(digits_config):
  with pytest.raises(ValueError, match="data.cache"):
    data.get_info(with_fields(digits_config, cache="sometimes"))


def test_config_fields_can_be_set_from_the_command_line():
  config = data.default_data_config()
  config.image_size, config.mean, config.cache = 32, (0.5, 0.5, 0.5), False
  assert (config.image_size, config.mean, config.cache) == (32, (0.5, 0.5, 0.5), False)
  assert all(config.get_ref(key).get_type() is not type(None)
             for key in config if config[key] is None)


def test_epochs_are_reshuffled_and_reaugmented(digits_config):
  batches = train_batches(digits_config, STEPS_PER_EPOCH + 1)
  assert not np.array_equal(batches[0]["label"], batches[STEPS_PER_EPOCH]["label"])


def test_hosts_split_each_global_batch(digits_config):
  steps = STEPS_PER_EPOCH + 2  # Crosses an epoch boundary.
  single = train_batches(digits_config, steps)
  hosts = [train_batches(digits_config, steps, process_index=i, process_count=2)
           for i in range(2)]
  for step in range(steps):
    parts = [host[step] for host in hosts]
    assert parts[0]["image"].shape == (BATCH // 2, 8, 8, 1)
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), single[step][key])
  # A host resumes its own slice of the stream.
  resumed = train_batches(digits_config, 3, start_step=steps - 3, process_index=1,
                          process_count=2)
  assert_batches_equal(resumed, hosts[1][-3:])


def test_hosts_slices_are_disjoint_examples(digits_config):
  config = raw_pixels(with_fields(digits_config, augment="none"))
  dataset = collections.Counter(image.tobytes() for image in train_split_images(config))
  seen = collections.Counter()
  for i in range(2):  # One epoch of both hosts: no training example is used twice.
    for batch in train_batches(config, STEPS_PER_EPOCH, process_index=i,
                               process_count=2):
      seen.update(image.tobytes() for image in as_uint8(batch["image"]))
  assert sum(seen.values()) == STEPS_PER_EPOCH * BATCH
  assert not seen - dataset


def test_example_seeds_fold_epoch_and_position_into_the_seed():
  fold_in = tf.random.experimental.stateless_fold_in
  expected = [fold_in(fold_in(tf.constant([5, 1], tf.int64), tf.constant(3, tf.int64)),
                      tf.constant(p, tf.int64)) for p in (0, 7, 100)]
  np.testing.assert_array_equal(
      pipeline.example_seeds(5, 3, tf.constant([0, 7, 100])), expected)


def test_batch_must_split_evenly_over_hosts(digits_config):
  with pytest.raises(ValueError, match="divisible"):
    data.train_iterator(digits_config, global_batch_size=63, seed=0,
                        process_index=0, process_count=2)


# --- eval iterator and representative images ---------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(digits_config, process_count):
  per_host = [list(data.eval_iterator(digits_config, batch_size=BATCH,
                                      process_index=i, process_count=process_count))
              for i in range(process_count)]
  num_steps = -(-359 // BATCH)
  assert all(len(batches) == num_steps for batches in per_host)
  batches = [b for batches in per_host for b in batches]
  assert all(b["image"].shape == (BATCH // process_count, 8, 8, 1) for b in batches)
  assert sum(b["mask"].sum() for b in batches) == 359
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  builder = tfds.builder("kd_digits", data_dir=digits_config.data_dir)
  expected = [ex["label"] for ex in tfds.as_numpy(builder.as_dataset(split="test"))]
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(expected))


def test_representative_images(digits_config):
  images = data.representative_images(digits_config, 10)
  assert images.shape == (10, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(images, data.representative_images(digits_config, 10))
  # Not augmented: every image is a training image, and they are not all one class.
  config = raw_pixels(digits_config)
  train = {image.tobytes() for image in train_split_images(config)}
  pixels = as_uint8(data.representative_images(config, 10))
  assert all(image.tobytes() in train for image in pixels)
  assert len({image.tobytes() for image in pixels}) == 10


# --- TFDS datasets by name (mocked: no data files needed) --------------------------


def test_mock_cifar10_flows_through_the_pipelines():
  config = with_fields(data.default_data_config(), name="cifar10")
  with tfds.testing.mock_data(num_examples=100):
    info = data.get_info(config)
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    (batch,) = train_batches(config, 1, global_batch_size=16)
    eval_batches = list(data.eval_iterator(config, batch_size=16, process_index=0,
                                           process_count=1))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].dtype == np.int32
  assert sum(b["mask"].sum() for b in eval_batches) == 100


def test_mock_cifar100_batches_carry_the_coarse_labels():
  config = with_fields(data.default_data_config(), name="cifar100",
                       extra_labels=("coarse_label",))
  with tfds.testing.mock_data(num_examples=40):
    builder = tfds.builder("cifar100")
    coarse = {split: np.array([e["coarse_label"] for e in tfds.as_numpy(
        builder.as_dataset(split=split, shuffle_files=False))])
              for split in ("train", "test")}
    (batch,) = train_batches(config, 1, global_batch_size=16)
    eval_batches = list(data.host_eval_iterator(config, batch_size=16))
    assert len(data.label_names(config, "coarse_label")) == 20
    assert len(data.label_names(config)) == 100
    with pytest.raises(ValueError, match="cifar100 has no label feature fine_label "
                       r"\(its ClassLabel features beside 'label': coarse_label\); "
                       "change data.extra_labels$"):
      data.get_info(with_fields(config, extra_labels=("fine_label",)))
  # The example at `index` (file order) carries its own coarse label.
  np.testing.assert_array_equal(batch["labels/coarse_label"],
                                coarse["train"][batch["index"]])
  assert batch["labels/coarse_label"].dtype == np.int32
  keep = np.concatenate([b["mask"] for b in eval_batches]) > 0
  carried = np.concatenate([b["labels/coarse_label"] for b in eval_batches])
  np.testing.assert_array_equal(carried[keep], coarse["test"])


def test_mock_imagenet_crops_images_of_any_size():
  config = with_fields(data.default_data_config(), name="imagenet2012", image_size=24)
  with tfds.testing.mock_data(num_examples=20):
    assert data.get_info(config).eval_split == "validation"
    (batch,) = train_batches(config, 1, global_batch_size=4)
    (eval_batch, *_) = data.eval_iterator(config, batch_size=4, process_index=0,
                                          process_count=1)
  assert batch["image"].shape == eval_batch["image"].shape == (4, 24, 24, 3)
  assert np.isfinite(batch["image"]).all()


# --- preprocessing ops: eagerly and inside tf.data ---------------------------------


def eager_and_graph(fn, *args):
  """`fn(*args)` run eagerly and inside a tf.data map, as numpy."""
  eager = fn(*args)
  graph = next(iter(tf.data.Dataset.from_tensors(args).map(fn)))
  return np.asarray(eager), np.asarray(graph)


TINY = tf.constant(np.arange(1, 13, dtype=np.uint8).reshape(3, 4, 1))  # 1..12 rows.
SEED = tf.constant([3, 4], tf.int64)


def test_normalize():
  mean, std = (0.5, 0.25), (0.5, 0.25)
  image = tf.constant([[[0, 255]]], tf.uint8)
  for out in eager_and_graph(lambda x: preprocess.normalize(x, mean, std), image):
    np.testing.assert_allclose(out, [[[-1.0, 3.0]]])
    assert out.dtype == np.float32


def test_pad_and_crop_at_fixed_offsets():
  # Offset (pad, pad) is the identity; (0, 0) shifts down-right, zeros shifted in.
  for out in eager_and_graph(lambda x: preprocess.pad_and_crop(x, 1, [1, 1]), TINY):
    np.testing.assert_array_equal(out, TINY)
  for out in eager_and_graph(lambda x: preprocess.pad_and_crop(x, 1, [0, 0]), TINY):
    np.testing.assert_array_equal(out[..., 0],
                                  [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7]])
  for out in eager_and_graph(lambda x: preprocess.pad_and_crop(x, 1, [2, 1]), TINY):
    np.testing.assert_array_equal(out[..., 0],
                                  [[5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 0]])


def test_random_pad_and_crop_is_a_seeded_shift():
  eager, graph = eager_and_graph(
      lambda x, s: preprocess.random_pad_and_crop(x, s, 2), TINY, SEED)
  np.testing.assert_array_equal(eager, graph)
  shifts = [preprocess.pad_and_crop(TINY, 2, [dy, dx]).numpy()
            for dy in range(5) for dx in range(5)]
  assert any(np.array_equal(eager, shift) for shift in shifts)
  outputs = {preprocess.random_pad_and_crop(TINY, [s, 0], 2).numpy().tobytes()
             for s in range(20)}
  assert len(outputs) > 5


def test_random_flip():
  flipped = TINY[:, ::-1].numpy()
  outputs = []
  for s in range(8):
    eager, graph = eager_and_graph(preprocess.random_flip_left_right, TINY,
                                   tf.constant([s, 0], tf.int64))
    np.testing.assert_array_equal(eager, graph)
    assert np.array_equal(eager, TINY) or np.array_equal(eager, flipped)
    outputs.append(np.array_equal(eager, flipped))
  assert any(outputs) and not all(outputs)


def test_resize():
  image = tf.fill([2, 2, 3], tf.constant(7, tf.uint8))
  for out in eager_and_graph(lambda x: preprocess.resize(x, (4, 6)), image):
    np.testing.assert_allclose(out, np.full((4, 6, 3), 7.0))


def test_random_resized_crop():
  image = tf.reshape(tf.range(60 * 40 * 3, dtype=tf.float32), [60, 40, 3])
  eager, graph = eager_and_graph(
      lambda x, s: preprocess.random_resized_crop(x, s, (16, 16)), image, SEED)
  assert eager.shape == (16, 16, 3)
  np.testing.assert_allclose(eager, graph, rtol=1e-6)
  other = preprocess.random_resized_crop(image, tf.constant([5, 6], tf.int64), (16, 16))
  assert not np.allclose(eager, other)


def test_resize_shorter_and_center_crop():
  # 8x16 image, left half 0, right half 255; resize to 16x32 (shorter side 8 / 0.5),
  # centre 8x8 crop spans columns 12..19: half 0, half 255.
  image = tf.constant(np.repeat([[0] * 8 + [255] * 8], 8, axis=0)[..., None], tf.uint8)
  for out in eager_and_graph(
      lambda x: preprocess.resize_shorter_and_center_crop(x, (8, 8), 0.5), image):
    assert out.shape == (8, 8, 1)
    np.testing.assert_allclose(out[:, :3], 0, atol=1e-3)
    np.testing.assert_allclose(out[:, -3:], 255, atol=1e-3)


@pytest.mark.parametrize("name", ["none", "cifar", "imagenet"])
def test_augmentation_presets_eagerly_and_in_graph(name):
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 10, 3)), tf.uint8)
  augmentation = preprocess.get_augmentation(name, image_size=(8, 8), pad=2, flip=True)
  train_eager, train_graph = eager_and_graph(augmentation.train, image, SEED)
  eval_eager, eval_graph = eager_and_graph(augmentation.eval, image)
  np.testing.assert_allclose(train_eager, train_graph, rtol=1e-5)
  np.testing.assert_allclose(eval_eager, eval_graph, rtol=1e-5)
  assert train_eager.shape == eval_eager.shape == (8, 8, 3)


def test_unknown_augmentation():
  with pytest.raises(ValueError, match="cifar"):
    preprocess.get_augmentation("autoaugment", image_size=None, pad=4, flip=True)


def test_cifar_augmentation_without_flip_never_mirrors():
  augmentation = preprocess.get_augmentation("cifar", image_size=None, pad=0,
                                              flip=False)
  for s in range(8):
    np.testing.assert_array_equal(
        augmentation.train(TINY, tf.constant([s, 0], tf.int64)), TINY)


# --- edge-condition ops in the training stream ----------------------------------------


def test_edge_ops_apply_to_the_augmented_training_images(digits_config):
  config = raw_pixels(with_fields(
      digits_config, augment="none",
      edge_augment=({"op": "low_light", "prob": 1.0, "severity": 3},)))
  split = train_split_images(config).astype(np.float32)
  (batch,) = train_batches(config, 1)
  # Severity 3: exposure 0.5, gamma 1.6.
  expected = 255 * 0.5 * (split[batch["index"]] / 255) ** 1.6
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-3)


def test_random_edge_ops_are_a_function_of_the_position(digits_config):
  config = with_fields(digits_config, edge_augment=(
      {"op": "cutout", "prob": 0.5, "severity": (1, 5)},
      {"op": "gaussian_noise", "prob": 0.5}))
  steps = 4
  single = train_batches(config, steps)
  assert not np.array_equal(single[0]["image"], train_batches(digits_config, 1)[0]["image"])
  hosts = [train_batches(config, steps, process_index=i, process_count=2) for i in range(2)]
  for step in range(steps):
    np.testing.assert_array_equal(
        np.concatenate([host[step]["image"] for host in hosts]), single[step]["image"])
  assert_batches_equal(train_batches(config, 2, start_step=2), single[2:])


def test_bad_edge_augment_fails_when_the_data_is_resolved(digits_config):
  with pytest.raises(ValueError, match=r"data.edge_augment\[0\]: unknown edge op 'fog'"):
    data.get_info(with_fields(digits_config, edge_augment=({"op": "fog"},)))


def _labels_in_file_order(config, split):
  builder = tfds.builder(config.name, data_dir=config.data_dir)
  return np.array([int(ex["label"]) for ex in builder.as_dataset(
      split=split, shuffle_files=False).as_numpy_iterator()])


def test_validation_is_the_tail_of_the_train_split_and_never_trained_on(digits_config):
  config = copy.deepcopy(digits_config)
  config.train_split, config.validation_fraction, config.augment = "train[:20%]", 0.1, "none"
  labels = _labels_in_file_order(config, "train[:20%]")  # 288 examples
  info = data.get_info(config)
  # round(0.1 * 288) = 29 held out: examples 259..287 of the split, in file order.
  assert (info.num_train, info.num_validation) == (259, 29)
  batches = list(data.eval_iterator(config, batch_size=32, split="validation"))
  got = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(got, labels[259:])
  train = list(data.eval_iterator(config, batch_size=32, split="train"))
  np.testing.assert_array_equal(
      np.concatenate([b["label"][b["mask"] > 0] for b in train]), labels[:259])
  # An epoch of training batches: 8 x 32 distinct examples of the first 259 positions.
  seen = np.concatenate([b["index"] for b in take(
      data.train_iterator(config, global_batch_size=32, seed=0), 259 // 32)])
  assert seen.max() <= 258 and len(np.unique(seen)) == 256


def test_named_validation_split_and_bad_validation_settings(digits_config):
  config = copy.deepcopy(digits_config)
  config.train_split, config.validation_split = "train[:50%]", "train[50%:60%]"
  info = data.get_info(config)
  assert (info.num_train, info.num_validation) == (719, 144)
  config.validation_fraction = 0.1
  with pytest.raises(ValueError, match="set one of data.validation_split and "
                                       "data.validation_fraction"):
    data.get_info(config)
  config.validation_split, config.validation_fraction = None, 1.0
  with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\)"):
    data.get_info(config)
  config.validation_fraction = 0.0
  with pytest.raises(ValueError, match="has no validation split; set data.validation"):
    next(data.eval_iterator(config, batch_size=32, split="validation"))


# --- subsets: data.examples, data.classes -------------------------------------------


def test_subset_holds_exactly_the_chosen_examples(digits_config, array_record_config,
                                                  tmp_path):
  labels = data.train_labels(digits_config)
  assert len(labels) == 1438 and np.bincount(labels)[3] == 146
  positions = [0, 5, 17, 200, 201, 700, 1437] + list(range(300, 360))
  kept = [p for p in sorted(positions) if labels[p] in (1, 3, 7)]
  subset = raw_pixels(with_fields(digits_config, augment="none", examples=positions,
                                  classes=(1, 3, 7)))
  info = data.get_info(subset)
  assert info.num_train == len(kept)
  assert info.num_eval == sum(1 for e in tfds.as_numpy(tfds.builder(
      "kd_digits", data_dir=digits_config.data_dir).as_dataset("test"))
                              if e["label"] in (1, 3, 7))
  # The training examples in file order are those positions; `index` counts within
  # the subset.
  (train,) = data.eval_iterator(subset, batch_size=len(kept), split="train",
                                process_index=0, process_count=1)
  np.testing.assert_array_equal(as_uint8(train["image"]),
                                train_split_images(digits_config)[kept])
  batch = BATCH // 16
  steps = len(kept) // batch + 1  # across an epoch boundary
  stream = train_batches(subset, steps, global_batch_size=batch)
  for b in stream:
    np.testing.assert_array_equal(as_uint8(b["image"]),
                                  as_uint8(train["image"][b["index"]]))
  # Random-access sources (in memory; ArrayRecord read by index, the positions from a
  # file) and resume agree.
  np.save(tmp_path / "positions.npy", np.array(positions))
  by_index = with_fields(subset, cache=False, data_dir=array_record_config.data_dir,
                         examples=str(tmp_path / "positions.npy"))
  assert_batches_equal(train_batches(by_index, 2, global_batch_size=batch,
                                     start_step=steps - 2), stream[-2:])
  evals = [list(data.eval_iterator(c, batch_size=BATCH, process_index=0, process_count=1))
           for c in (subset, with_fields(subset, data_dir=array_record_config.data_dir))]
  assert_batches_equal(*evals)
  assert {int(l) for b in evals[0] for l, m in zip(b["label"], b["mask"]) if m} == {1, 3, 7}


def test_bad_subsets_fail_in_one_line(digits_config, tmp_path):
  (tmp_path / "p.json").write_text("[4, 4]")
  for fields, message in [
      (dict(examples=(1, 1)), "distinct non-negative positions.*fix data.examples"),
      (dict(examples=str(tmp_path / "p.json")), "distinct non-negative"),
      (dict(examples=(2, 1438)), "reaches position 1438 but train has 1438 examples"),
      (dict(examples=(0,), classes=(9,)), "keep no example of train; change them")]:
    with pytest.raises(ValueError, match=message) as error:
      data.get_info(with_fields(digits_config, **fields))
    assert "\n" not in str(error.value)
