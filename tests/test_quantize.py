"""Tests for kd_jax.edge.quantize: int8 fake quantisation and QAT models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import export
from kd_jax.edge import quantize
from kd_jax.models import create


def test_weight_rounding_by_hand():
  # 2-bit symmetric: levels -1, 0, 1 times max|w| of each output channel (column).
  w = jnp.array([[1.0, -0.5], [0.3, 0.2]])
  expected = np.array([[1.0, -0.5], [0.0, 0.0]])  # col 0: 0.3/1 -> 0; col 1: 0.2/0.5 -> 0
  np.testing.assert_allclose(quantize.fake_quant_weight(w, bits=2), expected)
  # 8 bits: every value lands on k * max|w| / 127 per channel.
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  q = np.asarray(quantize.fake_quant_weight(w))
  scale = np.abs(np.asarray(w)).max(axis=(0, 1, 2)) / 127
  np.testing.assert_allclose(q / scale, np.round(q / scale), atol=1e-4)
  assert np.abs(q - w).max() <= scale.max() / 2 + 1e-7


def test_activation_rounding_by_hand():
  # 2 bits over [-1, 2]: scale 1, zero point 1 (levels -1, 0, 1, 2).
  x = jnp.array([-1.0, 0.0, 0.4, 2.0, 1.4])
  np.testing.assert_allclose(quantize.fake_quant_activation(x, bits=2),
                             [-1.0, 0.0, 0.0, 2.0, 1.0])
  # A positive-only tensor still represents 0 exactly (the range is widened to 0).
  y = jnp.array([0.0, 0.3, 3.0])
  q = quantize.fake_quant_activation(y)
  assert q[0] == 0.0 and abs(float(q[1]) - 0.3) <= 3.0 / 255 / 2 + 1e-7


def test_rounding_passes_gradients_straight_through():
  w = jax.random.normal(jax.random.key(1), (4, 3))
  np.testing.assert_allclose(
      jax.grad(lambda w: jnp.sum(quantize.fake_quant_weight(w) * 2.0))(w), 2.0)
  x = jax.random.normal(jax.random.key(2), (10,))
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(quantize.fake_quant_activation(x)))(x), 1.0)


@pytest.fixture(scope="module")
def resnet8():
  model = create("resnet8", 10)
  x = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
  variables = model.init(jax.random.key(0), x[:1])
  return model, variables, x


def test_quant_aware_keeps_fields_and_variables(resnet8):
  model, variables, x = resnet8
  qat = quantize.quant_aware(model)
  assert quantize.is_quant_aware(qat) and quantize.quant_aware(qat) is qat
  assert qat.clone(bn_axis_name="data").bn_axis_name == "data"
  q_vars = qat.init(jax.random.key(0), x[:1])
  jax.tree.map(np.testing.assert_array_equal, q_vars, variables)


def test_quant_aware_forward_is_the_rounded_model(resnet8):
  model, variables, x = resnet8
  qat = quantize.quant_aware(model)
  logits, taps = qat.apply(variables, x)
  plain, _ = model.apply(variables, x)
  # Close to the float model, but not equal: it is rounded.
  assert 0 < np.abs(logits - plain).max() < 0.05 * np.ptp(plain)
  assert set(taps) == set(model.apply(variables, x)[1])
  # With 24 bits the rounding vanishes.
  fine, _ = quantize.quant_aware(model, bits=24).apply(variables, x)
  np.testing.assert_allclose(fine, plain, atol=1e-5)
  # Weights alone: the plain model on materialised weights equals a QAT model whose
  # activations are left at (nearly) full precision.
  materialized = quantize.materialize(variables)
  w_only = jax.tree.map(lambda a, b: a, materialized, variables)
  np.testing.assert_allclose(model.apply(w_only, x)[0],
                             model.apply({**variables, "params": quantize.fake_quant_params(
                                 variables["params"])}, x)[0])


def test_quant_aware_trains(resnet8):
  model, variables, x = resnet8
  qat = quantize.quant_aware(model)
  labels = jnp.arange(16) % 10

  def loss(params):
    (logits, _), _ = qat.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.grad(loss)(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and min(norms) > 0


def test_materialized_int8_export_matches_qat_model(resnet8):
  """Full-int8 TFLite of the materialised weights computes what the QAT model simulates."""
  model, variables, x = resnet8
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {**variables, **updates}
  qat_logits = np.asarray(quantize.quant_aware(model).apply(variables, x)[0])
  float_logits = np.asarray(model.apply(variables, x)[0])
  calibration = np.asarray(jax.random.normal(jax.random.key(4), (64, 8, 8, 1)))
  int8 = export.TFLiteModel(export.to_tflite(
      model, quantize.materialize(variables), (8, 8, 1), "int8", calibration))
  tflite_logits = int8(np.asarray(x))
  spread = np.ptp(float_logits)
  assert np.abs(tflite_logits - qat_logits).max() < 0.05 * spread
  assert np.mean(tflite_logits.argmax(-1) == qat_logits.argmax(-1)) >= 0.9
