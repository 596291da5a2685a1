"""Deterministic, exactly resumable, host-sharded input pipelines over TFDS datasets
and folders of images (`data.name='folder:PATH'`, read with `tfds.ImageFolder`).

The training stream is defined position by position, so that it is reproducible and
cheap to resume, and each host reads only the examples it trains on:

- epoch `e` visits the training split in the order of a permutation of the example
  indices seeded by (seed, e) (`stateless_shuffle`, the same on every host);
- the example at position `p` of epoch `e` is augmented with stateless random ops
  seeded by (seed, e, p);
- global batch `s` of epoch `e` is positions [s * B, (s + 1) * B) of that order (the
  last incomplete batch of each epoch is dropped), and host `i` of `P` takes positions
  [s * B + i * B/P, s * B + (i + 1) * B/P) of it, so the hosts' slices of a step,
  concatenated in host order, are exactly the single-host global batch.

Host `i` reads the records at its positions only, by index, from a random-access
source: the split held in memory (`data.cache`, small datasets: read once), or an
ArrayRecord-prepared dataset's data source (`tfds build --file_format=array_record`),
which reads just those records. A TFRecord split not held in memory has no random
access; there host `i` reads only examples [i * n, (i + 1) * n) of the split (file
order, n = N // P, a TFDS split slice: the other files are never opened), shuffles
them each epoch with a buffer seeded by (seed, e), and takes B/P of them per step.
The guarantees then differ (docs/scaling.md):

- random access: the global stream does not depend on the host count, and resume is
  exact (step `k` starts at epoch `k // steps_per_epoch`, step `k % steps_per_epoch`,
  nothing before it read);
- per-host ranges: each epoch the hosts together visit distinct examples and resume
  is exact for a fixed host count, but the stream depends on the host count.

Each training example carries `index`, its position in the training split in file
order (before shuffling): the row of per-example state such as CRD's memory bank.
A subset (`data.examples`, `data.classes`) is a split of its own: its examples in file
order, counted and indexed within it.
Each host batch is decoded and augmented as one tf.data element (`tf.map_fn` over its
examples): per-element tf.data overhead, not augmentation, dominates for small images.

With a curriculum (`kd_jax.data.curriculum`) the stream is defined by the step
instead: global batch `s` is `B` distinct examples drawn, with seeds (seed, s), from the
easiest examples that the pacing function admits at step `s`, host `i` takes entries
[i * B/P, (i + 1) * B/P) of that draw, and the example at entry `p` is augmented with
seeds (seed, s, p). Only the indices and scores are held per example; the images are
read by index like the epoch stream's (a TFRecord split not cached is then held in
memory encoded). Batches then also carry each example's `difficulty`.

Edge-condition ops (`data.edge_augment`, see `augment`) run after the preset's
augmentation, seeded by the same per-example seed; with none configured, the stream is
exactly the one without them.

Determinism relies on the op-level seeds only; do not set TensorFlow's global seed
(`tf.random.set_seed`), which would change the shuffle order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import hashlib
import json
import math
import os
from typing import Optional, Union

import jax
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.data import augment
from kd_jax.data import curriculum as curriculum_lib
from kd_jax.data import kd_digits
from kd_jax.data import preprocess
from kd_jax.data import salts

try:  # JAX owns the accelerators; TensorFlow only feeds data from the CPU.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices.
  pass

Batch = dict[str, np.ndarray]
DataConfig = ml_collections.ConfigDict

# Datasets whose builder needs no network: prepared on first use.
_PREPARE_ON_DEMAND = (kd_digits.KdDigits.name,)
_CACHE_LIMIT_BYTES = 1 << 30
_UNCACHED_SHUFFLE_BUFFER = 16_384
_READ_BLOCK = 256  # Records per data-source read when a split is read in file order.
_CORRUPTION_SEED = 0  # Eval corruptions: example p is corrupted with seeds (0, 0, p).
FOLDER_PREFIX = "folder:"  # data.name of a folder of images: 'folder:PATH'.
_FOLDER_SAMPLE = 512  # Training images (file order) a folder's defaults are measured on.

# Defaults of the config fields left at None; mean/std: per channel, [0, 1] pixels.
_DATASET_DEFAULTS = {
    # Computed from the kd_digits train split (tests check these values).
    "kd_digits": dict(
        mean=(0.30553,), std=(0.37595,), augment="cifar", pad=1, flip=False
    ),
    "cifar10": dict(
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        augment="cifar", pad=4, flip=True,
    ),
    # As RepDistiller / mdistiller.
    "cifar100": dict(
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
        augment="cifar", pad=4, flip=True,
    ),
    "imagenet2012": dict(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        augment="imagenet", image_size=224, flip=True, eval_split="validation",
    ),
}


def dataset_defaults(name: str) -> dict:
  """The values a data config's None fields (mean, std, augment, pad, flip) take for
  the dataset `name`."""
  return dict(_DATASET_DEFAULTS.get(name, _GENERIC_DEFAULTS))
# Any other TFDS image dataset: [0, 1] pixels mapped to [-1, 1], no augmentation.
_GENERIC_DEFAULTS = dict(mean=(0.5,), std=(0.5,), augment="none", pad=4, flip=True)


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` block of an experiment config; fields left None take dataset defaults.

  Unset fields are typed placeholders, so they can be set from the command line
  (`--config.data.image_size=32`); a plain None in a ConfigDict cannot be.

  Fields:
    name: a TFDS dataset name ('kd_digits', 'cifar100', 'imagenet2012', ...), or
      'folder:PATH', a folder of images: PATH/<split>/<class>/*.png|jpg, with splits
      train/, test/ and any others (validation/, ...), read in `tfds.ImageFolder`'s
      order (sorted, then shuffled by a fixed seed per split: classes mixed, the same
      on every run). A folder's defaults come from its first 512 training images in
      file order: their size (when they share one), their per-channel mean and std,
      and augment 'cifar' with pad = side / 8 (rounded, at least 1) and flip True:
      random shifts by an eighth of the side and mirroring, the CIFAR recipe (4 px of
      32), cheap at any size and keeping the whole image, where ImageNet's
      random-resized crop needs a chosen size and is too strong for small sets (set
      flip=False where a mirrored image is another class, e.g. digits or text).
      Images of another size than the model input are resized to it.
    data_dir: TFDS data directory; None -> TFDS's default (`TFDS_DATA_DIR` or
      ~/tensorflow_datasets). Unused by folders.
    train_split: TFDS split (slicing allowed, e.g. 'train[:90%]'; on a folder, a
      slice of its subfolders in file order).
    eval_split: None -> 'test', or 'validation' if the dataset has no test split. The
      final figures of a run; touched only once, at the end.
    validation_fraction: the last fraction of each training split (in file order) is
      held out as the validation split (model selection, learning curves); 0 -> none.
    validation_split: a named TFDS split to validate on instead (then
      validation_fraction must be 0).
    image_size: side of the square model input; None -> native size (224 for
      imagenet2012; a folder's sampled size, an error if they differ).
    channels: 1 or 3 to convert the images (RGB to luma, gray to RGB), e.g. to feed a
      folder of PNGs to a model of grayscale digits; None -> the data's own.
    augment: 'none' | 'cifar' | 'imagenet' (see `preprocess`); None -> dataset default
      ('cifar' for kd_digits and CIFAR, 'imagenet' for imagenet2012).
    pad: 'cifar' crop padding in pixels; None -> 1 for kd_digits, 4 otherwise.
    flip: random horizontal flips; None -> False for kd_digits (mirrored digits are
      other symbols), True otherwise.
    mean, std: per-channel tuples in [0, 1] pixel units; None -> dataset statistics.
    shuffle_buffer: the per-epoch shuffle of a host's range where the split has no random
      access (TFRecord, not cached); None -> 16384 (at most the range).
    cache: keep decoded training images in memory: True, False, or 'auto' -> cache
      when the decoded split is under 1 GiB (strings 'true'/'false' also accepted);
      images of varying size (folders) are kept encoded, auto when the files would
      take under 1 GiB.
    edge_augment: edge-condition ops applied to training images after `augment`, a
      tuple of dicts `{'op': name, 'prob': p, 'severity': s or (low, high)}` (see
      `kd_jax.data.augment`); () -> none. From the command line:
      --config.data.edge_augment="({'op': 'jpeg', 'prob': 0.3, 'severity': (1, 5)},)".
    views: more views of each training example, beside 'image' (the view above),
      each a dict `{'name', 'augment', 'edge_augment', 'same_crop'}`: `augment` a
      preset (None -> the data's), `edge_augment` its own edge ops (default none),
      `same_crop` True to draw the preset's crop and flip with the image's seed (a
      paired view: e.g. the clean image behind a corrupted one) instead of the view's
      own. Batches carry `view/<name>`; the objective says which view the teacher and
      the student see (`distill.teacher_view`, a term's `student_view`, ...).
    examples: keep only these positions of `train_split` (file order, counted before
      the validation hold-out): a tuple of ints, or the path of a .npy or .json list
      of them; kept in file order. None -> all.
    classes: keep only the examples of these labels, in every split (labels are not
      renumbered); None -> all.
    extra_labels: names of ClassLabel features of a TFDS dataset carried beside the
      label, as `labels/<name>` (int32 [b], `label_key`) in training and eval batches,
      e.g. ('coarse_label',) on cifar100; () -> none.
  """
  config = ml_collections.ConfigDict()
  config.name = "kd_digits"
  config.data_dir = config_dict.placeholder(str)
  config.train_split = "train"
  config.eval_split = config_dict.placeholder(str)
  config.validation_fraction = 0.0
  config.validation_split = config_dict.placeholder(str)
  config.image_size = config_dict.placeholder(int)
  config.channels = config_dict.placeholder(int)
  config.augment = config_dict.placeholder(str)
  config.pad = config_dict.placeholder(int)
  config.flip = config_dict.placeholder(bool)
  config.mean = config_dict.placeholder(tuple)
  config.std = config_dict.placeholder(tuple)
  config.shuffle_buffer = config_dict.placeholder(int)
  # Typed `object` so both --config.data.cache=False and cache='auto' are accepted.
  config.cache = config_dict.FieldReference("auto", field_type=object)
  config.edge_augment = ()
  config.views = ()
  config.examples = config_dict.FieldReference(None, field_type=object)
  config.classes = config_dict.placeholder(tuple)
  config.extra_labels = ()
  return config


