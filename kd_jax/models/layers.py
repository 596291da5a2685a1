"""Building blocks shared by every model of the zoo.

The zoo reproduces PyTorch definitions, so the pieces here carry PyTorch's conventions:
BatchNorm with momentum 0.1 on the new batch (Flax ``momentum=0.9``) and ``eps=1e-5``,
convolutions padded symmetrically by ``kernel_size // 2`` (``padding=k//2`` in PyTorch,
not Flax's asymmetric ``'SAME'``), and the initialisers RepDistiller uses.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import onednn

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

  ``__call__(x, train=False)`` takes NHWC float images and returns
  ``(logits, taps)``: float32 logits ``[B, num_classes]`` and a dict of named
  features (``stem``, ``stage_k``, ``preact_stage_k`` where they exist, ``embedding``).
  """
  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  def norm(self, train: bool) -> ModuleDef:
    """BatchNorm with PyTorch's defaults, in training or inference mode."""
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype, axis_name=self.bn_axis_name)

  def conv(self, kernel_init: Callable = kaiming_normal_fan_out) -> ModuleDef:
    """Bias-free convolution in the computation dtype (see `conv_general_dilated`)."""
    return functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=kernel_init,
                             conv_general_dilated=conv_general_dilated)

  def head(self, embedding: jnp.ndarray,
           kernel_init: Callable = torch_default_init) -> jnp.ndarray:
    """The final linear classifier; returns float32 logits."""
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                      name="classifier")(embedding)
    return logits.astype(jnp.float32)


