"""EfficientNet-Lite0, the mobile EfficientNet without squeeze-excitation.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019, in its Lite form (TensorFlow's ``efficientnet/lite``: no squeeze-excitation,
ReLU6 instead of swish, stem and head fixed at 32 and 1280 channels), as timm defines
``efficientnet_lite0`` (``timm/models/efficientnet.py``, ``_gen_efficientnet_lite``;
its parameter count is the tests' reference): a 3x3/2 stem, a depthwise-separable block,
inverted residuals (`MBConv`) of expansion 6, a 1x1 conv to 1280, global pooling,
dropout 0.2 and the classifier. BatchNorm and padding as timm's PyTorch definition
(momentum 0.1, ``eps=1e-5``, symmetric ``k // 2``).
"""
from __future__ import annotations

import flax.linen as nn
import jax

from kd_jax.models.layers import Classifier, ConvBN, global_avg_pool, stage_taps
from kd_jax.models.mobilenetv3 import MBConv

# (expansion, kernel, output channels, blocks, first stride): timm's arch_def
# ds_r1_k3_s1_e1_c16, ir_r2_k3_s2_e6_c24, ir_r2_k5_s2_e6_c40, ir_r3_k3_s2_e6_c80,
# ir_r3_k5_s1_e6_c112, ir_r4_k5_s2_e6_c192, ir_r1_k3_s1_e6_c320 at depth and width 1.
GROUPS = (
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
)
# The group (0-based) that ends each tapped stage: the last at 1/4, 1/8, 1/16, 1/32.
STAGE_ENDS = (1, 2, 4, 6)
# The group whose first block is the first stride-2 one (stride 1 with the CIFAR stem).
FIRST_DOWN = 1


class EfficientNetLite0(Classifier):
  """EfficientNet-Lite0, timm's ``efficientnet_lite0``.

  With ``cifar_stem`` the stem and group 1 have stride 1, for 32x32 inputs (final map
  4x4 instead of 1x1); the parameters are the same.

  Taps: ``stem``; ``stage_1..4``, the outputs of groups (0-based) 1, 2, 4, 6 (channels
  24, 40, 112, 320), the last group at 1/4, 1/8, 1/16 and 1/32 of the input size (1/1,
  1/2, 1/4, 1/8 with ``cifar_stem``); block outputs are linear, so ``preact_stage_k``
  is the same array; ``embedding``, the pooled 1280-d map (the classifier's input;
  dropout, in training with a ``'dropout'`` rng, comes after it).
  """
  cifar_stem: bool = False
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(), self.norm(train)
    x = ConvBN(32, 3, conv, norm, 1 if self.cifar_stem else 2, activation=jax.nn.relu6,
               name="stem")(x.astype(self.dtype))
    taps = {"stem": x}
    for g, (expansion, kernel, features, num_blocks, first_stride) in enumerate(GROUPS):
      if self.cifar_stem and g == FIRST_DOWN:
        first_stride = 1
      for j in range(num_blocks):
        x = MBConv(features, x.shape[-1] * expansion, kernel, conv, norm, jax.nn.relu6,
                   first_stride if j == 0 else 1, name=f"group{g}_block{j}")(x)
      if g in STAGE_ENDS:
        stage_taps(taps, STAGE_ENDS.index(g) + 1, x, preact=x)
    x = ConvBN(1280, 1, conv, norm, activation=jax.nn.relu6, name="head_conv")(x)
    taps["embedding"] = global_avg_pool(x)
    x = nn.Dropout(self.dropout_rate,
                   deterministic=not train or not self.has_rng("dropout"))(taps["embedding"])
    return self.head(x), taps
