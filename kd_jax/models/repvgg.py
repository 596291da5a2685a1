"""RepVGG-A0, a student trained with branches and deployed as a plain 3x3-conv stack.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021, as the
authors' repository (DingXiaoH/RepVGG, ``create_RepVGG_A0``) and timm's ``repvgg_a0``
define it: five stages of 1, 2, 4, 14 and 1 blocks of widths ``min(64, 64a)``,
``64a``, ``128a``, ``256a`` and ``512b`` with ``a = 0.75``, ``b = 2.5`` (48, 48, 96,
192, 1280 channels), the first block of each stage with stride 2, global pooling and
the classifier. Convolutions are bias-free, BatchNorm is PyTorch's (momentum 0.1,
``eps=1e-5``) and every weight keeps PyTorch's default initialisation, as the
reference does.

**Training form** (``deploy=False``). A block with input ``x`` (``C_in`` channels) and
``C`` output channels computes

  ``y = relu(BN_3(W_3 * x) + BN_1(W_1 * x) + [BN_0(x)])``

with a 3x3 kernel ``W_3`` (padding 1), a 1x1 kernel ``W_1`` (padding 0), both with the
block's stride, and the identity branch ``BN_0`` only when ``C_in == C`` and the stride
is 1.

**Deploy form** (``deploy=True``). In inference each BatchNorm is an affine map per
channel, ``BN(z) = g (z - m) / sqrt(v + eps) + b``, so a branch ``BN(W * x)`` is the
convolution with kernel ``W' = W · g / s`` (per output channel, ``s = sqrt(v + eps)``)
plus the bias ``b' = b - g m / s``. The 1x1 kernel is the 3x3 kernel that is zero but
at its centre: with padding 1 and the same stride the 3x3 window of output pixel ``p``
is centred on the input pixel the 1x1 kernel reads, so the two convolutions agree. The
identity is the 3x3 kernel ``I[1, 1, i, o] = [i == o]``. Convolution is linear in its
kernel, so the block is one 3x3 convolution with bias,

  ``y = relu(K * x + c)``,  ``K = W_3' + pad(W_1') + I'``,  ``c = b_3' + b_1' + b_0'``,

which is what `reparameterize` computes from a trained model's variables. The deploy
form has 8,309,384 parameters at 1000 classes (the paper's Table: 8.30M; the training
form 9,108,968) and exports as a VGG: one CONV_2D with fused ReLU per block.

**CIFAR variant** (``cifar_stem=True``, ``repvgg_a0_cifar``). mdistiller's model zoo
has no RepVGG, so the rule is the one of the zoo's other ImageNet students
(`kd_jax.models.mobilenetv3`): the stem and the first block of stage 1 have stride 1,
so a 32x32 image keeps 32x32 through stage 1 and stages 1-4 end at 32, 16, 8 and 4
pixels. Stage 1's first block then keeps both width and resolution, so by the rule
above it gains an identity branch: the training form has 2 x 48 more parameters
(one BatchNorm), the deploy form the same count as the ImageNet form.
"""
from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kd_jax.models.layers import (Classifier, ConvBN, ModuleDef, conv2d, global_avg_pool,
                                  quant_point, stage_taps, torch_default_init)

# Blocks per stage (stage 0 is the stem block) and the width multipliers a, b of A0.
STAGE_BLOCKS = (1, 2, 4, 14, 1)
WIDTH_A, WIDTH_B = 0.75, 2.5
STAGE_WIDTHS = (min(64, int(64 * WIDTH_A)), int(64 * WIDTH_A), int(128 * WIDTH_A),
                int(256 * WIDTH_A), int(512 * WIDTH_B))  # 48, 48, 96, 192, 1280


def block_names() -> list[str]:
  """The blocks' module names, in order: ``stage{s}_block{j}``."""
  return [f"stage{s}_block{j}" for s, n in enumerate(STAGE_BLOCKS) for j in range(n)]


