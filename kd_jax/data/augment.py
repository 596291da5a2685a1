"""Edge-condition augmentation: the degradations a camera on an edge device adds.

Each op is a small registered function `op(image, seed, severity) -> image` on one
float32 image [H, W, C] with pixels in [0, 255] (C = 1 or 3), stateless (all its
randomness comes from `seed`, an int tensor [2]) and tested both eagerly and inside a
`tf.data` map. `severity` is 1..5, as in the corruption benchmarks of Hendrycks &
Dietterich (ImageNet-C, ICLR 2019), whose levels the noise and JPEG ops take:

- `low_light`:   exposure × gamma: `255 · e · (x / 255)^g`, e = 0.8 .. 0.25, g = 1.2 .. 2.0.
- `motion_blur`: a straight motion trail at a random angle, 0.1 .. 0.5 of the image side
                 long (`motion_blur_kernel`), borders mirrored.
- `gaussian_noise`: additive read noise, σ = 0.08 .. 0.38 of the pixel range.
- `shot_noise`:  photon (Poisson) noise, `Poisson(λ · x / 255) · 255 / λ`, λ = 60 .. 3.
- `jpeg`:        JPEG re-encoding at quality 25 .. 7.
- `grayscale`:   colour blended towards its luma by 0.2 .. 1.0 (1.0: full grayscale).
- `chroma_subsampling`: YUV with the chroma planes downsampled by 2 (YUV 4:2:0) .. 8,
                 then upsampled bilinearly, as a low-bandwidth video path does.
- `cutout`:      a black square, 0.25 .. 0.75 of the image side, centred at a random
                 pixel and clipped at the borders (DeVries & Taylor, 2017): occlusion.

A 1-channel image has no colour to reduce: `grayscale` and `chroma_subsampling` return
it unchanged (and robustness evaluation skips them, see `corruptions`).

A config composes ops as a list applied in order, each with a probability and a
severity (an int, or a `(low, high)` pair drawn uniformly per example):

    data.edge_augment = ({'op': 'low_light', 'prob': 0.5, 'severity': 3},
                         {'op': 'jpeg', 'prob': 0.3, 'severity': (1, 5)})

The pipeline applies them after the geometric augmentation, to the one image that
both the teacher and the student see in a train step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, Optional

import tensorflow as tf

from kd_jax.data import salts
from kd_jax.registry import Registry

Image = tf.Tensor
EdgeOp = Callable[[Image, tf.Tensor, int], Image]
SEVERITIES = (1, 2, 3, 4, 5)

OPS: Registry[EdgeOp] = Registry("edge op")
# Ops that act on colour only: identities on 1-channel images.
COLOUR_OPS = ("grayscale", "chroma_subsampling")
# The keys of a `data.edge_augment` entry and their defaults (op has none).
SPEC_DEFAULTS = dict(op=None, prob=1.0, severity=3)

_EXPOSURE = (0.8, 0.65, 0.5, 0.35, 0.25)
_GAMMA = (1.2, 1.4, 1.6, 1.8, 2.0)
_BLUR_LENGTH = (0.1, 0.2, 0.3, 0.4, 0.5)  # Fractions of the image side.
_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C gaussian_noise.
_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)  # ImageNet-C shot_noise.
_JPEG_QUALITY = (25, 18, 15, 10, 7)  # ImageNet-C jpeg_compression.
_DESATURATION = (0.2, 0.4, 0.6, 0.8, 1.0)
_CHROMA_FACTOR = (2, 3, 4, 6, 8)
_CUTOUT_SIZE = (0.25, 0.375, 0.5, 0.625, 0.75)  # Fractions of the image side.


def register(name: str) -> Callable[[EdgeOp], EdgeOp]:
  """Makes `op(image, seed, severity) -> image` usable as `{'op': name}`."""

  return OPS.register(name)


def _level(table: Sequence[Any], severity: int) -> Any:
  return table[severity - 1]


def _clip(image: Image) -> Image:
  return tf.clip_by_value(image, 0.0, 255.0)


# --- deterministic building blocks (the ops with their random draws fixed) ---------


def exposure_gamma(image: Image, exposure: float, gamma: float) -> Image:
  """`255 · exposure · (image / 255)^gamma`: a darker exposure and crushed shadows."""
  return 255.0 * exposure * tf.pow(image / 255.0, gamma)


def motion_blur_kernel(length: float, angle) -> tf.Tensor:
  """A [K, K] motion-blur kernel, K = 2·ceil(length / 2) + 1, summing to 1.

  The kernel is the segment of `length` pixels through the centre at `angle` (radians;
  0 is horizontal, π/2 vertical), drawn anti-aliased: each cell weighs
  `max(0, 1 − distance from its centre to the segment)`. A length of 2 at angle 0 is
  the horizontal box filter [1, 1, 1] / 3.
  """
  radius = math.ceil(length / 2)
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  dy, dx = tf.meshgrid(offsets, offsets, indexing="ij")
  angle = tf.cast(angle, tf.float32)
  sin, cos = tf.sin(angle), tf.cos(angle)
  along = tf.clip_by_value(dy * sin + dx * cos, -length / 2, length / 2)
  distance = tf.sqrt(tf.square(dy - along * sin) + tf.square(dx - along * cos))
  weights = tf.nn.relu(1.0 - distance)
  return weights / tf.reduce_sum(weights)


def blur(image: Image, kernel: tf.Tensor) -> Image:
  """Filters every channel with a [K, K] kernel; borders mirrored (symmetric padding)."""
  radius = kernel.shape[0] // 2
  padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
  filters = tf.tile(kernel[:, :, None, None], [1, 1, image.shape[-1], 1])
  out = tf.nn.depthwise_conv2d(padded[None], filters, [1, 1, 1, 1], "VALID")[0]
  return tf.ensure_shape(out, image.shape)


def jpeg(image: Image, quality: int) -> Image:
  """The image encoded as JPEG at `quality` (1..100) and decoded again."""
  pixels = tf.saturate_cast(tf.round(image), tf.uint8)
  return tf.ensure_shape(
      tf.cast(tf.image.adjust_jpeg_quality(pixels, quality), tf.float32), image.shape)


def desaturate(image: Image, amount: float) -> Image:
  """Blends an RGB image towards its luma (ITU-R BT.601 weights) by `amount` in [0, 1]."""
  if image.shape[-1] == 1:
    return image
  return (1.0 - amount) * image + amount * tf.image.rgb_to_grayscale(image)


def chroma_subsample(image: Image, factor: int) -> Image:
  """Keeps luma, averages the YUV chroma planes over factor × factor areas, upsamples.

  `factor` 2 is YUV 4:2:0. The area average and the bilinear upsampling are
  `tf.image.resize`'s ('area' to ceil(H / factor) × ceil(W / factor), then 'bilinear').
  """
  if image.shape[-1] == 1:
    return image
  height, width = image.shape[0], image.shape[1]
  yuv = tf.image.rgb_to_yuv(image / 255.0)
  small = tf.image.resize(yuv[..., 1:], [-(-height // factor), -(-width // factor)],
                          method="area")
  chroma = tf.image.resize(small, [height, width], method="bilinear")
  rgb = tf.image.yuv_to_rgb(tf.concat([yuv[..., :1], chroma], axis=-1))
  return tf.ensure_shape(_clip(255.0 * rgb), image.shape)


def cutout_at(image: Image, top, left, size: int) -> Image:
  """Zeroes rows [top, top + size) × columns [left, left + size), clipped at the borders."""
  rows = tf.range(image.shape[0])[:, None, None]
  cols = tf.range(image.shape[1])[None, :, None]
  top, left = tf.cast(top, tf.int32), tf.cast(left, tf.int32)
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return tf.where(inside, tf.zeros_like(image), image)


# --- registered ops ---------------------------------------------------------------


@register("low_light")
def low_light(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """`exposure_gamma` at the severity's exposure and gamma (deterministic)."""
  del seed
  return exposure_gamma(image, _level(_EXPOSURE, severity), _level(_GAMMA, severity))