VIEW_DEFAULTS = dict(name=None, augment=None, edge_augment=(), same_crop=False)
MAIN_VIEW = "image"


@dataclasses.dataclass(frozen=True)
class _View:
  """An extra view of each training example (`data.views`), resolved."""

  name: str
  augmentation: preprocess.Augmentation
  edge: Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]
  same_crop: bool


def view_names(data_config: DataConfig) -> tuple[str, ...]:
  """'image' and the names of `data.views`, checked (one-line errors)."""
  names = [MAIN_VIEW]
  for i, view in enumerate(data_config.views):
    unknown = sorted(set(view) - set(VIEW_DEFAULTS))
    if unknown or not view.get("name"):
      raise ValueError(f"data.views[{i}] must be a dict with a name and some of "
                       f"{', '.join(VIEW_DEFAULTS)}, got {dict(view)!r}")
    if view["name"] in names:
      raise ValueError(f"data.views[{i}]: a second view named {view['name']!r}")
    names.append(view["name"])
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a training loop need to know about a dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) after preprocessing.
  num_train: int  # Training examples: the split's first num_train in file order.
  num_eval: int
  train_split: str
  eval_split: str
  num_validation: int = 0
  validation_split: Optional[str] = None  # None: the train split's last num_validation.

  def steps_per_epoch(self, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder of each epoch is dropped)."""
    return self.num_train // global_batch_size


@dataclasses.dataclass(frozen=True)
class _Source:
  """A data config resolved against its TFDS builder."""

  builder: tfds.core.DatasetBuilder
  info: DatasetInfo
  decode: Callable[[tf.Tensor], tf.Tensor]  # Encoded image -> uint8 [H, W, C].
  augmentation: preprocess.Augmentation
  edge: Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]  # (image, seed) -> image
  mean: tuple[float, ...]
  std: tuple[float, ...]
  cache: bool  # Keep training examples in memory ...
  cache_decoded: bool  # ... decoded (only possible when all images have one shape).
  shuffle_buffer: int
  views: tuple[_View, ...] = ()
  # The kept positions of the train, eval and validation splits (`data.examples`,
  # `data.classes`); None: the whole split.
  kept: dict[str, Optional[np.ndarray]] = dataclasses.field(default_factory=dict)
  extra_labels: tuple[str, ...] = ()  # Label features carried as `labels/<name>`.


def label_key(feature: str) -> str:
  """The batch key of the label feature `feature` (`data.extra_labels`)."""
  return f"labels/{feature}"


def label_names(data_config: DataConfig, feature: Optional[str] = None,
                key: str = "data.extra_labels") -> tuple[str, ...]:
  """The class names of the label, or of the label feature `feature` (a TFDS
  ClassLabel's names, a folder's class subfolders; '0', '1', ... where unnamed); an
  unknown feature is an error naming the config `key`."""
  builder = _builder(data_config.name, data_config.data_dir)
  name = _supervised_keys(builder)[1] if feature is None else _label_features(
      builder, data_config.name, (feature,), key)[0]
  return tuple(builder.info.features[name].names)


def _label_features(builder: tfds.core.DatasetBuilder, name: str,
                    features: Sequence[str],
                    key: str = "data.extra_labels") -> tuple[str, ...]:
  """`features`, checked to be ClassLabel features of `builder` beside its label."""
  label = _supervised_keys(builder)[1]
  available = [key for key, feature in builder.info.features.items()
               if isinstance(feature, tfds.features.ClassLabel) and key != label]
  unknown = [f for f in features if f not in available]
  if unknown:
    raise ValueError(f"{name} has no label feature {', '.join(unknown)} (its ClassLabel "
                     f"features beside {label!r}: {', '.join(available) or 'none'}); "
                     f"change {key}")
  return tuple(features)


def _labels(example, label_key: str, extra: Sequence[str]):
  """An example's label, or its label and `extra` label features stacked ([1 + n])."""
  if not extra:
    return example[label_key]
  return tf.stack([tf.cast(example[key], tf.int64) for key in (label_key, *extra)], -1)