class RepVGGBlock(nn.Module):
  """One RepVGG block, in training form (three branches) or deploy form (one conv).

  Returns ``(relu(pre), pre)``: the output (marked as an int8 tensor of the exported
  graph) and its pre-activation.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  deploy: bool = False

  @nn.compact
  def __call__(self, x):
    if self.deploy:
      pre = conv2d(self.conv, self.features, 3, self.strides, use_bias=True,
                   name="fused")(x)
    else:
      pre = ConvBN(self.features, 3, self.conv, self.norm, self.strides, relu=False,
                   name="conv3x3")(x)
      pre = pre + ConvBN(self.features, 1, self.conv, self.norm, self.strides,
                         relu=False, name="conv1x1")(x)
      if self.strides == 1 and x.shape[-1] == self.features:
        pre = pre + self.norm(name="identity")(x)
    return quant_point(nn.relu(pre), "out"), pre


class RepVGG(Classifier):
  """RepVGG-A0 (see the module docstring); ``deploy`` selects the fused form.

  Taps: ``stem``, the stage-0 block's output; ``stage_1..4``, the last block of stages
  1-4 (48, 96, 192, 1280 channels at 1/4 ... 1/32 of the input, 1/1 ... 1/8 with
  ``cifar_stem``) after ReLU and ``preact_stage_k`` before it; ``embedding``, the
  pooled 1280-d map (the classifier's input). Both forms give the same taps.

  `export_form` is the deploy form (`reparameterize`); `kd_jax.export` converts it.
  """
  cifar_stem: bool = False
  deploy: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = self.conv(kernel_init=torch_default_init), self.norm(train)
    x = x.astype(self.dtype)
    taps = {}
    for s, (num_blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS)):
      for j in range(num_blocks):
        stride = 1 if j > 0 or (self.cifar_stem and s < 2) else 2
        x, pre = RepVGGBlock(width, conv, norm, stride, self.deploy,
                             name=f"stage{s}_block{j}")(x)
      if s == 0:
        taps["stem"] = x
      else:
        stage_taps(taps, s, x, pre)
    taps["embedding"] = global_avg_pool(x)
    return self.head(taps["embedding"]), taps

  @nn.nowrap
  def export_form(self, variables: Any) -> Tuple["RepVGG", Any]:
    """The model and variables to export: the deploy form (`reparameterize`)."""
    return reparameterize(self, variables)


def _fold(kernel, bn_params, bn_stats, eps):
  """``BN(W * x)`` as ``W' * x + b'``: ``W' = W g / s``, ``b' = b - g m / s``,
  ``s = sqrt(v + eps)`` (per output channel, the kernel's last axis)."""
  factor = bn_params["scale"] / jnp.sqrt(bn_stats["var"] + eps)
  return kernel * factor, bn_params["bias"] - bn_stats["mean"] * factor


def fuse_block(params: Any, stats: Any, eps: float) -> dict:
  """The deploy-form parameters ``{'kernel': [3, 3, C_in, C], 'bias': [C]}`` of one
  training-form block's ``params`` and BatchNorm ``stats`` (see the module docstring)."""
  k3, b3 = _fold(params["conv3x3"]["conv"]["kernel"], params["conv3x3"]["bn"],
                 stats["conv3x3"]["bn"], eps)
  k1, b1 = _fold(params["conv1x1"]["conv"]["kernel"], params["conv1x1"]["bn"],
                 stats["conv1x1"]["bn"], eps)
  kernel = k3 + jnp.pad(k1, ((1, 1), (1, 1), (0, 0), (0, 0)))
  bias = b3 + b1
  if "identity" in params:
    channels = kernel.shape[-1]
    eye = np.zeros((3, 3, channels, channels), np.float32)
    eye[1, 1] = np.eye(channels, dtype=np.float32)
    k0, b0 = _fold(jnp.asarray(eye), params["identity"], stats["identity"], eps)
    kernel, bias = kernel + k0, bias + b0
  return {"kernel": kernel, "bias": bias}


def reparameterize(model: RepVGG, variables: Any) -> Tuple[RepVGG, Any]:
  """The deploy form of a training-form RepVGG and its variables.

  Each block's three branches are fused into one 3x3 convolution with bias (module
  docstring); the classifier is kept. The result computes the same inference logits
  and taps up to float rounding (the tests measure under 1e-6 of the largest logit),
  for any number of classes and either stem. A deploy-form model is returned as it is.

  Args:
    model: a `RepVGG` (``deploy=False``).
    variables: its ``{'params', 'batch_stats'}``; other collections are dropped.

  Returns:
    ``(model.clone(deploy=True), {'params': ...})``: the deploy form has no BatchNorm,
    hence no ``batch_stats``.
  """
  if model.deploy:
    return model, variables
  params, stats = variables["params"], variables["batch_stats"]
  fused = {name: {"fused": fuse_block(params[name], stats[name], model.BN_EPSILON)}
           for name in block_names()}
  fused["classifier"] = params["classifier"]
  return model.clone(deploy=True), {"params": fused}
