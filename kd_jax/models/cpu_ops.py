"""Pure-JAX rewrites of the grouped convolutions that XLA:CPU runs slowly.

A zoo model built with ``cpu_ops=True`` (the default of `kd_jax.models.create` when
JAX's default backend is the CPU) traces two operations with the functions of this
module instead of ``lax.conv_general_dilated``:

- a depthwise convolution (one channel per group; MobileNetV2, ShuffleNets) as a sum of
  ``kh * kw`` shifted, per-channel-scaled views of the padded input: element-wise work
  that XLA fuses, where XLA:CPU lowers the grouped convolution to a generic loop;
- a grouped 1x1 convolution (ShuffleNetV1) as one matrix product per group.

Values and gradients are those of the ``lax`` op up to float rounding, and parameters
are identical, so a model can be traced either way from the same variables. Exports,
MAC counts and accelerators use the ``lax`` op: TFLite then gets DEPTHWISE_CONV_2D and
CONV_2D, and cuDNN / TPUs their own kernels.

``python benchmarks/cpu_ops.py`` measures what each rewrite gives, per model, as the
training-step throughput with and without them (`benchmarks/results/cpu_ops.md`).
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


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


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
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
  return _depthwise(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))


def _depthwise_forward(x, kernel, strides, padding):
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
# over batch and space. Left to autodiff, XLA:CPU materialises every shifted view of
# the whole batch before reducing each one. Here the kh*kw sums are one multi-output
# reduction, which XLA fuses with the views and products, run over batch chunks of
# about this many bytes of output gradient so that each chunk stays in cache.
_KERNEL_GRAD_CHUNK_BYTES = 512 * 1024


def _depthwise_kernel_grad(x, g, window, strides, padding):
  """``d(sum(out * g)) / d kernel`` of `depthwise_conv`, as ``[kh, kw, 1, C]``."""
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
def _depthwise(x, kernel, strides, padding):
  return _depthwise_forward(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
  return _depthwise_forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x: _depthwise_forward(x, kernel, strides, padding), x)
  kernel_grad = _depthwise_kernel_grad(x, g, kernel.shape[:2], strides, padding)
  return x_vjp(g)[0], kernel_grad.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def grouped_pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                           groups: int, precision=None) -> jnp.ndarray:
  """Grouped 1x1 convolution of NHWC ``x`` as one matrix product per group.

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[1, 1, C // groups, O]`` (HWIO); output channels ``[i*O/g, (i+1)*O/g)``
      read input channels ``[i*C/g, (i+1)*C/g)``.
    strides: ``(sh, sw)``; no padding.
    groups: the number of groups ``g``.
    precision: passed to the matrix products.

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
  """``lax.conv_general_dilated``, with grouped NHWC convolutions rewritten.

  A depthwise convolution becomes `depthwise_conv` and a grouped unpadded 1x1 one
  `grouped_pointwise_conv`; every other convolution is ``lax``'s. Signature of
  ``lax.conv_general_dilated``, so that ``nn.Conv(conv_general_dilated=...)`` takes it.
  """
  plain = (lhs.ndim == 4 and rhs.ndim == 4 and not isinstance(padding, str)
           and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and not kwargs
           and dimension_numbers == lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if plain and feature_group_count > 1:
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1:
      return depthwise_conv(lhs, rhs.astype(lhs.dtype), window_strides, padding)
    if rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
      return grouped_pointwise_conv(lhs, rhs.astype(lhs.dtype), window_strides,
                                    feature_group_count, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)
