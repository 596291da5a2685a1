"""MobileNetV2 for CIFAR, the CRD benchmark's student ``mobile_half``.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018; the definition of RepDistiller's ``models/mobilenetv2.py``
(from "Knowledge Distillation via Route Constrained Optimization"): a 3x3/2 stem,
seven groups of inverted residuals, a 1x1 conv to 1280 channels. Unlike torchvision,
every inverted residual has its 1x1 expansion conv, also with expansion ratio 1.
"""
from __future__ import annotations

import flax.linen as nn

from kd_jax.models.layers import (Classifier, ConvBN, ModuleDef, global_avg_pool,
                                  quant_point, small_normal, stage_taps)

# (expansion (None: the model's), output channels at width 1, blocks, first stride)
SETTINGS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# After which group (0-based) each tapped stage ends, as RepDistiller's features.
STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """1x1 expand - BN - ReLU, 3x3 depthwise - BN - ReLU, 1x1 linear projection - BN."""
  features: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1] * self.expansion
    out = ConvBN(hidden, 1, self.conv, self.norm, name="expand")(x)
    out = ConvBN(hidden, 3, self.conv, self.norm, self.strides, groups=hidden,
                 name="depthwise")(out)
    out = ConvBN(self.features, 1, self.conv, self.norm, relu=False, name="project")(out)
    if self.strides == 1 and x.shape[-1] == self.features:
      out = quant_point(out + x, "sum")
    return out


class MobileNetV2(Classifier):
  """MobileNetV2 with expansion ``expansion`` and width multiplier ``width_mult``.

  Taps: ``stem`` (first conv-BN-ReLU), ``stage_1..4`` (outputs of groups 1, 2, 4, 6,
  as RepDistiller's features), ``embedding`` (pooled 1280-d map). Block outputs are
  linear (no ReLU), so ``preact_stage_k`` is the same array as ``stage_k`` (as
  RepDistiller returns the same features with ``preact=True``).
  """
  expansion: int = 6
  width_mult: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(), self.norm(train)
    x = ConvBN(int(32 * self.width_mult), 3, conv, norm, strides=2,
               name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for g, (expansion, channels, num_blocks, first_stride) in enumerate(SETTINGS):
      for j in range(num_blocks):
        x = InvertedResidual(int(channels * self.width_mult), expansion or self.expansion,
                             conv, norm, first_stride if j == 0 else 1,
                             name=f"group{g}_block{j}")(x)
      if g in STAGE_ENDS:
        stage_taps(taps, STAGE_ENDS.index(g) + 1, x, preact=x)
    last_width = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = ConvBN(last_width, 1, conv, norm, name="head_conv")(x)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"], kernel_init=small_normal), taps