def _builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name`, or the `tfds.ImageFolder` of 'folder:PATH';
  kd_digits is prepared on first use."""
  path = _folder_path(name)
  if path is not None:
    if not tf.io.gfile.isdir(path):
      raise ValueError(f"dataset {name}: {path} is not a directory; set "
                       "--config.data.name=folder:PATH to a folder of train/ and test/")
    return tfds.ImageFolder(path)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f"unknown dataset {name!r}: not a registered TFDS builder; use kd_digits or a "
        "TFDS name such as cifar100"
    ) from None
  if builder.name in _PREPARE_ON_DEMAND and not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def _folder_path(name: str) -> Optional[str]:
  """PATH of data.name 'folder:PATH' (user directory expanded); None for TFDS names."""
  if not name.startswith(FOLDER_PREFIX):
    return None
  return os.path.expanduser(name[len(FOLDER_PREFIX):])


def _check_folder_split(builder: tfds.core.DatasetBuilder, name: str, spec: str,
                        key: str) -> None:
  """Raises a one-line error naming `data.<key>` unless each split of the TFDS split
  spec `spec` ('train', 'train[:20%]', ...) is a subfolder holding images."""
  path = _folder_path(name)
  info = builder.info.splits
  for split in (part.split("[")[0].strip() for part in spec.split("+")):
    if split in info and info[split].num_examples:
      continue
    if tf.io.gfile.isdir(os.path.join(path, split)):
      raise ValueError(f"{name}: {split}/ holds no images (png, jpg) in class "
                       f"subfolders; add some to {split}/<class>/ or change data.{key}")
    subfolders = sorted(f.rstrip("/") for f in tf.io.gfile.listdir(path)
                        if tf.io.gfile.isdir(os.path.join(path, f)))
    raise ValueError(f"{name} has no split {split!r} (its subfolders: "
                     f"{', '.join(subfolders) or 'none'}); add {split}/<class>/ images "
                     f"or set data.{key} to one of them")


@dataclasses.dataclass(frozen=True)
class _FolderSample:
  """What a folder's defaults are measured on: its first training images."""

  image_hw: Optional[tuple[int, int]]  # Their shared (height, width); None: they differ.
  mean: tuple[float, ...]  # Per channel, [0, 1] pixels.
  std: tuple[float, ...]
  file_bytes: float  # Mean encoded size.


_FOLDER_SAMPLES: dict[str, _FolderSample] = {}  # By digest of the sampled files.


def _with_channels(decode: Callable[[tf.Tensor], tf.Tensor], declared: int,
                   channels: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """`decode` followed by the conversion to `channels` (RGB to luma, gray to RGB)."""
  if channels == declared:
    return decode
  convert = tf.image.rgb_to_grayscale if channels == 1 else tf.image.grayscale_to_rgb
  return lambda blob: convert(decode(blob))


def _folder_sample(builder: tfds.core.DatasetBuilder, split: str,
                   channels: int) -> _FolderSample:
  """Size, per-channel mean and std of the first `_FOLDER_SAMPLE` images of `split`
  in file order: a bounded, deterministic sample. Decoded once per content (cached by
  the digest of the files), as every pipeline of a run resolves its data again."""
  examples, _ = _read_split(builder, split)
  encoded = next(examples.map(lambda image, label: image).batch(_FOLDER_SAMPLE)
                 .with_options(_options()).as_numpy_iterator())
  digest = hashlib.sha256()
  for blob in encoded:
    digest.update(len(blob).to_bytes(8, "little") + blob)
  key = f"{digest.hexdigest()}/{channels}"
  if key not in _FOLDER_SAMPLES:
    feature = builder.info.features[_supervised_keys(builder)[0]]
    decode = _with_channels(feature.decode_example, feature.shape[-1], channels)

    def summary(blob):
      image = decode(blob)
      pixels = tf.reshape(tf.cast(image, tf.float64) / 255.0, [-1, tf.shape(image)[-1]])
      return (tf.shape(image)[:2], tf.reduce_sum(pixels, 0),
              tf.reduce_sum(tf.square(pixels), 0), tf.shape(pixels)[0])

    sizes, sums, squares, count = set(), 0.0, 0.0, 0
    for hw, total, total_sq, n in tf.data.Dataset.from_tensor_slices(encoded).map(
        summary, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
      sizes.add(tuple(int(v) for v in hw))
      sums, squares, count = sums + total, squares + total_sq, count + n
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    _FOLDER_SAMPLES[key] = _FolderSample(
        image_hw=sizes.pop() if len(sizes) == 1 else None,
        mean=tuple(float(v) for v in mean),
        # A constant channel is left unscaled rather than divided by zero.
        std=tuple(float(v) if v > 0 else 1.0 for v in std),
        file_bytes=float(np.mean([len(blob) for blob in encoded])))
  return _FOLDER_SAMPLES[key]


def _folder_defaults(name: str, sample: _FolderSample, split: str,
                     image_size: Optional[int]) -> dict:
  """The defaults of a folder's data config (see `default_data_config`)."""
  if image_size is None and sample.image_hw is None:
    raise ValueError(f"dataset {name}: the first {_FOLDER_SAMPLE} images of {split} "
                     "differ in size; set --config.data.image_size")
  side = image_size or min(sample.image_hw)
  return dict(mean=sample.mean, std=sample.std, augment="cifar",
              pad=max(1, round(side / 8)), flip=True)


def _supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The (image, label) feature names."""
  return builder.info.supervised_keys or ("image", "label")


def _read_split(builder: tfds.core.DatasetBuilder, split: str,
                extra: Sequence[str] = ()):
  """(undecoded `(image, label)` pairs of a split in file order, number of examples);
  with `extra` label features, `label` is the label and them stacked (`_labels`)."""
  image_key, label_key = _supervised_keys(builder)
  if isinstance(builder, tfds.ImageFolder):
    return _read_folder_split(builder, split)
  if _is_array_record(builder):
    records = _data_source(builder, split)
    lookup = _record_lookup(records, image_key, (label_key, *extra))
    ds = tf.data.Dataset.range(len(records)).batch(_READ_BLOCK).map(
        lookup).unbatch()
    return ds, len(records)
  try:
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
    )
  except AssertionError:  # TFDS's way of saying the data files are missing.
    if builder.is_prepared():
      raise
    name, root = builder.name, builder.data_dir_root
    raise ValueError(
        f"dataset {name} is not prepared in {root}; run `tfds build {name} "
        f"--data_dir {root}` on a machine with network, or point "
        "--config.data.data_dir at a directory where it is prepared"
    ) from None
  num_examples = int(ds.cardinality())
  if num_examples < 0:
    num_examples = builder.info.splits[split].num_examples
  return ds.map(lambda ex: (ex[image_key], _labels(ex, label_key, extra))), num_examples


