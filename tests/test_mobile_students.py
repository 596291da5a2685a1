"""The mobile students (MobileNetV3, EfficientNet-Lite0) export to builtins-only TFLite.

Each CIFAR variant is converted at 32x32 in fp32 and full int8; the fp32 logits match
JAX's to 1e-4 of the largest logit (measured: 0.9 to 1.5e-6).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import export, models, op_profile

SHAPE = (32, 32, 3)


def _random_variables(model, rng):
  """Variables of ``model`` drawn with NumPy (no compiled init): kernels of variance
  1 / fan-in, so activations stay of order one through the depth, and BatchNorm
  statistics away from the identity, so folding them is exercised."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(1 / fan_in), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("name", [
    "mobilenetv3_small_cifar", "mobilenetv3_large_cifar", "efficientnet_lite0_cifar"])
def test_cifar_variant_exports_builtins_only_with_fp32_parity(name):
  rng = np.random.default_rng(0)
  model = models.create(name, 10, cpu_ops=False)
  variables = _random_variables(model, rng)
  images = rng.normal(size=(4, *SHAPE)).astype(np.float32)
  logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(
      variables, images)[0])
  builtins = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for quantization in ("fp32", "int8"):
    flatbuffer = export.to_tflite(model, variables, SHAPE, quantization,
                                  representative_images=images)
    ops = set(export.op_names(flatbuffer))
    assert ops <= builtins, ops
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= ops
    # No HARD_SWISH (XNNPACK has no int8 kernel for it): one XNNPACK partition.
    assert "HARD_SWISH" not in ops
    assert op_profile.delegated(export.TFLiteModel(flatbuffer).interpreter) == 1
    if quantization == "fp32":
      got = export.TFLiteModel(flatbuffer)(images)
      assert np.abs(got - logits).max() <= 1e-4 * np.abs(logits).max()
    else:
      assert {"QUANTIZE", "DEQUANTIZE"} <= ops
