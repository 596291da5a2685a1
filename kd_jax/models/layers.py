"""Building blocks shared by every model of the zoo.

The zoo reproduces PyTorch definitions, so the pieces here carry PyTorch's conventions:
BatchNorm with momentum 0.1 on the new batch (Flax ``momentum=0.9``) and ``eps=1e-5``,
convolutions padded symmetrically by ``kernel_size // 2`` (``padding=k//2`` in PyTorch,
not Flax's asymmetric ``'SAME'``), and the initialisers RepDistiller uses.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from kd_jax.models import cpu_ops as cpu_ops_lib

ModuleDef = Any  # a Module class, or a functools.partial of one

# He et al. (2015) normal init with fan = k*k*out_channels (PyTorch `kaiming_normal_`
# with mode='fan_out', and RepDistiller's `normal_(0, sqrt(2 / n))`).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default for Conv2d / Linear weights: kaiming_uniform_(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# RepDistiller's classifier init for VGG and MobileNetV2.
small_normal = nn.initializers.normal(0.01)


class Classifier(nn.Module):
  """Fields every model of the zoo has; subclasses implement ``__call__``.

  Attributes:
    num_classes: size of the logits.
    dtype: computation dtype (parameters stay float32).
    bn_axis_name: passed as ``axis_name`` to every BatchNorm, so that a step under
      ``jax.shard_map`` over that axis normalises with cross-device statistics.
    cpu_ops: trace grouped convolutions with the pure-JAX rewrites of
      `kd_jax.models.cpu_ops` (faster on XLA:CPU) instead of the ``lax`` op. The
      parameters are the same either way; exports and MAC counts use
      ``model.clone(cpu_ops=False)`` (see `portable`).

  ``__call__(x, train=False)`` takes NHWC float images and returns
  ``(logits, taps)``: float32 logits ``[B, num_classes]`` and a dict of named
  features (``stem``, ``stage_k``, ``preact_stage_k`` where they exist, ``embedding``).
  """
  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  cpu_ops: bool = False
  # BatchNorm's settings: PyTorch's defaults (momentum 0.1 on the new batch, i.e. Flax
  # 0.9); a definition that sets its own overrides these class constants.
  BN_MOMENTUM = 0.9
  BN_EPSILON = 1e-5

  def norm(self, train: bool) -> ModuleDef:
    """BatchNorm with the model's settings, in training or inference mode."""
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=self.BN_MOMENTUM,
        epsilon=self.BN_EPSILON, dtype=self.dtype, axis_name=self.bn_axis_name)

  def conv(self, kernel_init: Callable = kaiming_normal_fan_out) -> ModuleDef:
    """Bias-free convolution in the computation dtype."""
    return functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kernel_init,
        conv_general_dilated=(cpu_ops_lib.conv_general_dilated if self.cpu_ops
                              else lax.conv_general_dilated))

  def head(self, embedding: jnp.ndarray,
           kernel_init: Callable = torch_default_init) -> jnp.ndarray:
    """The final linear classifier; returns float32 logits."""
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                      name="classifier")(embedding)
    return logits.astype(jnp.float32)


def conv2d(conv: ModuleDef, features: int, kernel_size: int, strides: int = 1,
           groups: int = 1, **kw) -> nn.Module:
  """A square convolution padded by ``kernel_size // 2`` on every side, as PyTorch's."""
  pad = kernel_size // 2
  return conv(features, (kernel_size, kernel_size), strides=(strides, strides),
              padding=((pad, pad), (pad, pad)), feature_group_count=groups, **kw)


class ConvBN(nn.Module):
  """Convolution, BatchNorm, then ``activation`` (ReLU unless given) if ``relu``."""
  features: int
  kernel_size: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  groups: int = 1
  use_bias: bool = False
  relu: bool = True
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = conv2d(self.conv, self.features, self.kernel_size, self.strides, self.groups,
               use_bias=self.use_bias, name="conv")(x)
    x = self.norm(name="bn")(x)
    return self.activation(x) if self.relu else x


def portable(model: nn.Module) -> nn.Module:
  """``model`` traced with the ``lax`` ops only: what exports and MAC counts trace.

  A zoo model built with ``cpu_ops=True`` is cloned with ``cpu_ops=False`` (same
  parameters); any other module is returned as it is.
  """
  if isinstance(model, Classifier) and model.cpu_ops:
    return model.clone(cpu_ops=False)
  return model


def export_form(model: nn.Module, variables: Any) -> tuple[nn.Module, Any]:
  """The ``(model, variables)`` a deployment runs: ``model.export_form(variables)``
  where the model defines it (a re-parameterisable student's fused form, e.g.
  `kd_jax.models.repvgg.reparameterize`), else the pair as it is. Both compute the
  same inference logits and taps."""
  hook = getattr(model, "export_form", None)
  return hook(variables) if hook is not None else (model, variables)


class QuantPoint(nn.Module):
  """Identity that marks a tensor the full-int8 TFLite graph stores in int8.

  Convolution (ConvBN) and dense outputs are such tensors already; the others (a
  residual sum after its ReLU, a concatenation, a pooled map) are marked with this
  module so that quantization-aware training (`kd_jax.edge.quantize`) rounds them as
  the exported model will. It holds no variables and changes nothing otherwise.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return x


def quant_point(x: jnp.ndarray, name: Optional[str] = None) -> jnp.ndarray:
  """``x``, marked as an int8 tensor of the exported graph (`QuantPoint`); call it
  inside a compact module method."""
  return QuantPoint(name=name)(x)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the spatial axes of an NHWC map, for any spatial size: ``[B, C]``.

  A `quant_point` (TFLite stores the pooled vector in int8), so call it inside a
  compact module method.
  """
  return quant_point(jnp.mean(x, axis=(1, 2)))


def stage_taps(taps: dict, k: int, out: jnp.ndarray,
               preact: Optional[jnp.ndarray] = None) -> None:
  """Records stage ``k``'s output (and its pre-activation, when given) in ``taps``."""
  taps[f"stage_{k}"] = out
  if preact is not None:
    taps[f"preact_stage_{k}"] = preact