def _read_folder_split(builder: tfds.ImageFolder, split):
  """`_read_split` of a folder. ImageFolder reads whole subfolders only: a TFDS split
  spec ('train[:20%]', 'train+validation', a ReadInstruction) is read as slices of
  them, in file order."""
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  image_key, label_key = _supervised_keys(builder)
  examples, num_examples = None, 0
  for part in split.to_absolute(builder.info.splits):
    # None bounds: the split's ends.
    start = part.from_ or 0
    stop = builder.info.splits[part.splitname].num_examples if part.to is None else part.to
    whole = builder.as_dataset(split=part.splitname, shuffle_files=False,
                               decoders={image_key: tfds.decode.SkipDecoding()})
    piece = whole.skip(start).take(stop - start).map(
        lambda ex: (ex[image_key], ex[label_key]))
    examples = piece if examples is None else examples.concatenate(piece)
    num_examples += stop - start
  return examples, num_examples


_LABELS: dict[tuple[str, str], np.ndarray] = {}  # By (dataset, split).


def _split_labels(builder: tfds.core.DatasetBuilder, split: str,
                  extra: Sequence[str] = ()) -> np.ndarray:
  """The labels (int64 [N], or [N, 1 + k] with `extra` label features) of a split in
  file order, images left undecoded, read once per process."""
  key = (os.path.join(str(builder.data_dir), builder.name), str(split), tuple(extra))
  if key not in _LABELS:
    examples, _ = _read_split(builder, split, extra)
    _LABELS[key] = np.array([label for _, label in examples.with_options(
        _options()).as_numpy_iterator()], np.int64)
  return _LABELS[key]


def _configured_examples(value) -> Optional[np.ndarray]:
  """`data.examples` as sorted unique positions (int64), or None."""
  if value is None:
    return None
  if isinstance(value, str):
    if value.endswith(".npy"):
      with tf.io.gfile.GFile(value, "rb") as f:
        value = np.load(f)
    else:
      with tf.io.gfile.GFile(value) as f:
        value = json.load(f)
  positions = np.asarray(value, np.int64).reshape(-1)
  if len(np.unique(positions)) != len(positions) or (positions < 0).any():
    raise ValueError("data.examples must list distinct non-negative positions of the "
                     "train split; fix data.examples")
  return np.sort(positions)


def _kept(builder: tfds.core.DatasetBuilder, split: str, examples: Optional[np.ndarray],
          classes: Optional[Sequence[int]]) -> Optional[np.ndarray]:
  """The positions of `split` (file order) among `examples` whose label is in
  `classes`; None (either filter unset) means all."""
  if examples is None and classes is None:
    return None
  size = _read_split(builder, split)[1]
  if examples is not None and examples.size and examples[-1] >= size:
    raise ValueError(f"data.examples reaches position {examples[-1]} but {split} has "
                     f"{size} examples; fix data.examples")
  if classes is None:
    return examples
  keep = np.isin(_split_labels(builder, split), np.asarray(classes, np.int64))
  return np.flatnonzero(keep) if examples is None else examples[keep[examples]]


def _read_kept(builder: tfds.core.DatasetBuilder, split: str,
               kept: Optional[np.ndarray], extra: Sequence[str] = ()):
  """`_read_split` restricted to the positions `kept` (None: all), in file order;
  an ArrayRecord split reads only those records."""
  if kept is None:
    return _read_split(builder, split, extra)
  if _is_array_record(builder):
    image_key, label_key = _supervised_keys(builder)
    lookup = _record_lookup(_data_source(builder, split), image_key, (label_key, *extra))
    ds = tf.data.Dataset.from_tensor_slices(kept).batch(_READ_BLOCK).map(lookup).unbatch()
    return ds, len(kept)
  examples, size = _read_split(builder, split, extra)
  mask = tf.constant(np.isin(np.arange(size), kept))
  ds = examples.enumerate().filter(lambda i, _: mask[i]).map(lambda _, ex: ex)
  return ds, len(kept)