@register("motion_blur")
def motion_blur(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """A motion trail at a uniform random angle in [0, π)."""
  length = _level(_BLUR_LENGTH, severity) * min(image.shape[0], image.shape[1])
  angle = tf.random.stateless_uniform([], seed, 0.0, math.pi)
  return blur(image, motion_blur_kernel(length, angle))


@register("gaussian_noise")
def gaussian_noise(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """`clip(image + 255 σ · N(0, 1))` per pixel and channel."""
  sigma = 255.0 * _level(_NOISE_SIGMA, severity)
  return _clip(image + sigma * tf.random.stateless_normal(tf.shape(image), seed))


@register("shot_noise")
def shot_noise(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """Photon counts: `clip(Poisson(λ · image / 255) · 255 / λ)`; black stays black."""
  photons = _level(_PHOTONS, severity)
  counts = tf.random.stateless_poisson(tf.shape(image), seed, image / 255.0 * photons,
                                       dtype=tf.float32)
  return _clip(counts * (255.0 / photons))


@register("jpeg")
def jpeg_compression(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """`jpeg` at the severity's quality (deterministic)."""
  del seed
  return jpeg(image, _level(_JPEG_QUALITY, severity))


@register("grayscale")
def grayscale(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """`desaturate` by the severity's amount (deterministic); identity on 1 channel."""
  del seed
  return desaturate(image, _level(_DESATURATION, severity))


@register("chroma_subsampling")
def chroma_subsampling(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """`chroma_subsample` by the severity's factor (deterministic); identity on 1 channel."""
  del seed
  return chroma_subsample(image, _level(_CHROMA_FACTOR, severity))


@register("cutout")
def cutout(image: Image, seed: tf.Tensor, severity: int) -> Image:
  """A black square of the severity's size centred at a uniformly drawn pixel."""
  size = max(1, round(_level(_CUTOUT_SIZE, severity) * min(image.shape[0],
                                                          image.shape[1])))
  centre = tf.cast(tf.random.stateless_uniform([2], seed) * image.shape[:2].as_list(),
                   tf.int32)
  return cutout_at(image, centre[0] - size // 2, centre[1] - size // 2, size)


# --- composition from the config ---------------------------------------------------


def corruptions(channels: int) -> tuple[str, ...]:
  """The registered ops that change an image of `channels` channels (colour ops need 3)."""
  return tuple(name for name in OPS if channels == 3 or name not in COLOUR_OPS)


def _parse(spec: Any, where: str) -> tuple[str, float, tuple[int, int]]:
  """(op, prob, (lowest, highest) severity) of one config entry; one-line errors."""
  if not isinstance(spec, Mapping):
    raise ValueError(f"{where} must be a dict such as {{'op': 'jpeg', 'prob': 0.5, "
                     f"'severity': 3}}, got {spec!r}")
  unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
  if unknown:
    raise ValueError(f"{where} has unknown keys {', '.join(unknown)}; use "
                     f"{', '.join(SPEC_DEFAULTS)}")
  spec = {**SPEC_DEFAULTS, **spec}
  name = spec["op"]
  if name not in OPS:
    raise ValueError(f"{where}: {OPS.unknown(name)}")
  prob = spec["prob"]
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
    raise ValueError(f"{where}: prob must be a number in [0, 1], got {prob!r}")
  severity = spec["severity"]
  bounds = tuple(severity) if isinstance(severity, (tuple, list)) else (severity,) * 2
  if (len(bounds) != 2 or not all(isinstance(s, int) and s in SEVERITIES for s in bounds)
      or bounds[0] > bounds[1]):
    raise ValueError(f"{where}: severity must be an int in 1..5 or a (low, high) pair "
                     f"of them, got {severity!r}")
  return name, float(prob), bounds


def parse(specs: Optional[Sequence[Mapping[str, Any]]]
          ) -> list[tuple[str, float, tuple[int, int]]]:
  """`data.edge_augment` as (op, prob, (lowest, highest) severity) triples.

  Raises:
    ValueError: not a sequence of dicts, an unknown op or key, or a probability or
      severity out of range.
  """
  if specs is None:
    return []
  if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
    raise ValueError("data.edge_augment must be a tuple of dicts such as "
                     "({'op': 'jpeg', 'prob': 0.5, 'severity': 3},)")
  return [_parse(spec, f"data.edge_augment[{i}]") for i, spec in enumerate(specs)]


def compose(specs: Optional[Sequence[Mapping[str, Any]]],
            channels: int) -> Optional[Callable[[Image, tf.Tensor], Image]]:
  """The config's edge ops as one `(image, seed) -> float32 image`; None if there are none.

  Op i draws from `fold_in(fold_in(seed, 2), i)` split in three: whether it applies
  (with probability `prob`), its severity (uniform over the range) and its own
  randomness. So the result is a function of the example's seed alone.

  Args:
    specs: `data.edge_augment`, a sequence of `{'op', 'prob', 'severity'}` dicts.
    channels: channels of the images (1 or 3).

  Raises:
    ValueError: as `parse`, or images with other than 1 or 3 channels.
  """
  ops = parse(specs)
  if not ops:
    return None
  if channels not in (1, 3):
    raise ValueError(f"data.edge_augment handles images of 1 or 3 channels, not "
                     f"{channels}; set data.edge_augment=()")

  def apply(image: Image, seed: tf.Tensor) -> Image:
    image = tf.cast(image, tf.float32)
    seed = tf.random.experimental.stateless_fold_in(seed, salts.EDGE)
    for i, (name, prob, (lowest, highest)) in enumerate(ops):
      coin_seed, level_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(seed, i), 3))
      image = _apply_one(image, OPS[name], prob, lowest, highest,
                         coin_seed, level_seed, op_seed)
    return image

  return apply


def _apply_one(image, op, prob, lowest, highest, coin_seed, level_seed, op_seed):
  """`op` with probability `prob` at a severity drawn from [lowest, highest]."""
  def corrupt():
    if lowest == highest:
      return op(image, op_seed, lowest)
    level = tf.random.stateless_uniform([], level_seed, 0, highest - lowest + 1,
                                        dtype=tf.int32)
    return tf.switch_case(level, [
        (lambda s=s: op(image, op_seed, s)) for s in range(lowest, highest + 1)])

  if prob >= 1.0:
    return corrupt()
  if prob <= 0.0:
    return image
  applies = tf.random.stateless_uniform([], coin_seed) < prob
  return tf.cond(applies, corrupt, lambda: image)


def corruption(name: str, severity: int,
               channels: int) -> Callable[[Image, tf.Tensor], Image]:
  """One op always applied at one severity: a robustness-evaluation corruption."""
  return compose(({"op": name, "prob": 1.0, "severity": severity},), channels)

