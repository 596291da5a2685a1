"""Quantization-aware training: any zoo model with TFLite's full-int8 arithmetic simulated.

`quant_aware(model)` returns a module with the same fields and the same parameters as
`model` whose forward pass rounds, as TFLite's full-integer kernels do:

- **weights** of every convolution and dense layer: symmetric, per output channel,
  `bits` bits: ``w_q = s · clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)`` with
  ``s = max|w| / (2^(b-1) - 1)`` per output channel. TFLite folds each BatchNorm into
  the convolution before it, which multiplies every output channel by its own factor;
  per-output-channel symmetric rounding commutes with that scaling, so rounding the
  unfolded kernel lands on exactly the grid the converter will use.
- **activations**: every tensor the int8 TFLite graph stores in int8 — the image, each
  convolution's output after its folded BatchNorm and fused ReLU (a zoo `ConvBN`), the
  dense outputs (the logits), and the tensors the zoo marks with `quant_point`
  (residual sums after their ReLU, concatenations, pooled maps) — asymmetric, per
  tensor, over ``[min(lo, 0), max(hi, 0)]`` (TFLite too widens ranges to contain 0).
  A convolution or dense input that is none of these (a pre-activation network's
  BatchNorm-ReLU output) is rounded where it enters.

Each activation's range ``[lo, hi]`` is state, as in TF-MOT's and PyTorch's observers:
an exponential moving average of the batch minimum and maximum (``momentum`` 0.99, the
first training batch sets it), updated in training (`train=True` with the collection
mutable; across devices the batch extremes are reduced over the model's
``bn_axis_name``) and frozen in evaluation and export, so the evaluation output of an
image does not depend on the rest of its batch. Before the first training batch a
tensor passes unrounded. The ranges live in the ``batch_stats`` collection beside
BatchNorm's statistics, under ``<tensor>_range`` / ``<tensor>_seen`` of the module
that produces the tensor: they are the same kind of state (updated in training,
frozen in evaluation), so the train state, checkpoints, resume and cross-device
evaluation carry them without change.

Rounding passes gradients straight through inside the range and stops them outside
(Bengio et al., 2013; Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018). A QAT model is trained like
any student (the teacher guides it through the same objective), then exported with
`materialize` + full-int8 conversion whose activation ranges are the learned ones
(`export_ranges`, `kd_jax.export.function_to_tflite(activation_ranges=...)`).

Why the fake-quant ops are written here rather than taken from a library: the target
is TFLite's int8 scheme, reached through the float graph plus calibration. AQT (aqtp)
quantises `dot_general` for int8 XLA execution and lacks the convolution path this
zoo needs; TF-MOT's QAT is Keras-only. The scheme above is a few lines, acts on
unmodified zoo models through Flax's variable mapping and method interception, and
keeps their parameters, so a distilled student's checkpoint is its starting point.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import layers as zoo_layers

STATS = "batch_stats"  # the collection holding the activation ranges
RANGE_MOMENTUM = 0.99  # PyTorch's MovingAverageMinMaxObserver (averaging_constant 0.01)


def _round_ste(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """clip(round(x), lo, hi) forward; backward the identity where x rounds inside
  [lo, hi] and zero where it is clipped (straight-through estimator)."""
  inside = (x >= lo - 0.5) & (x <= hi + 0.5)
  x = jnp.where(inside, x, lax.stop_gradient(x))
  return x + lax.stop_gradient(jnp.clip(jnp.round(x), lo, hi) - x)


def fake_quant_weight(w: jax.Array, bits: int = 8) -> jax.Array:
  """Symmetric per-output-channel (last axis) rounding of a kernel to `bits` bits."""
  qmax = 2.0 ** (bits - 1) - 1
  scale = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / qmax
  scale = lax.stop_gradient(jnp.where(scale > 0, scale, 1.0))
  return _round_ste(w / scale, -qmax, qmax) * scale


def fake_quant_activation(x: jax.Array, lo: jax.Array, hi: jax.Array,
                          bits: int = 8) -> jax.Array:
  """Asymmetric per-tensor rounding to `bits` bits over [min(lo, 0), max(hi, 0)].

  Scale ``(hi - lo) / (2^b - 1)`` and an integer zero point, as TFLite's int8
  activations; values outside the range are clipped to it.
  """
  levels = 2.0 ** bits - 1
  lo = lax.stop_gradient(jnp.minimum(lo, 0.0))
  hi = lax.stop_gradient(jnp.maximum(hi, 0.0))
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  zero_point = jnp.round(-lo / scale)  # the integer that represents 0 exactly
  q = _round_ste(x / scale, -zero_point, levels - zero_point)  # integer minus zero point
  return (q * scale).astype(x.dtype)


def update_range(old: jax.Array, seen: jax.Array, batch_min: jax.Array,
                 batch_max: jax.Array, momentum: float = RANGE_MOMENTUM) -> jax.Array:
  """The next ``[lo, hi]``: ``momentum · old + (1 - momentum) · [batch_min, batch_max]``,
  or the batch's own extremes when no batch was `seen` before."""
  batch = jnp.stack([batch_min, batch_max]).astype(jnp.float32)
  return jnp.where(seen > 0, momentum * old + (1.0 - momentum) * batch, batch)


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