def _is_array_record(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether `builder` is prepared as ArrayRecord (random access by index)."""
  return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def _data_source(builder: tfds.core.DatasetBuilder, split: str):
  """The random-access source of an ArrayRecord split, images left encoded."""
  image_key, _ = _supervised_keys(builder)
  return builder.as_data_source(
      split=split, decoders={image_key: tfds.decode.SkipDecoding()})


def _record_lookup(records, image_key: str, label_keys: Sequence[str]):
  """`lookup(indices) -> (encoded images, labels)`: the records at `indices` (int64
  [n]) of a data source, read inside tf.data (only those records are read); labels
  [n], or [n, k] for k > 1 `label_keys` (`_labels`)."""

  def read(indices):
    examples = records.__getitems__(indices.tolist())
    return (np.array([ex[image_key] for ex in examples], dtype=object),
            np.array([[ex[key] for key in label_keys] if len(label_keys) > 1
                      else ex[label_keys[0]] for ex in examples], dtype=np.int64))

  def lookup(indices):
    images, labels = tf.numpy_function(read, [indices], (tf.string, tf.int64),
                                       stateful=False)
    images.set_shape(indices.shape)
    labels.set_shape(indices.shape.concatenate(
        [len(label_keys)] if len(label_keys) > 1 else []))
    return images, labels

  return lookup


def _parse_cache(value: Union[None, bool, str]) -> Optional[bool]:
  """The `cache` option as True, False or None (auto)."""
  choices = {"auto": None, "none": None, "true": True, "false": False}
  if value is None or isinstance(value, bool):
    return value
  if str(value).lower() not in choices:
    raise ValueError(f"data.cache must be True, False or 'auto', got {value!r}")
  return choices[str(value).lower()]


def _source(data_config: DataConfig) -> _Source:
  """Resolves dataset-dependent defaults and reads the splits' metadata."""
  name = data_config.name
  builder = _builder(name, data_config.data_dir)
  image_key, label_key = _supervised_keys(builder)
  features = builder.info.features
  declared_shape = tuple(features[image_key].shape)
  channels = data_config.get("channels") or declared_shape[-1]
  if channels != declared_shape[-1] and (channels not in (1, 3)
                                         or declared_shape[-1] not in (1, 3)):
    raise ValueError(f"data.channels={channels} is not available for {name} (images "
                     f"of {declared_shape[-1]} channels); use 1 or 3, or leave it unset")
  table = _DATASET_DEFAULTS.get(builder.name, _GENERIC_DEFAULTS)
  eval_split = data_config.eval_split or table.get("eval_split") or (
      "test" if "test" in builder.info.splits or not builder.info.splits
      else "validation")
  sample = None
  if _folder_path(name) is None:
    defaults = table
  else:
    for key in ("train_split", "eval_split", "validation_split"):
      split = eval_split if key == "eval_split" else data_config[key]
      if split:
        _check_folder_split(builder, name, split, key)
    sample = _folder_sample(builder, data_config.train_split, channels)
    defaults = _folder_defaults(name, sample, data_config.train_split,
                                data_config.image_size)

  def option(key):
    value = data_config[key]
    return defaults.get(key) if value is None else value

  classes = data_config.get("classes")
  kept = {"train": _kept(builder, data_config.train_split,
                         _configured_examples(data_config.get("examples")), classes),
          "eval": _kept(builder, eval_split, None, classes),
          "validation": None if not data_config.validation_split else _kept(
              builder, data_config.validation_split, None, classes)}
  num_train = _read_kept(builder, data_config.train_split, kept["train"])[1]
  num_eval = _read_kept(builder, eval_split, kept["eval"])[1]
  if not num_train:
    raise ValueError(f"data.examples and data.classes keep no example of "
                     f"{data_config.train_split}; change them")
  fraction = float(data_config.validation_fraction)
  validation_split = data_config.validation_split
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction}")
  if validation_split and fraction:
    raise ValueError("set one of data.validation_split and data.validation_fraction, "
                     "not both")
  if validation_split:
    num_validation = _read_kept(builder, validation_split, kept["validation"])[1]
  else:
    num_validation = int(round(fraction * num_train))
    num_train -= num_validation
    if fraction and (num_validation == 0 or num_train == 0):
      raise ValueError(f"data.validation_fraction={fraction} of the {num_train + num_validation} "
                       f"examples of {data_config.train_split} leaves an empty split; "
                       "change it")

  # A dataset whose images may differ in size is resized to the model input.
  fixed_shape = None not in declared_shape
  native_shape = declared_shape if sample is None else (
      *(sample.image_hw or (None, None)), declared_shape[-1])
  image_size = option("image_size")
  if image_size is not None:
    image_hw = (image_size, image_size)
  elif None in native_shape[:2]:
    raise ValueError(
        f"dataset {name} has images of varying size; set --config.data.image_size"
    )
  else:
    image_hw = native_shape[:2]
  resize_to = None if image_size is None and fixed_shape else image_hw

  cache = _parse_cache(data_config.cache)
  if cache is None:
    if fixed_shape:
      cache = num_train * math.prod(native_shape) < _CACHE_LIMIT_BYTES
    else:  # Held encoded: a folder's size is estimated from its sample.
      cache = sample is not None and num_train * sample.file_bytes < _CACHE_LIMIT_BYTES
  shuffle_buffer = option("shuffle_buffer") or _UNCACHED_SHUFFLE_BUFFER

  mean, std = (tuple(option(key)) for key in ("mean", "std"))
  mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
  return _Source(
      builder=builder,
      info=DatasetInfo(
          num_classes=features[label_key].num_classes,
          image_shape=(*image_hw, channels),
          num_train=num_train,
          num_eval=num_eval,
          train_split=data_config.train_split,
          eval_split=eval_split,
          num_validation=num_validation,
          validation_split=validation_split,
      ),
      decode=_with_channels(features[image_key].decode_example, declared_shape[-1],
                            channels),
      augmentation=preprocess.get_augmentation(
          option("augment"),
          image_size=resize_to,
          pad=option("pad"),
          flip=option("flip"),
      ),
      edge=augment.compose(data_config.edge_augment, channels),
      mean=mean,
      std=std,
      cache=cache,
      cache_decoded=cache and fixed_shape,
      shuffle_buffer=shuffle_buffer,
      views=_views(data_config, option, resize_to, channels),
      kept=kept,
      extra_labels=_label_features(builder, name, data_config.get("extra_labels", ())),
  )


def _views(data_config, option, resize_to, channels) -> tuple[_View, ...]:
  view_names(data_config)
  views = []
  for spec in data_config.views:
    spec = {**VIEW_DEFAULTS, **dict(spec)}
    views.append(_View(
        name=spec["name"],
        augmentation=preprocess.get_augmentation(
            spec["augment"] or option("augment"),
            image_size=resize_to,
            pad=option("pad"), flip=option("flip")),
        edge=augment.compose(spec["edge_augment"], channels),
        same_crop=bool(spec["same_crop"])))
  return tuple(views)


def train_labels(data_config: DataConfig) -> np.ndarray:
  """The labels (int64 [N]) of every example of `data.train_split` in file order:
  entry p is the label of position p, as `data.examples` counts them."""
  return _split_labels(_builder(data_config.name, data_config.data_dir),
                       data_config.train_split)


