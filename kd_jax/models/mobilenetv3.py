"""MobileNetV3-Small and -Large, ImageNet students for the edge.

Howard et al., "Searching for MobileNetV3", ICCV 2019, as torchvision defines it
(``torchvision/models/mobilenetv3.py``, whose parameter counts the tests check):
a 3x3/2 stem with hard-swish, inverted residuals with optional squeeze-excitation
(hard-sigmoid gate, squeeze width ``make_divisible(expanded // 4, 8)``), a 1x1 conv to
576 / 960 channels, global pooling, a hidden dense layer of 1024 / 1280 units with
hard-swish, dropout 0.2 and the classifier. BatchNorm ``eps=0.001``, momentum 0.01
(Flax 0.99), as torchvision's.

`MBConv` is the inverted residual shared with `kd_jax.models.efficientnet_lite`.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import (Classifier, ConvBN, ModuleDef, global_avg_pool,
                                  quant_point, small_normal, stage_taps)



def hard_swish(x: jnp.ndarray) -> jnp.ndarray:
  """Hard-swish, x · relu6(x + 3) / 6, written as x · (clip(x / 3, -1, 1) / 2 + 1/2).

  The same function (and gradient, but at x = -3 exactly), but TFLite's converter does not fuse this form
  into a HARD_SWISH op, whose int8 kernel XNNPACK does not take: each int8
  HARD_SWISH split the graph out of XNNPACK and ran the slow builtin kernel
  (mobilenetv3_small at 224×224 ran int8 at 8.6× its fp32 time). This form becomes
  MUL (the clip fused into it), MUL, ADD, MUL, all delegated (0.2× in
  benchmarks/edge_latency.py).
  """
  return x * (0.5 * jnp.clip(x * (1 / 3), -1.0, 1.0) + 0.5)


RE, HS = "relu", "hard_swish"
ACTIVATIONS = {RE: nn.relu, HS: hard_swish}

# One row per block: (kernel, expanded channels, output channels, squeeze-excitation,
# activation, stride), the tables of torchvision's `_mobilenet_v3_conf` (the paper's
# Tables 1 and 2).
LARGE = (
    (3, 16, 16, False, RE, 1),
    (3, 64, 24, False, RE, 2), (3, 72, 24, False, RE, 1),
    (5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1),
    (3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
    (3, 184, 80, False, HS, 1), (3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1),
    (5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1),
)
SMALL = (
    (3, 16, 16, True, RE, 2),
    (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
    (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
    (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1),
    (5, 288, 96, True, HS, 2), (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1),
)
# The block (0-based) that ends each tapped stage: the last block at 1/4, 1/8, 1/16 and
# 1/32 of the input resolution (1/1 ... 1/8 with the CIFAR stem).
STAGE_ENDS = {"large": (2, 5, 11, 14), "small": (0, 2, 7, 10)}
# (blocks, last conv width, hidden dense width)
VARIANTS = {"large": (LARGE, 960, 1280), "small": (SMALL, 576, 1024)}


def make_divisible(value: float, divisor: int = 8) -> int:
  """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``),
  never more than 10% below it; the channel rounding of the MobileNet definitions."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcitation(nn.Module):
  """Hu et al., CVPR 2018: x · hard_sigmoid(fc2(relu(fc1(mean(x))))), fc = 1x1 conv."""
  squeeze: int
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    scale = quant_point(jnp.mean(x, axis=(1, 2), keepdims=True), "pool")
    scale = nn.relu(self.conv(self.squeeze, (1, 1), use_bias=True, name="fc1")(scale))
    scale = self.conv(x.shape[-1], (1, 1), use_bias=True, name="fc2")(scale)
    scale = quant_point(jax.nn.hard_sigmoid(scale), "gate")
    return quant_point(x * scale, "scaled")


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand-BN-act], kxk depthwise-BN-act, [squeeze-excitation],
  1x1 linear projection-BN, plus the input when the shape allows.

  There is no expansion conv when ``expanded`` equals the input width (torchvision's
  and timm's rule, so MobileNetV3's first block and EfficientNet's depthwise-separable
  block have none).
  """
  features: int
  expanded: int
  kernel_size: int
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
  strides: int = 1
  squeeze: Optional[int] = None  # squeeze-excitation width, None for none

  @nn.compact
  def __call__(self, x):
    out = x
    if self.expanded != x.shape[-1]:
      out = ConvBN(self.expanded, 1, self.conv, self.norm, activation=self.activation,
                   name="expand")(out)
    out = ConvBN(self.expanded, self.kernel_size, self.conv, self.norm, self.strides,
                 groups=self.expanded, activation=self.activation, name="depthwise")(out)
    if self.squeeze:
      out = SqueezeExcitation(self.squeeze, self.conv, name="se")(out)
    out = ConvBN(self.features, 1, self.conv, self.norm, relu=False, name="project")(out)
    if self.strides == 1 and x.shape[-1] == self.features:
      out = quant_point(out + x, "sum")
    return out


class MobileNetV3(Classifier):
  """MobileNetV3-``variant`` ('small' or 'large'), torchvision's definition.

  With ``cifar_stem`` the stem and the first stride-2 block have stride 1, for 32x32
  inputs (final map 4x4 instead of 1x1); the parameters are the same.

  Taps: ``stem``; ``stage_1..4``, the outputs of blocks (0-based) 2, 5, 11, 14 (large)
  or 0, 2, 7, 10 (small), the last block at 1/4, 1/8, 1/16 and 1/32 of the input size
  (1/1, 1/2, 1/4, 1/8 with ``cifar_stem``); block outputs are linear, so
  ``preact_stage_k`` is the same array (as MobileNetV2's); ``embedding``, the hidden
  dense layer's hard-swish output (the classifier's input; dropout, in training with a
  ``'dropout'`` rng, comes after it).
  """
  variant: str = "large"
  cifar_stem: bool = False
  dropout_rate: float = 0.2
  BN_MOMENTUM = 0.99
  BN_EPSILON = 1e-3

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks, last_width, hidden = VARIANTS[self.variant]
    stage_ends = STAGE_ENDS[self.variant]
    first_down = next(i for i, block in enumerate(blocks) if block[-1] == 2)
    conv, norm = self.conv(), self.norm(train)
    x = ConvBN(16, 3, conv, norm, 1 if self.cifar_stem else 2,
               activation=hard_swish, name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for i, (kernel, expanded, features, se, activation, stride) in enumerate(blocks):
      x = MBConv(features, expanded, kernel, conv, norm, ACTIVATIONS[activation],
                 1 if self.cifar_stem and i == first_down else stride,
                 make_divisible(expanded // 4) if se else None, name=f"block{i}")(x)
      if i in stage_ends:
        stage_taps(taps, stage_ends.index(i) + 1, x, preact=x)
    x = ConvBN(last_width, 1, conv, norm, activation=hard_swish,
               name="head_conv")(x)
    x = nn.Dense(hidden, dtype=self.dtype, kernel_init=small_normal,
                 name="hidden")(global_avg_pool(x))
    taps["embedding"] = quant_point(hard_swish(x), "embedding")
    x = nn.Dropout(self.dropout_rate,
                   deterministic=not train or not self.has_rng("dropout"))(taps["embedding"])
    return self.head(x, kernel_init=small_normal), taps
