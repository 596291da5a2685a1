"""ShuffleNet V1 and V2 for CIFAR, as in the CRD benchmark.

Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018; Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical
Guidelines for Efficient CNN Architecture Design", ECCV 2018. The definitions of
RepDistiller's ``models/ShuffleNetv1.py`` (``ShuffleV1``: groups 3, widths 240/480/960)
and ``models/ShuffleNetv2.py`` (``ShuffleV2``: net size 1, widths 116/232/464, 1024):
a 1x1 stem without down-sampling, three stages that each halve the resolution.
Convolutions keep PyTorch's default init, as the reference does.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import (Classifier, ConvBN, ModuleDef, global_avg_pool,
                                  quant_point, stage_taps, torch_default_init)


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """Interleaves the channels of ``groups`` groups: channel ``g*n + i`` -> ``i*G + g``."""
  *batch_dims, channels = x.shape
  x = x.reshape(*batch_dims, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*batch_dims, channels)


class ShuffleV1Unit(nn.Module):
  """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, plus the shortcut.

  With stride 2 the shortcut is a 3x3/2 average pool concatenated to the branch, so the
  unit outputs ``features + in_channels`` channels.
  """
  features: int
  groups: int
  input_groups: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    """Returns ``(output, preact)``: after / before the final ReLU."""
    mid = self.features // 4
    out = ConvBN(mid, 1, self.conv, self.norm, groups=self.input_groups, name="reduce")(x)
    out = channel_shuffle(out, self.input_groups)
    out = ConvBN(mid, 3, self.conv, self.norm, self.strides, groups=mid,
                 name="depthwise")(out)
    out = ConvBN(self.features, 1, self.conv, self.norm, groups=self.groups, relu=False,
                 name="expand")(out)
    if self.strides == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             count_include_pad=True)
      shortcut = quant_point(shortcut, "pool")
      preact = jnp.concatenate([out, shortcut], axis=-1)
    else:
      preact = out + x
    return quant_point(nn.relu(preact), "output"), preact


class ShuffleNetV1(Classifier):
  """ShuffleNet V1; taps ``stem``, ``stage_k``/``preact_stage_k`` (k=1..3), ``embedding``."""
  stage_widths: Sequence[int] = (240, 480, 960)
  stage_sizes: Sequence[int] = (4, 8, 4)
  groups: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(torch_default_init), self.norm(train)
    x = ConvBN(24, 1, conv, norm, name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for i, (width, num_blocks) in enumerate(zip(self.stage_widths, self.stage_sizes)):
      for j in range(num_blocks):
        unit = ShuffleV1Unit(
            width - x.shape[-1] if j == 0 else width, self.groups,
            input_groups=1 if i == j == 0 else self.groups,  # the stem has 24 channels
            conv=conv, norm=norm, strides=2 if j == 0 else 1,
            name=f"stage{i + 1}_block{j}")
        x, preact = unit(x)
      stage_taps(taps, i + 1, x, preact)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"]), taps


class ShuffleV2DownUnit(nn.Module):
  """Two stride-2 branches on the whole input, concatenated and shuffled."""
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    half = self.features // 2
    left = ConvBN(x.shape[-1], 3, self.conv, self.norm, 2, groups=x.shape[-1],
                  relu=False, name="left_depthwise")(x)
    left = ConvBN(half, 1, self.conv, self.norm, name="left_pointwise")(left)
    right = ConvBN(half, 1, self.conv, self.norm, name="right_reduce")(x)
    right = ConvBN(half, 3, self.conv, self.norm, 2, groups=half, relu=False,
                   name="right_depthwise")(right)
    right = ConvBN(half, 1, self.conv, self.norm, name="right_pointwise")(right)
    return channel_shuffle(quant_point(jnp.concatenate([left, right], axis=-1), "concat"), 2)


class ShuffleV2Unit(nn.Module):
  """Channel split; the second half goes through 1x1 - depthwise 3x3 - 1x1."""

  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    """Returns ``(output, preact)``.

    As in the reference, ``preact`` is the concatenation before the shuffle, with the
    branch taken before its last ReLU; ``output`` is shuffled.
    """
    half = x.shape[-1] // 2
    kept, branch = x[..., :half], x[..., half:]
    branch = ConvBN(half, 1, self.conv, self.norm, name="reduce")(branch)
    branch = ConvBN(half, 3, self.conv, self.norm, groups=half, relu=False,
                    name="depthwise")(branch)
    branch = ConvBN(half, 1, self.conv, self.norm, relu=False, name="expand")(branch)
    out = quant_point(jnp.concatenate([kept, nn.relu(branch)], axis=-1), "concat")
    return channel_shuffle(out, 2), jnp.concatenate([kept, branch], axis=-1)


class ShuffleNetV2(Classifier):
  """ShuffleNet V2; taps ``stem``, ``stage_k``/``preact_stage_k`` (k=1..3), ``embedding``."""
  stage_widths: Sequence[int] = (116, 232, 464)
  stage_sizes: Sequence[int] = (3, 7, 3)
  last_width: int = 1024

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(torch_default_init), self.norm(train)
    x = ConvBN(24, 1, conv, norm, name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for i, (width, num_blocks) in enumerate(zip(self.stage_widths, self.stage_sizes)):
      x = ShuffleV2DownUnit(width, conv, norm, name=f"stage{i + 1}_down")(x)
      for j in range(num_blocks):
        x, preact = ShuffleV2Unit(conv, norm, name=f"stage{i + 1}_block{j}")(x)
      stage_taps(taps, i + 1, x, preact)
    x = ConvBN(self.last_width, 1, conv, norm, name="head_conv")(x)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"]), taps
