"""Quantization-aware training: any zoo model with TFLite's full-int8 arithmetic simulated.

`quant_aware(model)` returns a module with the same fields and the same variables as
`model` whose forward pass rounds, as TFLite's full-integer kernels do:

- **weights** of every convolution and dense layer: symmetric, per output channel,
  `bits` bits: ``w_q = s · clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)`` with
  ``s = max|w| / (2^(b-1) - 1)`` per output channel. TFLite folds each BatchNorm into
  the convolution before it, which multiplies every output channel by its own factor;
  per-output-channel symmetric rounding commutes with that scaling, so rounding the
  unfolded kernel lands on exactly the grid the converter will use.
- **activations** entering every convolution and dense layer (the image included):
  asymmetric, per tensor, over ``[min(x, 0), max(x, 0)]`` of the current batch, the
  range TFLite's calibration records (it too widens ranges to contain 0).

Rounding passes gradients straight through (Bengio et al., 2013; Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018). A QAT model is trained like any student (the teacher guides it
through the same objective), then exported with `materialize` + full-int8 conversion.

Why the fake-quant ops are written here rather than taken from a library: the target
is TFLite's int8 scheme, reached through the float graph plus calibration. AQT (aqtp)
quantises `dot_general` for int8 XLA execution and lacks the convolution path this
zoo needs; TF-MOT's QAT is Keras-only. The scheme above is a few lines, acts on
unmodified zoo models through Flax's variable mapping and method interception, and
keeps their variables, so a distilled student's checkpoint is its starting point.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _round_ste(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """clip(round(x), lo, hi) forward, identity backward (straight-through estimator).

  The ranges below contain every value, so clipping only absorbs float error and the
  gradient is passed through unchanged everywhere.
  """
  return x + jax.lax.stop_gradient(jnp.clip(jnp.round(x), lo, hi) - x)


def fake_quant_weight(w: jax.Array, bits: int = 8) -> jax.Array:
  """Symmetric per-output-channel (last axis) rounding of a kernel to `bits` bits."""
  qmax = 2.0 ** (bits - 1) - 1
  scale = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / qmax
  scale = jax.lax.stop_gradient(jnp.where(scale > 0, scale, 1.0))
  return _round_ste(w / scale, -qmax, qmax) * scale


def fake_quant_activation(x: jax.Array, bits: int = 8) -> jax.Array:
  """Asymmetric per-tensor rounding over [min(x, 0), max(x, 0)] to `bits` bits."""
  levels = 2.0 ** bits - 1
  lo = jax.lax.stop_gradient(jnp.minimum(jnp.min(x), 0.0))
  hi = jax.lax.stop_gradient(jnp.maximum(jnp.max(x), 0.0))
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  zero_point = jnp.round(-lo / scale)  # the integer that represents 0 exactly
  q = _round_ste(x / scale, -zero_point, levels - zero_point)  # integer minus zero point
  return (q * scale).astype(x.dtype)


def fake_quant_params(params: Any, bits: int = 8) -> Any:
  """Rounds every ``kernel`` leaf of a params tree (convolutions and dense layers)."""
  def leaf(path, w):
    name = getattr(path[-1], "key", None)
    return fake_quant_weight(w, bits) if name == "kernel" else w
  return jax.tree_util.tree_map_with_path(leaf, params)


def materialize(variables: Any, bits: int = 8) -> Any:
  """`variables` with each kernel replaced by its rounded value (for the plain model).

  Exporting the plain model with these weights through full-int8 conversion gives the
  integers the QAT model simulated.
  """
  return {**variables, "params": fake_quant_params(variables["params"], bits)}


def quant_aware(model: nn.Module, bits: int = 8) -> nn.Module:
  """The QAT version of `model`: same fields, same variables, int8 arithmetic simulated.

  `init` behaves as the plain model's; `apply` rounds weights and activations. Fields
  such as `bn_axis_name` and `dtype` can still be changed with `clone`.
  """
  if isinstance(model, _QuantAware):
    return model
  base = type(model)
  mapped = nn.map_variables(base, "params",
                            trans_in_fn=lambda p: fake_quant_params(p, bits), init=False)

  def quantize_inputs(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
      args = (fake_quant_activation(args[0], bits),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  class QuantAware(mapped, _QuantAware):  # pylint: disable=missing-class-docstring
    quant_bits = bits

    def __call__(self, x, train: bool = False):
      if self.is_initializing():  # the plain model's variables, unrounded
        return base.__call__(self, x, train)
      with nn.intercept_methods(quantize_inputs):
        return super().__call__(x, train)

  QuantAware.__name__ = QuantAware.__qualname__ = f"QuantAware{base.__name__}"
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return QuantAware(**fields)


class _QuantAware:
  """Marks modules made by `quant_aware`."""


def is_quant_aware(model: nn.Module) -> bool:
  return isinstance(model, _QuantAware)