# Window operations on XLA:CPU. XLA lowers a grouped convolution with one channel per
# group to a slow generic loop: at CIFAR shape the MobileNetV2 student's training step
# ran 77 images/s, 12x slower than PyTorch's. The same convolution written as a sum of
# kh*kw shifted, per-channel-scaled views of the padded input is element-wise work
# that XLA fuses (a 64x16x16x96 forward: 80 ms -> 1.6 ms), and its gradients are
# again pads, slices and reductions. Likewise a max pool written as a running maximum
# over the window's strided views keeps VGG's forward out of one large library fusion
# that ran it at half speed, and a grouped 1x1 convolution (ShuffleV1) written as one
# matrix product per group trains 3.6x faster than XLA's grouped convolution.
# Parameters and results are those of the `lax` ops (up to float rounding; a max pool's
# gradient goes to the first maximum of each window, as with `nn.max_pool` and
# PyTorch), so the choice is made when tracing: 'taps' on the CPU backend, the `lax`
# ops elsewhere (cuDNN and TPU have fast kernels for them) and wherever a graph is
# exported, so that TFLite gets DEPTHWISE_CONV_2D, CONV_2D and MAX_POOL_2D
# (`kd_jax.export`) and MAC counts see convolutions (`kd_jax.edge.cost`).
IMPLEMENTATIONS = ("auto", "taps", "lax")
_implementation = threading.local()


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
  """Within the block, the zoo traces grouped convolutions and max pools as ``name``.

  ``'taps'``: sums / maxima of shifted views and per-group matrix products; ``'lax'``:
  ``lax.conv_general_dilated`` and ``nn.max_pool``; ``'auto'`` (the default): 'taps'
  when JAX's default backend is the CPU, else 'lax'.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
  previous = getattr(_implementation, "name", "auto")
  _implementation.name = name
  try:
    yield
  finally:
    _implementation.name = previous


def _use_taps() -> bool:
  name = getattr(_implementation, "name", "auto")
  return name == "taps" or (name == "auto" and jax.default_backend() == "cpu")


def _window_views(padded: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
                  out_shape: Sequence[int]) -> Iterator[tuple[int, int, jnp.ndarray]]:
  """``(i, j, view)`` for each window tap: ``view[b, y, x] = padded[b, y*sh + i, x*sw + j]``."""
  batch, channels = padded.shape[0], padded.shape[-1]
  (sh, sw), (out_h, out_w) = strides, out_shape
  for i in range(window[0]):
    for j in range(window[1]):
      yield i, j, lax.slice(padded, (0, i, j, 0),
                            (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                             channels), (1, sh, sw, 1))


def max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int]) -> jnp.ndarray:
  """``nn.max_pool(x, window, strides)`` of an NHWC ``x``, unpadded; see `implementation`."""
  if not _use_taps():
    return nn.max_pool(x, tuple(window), strides=tuple(strides))
  out_shape = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:3], window, strides)]
  out = None
  for _, _, view in _window_views(x, window, strides, out_shape):
    # A strict comparison keeps the first maximum, so the gradient goes to it alone.
    out = view if out is None else jnp.where(view > out, view, out)
  return out


def depthwise_conv_taps(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                        padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """Depthwise 2-D convolution of NHWC ``x`` as a sum of shifted, scaled views.

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[kh, kw, 1, C]`` (HWIO with one input channel per group).
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))`` zero padding.

  Returns:
    ``[B, Ho, Wo, C]``, equal to ``lax.conv_general_dilated`` with
    ``feature_group_count=C``.
  """
  return _depthwise_taps(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))


def _depthwise_taps_forward(x, kernel, strides, padding):
  window = kernel.shape[:2]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_shape = [(size - k) // s + 1
               for size, k, s in zip(padded.shape[1:3], window, strides)]
  out = None
  for i, j, view in _window_views(padded, window, strides, out_shape):
    term = view * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


# The kernel gradient is kh*kw reductions of (shifted input view) * (output gradient)
# over batch and space. Left to autodiff, XLA:CPU materialises every shifted view of the
# whole batch before reducing each one (a 64x16x16x72 layer: 9 x 4.7 MB, ~20 ms). Here
# the kh*kw sums are one multi-output reduction, which XLA fuses with the views and
# products, run over batch chunks of about this many bytes of output gradient so that
# each chunk stays in cache (~3 ms for that layer).
_KERNEL_GRAD_CHUNK_BYTES = 512 * 1024


def _depthwise_kernel_grad(x, g, window, strides, padding):
  """``d(sum(out * g)) / d kernel`` of `depthwise_conv_taps`, as ``[kh, kw, 1, C]``."""
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  batch, out_h, out_w, channels = g.shape

  def reduce_taps(padded, g):
    g = g.astype(jnp.float32)
    products = tuple(view.astype(jnp.float32) * g for _, _, view in
                     _window_views(padded, window, strides, (out_h, out_w)))
    sums = lax.reduce(products, (np.float32(0),) * len(products),
                      lambda a, b: tuple(x + y for x, y in zip(a, b)), (0, 1, 2))
    return jnp.stack(sums)

  per_example = out_h * out_w * channels * 4
  size = max(1, min(batch, _KERNEL_GRAD_CHUNK_BYTES // per_example))
  size = max(d for d in range(1, size + 1) if batch % d == 0)
  if size == batch:
    grad = reduce_taps(padded, g)
  else:
    def body(k, total):
      return total + reduce_taps(lax.dynamic_slice_in_dim(padded, k * size, size),
                                 lax.dynamic_slice_in_dim(g, k * size, size))
    grad = lax.fori_loop(0, batch // size, body,
                         jnp.zeros((window[0] * window[1], channels), jnp.float32))
  return grad.reshape(*window, 1, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps(x, kernel, strides, padding):
  return _depthwise_taps_forward(x, kernel, strides, padding)


def _depthwise_taps_fwd(x, kernel, strides, padding):
  return _depthwise_taps_forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_taps_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x: _depthwise_taps_forward(x, kernel, strides, padding), x)
  kernel_grad = _depthwise_kernel_grad(x, g, kernel.shape[:2], strides, padding)
  return x_vjp(g)[0], kernel_grad.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def grouped_pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                           groups: int, precision=None) -> jnp.ndarray:
  """Grouped 1x1 convolution of NHWC ``x`` as one matrix product per group.

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[1, 1, C // groups, O]`` (HWIO); output channels ``[i*O/g, (i+1)*O/g)``
      read input channels ``[i*C/g, (i+1)*C/g)``.
    strides: ``(sh, sw)``; no padding.
    groups: the number of groups ``g``.

  Returns:
    ``[B, Ho, Wo, O]``, equal to ``lax.conv_general_dilated`` with
    ``feature_group_count=groups``.
  """
  x = x[:, ::strides[0], ::strides[1]]
  size_in, size_out = x.shape[-1] // groups, kernel.shape[-1] // groups
  rows = x.reshape(-1, x.shape[-1])
  out = jnp.concatenate(
      [jnp.matmul(rows[:, i * size_in:(i + 1) * size_in],
                  kernel[0, 0, :, i * size_out:(i + 1) * size_out], precision=precision)
       for i in range(groups)], axis=-1)
  return out.reshape(*x.shape[:3], kernel.shape[-1])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated``; on the 'taps' path, dense float32 2-D NHWC
  convolutions run oneDNN's kernels where `onednn.available()`, depthwise ones become
  `depthwise_conv_taps` and grouped 1x1 ones `grouped_pointwise_conv`.

  The zoo's ``nn.Conv`` layers call this; see `implementation`.
  """
  plain = (lhs.ndim == 4 and rhs.ndim == 4 and not isinstance(padding, str)
           and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and not kwargs
           and dimension_numbers == lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if (plain and feature_group_count == 1 and _use_taps()
      and onednn.supports(lhs, rhs, window_strides, padding) and onednn.available()):
    return onednn.conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))
  if plain and feature_group_count > 1 and _use_taps():
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1:
      return depthwise_conv_taps(lhs, rhs.astype(lhs.dtype), window_strides, padding)
    if rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
      return grouped_pointwise_conv(lhs, rhs.astype(lhs.dtype), window_strides,
                                    feature_group_count, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)


