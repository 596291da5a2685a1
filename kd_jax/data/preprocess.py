"""Image preprocessing ops for tf.data: normalisation, resizing, augmentation.

Every op is a small function of tensors that behaves the same eagerly and inside a
`tf.data` map (tests check both). Random ops are *stateless*: they take a `seed`, an
int tensor of shape [2], instead of drawing from a global generator, so an example's
augmentation is a pure function of (run seed, epoch, position in epoch). That is what
lets the pipeline resume exactly at any step without replaying earlier augmentations.

Augmentation presets are registered by name (`register_augmentation`) and selected with
`data_config.augment`; each preset gives a train op `(image, seed) -> image` and an
eval op `image -> image`, both before normalisation:

- `none`:     optional resize to `image_size`.
- `cifar`:    zero-pad by `pad` pixels, random crop back to size, optional random
              horizontal flip; as `RandomCrop(32, padding=4)` + `RandomHorizontalFlip`
              in RepDistiller (Tian et al., 2020) and mdistiller (Zhao et al., 2022).
- `imagenet`: Inception-style random-resized crop (area 8%..100%, aspect ratio
              3/4..4/3) to `image_size` + flip; eval resizes the shorter side to
              `image_size / 0.875` and takes the centre crop (Szegedy et al., 2015).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Optional

import tensorflow as tf

from kd_jax.registry import Registry

Image = tf.Tensor
Size = tuple[int, int]


def normalize(image: Image, mean: Sequence[float], std: Sequence[float]) -> Image:
  """Maps pixels in [0, 255] to float32 `(image / 255 - mean) / std` per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def resize(image: Image, size: Size) -> Image:
  """Bilinear anti-aliased resize of an [H, W, C] image to `size` = (height, width)."""
  return tf.image.resize(image, size, method="bilinear", antialias=True)


def pad_and_crop(image: Image, pad: int, offset: tf.Tensor) -> Image:
  """Zero-pads `pad` pixels on each side, then crops the original size at `offset`.

  Args:
    image: [H, W, C].
    pad: padding in pixels on each border.
    offset: int [2], (top, left) of the crop in the padded image, each in 0..2*pad.

  Returns:
    [H, W, C], the image shifted by (pad - top, pad - left) with zeros shifted in.
  """
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  cropped = tf.slice(padded, tf.concat([tf.cast(offset, tf.int32), [0]], 0), shape)
  return tf.ensure_shape(cropped, image.shape)


def random_pad_and_crop(image: Image, seed: tf.Tensor, pad: int) -> Image:
  """`pad_and_crop` at a uniformly drawn offset (a random shift by up to `pad` px)."""
  offset = tf.random.stateless_uniform([2], seed, 0, 2 * pad + 1, dtype=tf.int32)
  return pad_and_crop(image, pad, offset)


def random_flip_left_right(image: Image, seed: tf.Tensor) -> Image:
  """Mirrors the image horizontally with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def random_resized_crop(
    image: Image,
    seed: tf.Tensor,
    size: Size,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image:
  """Crops a random box (area share in `scale`, aspect in `ratio`), resizes to `size`.

  Falls back to the whole image when no box fits in 100 attempts.
  """
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=ratio,
      area_range=scale,
      max_attempts=100,
      use_image_if_no_bounding_boxes=True,
  )
  return resize(tf.slice(image, begin, crop_size), size)


def resize_shorter_and_center_crop(
    image: Image, size: Size, crop_fraction: float = 0.875
) -> Image:
  """Resizes the shorter side to `size / crop_fraction`, then crops the centre."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = max(size) / crop_fraction
  scaled = tf.cast(tf.round(shape * target / tf.reduce_min(shape)), tf.int32)
  image = resize(image, scaled)
  top = (scaled[0] - size[0]) // 2
  left = (scaled[1] - size[1]) // 2
  return tf.ensure_shape(
      tf.slice(image, [top, left, 0], [size[0], size[1], -1]), [*size, image.shape[-1]]
  )


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A preset: `train(image, seed) -> image` and `eval(image) -> image` (uint8 in)."""

  train: Callable[[Image, tf.Tensor], Image]
  eval: Callable[[Image], Image]


AugmentationFactory = Callable[..., Augmentation]
AUGMENTATIONS: Registry[AugmentationFactory] = Registry("augmentation",
                                                       hint="set data.augment")


def register_augmentation(
    name: str,
) -> Callable[[AugmentationFactory], AugmentationFactory]:
  """Registers `factory(*, image_size, pad, flip) -> Augmentation` under `name`."""

  return AUGMENTATIONS.register(name)


def get_augmentation(
    name: str, *, image_size: Optional[Size], pad: int, flip: bool
) -> Augmentation:
  """Builds the registered preset `name` (see the module docstring for the presets)."""
  return AUGMENTATIONS.get(name)(image_size=image_size, pad=pad, flip=flip)


def _resize_to(image_size: Optional[Size]) -> Callable[[Image], Image]:
  return (lambda image: image) if image_size is None else (
      lambda image: resize(image, image_size))


@register_augmentation("none")
def _no_augmentation(*, image_size, pad, flip) -> Augmentation:
  del pad, flip
  fit = _resize_to(image_size)
  return Augmentation(train=lambda image, seed: fit(image), eval=fit)


@register_augmentation("cifar")
def _cifar_augmentation(*, image_size, pad, flip) -> Augmentation:
  fit = _resize_to(image_size)

  def train(image, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = random_pad_and_crop(fit(image), crop_seed, pad)
    return random_flip_left_right(image, flip_seed) if flip else image

  return Augmentation(train=train, eval=fit)


@register_augmentation("imagenet")
def _imagenet_augmentation(*, image_size, pad, flip) -> Augmentation:
  del pad
  if image_size is None:
    raise ValueError("augment='imagenet' needs data.image_size (e.g. 224)")

  def train(image, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = random_resized_crop(image, crop_seed, image_size)
    return random_flip_left_right(image, flip_seed) if flip else image

  return Augmentation(
      train=train, eval=lambda image: resize_shorter_and_center_crop(image, image_size)
  )