def train_label_features(data_config: DataConfig,
                         features: Sequence[str]) -> np.ndarray:
  """The label and the label `features` (`data.extra_labels` names) of every example of
  `data.train_split` in file order: int64 [N, 1 + len(features)], images undecoded."""
  builder = _builder(data_config.name, data_config.data_dir)
  return _split_labels(builder, data_config.train_split,
                       _label_features(builder, data_config.name, features))


def get_info(
    name: Union[str, DataConfig], data_dir: Optional[str] = None
) -> DatasetInfo:
  """Class count, preprocessed image shape and split sizes of a dataset.

  Args:
    name: a dataset name or 'folder:PATH' (with the defaults of
      `default_data_config`), or a data config.
    data_dir: TFDS data directory when `name` is a string (None -> TFDS default).

  Returns:
    The dataset's `DatasetInfo`.

  Raises:
    ValueError: unknown dataset name, a TFDS dataset not prepared in `data_dir`, or
      a folder that is missing, lacks a split or holds images of varying size without
      `image_size`.
  """
  if isinstance(name, str):
    config = default_data_config()
    config.name, config.data_dir = name, data_dir
  else:
    config = name
  return _source(config).info


def _host_partition(
    batch_size: int, process_index: Optional[int], process_count: Optional[int]
) -> tuple[int, int, int]:
  """(process_index, process_count, per-host batch), defaulting to this JAX process."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the {process_count} processes"
    )
  return process_index, process_count, batch_size // process_count


def example_seeds(seed: int, epoch, positions) -> tf.Tensor:
  """Augmentation seeds (int64 [n, 2]) of the examples at `positions` of `epoch`.

  Row k equals `stateless_fold_in(stateless_fold_in([seed, 1], epoch), positions[k])`,
  computed for all positions at once.
  """
  epoch_key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, salts.AUGMENT], tf.int64), tf.cast(epoch, tf.int64))
  positions = tf.cast(positions, tf.int64)
  folded = tf.random.stateless_uniform(
      [], epoch_key, minval=None, maxval=None, dtype=tf.int64)
  return tf.stack([tf.fill(tf.shape(positions), folded), positions], axis=1)


def _epoch_order_key(seed: int, epoch) -> tf.Tensor:
  """The key (int64 [2]) of epoch `epoch`'s global permutation of the training split."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([seed, salts.SHUFFLE], tf.int64), tf.cast(epoch, tf.int64))


def _epoch_shuffle_seed(seed: int, epoch) -> tf.Tensor:
  """The seed of epoch `epoch`'s shuffle (int64 scalar)."""
  return tf.random.stateless_uniform([], _epoch_order_key(seed, epoch), minval=None,
                                     maxval=None, dtype=tf.int64)


def _preprocess_batch(source: _Source, images, labels, *, decoded: bool, train: bool,
                      seeds=None, corruption=None):
  """Decodes (unless `decoded`), augments or eval-crops, corrupts, normalises.

  `train`: the preset's train augmentation then the config's edge ops, seeded by
  `seeds`; otherwise the eval preprocessing then `corruption(image, seed)` if given.
  In training, each of `data.views` is made from the same decoded image with its own
  preset and edge ops, seeded by `seeds` (`same_crop`) or by the view's own seeds.
  Examples are processed one by one (images may differ in size before cropping) with
  `tf.map_fn` inside one tf.data element, which costs far less than one tf.data
  element per example.
  """

  def batch_of(augmentation, edge, crop_seeds, edge_seeds=None):
    """The batch through one preset and edge ops: the preset draws from `crop_seeds`,
    the edge ops from `edge_seeds` (default the same)."""
    def one(args):
      image = args[0] if decoded else source.decode(args[0])
      if train:
        image = augmentation.train(image, args[1])
      else:
        image = augmentation.eval(image)
      image = tf.cast(image, tf.float32)
      return image if edge is None else edge(image, args[-1])

    elems = (images,) if crop_seeds is None else (images, crop_seeds)
    if edge_seeds is not None:
      elems = (*elems, edge_seeds)
    out = tf.map_fn(
        one, elems,
        fn_output_signature=tf.TensorSpec(source.info.image_shape, tf.float32),
    )
    return preprocess.normalize(out, source.mean, source.std)

  labels = tf.cast(labels, tf.int32)
  batch = {
      MAIN_VIEW: batch_of(source.augmentation, source.edge if train else corruption,
                          seeds),
      "label": labels[:, 0] if source.extra_labels else labels,
      **{label_key(f): labels[:, i + 1] for i, f in enumerate(source.extra_labels)},
  }
  if train:
    for i, view in enumerate(source.views):
      own = tf.stack([tf.bitwise.bitwise_xor(seeds[:, 0], salts.VIEW * (i + 1)),
                      seeds[:, 1]], axis=1)
      # A paired view (`same_crop`) crops and flips with the image's seeds and draws
      # its edge ops from its own; any other view draws both from its own.
      batch[f"view/{view.name}"] = batch_of(
          view.augmentation, view.edge, seeds if view.same_crop else own, own)
  return batch


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _split_examples(source: _Source, split: str) -> tuple[tf.data.Dataset, int]:
  """(undecoded (image, label) pairs in file order, their number) of one of a data
  config's splits: 'train' (without the examples held out for validation),
  'validation' or 'eval'."""
  info = source.info
  if split == "eval":
    return _read_kept(source.builder, info.eval_split, source.kept["eval"],
                      source.extra_labels)
  if split == "validation":
    if not info.num_validation:
      raise ValueError("this run has no validation split; set data.validation_fraction "
                       "or data.validation_split")
    if info.validation_split:
      return _read_kept(source.builder, info.validation_split,
                        source.kept["validation"], source.extra_labels)
    examples, _ = _read_kept(source.builder, info.train_split, source.kept["train"],
                             source.extra_labels)
    return examples.skip(info.num_train), info.num_validation
  if split == "train":
    examples, _ = _read_kept(source.builder, info.train_split, source.kept["train"],
                             source.extra_labels)
    return examples.take(info.num_train), info.num_train
  raise ValueError(f"split must be 'train', 'validation' or 'eval', got {split!r}")


def _in_memory_split(source: _Source) -> tuple[tf.Tensor, tf.Tensor]:
  """(images, labels) of the whole training split as two tensors, in file order:
  decoded uint8 [N, H, W, C] when `cache_decoded`, else the encoded images [N]."""
  examples, num_train = _split_examples(source, "train")
  if source.cache_decoded:
    examples = examples.map(lambda image, label: (source.decode(image), label),
                            num_parallel_calls=tf.data.AUTOTUNE)
  return next(iter(examples.batch(num_train).with_options(_options())))