def _interceptor(root: nn.Module, train: bool, bits: int, momentum: float,
                 record: Optional[list] = None) -> Callable:
  """The method interceptor of one `QuantAware` call.

  It observes (and rounds) the root's input, each `ConvBN` / `QuantPoint` / `Dense`
  output, and each convolution or dense input that is not already one of those.
  With `record` (a list) nothing is rounded: each tensor is appended with its range
  and its count of training batches, ``(value, lo, hi, seen)``, for `export_ranges`.
  """
  axis_name = getattr(root, "bn_axis_name", None)
  produced = []  # the tensors rounded so far in this call (already on their grid)
  calls = []  # the first call intercepted is the root's

  def observe(module: nn.Module, x: jax.Array, name: str) -> jax.Array:
    bounds = module.variable(STATS, f"{name}_range", lambda: jnp.zeros(2, jnp.float32))
    seen = module.variable(STATS, f"{name}_seen", lambda: jnp.zeros((), jnp.int32))
    if module.is_initializing():  # create the variables that `apply` will use
      produced.append(x)
      return x
    if train and module.is_mutable_collection(STATS):
      batch_min, batch_max = lax.stop_gradient(jnp.min(x)), lax.stop_gradient(jnp.max(x))
      if axis_name is not None:
        batch_min, batch_max = lax.pmin(batch_min, axis_name), lax.pmax(batch_max, axis_name)
      bounds.value = update_range(bounds.value, seen.value, batch_min, batch_max, momentum)
      seen.value = seen.value + 1
    lo, hi = bounds.value[0], bounds.value[1]
    if record is not None:
      record.append((x, lo, hi, seen.value))
      out = x
    else:
      out = jnp.where(seen.value > 0, fake_quant_activation(x, lo, hi, bits), x)
    produced.append(out)
    return out

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not args:
      return next_fun(*args, **kwargs)
    x = args[0]
    calls.append(module)
    if len(calls) == 1:
      # As a float32 array, whatever the caller passed, so that the model's own cast
      # to float32 keeps this very tensor (and the stem sees a rounded input).
      args = (observe(module, jnp.asarray(x, jnp.float32), "input"), *args[1:])
    elif (isinstance(module, (nn.Conv, nn.Dense))
          and not any(x is y for y in produced)):
      args = (observe(module, x, "input"), *args[1:])
    y = next_fun(*args, **kwargs)
    if isinstance(module, (zoo_layers.ConvBN, zoo_layers.QuantPoint, nn.Dense)):
      y = observe(module, y, "output")
    return y

  return intercept


def quant_aware(model: nn.Module, bits: int = 8,
                momentum: float = RANGE_MOMENTUM) -> nn.Module:
  """The QAT version of `model`: same fields and parameters, int8 arithmetic simulated.

  `init` gives the plain model's variables plus the activation ranges (not yet seen);
  `apply` rounds weights and activations. Fields such as `bn_axis_name` and `dtype`
  can still be changed with `clone`.
  """
  if isinstance(model, _QuantAware):
    return model
  base = type(model)
  mapped = nn.map_variables(base, "params",
                            trans_in_fn=lambda p: fake_quant_params(p, bits), init=False)

  class QuantAware(mapped, _QuantAware):  # pylint: disable=missing-class-docstring
    quant_bits = bits
    range_momentum = momentum

    def __call__(self, x, train: bool = False):
      with nn.intercept_methods(_interceptor(self, train, bits, momentum)):
        if self.is_initializing():  # the plain model's parameters, unrounded
          return base.__call__(self, x, train)
        return super().__call__(x, train)

    def recorded(self, x):
      """Inference mode without activation rounding; returns the observed tensors
      ``[(value, lo, hi, seen), ...]`` (see `export_ranges`)."""
      record = []
      with nn.intercept_methods(_interceptor(self, False, bits, momentum, record)):
        super().__call__(x, False)
      return record

  QuantAware.__name__ = QuantAware.__qualname__ = f"QuantAware{base.__name__}"
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return QuantAware(**fields)


class _QuantAware:
  """Marks modules made by `quant_aware`."""


def is_quant_aware(model: nn.Module) -> bool:
  return isinstance(model, _QuantAware)


def with_ranges(model: nn.Module, variables: Any, input_shape: Sequence[int]) -> Any:
  """`variables` of the plain model, completed with the QAT model's unseen ranges.

  Args:
    model: a `quant_aware` model; variables: the plain model's (e.g. the distilled
      student's); input_shape: one example's shape (H, W, C).
  """
  fresh = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *input_shape[-3:]), jnp.float32)))
  flat = flax.traverse_util.flatten_dict(dict(variables.get(STATS, {})))
  for key, leaf in flax.traverse_util.flatten_dict(dict(fresh.get(STATS, {}))).items():
    if key not in flat:
      flat[key] = jnp.zeros(leaf.shape, leaf.dtype)
  return {**variables, STATS: flax.traverse_util.unflatten_dict(flat)}


def export_ranges(model: nn.Module, variables: Any,
                  images: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
  """The learned activation ranges with the tensors they belong to, for the exporter.

  Runs the QAT model in inference mode without activation rounding (its rounded
  weights, i.e. the float model `materialize` exports) on `images`, and returns
  ``[(values [N, ...], lo, hi), ...]`` for every tensor whose range was seen in
  training; `kd_jax.export.function_to_tflite(activation_ranges=(images, ...))`
  finds each tensor of the converted graph among them.
  """
  recorded = jax.jit(lambda v, x: model.apply(v, x, method="recorded"))(
      variables, jnp.asarray(images, jnp.float32))
  return [(np.asarray(x), float(lo), float(hi)) for x, lo, hi, seen in recorded
          if int(seen) > 0]
