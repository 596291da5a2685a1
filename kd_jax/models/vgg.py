"""VGG with BatchNorm for CIFAR, as in the CRD benchmark.

Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015; the ``vggN_bn`` definitions of RepDistiller's ``models/vgg.py``
(registered there as ``vggN``): five blocks of 3x3 conv (with bias) - BN - ReLU, 2x2
max-pools after the first three blocks (and after the fourth for 64px inputs only, as
in the reference), no fully-connected layers but the 512 -> classes classifier.

The three max-pools halve the resolution, so inputs need at least 8x8 pixels.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from kd_jax.models.layers import (Classifier, ConvBN, global_avg_pool, small_normal,
                                  stage_taps)

# Output channels of the convs of each of the five blocks.
CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
         (512, 512, 512, 512)),
}


class VGG(Classifier):
  """VGG-BN with the conv widths ``blocks`` (one tuple per block).

  Taps: ``stem`` (block 0 after ReLU), ``stage_k`` / ``preact_stage_k`` for blocks
  k = 1..4 after / before their last ReLU, ``embedding`` (pooled block 4, [B, 512]).
  """
  blocks: Sequence[Sequence[int]] = CONFIGS[8]

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(), self.norm(train)
    input_height = x.shape[1]
    x = x.astype(self.dtype)
    taps = {}
    for k, widths in enumerate(self.blocks):
      if k in (1, 2, 3) or (k == 4 and input_height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j, width in enumerate(widths):
        last = j == len(widths) - 1
        x = ConvBN(width, 3, conv, norm, use_bias=True, relu=not last,
                   name=f"block{k}_conv{j}")(x)
      preact, x = x, nn.relu(x)
      if k == 0:
        taps["stem"] = x
      else:
        stage_taps(taps, k, x, preact)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"], kernel_init=small_normal), taps