def _train_lookup(source: _Source, *, in_memory_fallback: bool = False):
  """`(lookup, decoded)`: `lookup(indices) -> (images, labels)` reads the training
  examples at `indices` (file order), `decoded` says whether its images are decoded.

  The source: the split held in memory when `data.cache` is on; else the ArrayRecord
  data source, which reads only the records asked for; else, with
  `in_memory_fallback`, the (encoded) split held in memory. None: no random access (a
  TFRecord split not held in memory).
  """
  if source.cache or (in_memory_fallback and not _is_array_record(source.builder)):
    images, labels = _in_memory_split(source)
    return ((lambda indices: (tf.gather(images, indices), tf.gather(labels, indices))),
            source.cache_decoded)
  if _is_array_record(source.builder):
    records = _data_source(source.builder, source.info.train_split)
    image_key, label_key = _supervised_keys(source.builder)
    read = _record_lookup(records, image_key, (label_key, *source.extra_labels))
    kept = source.kept["train"]
    if kept is None:
      return read, False
    return (lambda indices: read(tf.gather(kept, indices))), False  # Subset -> split.
  return None


def _host_range(source: _Source, start: int, count: int) -> tf.data.Dataset:
  """Training examples [start, start + count) in file order as (image, label, index),
  read through a TFDS split slice, so only the files holding them are opened."""
  builder, info = source.builder, source.info
  try:
    (whole,) = tfds.core.ReadInstruction.from_spec(info.train_split).to_absolute(
        builder.info.splits)
    first = (whole.from_ or 0) + start
    examples, _ = _read_split(builder, tfds.core.ReadInstruction(
        whole.splitname, from_=first, to=first + count, unit="abs"), source.extra_labels)
  except (ValueError, TypeError, KeyError):  # A split spec TFDS cannot slice further.
    examples = None
  if examples is None or source.kept["train"] is not None:  # A subset: filtered.
    examples = _split_examples(source, "train")[0].skip(start).take(count)
  return examples.enumerate().map(
      lambda i, example: (*example, tf.cast(i + start, tf.int32)))


def train_dataset(
    data_config: DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    curriculum: Optional[curriculum_lib.Curriculum] = None,
) -> tf.data.Dataset:
  """The infinite tf.data stream behind `train_iterator` (same arguments)."""
  source = _source(data_config)
  process_index, process_count, per_host = _host_partition(
      global_batch_size, process_index, process_count)
  steps_per_epoch = source.info.steps_per_epoch(global_batch_size)
  if steps_per_epoch == 0:
    raise ValueError(
        f"global batch size {global_batch_size} exceeds the {source.info.num_train} "
        f"examples of {data_config.name}:{source.info.train_split}"
    )
  if curriculum is not None:
    return _curriculum_dataset(source, curriculum, global_batch_size, seed, start_step,
                               process_index, process_count)
  start_epoch, skipped_steps = divmod(start_step, steps_per_epoch)
  # This host's positions within each global batch.
  offsets = process_index * per_host + tf.range(per_host, dtype=tf.int64)
  random_access = _train_lookup(source)

  if random_access is not None:
    lookup, decoded = random_access
    num_train = source.info.num_train

    def epoch(epoch_index):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_train, dtype=tf.int64), _epoch_order_key(seed, epoch_index))
      first = tf.where(epoch_index == start_epoch, skipped_steps, 0)
      return tf.data.Dataset.range(tf.cast(first, tf.int64), steps_per_epoch).map(
          lambda step: (epoch_index, step * global_batch_size + offsets,
                        tf.gather(order, step * global_batch_size + offsets)))

    def process(epoch_index, positions, indices):
      images, labels = lookup(indices)
      return {**_preprocess_batch(
          source, images, labels, decoded=decoded, train=True,
          seeds=example_seeds(seed, epoch_index, positions)),
              "index": tf.cast(indices, tf.int32)}
  else:
    # Per-host ranges: host i shuffles and reads only examples [i n, (i + 1) n).
    host_examples = source.info.num_train // process_count
    examples = _host_range(source, process_index * host_examples, host_examples)

    def epoch(epoch_index):
      ordered = examples.shuffle(
          min(source.shuffle_buffer, host_examples),
          seed=_epoch_shuffle_seed(seed, epoch_index), reshuffle_each_iteration=False)
      skip = tf.where(epoch_index == start_epoch, skipped_steps, 0)
      return ordered.batch(per_host, drop_remainder=True).take(
          steps_per_epoch).enumerate().skip(tf.cast(skip, tf.int64)).map(
              lambda step, batch: (epoch_index, step * global_batch_size + offsets,
                                   batch))

    def process(epoch_index, positions, batch):
      images, labels, index = batch
      return {**_preprocess_batch(
          source, images, labels, decoded=False, train=True,
          seeds=example_seeds(seed, epoch_index, positions)), "index": index}

  return (
      tf.data.Dataset.range(start_epoch, tf.int64.max)
      .flat_map(epoch)
      .map(process, num_parallel_calls=tf.data.AUTOTUNE)
      .prefetch(tf.data.AUTOTUNE)
      .with_options(_options())
  )


def _curriculum_dataset(source: _Source, curriculum, global_batch_size: int, seed: int,
                        start_step: int, process_index: int,
                        process_count: int) -> tf.data.Dataset:
  """The curriculum stream (module docstring): step s's draw from the paced pool,
  read by index (`_train_lookup`): only the scores are held per example."""
  num_train = source.info.num_train
  if len(curriculum.difficulty) != num_train:
    raise ValueError(
        f"the curriculum scores {len(curriculum.difficulty)} examples but "
        f"{source.info.train_split} has {num_train}; delete the saved difficulty "
        "scores to recompute them")
  per_host = global_batch_size // process_count
  host_indices = curriculum.sampler(seed=seed, global_batch_size=global_batch_size,
                                    process_index=process_index,
                                    process_count=process_count)
  lookup, decoded = _train_lookup(source, in_memory_fallback=True)
  difficulty = tf.constant(curriculum.difficulty, tf.float32)
  positions = process_index * per_host + tf.range(per_host, dtype=tf.int64)

  def draw(step):
    chosen = host_indices(step)
    images, labels = lookup(chosen)
    batch = _preprocess_batch(
        source, images, labels, decoded=decoded, train=True,
        seeds=example_seeds(seed, step, positions))
    return {**batch, "index": chosen, "difficulty": tf.gather(difficulty, chosen)}

  return (
      tf.data.Dataset.range(start_step, tf.int64.max)
      .map(draw, num_parallel_calls=tf.data.AUTOTUNE)
      .prefetch(tf.data.AUTOTUNE)
      .with_options(_options())
  )


