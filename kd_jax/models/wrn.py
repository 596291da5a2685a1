"""Wide Residual Networks (WRN-depth-k) for CIFAR, as in the CRD benchmark.

Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016; the definition of
RepDistiller's ``models/wrn.py`` (no dropout): pre-activation blocks, three stages of
``(depth - 4) / 6`` blocks with widths ``16k, 32k, 64k``, a final BN-ReLU.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import (Classifier, ModuleDef, conv2d, global_avg_pool,
                                  quant_point, stage_taps)
from kd_jax.models.resnet import block_mid_widths


class PreActBlock(nn.Module):
  """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the input (or its 1x1 projection).

  ``mid_features`` (default ``features``) is the first conv's output width, which no
  residual connection constrains (channel pruning narrows it).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  mid_features: Optional[int] = None

  @nn.compact
  def __call__(self, x) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Returns ``(output, normalized_input)``: the second is ``bn1(x)`` before ReLU."""
    normalized = self.norm(name="bn1")(x)
    act = nn.relu(normalized)
    mid_features = self.features if self.mid_features is None else self.mid_features
    out = conv2d(self.conv, mid_features, 3, self.strides, name="conv1")(act)
    out = nn.relu(self.norm(name="bn2")(out))
    out = conv2d(self.conv, self.features, 3, name="conv2")(out)
    if x.shape[-1] == self.features:
      shortcut = x
    else:  # the projection reads the activated input, as in the reference
      shortcut = conv2d(self.conv, self.features, 1, self.strides, name="shortcut")(act)
    return quant_point(out + shortcut, "sum"), normalized


class WideResNet(Classifier):
  """WRN-``depth``-``widen_factor``.

  Taps follow RepDistiller: ``stem`` is the first conv's output (no BN: blocks are
  pre-activation); ``stage_k`` is the raw output of stage k (a residual sum);
  ``preact_stage_k`` is that output through the BN that follows it (the first BN of the
  next stage, or the final BN), before its ReLU; ``embedding`` is the pooled final
  BN-ReLU map.

  ``mid_widths`` gives the ``mid_features`` of each block, in the order of
  `block_names`; ``None`` keeps every block at its stage width (the published one).
  """
  depth: int = 16
  widen_factor: int = 1
  mid_widths: Optional[Sequence[int]] = None

  def __post_init__(self):
    if self.mid_widths is not None:  # a list (from a config or JSON) is not hashable
      object.__setattr__(self, "mid_widths", tuple(self.mid_widths))
    super().__post_init__()

  def _blocks_per_stage(self) -> int:
    """``(depth - 4) / 6``; raises ValueError for a depth that is not 6n+4."""
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
    return (self.depth - 4) // 6

  def block_names(self) -> List[str]:
    """The residual blocks' submodule names, stage by stage."""
    return [f"stage{i + 1}_block{j}" for i in range(3)
            for j in range(self._blocks_per_stage())]

  @nn.compact
  def __call__(self, x, train: bool = False):
    names = self.block_names()
    blocks = iter(zip(names, block_mid_widths(self.mid_widths, names)))
    conv, norm = self.conv(), self.norm(train)
    x = conv2d(conv, 16, 3, name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for i in range(3):
      width = (16 << i) * self.widen_factor
      for j in range(self._blocks_per_stage()):
        name, mid_width = next(blocks)
        block = PreActBlock(width, conv, norm, 2 if i > 0 and j == 0 else 1, mid_width,
                            name=name)
        x, normalized = block(x)
        if j == 0 and i > 0:  # bn1 of this block normalises the previous stage output
          taps[f"preact_stage_{i}"] = normalized
      stage_taps(taps, i + 1, x)
    normalized = norm(name="final_bn")(x)
    taps["preact_stage_3"] = normalized
    taps["embedding"] = global_avg_pool(nn.relu(normalized))
    return self.head(taps["embedding"]), taps
