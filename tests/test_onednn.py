"""oneDNN convolutions on the CPU path: values, gradients, routing, and when they are off."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kd_jax import models
from kd_jax.models import layers, onednn

# The oneDNN wheels are dependencies on Linux x86-64; there the library must build.
INSTALLED = (onednn._find(os.path.join("lib", "libdnnl.so.3")) is not None
             and sys.platform.startswith("linux"))
needs_onednn = pytest.mark.skipif(not INSTALLED, reason="the oneDNN wheel is not installed")


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@needs_onednn
def test_onednn_builds_where_its_wheel_is_installed():
  assert onednn.available()


@needs_onednn
@pytest.mark.parametrize("x_shape, k_shape, strides, padding", [
    ((2, 8, 8, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1))),     # a stem
    ((3, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),   # a downsampling 3x3
    ((3, 8, 8, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),   # a 1x1 shortcut
    ((2, 5, 7, 6), (3, 2, 6, 9), (1, 2), ((0, 2), (1, 0))),     # odd and asymmetric
])
def test_onednn_convolution_equals_lax_in_value_and_both_gradients(
    x_shape, k_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
  ours = jax.jit(lambda x, w: onednn.conv(x, w, strides, padding))
  reference = _lax_conv(x, w, strides, padding)
  np.testing.assert_allclose(ours(x, w), reference, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=reference.shape), jnp.float32)
  dx, dw = jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g))(x, w, g)
  ref_dx, ref_dw = jax.vjp(lambda x, w: _lax_conv(x, w, strides, padding), x, w)[1](g)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)


def _ffi_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("ffi_call")


@needs_onednn
def test_zoo_sends_dense_convolutions_to_onednn_on_the_taps_path_only():
  model = models.create("resnet8", 10)  # 9 dense convolutions
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x[:1], train=False)

  def loss(params, impl):
    with layers.implementation(impl):
      (logits, _), _ = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
    return jnp.mean(logits ** 2)

  def forward(v, impl):
    with layers.implementation(impl):
      return model.apply(v, x, train=False)[0]

  params = variables["params"]
  # Forward, input gradient and kernel gradient per convolution (XLA drops the stem's
  # unused input gradient later).
  grad = jax.grad(loss)
  assert _ffi_calls(lambda p: grad(p, "taps"), params) == 9 * 3
  assert _ffi_calls(lambda v: forward(v, "taps"), variables) == 9
  assert _ffi_calls(lambda p: grad(p, "lax"), params) == 0
  assert _ffi_calls(lambda v: forward(v, "lax"), variables) == 0
  with onednn.disabled():
    assert _ffi_calls(lambda p: grad(p, "taps"), params) == 0
  assert onednn.available()  # the block ends, oneDNN is back
  # Not float32 (the bfloat16 teacher forward of `make_train_step`): XLA's convolutions.
  bf16 = model.clone(dtype=jnp.bfloat16)
  with layers.implementation("taps"):
    assert _ffi_calls(lambda v: bf16.apply(v, x, train=False)[0], variables) == 0
  # The train step's gradients agree with the `lax` ops'.
  ours, reference = jax.jit(lambda p: grad(p, "taps"))(params), grad(params, "lax")
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


def _available_in_subprocess(env: dict) -> subprocess.CompletedProcess:
  code = ("import warnings; warnings.simplefilter('always');"
          "from kd_jax.models import onednn; print('available', onednn.available())")
  return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                        capture_output=True, text=True, timeout=300)


def test_onednn_is_off_when_the_environment_says_so():
  result = _available_in_subprocess({"KD_JAX_ONEDNN": "0"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "available False" in result.stdout
  assert "oneDNN" not in result.stderr


@needs_onednn
def test_without_a_compiler_onednn_is_off_with_one_warning(tmp_path):
  result = _available_in_subprocess({"CXX": str(tmp_path / "no-such-compiler"),
                                     "KD_JAX_CACHE": str(tmp_path / "cache")})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "available False" in result.stdout
  assert result.stderr.count("oneDNN convolutions are off, XLA's are used") == 1
  assert os.listdir(tmp_path / "cache" / "native") == []  # no half-written library


@needs_onednn
def test_onednn_convolution_differentiates_twice_like_lax():
  # A gradient penalty: the gradient of |d loss / d x|^2 with respect to the kernel and x.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  strides, padding = (2, 1), ((1, 1), (0, 2))
  t = jnp.asarray(rng.normal(size=_lax_conv(x, w, strides, padding).shape), jnp.float32)

  def penalty(conv):
    loss = lambda x, w: jnp.sum(jnp.tanh(conv(x, w, strides, padding)) * t)
    return lambda x, w: jnp.sum(jax.grad(loss, argnums=(0, 1))(x, w)[0] ** 2)

  ours = jax.jit(jax.grad(penalty(onednn.conv), argnums=(0, 1)))(x, w)
  reference = jax.grad(penalty(_lax_conv), argnums=(0, 1))(x, w)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
