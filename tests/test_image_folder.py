"""Tests of folder datasets (`data.name='folder:PATH'`): a few tiny PNGs written here."""

import copy

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax import data
from kd_jax.data import curriculum as curriculum_lib

CLASSES = ("cat", "dog", "owl")


def write_png(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(image))


def pattern(k, size=(8, 8)):
  """Image k: distinct values in every pixel and channel (uint8 [H, W, 3])."""
  h, w = size
  y, x = np.mgrid[:h, :w]
  return np.stack([(k * 37 + 3 * y + x) % 256, (k * 11 + 29 * x) % 256,
                   (200 - k * 13 - 17 * y) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(root, {file name: uint8 image}): 3 classes, 3 train / 1 test image each, 8x8;
  one training image grayscale (decoded to 3 equal channels)."""
  root = tmp_path_factory.mktemp("images")
  images = {}
  for c, name in enumerate(CLASSES):
    for i in range(3):
      image = pattern(3 * c + i)
      if (c, i) == (2, 1):
        image = image[..., :1]
      write_png(root / "train" / name / f"{i}.png", image)
      images[str(root / "train" / name / f"{i}.png")] = np.broadcast_to(image, (8, 8, 3))
    image = pattern(20 + c)
    write_png(root / "test" / name / "0.png", image)
    images[str(root / "test" / name / "0.png")] = image
  return root, images


def folder_config(root, **overrides):
  config = data.default_data_config()
  config.name = f"folder:{root}"
  config.update(overrides)
  return config


def file_order(root, split):
  """The file names of `split` in the order TFDS's ImageFolder reads them."""
  ds = tfds.ImageFolder(str(root)).as_dataset(split=split, shuffle_files=False)
  return [ex["image/filename"].decode() for ex in tfds.as_numpy(ds)]


def normalised(image, mean, std):
  return (image.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)


def train_statistics(images):
  """Per-channel mean and std, [0, 1] pixels, of the training images: by hand."""
  train = np.stack([v for k, v in images.items() if "/train/" in k]) / 255.0
  return train.mean((0, 1, 2)), train.std((0, 1, 2))


def test_info_comes_from_the_data(folder):
  root, _ = folder
  info = data.get_info(folder_config(root))
  assert (info.num_classes, info.image_shape) == (3, (8, 8, 3))
  assert (info.num_train, info.num_eval, info.eval_split) == (9, 3, "test")


def test_file_order_is_deterministic_and_splits_can_be_sliced(folder):
  root, _ = folder
  order = file_order(root, "train")
  assert order == file_order(root, "train")
  assert sorted(order) == sorted(str(p) for p in root.glob("train/*/*.png"))
  config = folder_config(root, train_split="train[:4]+test", augment="none")
  (batch,) = list(data.eval_iterator(config, batch_size=8, split="train",
                                     process_index=0, process_count=1))
  names = order[:4] + file_order(root, "test")
  assert [CLASSES[i] for i in batch["label"][:7]] == [n.split("/")[-2] for n in names]


def test_batches_hold_the_images_normalised_by_the_train_statistics(folder):
  root, images = folder
  mean, std = train_statistics(images)
  config = folder_config(root, augment="none")
  train_files = file_order(root, "train")
  batch = next(data.train_iterator(config, global_batch_size=4, seed=0,
                                   process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
  for image, label, index in zip(batch["image"], batch["label"], batch["index"]):
    name = train_files[index]
    assert CLASSES[label] == name.split("/")[-2]
    np.testing.assert_allclose(image, normalised(images[name], mean, std), atol=1e-5)
  (batch,) = list(data.eval_iterator(config, batch_size=4, process_index=0,
                                     process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 0])
  for i, name in enumerate(file_order(root, "test")):
    np.testing.assert_allclose(batch["image"][i], normalised(images[name], mean, std),
                               atol=1e-5)


def test_the_rest_of_the_pipeline_runs_on_a_folder(folder):
  root, _ = folder
  config = folder_config(root, validation_fraction=1 / 3, views=(
      {"name": "plain", "augment": "none"},), edge_augment=(
          {"op": "gaussian_noise", "prob": 0.5, "severity": 2},))
  info = data.get_info(config)
  assert (info.num_train, info.num_validation) == (6, 3)
  kw = dict(global_batch_size=2, seed=1, process_index=0, process_count=1)
  stream = data.train_iterator(config, **kw)
  batches = [next(stream) for _ in range(4)]
  resumed = next(data.train_iterator(config, start_step=3, **kw))
  for key in batches[3]:
    np.testing.assert_array_equal(batches[3][key], resumed[key])
  assert batches[0]["view/plain"].shape == (2, 8, 8, 3)
  assert max(b["index"].max() for b in batches) < 6
  uncached = next(data.train_iterator(folder_config(root, cache=False), **kw))
  assert uncached["image"].shape == (2, 8, 8, 3)
  validation = list(data.eval_iterator(config, batch_size=3, split="validation",
                                       process_index=0, process_count=1))
  assert validation[0]["mask"].sum() == 3
  assert data.representative_images(config, 4).shape == (4, 8, 8, 3)
  curriculum = curriculum_lib.Curriculum(np.arange(6, dtype=np.float32), "linear",
                                         start_fraction=0.5, full_step=2)
  paced = next(data.train_iterator(config, curriculum=curriculum, **kw))
  assert set(paced["index"]) <= {0, 1, 2}


def test_images_of_varying_size_need_image_size_and_are_resized(tmp_path):
  small, large = pattern(1), pattern(2, (12, 10))
  write_png(tmp_path / "train" / "a" / "0.png", small)
  write_png(tmp_path / "train" / "b" / "0.png", large)
  write_png(tmp_path / "test" / "a" / "0.png", large)
  with pytest.raises(ValueError, match=r"differ in size; set --config.data.image_size$"):
    data.get_info(folder_config(tmp_path))
  config = folder_config(tmp_path, image_size=6, augment="none", mean=(0.0,), std=(1.0,))
  assert data.get_info(config).image_shape == (6, 6, 3)
  batch = next(data.train_iterator(config, global_batch_size=2, seed=0,
                                   process_index=0, process_count=1))
  assert batch["image"].shape == (2, 6, 6, 3)
  (batch,) = list(data.eval_iterator(config, batch_size=1, process_index=0,
                                     process_count=1))
  expected = tf.image.resize(large, (6, 6), method="bilinear", antialias=True) / 255
  np.testing.assert_allclose(batch["image"][0], expected, atol=1e-6)


def test_errors_are_one_line_and_name_what_to_change(tmp_path, folder):
  root, _ = folder

  def error(config):
    with pytest.raises(ValueError) as e:
      data.get_info(config)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "is not a directory" in error(folder_config(tmp_path / "nowhere"))
  write_png(tmp_path / "test" / "a" / "0.png", pattern(0))
  (tmp_path / "extra").mkdir()
  assert error(folder_config(tmp_path)).endswith(
      "has no split 'train' (its subfolders: extra, test); add train/<class>/ images "
      "or set data.train_split to one of them")
  (tmp_path / "train" / "a").mkdir(parents=True)
  assert "train/ holds no images" in error(folder_config(tmp_path))
  message = error(folder_config(root, eval_split="validation"))
  assert "no split 'validation' (its subfolders: test, train)" in message
  assert "data.eval_split" in message
