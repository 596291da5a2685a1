"""ResNets: the CIFAR family of the CRD benchmark and torchvision's ImageNet ones.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
CIFAR variants (resnet8 ... resnet110, resnet8x4, resnet32x4) follow RepDistiller's
``models/resnet.py`` (Tian, Krishnan, Isola, "Contrastive Representation Distillation",
ICLR 2020): a 3x3 stem and three stages. ImageNet variants (resnet18/34/50) follow
torchvision: a 7x7/2 stem with a 3x3/2 max-pool, four stages, stride on the 3x3 conv
of the bottleneck ("ResNet v1.5"). Both share the residual blocks below.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import (Classifier, ConvBN, ModuleDef, global_avg_pool,
                                  quant_point, stage_taps)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN; the sum with the shortcut goes through the final ReLU.

  ``mid_features`` (default ``features``) is the first conv's output width, which no
  residual connection constrains (channel pruning narrows it).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  mid_features: Optional[int] = None
  expansion = 1

  @nn.compact
  def __call__(self, x) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Returns ``(output, preact)``, preact being the sum before the final ReLU."""
    mid_features = self.features if self.mid_features is None else self.mid_features
    out = ConvBN(mid_features, 3, self.conv, self.norm, self.strides, name="conv_bn1")(x)
    out = ConvBN(self.features, 3, self.conv, self.norm, relu=False, name="conv_bn2")(out)
    preact = out + _shortcut(x, self.features, self.strides, self.conv, self.norm)
    return quant_point(nn.relu(preact), "sum"), preact


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand to ``4 * features``.

  ``mid_features`` (default ``features``) is the width of the two inner convs
  (torchvision's ``width``).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  mid_features: Optional[int] = None
  expansion = 4

  @nn.compact
  def __call__(self, x) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Returns ``(output, preact)``, preact being the sum before the final ReLU."""
    out_features = self.features * self.expansion
    mid_features = self.features if self.mid_features is None else self.mid_features
    out = ConvBN(mid_features, 1, self.conv, self.norm, name="conv_bn1")(x)
    out = ConvBN(mid_features, 3, self.conv, self.norm, self.strides, name="conv_bn2")(out)
    out = ConvBN(out_features, 1, self.conv, self.norm, relu=False, name="conv_bn3")(out)
    preact = out + _shortcut(x, out_features, self.strides, self.conv, self.norm)
    return quant_point(nn.relu(preact), "sum"), preact


def _shortcut(x, features: int, strides: int, conv: ModuleDef, norm: ModuleDef):
  """Identity, or a 1x1 conv-BN projection when the shape changes."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return ConvBN(features, 1, conv, norm, strides, relu=False, name="downsample")(x)


def block_mid_widths(mid_widths: Optional[Sequence[int]],
                     block_names: Sequence[str]) -> List[Optional[int]]:
  """Each block's inner width from a model's ``mid_widths`` (``None``: the default).

  Raises:
    ValueError: ``mid_widths`` is not one positive width per block.
  """
  if mid_widths is None:
    return [None] * len(block_names)
  if len(mid_widths) != len(block_names) or min(mid_widths) < 1:
    raise ValueError(f"mid_widths must be {len(block_names)} positive widths, one per "
                     f"residual block in order; got {tuple(mid_widths)}")
  return [int(w) for w in mid_widths]


class ResNet(Classifier):
  """A ResNet with ``len(stage_sizes)`` stages; the first keeps the resolution.

  Attributes:
    stage_sizes: number of blocks per stage.
    stage_widths: ``features`` of the blocks of each stage (bottlenecks output 4x).
    stem_width: channels of the stem convolution.
    block: `BasicBlock` or `Bottleneck`.
    imagenet_stem: 7x7/2 conv and 3x3/2 max-pool (torchvision) instead of a 3x3 conv.
    mid_widths: the ``mid_features`` of each block, in the order of `block_names`;
      ``None`` keeps every block at its stage width (the published architecture).

  Taps: ``stem`` (after the stem's ReLU, before the max-pool), ``stage_k`` and
  ``preact_stage_k`` (last block of stage k, after / before its final ReLU),
  ``embedding`` (global average pool of the last stage).
  """
  stage_sizes: Sequence[int] = (1, 1, 1)
  stage_widths: Sequence[int] = (16, 32, 64)
  stem_width: int = 16
  block: ModuleDef = BasicBlock
  imagenet_stem: bool = False
  mid_widths: Optional[Sequence[int]] = None

  def __post_init__(self):
    if self.mid_widths is not None:  # a list (from a config or JSON) is not hashable
      object.__setattr__(self, "mid_widths", tuple(self.mid_widths))
    super().__post_init__()

  def block_names(self) -> List[str]:
    """The residual blocks' submodule names, stage by stage."""
    return [f"stage{i + 1}_block{j}" for i, num_blocks in enumerate(self.stage_sizes)
            for j in range(num_blocks)]

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(), self.norm(train)
    x = x.astype(self.dtype)
    if self.imagenet_stem:
      x = ConvBN(self.stem_width, 7, conv, norm, strides=2, name="stem")(x)
    else:
      x = ConvBN(self.stem_width, 3, conv, norm, name="stem")(x)
    taps = {"stem": x}
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    names = self.block_names()
    blocks = iter(zip(names, block_mid_widths(self.mid_widths, names)))
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for j in range(num_blocks):
        name, mid_width = next(blocks)
        strides = 2 if i > 0 and j == 0 else 1
        x, preact = self.block(width, conv, norm, strides, mid_width, name=name)(x)
      stage_taps(taps, i + 1, x, preact)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"]), taps