def train_iterator(
    data_config: DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    curriculum: Optional[curriculum_lib.Curriculum] = None,
) -> Iterator[Batch]:
  """Infinite iterator over this host's part of the augmented training batches.

  Args:
    data_config: see `default_data_config`.
    global_batch_size: examples per step summed over all processes.
    seed: determines the epoch orders and the augmentations (see module docstring).
    start_step: yield the uninterrupted stream's batches from this step on.
    process_index: this host's index; None -> `jax.process_index()`.
    process_count: number of hosts; None -> `jax.process_count()`.
    curriculum: draw each step's batch from the examples its pacing admits (see the
      module docstring); None -> the epoch stream.

  Returns:
    An iterator of `{'image': float32 [b, H, W, C] normalised, 'label': int32 [b],
    'index': int32 [b]}` with `b = global_batch_size // process_count`, `index` being
    each example's position in the training split (in file order, before shuffling);
    with a curriculum, also `'difficulty': float32 [b]`, each example's score.
  """
  return train_dataset(
      data_config,
      global_batch_size=global_batch_size,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      curriculum=curriculum,
  ).as_numpy_iterator()


def eval_dataset(
    data_config: DataConfig,
    *,
    batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    corruption: Optional[tuple[str, int]] = None,
    split: str = "eval",
) -> tf.data.Dataset:
  """The finite tf.data stream behind `eval_iterator` (same arguments)."""
  (dataset,) = eval_datasets(data_config, [corruption], batch_size=batch_size,
                             process_index=process_index, process_count=process_count,
                             split=split)
  return dataset


def eval_datasets(
    data_config: DataConfig,
    corruptions: Sequence[Optional[tuple[str, int]]],
    *,
    batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    split: str = "eval",
) -> list[tf.data.Dataset]:
  """`eval_dataset` under each of `corruptions` (None: clean), resolving the data once."""
  source = _source(data_config)
  process_index, process_count, per_host = _host_partition(
      batch_size, process_index, process_count)
  examples, num_examples = _split_examples(source, split)
  num_steps = -(-num_examples // batch_size)
  num_chunks = -(-num_examples // per_host)
  own_chunks = len(range(process_index, num_chunks, process_count))
  empty = tf.data.Dataset.from_tensors({
      "image": tf.zeros((per_host, *source.info.image_shape), tf.float32),
      "label": tf.zeros([per_host], tf.int32),
      "mask": tf.zeros([per_host], tf.float32),
      **{label_key(f): tf.zeros([per_host], tf.int32) for f in source.extra_labels},
  }).repeat(num_steps - own_chunks)
  own = examples.batch(per_host).enumerate().filter(
      lambda chunk, _: chunk % process_count == process_index)

  def dataset(corruption):
    corrupt = None if corruption is None else augment.corruption(
        *corruption, channels=source.info.image_shape[-1])

    def process(chunk, images, labels):
      num_real = tf.shape(labels)[0]
      positions = chunk * per_host + tf.range(num_real, dtype=tf.int64)
      batch = _preprocess_batch(
          source, images, labels, decoded=False, train=False, corruption=corrupt,
          seeds=None if corrupt is None else example_seeds(_CORRUPTION_SEED, 0,
                                                           positions))
      padding = [[0, per_host - num_real]]
      return {
          **{key: tf.pad(value, padding + [[0, 0]] * (value.shape.rank - 1))
             for key, value in batch.items()},
          "mask": tf.pad(tf.ones([num_real], tf.float32), padding),
      }

    return (
        own.map(lambda chunk, batch: process(chunk, *batch),
                num_parallel_calls=tf.data.AUTOTUNE)
        .concatenate(empty)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_options())
    )

  return [dataset(corruption) for corruption in corruptions]


def eval_iterator(
    data_config: DataConfig,
    *,
    batch_size: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    corruption: Optional[tuple[str, int]] = None,
    split: str = "eval",
) -> Iterator[Batch]:
  """One pass over this host's part of a split, without augmentation.

  `split` is 'eval' (the evaluation split: a run's final figures), 'validation' (held
  out for model selection, see `default_data_config`) or 'train' (the training
  examples in file order, e.g. for the teacher's pass over them).

  `batch_size` is the global batch: every host yields `ceil(num_eval / batch_size)`
  batches of `b = batch_size // process_count` (so all hosts run the same number of
  steps), host i's slice of step s being examples [s * B + i * b, s * B + (i + 1) * b)
  of the split in file order. Padding examples have `mask` 0, so summing a metric times
  `mask` over all hosts counts every example exactly once.

  `corruption=(op, severity)` applies that edge op (`kd_jax.data.augment`) to every
  example after the eval preprocessing, the example at position p of the split seeded
  by `example_seeds(0, 0, [p])`: the same corrupted split on every run and host.

  Returns:
    An iterator of `{'image': float32 [b, H, W, C], 'label': int32 [b],
    'mask': float32 [b]}`.
  """
  return eval_dataset(
      data_config,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      corruption=corruption,
      split=split,
  ).as_numpy_iterator()


def host_eval_iterator(data_config: DataConfig, *, batch_size: int,
                       split: str = "eval") -> Iterator[Batch]:
  """One pass over all of a split on this host alone, for host-side work that sees
  every example (TFLite accuracy in LiteRT, reports): `eval_iterator` as if this
  were the only process."""
  return eval_iterator(data_config, batch_size=batch_size, process_index=0,
                       process_count=1, split=split)


def representative_images(data_config: DataConfig, n: int, seed: int = 0) -> np.ndarray:
  """`n` training images, preprocessed as for evaluation (no augmentation).

  Drawn from a seeded shuffle of the training split (so classes are mixed), for
  int8 TFLite calibration.

  Returns:
    float32 [min(n, num_train), H, W, C], normalised like the model inputs.
  """
  source = _source(data_config)
  examples, num_examples = _split_examples(source, "train")
  images = (
      examples.shuffle(min(num_examples, _UNCACHED_SHUFFLE_BUFFER), seed=seed)
      .batch(n)
      .take(1)
      .map(lambda images, labels: _preprocess_batch(
          source, images, labels, decoded=False, train=False)["image"])
      .with_options(_options())
  )
  return next(images.as_numpy_iterator())
