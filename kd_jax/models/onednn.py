"""oneDNN's convolutions inside XLA:CPU programs, through XLA's FFI.

XLA:CPU computes convolutions with Eigen kernels. On a 2-core AVX-512 CPU oneDNN's
(PyTorch's CPU convolutions) were 1.4-1.5x faster forward and 1.4-1.7x backward
for the zoo's shapes (`benchmarks/conv_kernels.py`), and XLA's own matrix products
stay below them, so no rewriting inside XLA closes that gap. This module compiles
`native/onednn_conv.cc` (three XLA FFI handlers: forward, input gradient, kernel
gradient) against the oneDNN wheel on first use, caches the library per source and
version, and registers the handlers; `conv` is a `jax.custom_vjp` over them.

The zoo uses it on the CPU ('taps') path for dense float32 2-D convolutions
(`kd_jax.models.layers.conv_general_dilated`); exports, MAC counts and every other
backend keep `lax.conv_general_dilated`. It is off where oneDNN or a C++ compiler is
missing (one warning says why); `KD_JAX_ONEDNN=0` turns it off for the process and
`with onednn.disabled():` while tracing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(__file__), "native", "onednn_conv.cc")
_HANDLERS = {"forward": "KdConvForward", "input_grad": "KdConvBackwardData",
             "kernel_grad": "KdConvBackwardWeights"}
_TARGET_PREFIX = "kd_jax_onednn_"


def _prefixes() -> list[str]:
  """Where pip puts the oneDNN wheels' lib/ and include/: the environment, the user."""
  return list(dict.fromkeys([sys.prefix, sysconfig.get_config_var("userbase") or "",
                             os.path.expanduser("~/.local")]))


def _find(relative: str) -> str | None:
  for prefix in _prefixes():
    path = os.path.join(prefix, relative)
    if prefix and os.path.exists(path):
      return path
  return None


def _cache_dir() -> str:
  root = os.environ.get("KD_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kd_jax")
  return os.path.join(root, "native")


def _build(dnnl_lib: str, dnnl_include: str) -> str:
  """Compiles the handlers once per (source, jaxlib, oneDNN) and returns the library."""
  with open(_SOURCE, "rb") as f:
    source = f.read()
  digest = hashlib.sha256(source + jax.__version__.encode() + dnnl_lib.encode()
                          + str(os.path.getsize(dnnl_lib)).encode()).hexdigest()[:16]
  target = os.path.join(_cache_dir(), f"libkd_onednn_conv-{digest}.so")
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  compiler = os.environ.get("CXX", "c++")
  fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
  os.close(fd)
  command = [compiler, "-O2", "-std=c++17", "-fPIC", "-shared", "-w", _SOURCE,
             f"-I{jax.ffi.include_dir()}", f"-I{dnnl_include}",
             dnnl_lib, "-o", partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
    os.replace(partial, target)  # atomic: concurrent first uses each build, one wins
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


_switch = threading.local()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Within the block the zoo traces XLA's convolutions (e.g. to compare the two)."""
  previous = getattr(_switch, "off", False)
  _switch.off = True
  try:
    yield
  finally:
    _switch.off = previous


def available() -> bool:
  """Whether the zoo sends convolutions to oneDNN here: registered, and not `disabled`."""
  return not getattr(_switch, "off", False) and _registered()


@functools.cache
def _registered() -> bool:
  """Builds (once) and registers the handlers; False where that cannot be done."""
  if os.environ.get("KD_JAX_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if not sys.platform.startswith("linux"):
    return False
  dnnl_lib = _find(os.path.join("lib", "libdnnl.so.3"))
  header = os.path.join("include", "oneapi", "dnnl", "dnnl.hpp")
  dnnl_header = _find(header)
  if dnnl_lib is None or dnnl_header is None:
    return False  # not installed (kd_jax installs it on Linux x86-64): XLA's kernels
  try:
    ctypes.CDLL(dnnl_lib, mode=ctypes.RTLD_GLOBAL)
    include = dnnl_header[:-len(header)] + "include"
    library = ctypes.CDLL(_build(dnnl_lib, include))
    for name, symbol in _HANDLERS.items():
      jax.ffi.register_ffi_target(_TARGET_PREFIX + name,
                                  jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    warnings.warn(f"kd_jax: oneDNN convolutions are off, XLA's are used ({e}); "
                  "set KD_JAX_ONEDNN=0 to silence this", RuntimeWarning, stacklevel=2)
    return False
  return True


def supports(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
             rhs_dilation=None, feature_group_count: int = 1) -> bool:
  """Whether `conv` computes this NHWC/HWIO `lax.conv_general_dilated` call."""
  return (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and not isinstance(padding, str) and len(window_strides) == 2
          and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
          and all(int(p) >= 0 for pair in padding for p in pair)
          and lhs.shape[0] > 0 and lhs.shape[3] == rhs.shape[2])


def _attributes(strides, padding) -> dict:
  (top, bottom), (left, right) = padding
  return {"sh": np.int64(strides[0]), "sw": np.int64(strides[1]), "ph0": np.int64(top),
          "ph1": np.int64(bottom), "pw0": np.int64(left), "pw1": np.int64(right)}


def _call(kind: str, shape, strides, padding, *operands):
  return jax.ffi.ffi_call(_TARGET_PREFIX + kind, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(*operands, **_attributes(strides, padding))


# Forward F(x, w), input gradient D(g, w) and kernel gradient K(x, g) are bilinear and
# adjoint to each other (<F(x, w), g> = <x, D(g, w)> = <w, K(x, g)>), so each one's
# gradients are the other two: reverse mode differentiates through any order.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int],
         padding: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
  """``lax.conv_general_dilated(x, kernel, strides, padding)`` (NHWC, HWIO), by oneDNN."""
  b, h, w, _ = x.shape
  kh, kw, _, out = kernel.shape
  shape = (b, (h + sum(padding[0]) - kh) // strides[0] + 1,
           (w + sum(padding[1]) - kw) // strides[1] + 1, out)
  return _call("forward", shape, strides, padding, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _input_grad(g, kernel, strides, padding, x_shape):
  return _call("input_grad", x_shape, strides, padding, g, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _kernel_grad(x, g, strides, padding, kernel_shape):
  return _call("kernel_grad", kernel_shape, strides, padding, x, g)


def _conv_fwd(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  return (_input_grad(g, kernel, strides, padding, x.shape),
          _kernel_grad(x, g, strides, padding, kernel.shape))


def _input_grad_fwd(g, kernel, strides, padding, x_shape):
  return _input_grad(g, kernel, strides, padding, x_shape), (g, kernel)


def _input_grad_bwd(strides, padding, x_shape, residuals, c):
  g, kernel = residuals
  return (conv(c, kernel, strides, padding),
          _kernel_grad(c, g, strides, padding, kernel.shape))


def _kernel_grad_fwd(x, g, strides, padding, kernel_shape):
  return _kernel_grad(x, g, strides, padding, kernel_shape), (x, g)


def _kernel_grad_bwd(strides, padding, kernel_shape, residuals, c):
  x, g = residuals
  return (_input_grad(g, c, strides, padding, x.shape), conv(x, c, strides, padding))


conv.defvjp(_conv_fwd, _conv_bwd)
_input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)