def conv2d(conv: ModuleDef, features: int, kernel_size: int, strides: int = 1,
           groups: int = 1, **kw) -> nn.Module:
  """A square convolution padded by ``kernel_size // 2`` on every side, as PyTorch's."""
  pad = kernel_size // 2
  return conv(features, (kernel_size, kernel_size), strides=(strides, strides),
              padding=((pad, pad), (pad, pad)), feature_group_count=groups, **kw)


# In a train step XLA:CPU feeds each weight-gradient convolution a transposed copy of
# the layer's input ([B, H, W, C] -> [C, H, W, B]). When that input is a ReLU output,
# XLA fuses the ReLU and the BatchNorm(s) before it into the transpose, recomputing
# them in the transpose's strided order: for resnet8x4 at batch 64 those fusions took
# 198 of 363 ms of thread time per step, against ~5 ms for a plain 16 MiB transpose.
# Computing the ReLU inside a conditional makes its output a buffer XLA cannot fuse
# through, so the transposes read it (198 -> 59 ms; student step +12-16%).
# `lax.optimization_barrier` does not survive XLA:CPU's passes. oneDNN's kernel
# gradient reads the NHWC input as it is, so with oneDNN's convolutions the ReLU stays
# plain (resnet8x4 step 140 -> 145 img/s, wrn_16_2 207 -> 213, within the noise).


@jax.custom_jvp
def relu(x: jnp.ndarray) -> jnp.ndarray:
  """``nn.relu``; differentiated on the 'taps' path with XLA's convolutions, its 4-D
  output is a buffer.

  Undifferentiated (inference, the teacher's forward, exports) it is ``nn.relu``
  itself; the values and gradients are ``nn.relu``'s everywhere.
  """
  return nn.relu(x)


@relu.defjvp
def _relu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  if x.ndim == 4 and x.size and _use_taps() and not onednn.available():
    probe = x[0, 0, 0, 0]  # a predicate XLA cannot fold; both branches are the same
    y = lax.cond(probe == probe, nn.relu, nn.relu, x)
  else:
    y = nn.relu(x)
  return y, jnp.where(x > 0, dx, jnp.zeros_like(dx))


class ConvBN(nn.Module):
  """Convolution, BatchNorm, then ReLU if ``relu``."""
  features: int
  kernel_size: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  groups: int = 1
  use_bias: bool = False
  relu: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = conv2d(self.conv, self.features, self.kernel_size, self.strides, self.groups,
               use_bias=self.use_bias, name="conv")(x)
    x = self.norm(name="bn")(x)
    return relu(x) if self.relu else x


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the spatial axes of an NHWC map, for any spatial size: ``[B, C]``."""
  return jnp.mean(x, axis=(1, 2))


def stage_taps(taps: dict, k: int, out: jnp.ndarray,
               preact: Optional[jnp.ndarray] = None) -> None:
  """Records stage ``k``'s output (and its pre-activation, when given) in ``taps``."""
  taps[f"stage_{k}"] = out
  if preact is not None:
    taps[f"preact_stage_{k}"] = preact
