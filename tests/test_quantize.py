"""Tests for kd_jax.edge.quantize: int8 fake quantisation, learned ranges, QAT models."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tflite_schema

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
  # 2 bits over [-1, 2]: scale 1, zero point 1 (levels -1, 0, 1, 2); 3.0 is clipped.
  x = jnp.array([-1.0, 0.0, 0.4, 2.0, 1.4, 3.0])
  np.testing.assert_allclose(quantize.fake_quant_activation(x, -1.0, 2.0, bits=2),
                             [-1.0, 0.0, 0.0, 2.0, 1.0, 2.0])
  # A positive-only range still represents 0 exactly (it is widened to 0).
  y = jnp.array([0.0, 0.3, 3.0])
  q = quantize.fake_quant_activation(y, 0.3, 3.0)
  assert q[0] == 0.0 and abs(float(q[1]) - 0.3) <= 3.0 / 255 / 2 + 1e-7


def test_rounding_passes_gradients_straight_through_inside_the_range():
  w = jax.random.normal(jax.random.key(1), (4, 3))
  np.testing.assert_allclose(
      jax.grad(lambda w: jnp.sum(quantize.fake_quant_weight(w) * 2.0))(w), 2.0)
  # Over [-1, 1]: 1 inside (the ends included), 0 where the value is clipped.
  x = jnp.array([-2.0, -1.0, 0.3, 1.0, 1.5])
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(quantize.fake_quant_activation(x, -1.0, 1.0)))(x),
      [0.0, 1.0, 1.0, 1.0, 0.0])


def test_range_ema_by_hand():
  first = quantize.update_range(jnp.zeros(2), 0, -3.0, 4.0, 0.99)
  np.testing.assert_allclose(first, [-3.0, 4.0])  # the first batch sets the range
  # 0.99 * [-1, 2] + 0.01 * [-3, 4] = [-1.02, 2.02]
  np.testing.assert_allclose(quantize.update_range(jnp.array([-1.0, 2.0]), 1, -3.0, 4.0),
                             [-1.02, 2.02], rtol=1e-6)


@pytest.fixture(scope="module")
def resnet8():
  model = create("resnet8", 10)
  x = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  return model, variables, x


@functools.partial(jax.jit, static_argnums=0)
def _jit_eval(model, variables, x):
  return model.apply(variables, x)[0]


def _eval(model, variables, x):
  """Inference-mode logits, jitted (op-by-op dispatch of a QAT model is slow)."""
  return np.asarray(_jit_eval(model, variables, x))


def _train_ranges(qat, variables, batches):
  """`variables` after train-mode forwards on `batches` (ranges and BN statistics)."""
  step = jax.jit(lambda v, x: qat.apply(v, x, train=True, mutable=["batch_stats"])[1])
  for batch in batches:
    variables = {**variables, **step(variables, batch)}
  return variables


@pytest.fixture(scope="module")
def trained(resnet8):
  """The QAT resnet8 and its variables with ranges seen on two batches of 8."""
  model, variables, x = resnet8
  qat = quantize.quant_aware(model)
  return qat, _train_ranges(qat, quantize.with_ranges(qat, variables, (8, 8, 1)),
                            (x[:8], x[8:]))


def test_quant_aware_keeps_fields_and_adds_ranges(resnet8):
  model, variables, x = resnet8
  qat = quantize.quant_aware(model)
  assert quantize.is_quant_aware(qat) and quantize.quant_aware(qat) is qat
  assert qat.clone(bn_axis_name="data").bn_axis_name == "data"
  q_vars = jax.jit(qat.init)(jax.random.key(0), x[:1])
  jax.tree.map(np.testing.assert_array_equal, q_vars["params"], variables["params"])
  flat = flax.traverse_util.flatten_dict(q_vars["batch_stats"], sep="/")
  ranges = sorted(k[:-len("_range")] for k in flat if k.endswith("_range"))
  # The 15 int8 activation tensors of resnet8's TFLite graph: the image, 11 conv
  # outputs (stem; 2 per block, plus 2 shortcut projections), 3 residual sums, the
  # pooled vector (a SUM) and the logits; PAD outputs share their input's scale.
  assert len(ranges) == 15 and "input" in ranges and "classifier/output" in ranges
  assert {"stage1_block0/sum/output", "stage2_block0/downsample/output",
          "QuantPoint_0/output"} <= set(ranges)
  completed = quantize.with_ranges(qat, variables, (8, 8, 1))
  assert jax.tree.map(np.shape, completed) == jax.tree.map(np.shape, q_vars)
  # Before any training batch nothing is rounded but the weights.
  np.testing.assert_allclose(_eval(qat, completed, x),
                             _eval(model, quantize.materialize(variables), x), atol=1e-6)


def test_ranges_are_the_ema_of_batch_extremes(resnet8):
  model, variables, x = resnet8
  qat = quantize.quant_aware(model, momentum=0.9)
  trained = _train_ranges(qat, quantize.with_ranges(qat, variables, (8, 8, 1)),
                          (x[:8], x[8:]))
  a, b = np.asarray(x[:8]), np.asarray(x[8:])
  # The input's range by hand: the first batch, then 0.9 * it + 0.1 * the second.
  expected = 0.9 * np.array([a.min(), a.max()]) + 0.1 * np.array([b.min(), b.max()])
  np.testing.assert_allclose(trained["batch_stats"]["input_range"], expected, rtol=1e-6)
  assert int(trained["batch_stats"]["input_seen"]) == 2


def test_eval_logits_do_not_depend_on_the_batch(resnet8, trained):
  _, _, x = resnet8
  qat, trained = trained
  others = jax.random.normal(jax.random.key(5), (7, 8, 8, 1)) * 3.0
  alone = _eval(qat, trained, x[:1])
  in_batch = _eval(qat, trained, x[:8])[:1]
  with_others = _eval(qat, trained, jnp.concatenate([x[:1], others]))[:1]
  # Exact: the ranges are frozen and every layer computes each image on its own.
  np.testing.assert_array_equal(alone, in_batch)
  np.testing.assert_array_equal(alone, with_others)


def test_quant_aware_forward_is_the_rounded_model(resnet8, trained):
  model, variables, x = resnet8
  qat, trained = trained
  logits, plain = _eval(qat, trained, x), _eval(model, trained, x)  # model: no ranges
  # Close, not equal: 8 rounded layers of an untrained network whose running BN
  # statistics (hence its eval activations) have seen two batches only (measured 5%).
  assert 0 < np.abs(logits - plain).max() < 0.1 * np.ptp(plain)
  taps = jax.eval_shape(lambda: qat.apply(trained, x)[1])
  assert set(taps) == set(jax.eval_shape(lambda: model.apply(trained, x)[1]))
  # With 24 bits the rounding vanishes. In training mode the first batch sets every
  # range to its own extremes, so nothing is clipped either.
  fine = quantize.quant_aware(model, bits=24)
  train_logits = jax.jit(lambda m, v: m.apply(v, x, train=True, mutable=["batch_stats"])[0][0],
                         static_argnums=0)
  np.testing.assert_allclose(
      train_logits(fine, quantize.with_ranges(fine, variables, (8, 8, 1))),
      train_logits(model, variables), atol=1e-5)


def test_quant_aware_trains(resnet8, trained):
  _, _, x = resnet8
  qat, variables = trained
  labels = jnp.arange(16) % 10

  def loss(params):
    (logits, _), _ = qat.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and min(norms) > 0


def _activation_scales(flatbuffer):
  """Scales of the per-tensor-quantised int8 activations of a TFLite model."""
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
  return [float(t.quantization.scale[0]) for t in model.subgraphs[0].tensors
          if t.type == tflite_schema.TensorType.INT8 and t.buffer and t.shape[0] == 1
          and len(t.quantization.scale) == 1]


def test_int8_export_uses_the_learned_ranges(resnet8, trained):
  """Full-int8 TFLite of a QAT model computes what the QAT model simulates."""
  model, _, x = resnet8
  qat, trained = trained
  images = np.asarray(jax.random.normal(jax.random.key(4), (32, 8, 8, 1)))
  qat_logits = _eval(qat, trained, images)
  probe = np.asarray(x[:4])
  ranges = quantize.export_ranges(qat, trained, probe)
  fn = export.logits_function(model, quantize.materialize(trained))
  int8 = export.function_to_tflite(fn, (8, 8, 1), "int8", images,
                                   activation_ranges=(probe, ranges))
  # Every learned range is used: each int8 activation's scale is (hi - lo) / 255 of
  # its range (the pooled SUM's times the 4 pixels it adds; PAD keeps its input's).
  learned = [(max(hi, 0) - min(lo, 0)) / 255 for _, lo, hi in ranges]
  learned[-2] *= 4  # the pooled vector: TFLite sums 2x2 pixels, the 1/4 goes to the FC
  scales = _activation_scales(int8)
  assert len(ranges) == 15
  for scale in learned:
    assert min(abs(s / scale - 1) for s in scales) < 1e-5, scale
  tflite_logits = export.TFLiteModel(int8)(images)
  logit_step = learned[-1]
  # Measured: at most 2 steps of the logit scale (fixed-point requantisation and int32
  # biases round differently from the float simulation, ±1 step per layer at most);
  # calibrated ranges instead of the learned ones give 3.6 steps on the same model.
  assert np.abs(tflite_logits - qat_logits).max() <= 3 * logit_step
  assert np.mean(tflite_logits.argmax(-1) == qat_logits.argmax(-1)) >= 0.9


def test_shufflenet_concatenations_export_with_the_learned_ranges():
  """ShuffleNetV2: channel splits, concatenations and shuffles between the convolutions."""
  model = create("ShuffleV2", 10)
  images = np.asarray(jax.random.normal(jax.random.key(6), (16, 16, 16, 3)))
  qat = quantize.quant_aware(model)
  trained = _train_ranges(qat, quantize.with_ranges(
      qat, jax.jit(model.init)(jax.random.key(0), images[:1]), (16, 16, 3)), (images[:8],))
  ranges = quantize.export_ranges(qat, trained, images[:4])
  int8 = export.function_to_tflite(
      export.logits_function(model, quantize.materialize(trained)), (16, 16, 3), "int8",
      images, activation_ranges=(images[:4], ranges))
  logit_step = (max(ranges[-1][2], 0) - min(ranges[-1][1], 0)) / 255
  diff = np.abs(export.TFLiteModel(int8)(images) - _eval(qat, trained, images)).max()
  # Measured 1.0 step (calibrated ranges instead: 9.5 steps on the same model).
  assert diff <= 2 * logit_step, diff / logit_step
