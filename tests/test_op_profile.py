"""Tests for kd_jax.op_profile: single-op slicing, per-op timing, delegation facts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import export, op_profile

SHAPE = (6, 6, 2)
WEIGHTS = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)


def conv_tanh_cumsum(images):
  """CONV_2D, TANH, RESHAPE, CUMSUM: XNNPACK takes the first three, not CUMSUM."""
  y = jax.lax.conv_general_dilated(images, WEIGHTS, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jnp.tanh(y)
  return jnp.cumsum(y.reshape(y.shape[0], -1), axis=-1)


@pytest.fixture(scope="module")
def flatbuffer():
  return export.function_to_tflite(conv_tanh_cumsum, SHAPE)


def run_op_by_op(flatbuffer, inputs):
  """The model run one sliced op at a time (builtin kernels), each op fed the
  outputs of the sliced ops before it; returns every tensor produced."""
  model = op_profile.read_model(flatbuffer)
  graph = model.subgraphs[0]
  values = dict(zip((int(i) for i in graph.inputs), inputs))
  for op in op_profile.single_op_models(flatbuffer):
    interpreter = op_profile.reference_interpreter(op["model"])
    for detail, index in zip(interpreter.get_input_details(), op["inputs"]):
      interpreter.set_tensor(detail["index"], values[index])
    interpreter.invoke()
    for detail, index in zip(interpreter.get_output_details(), op["outputs"]):
      values[index] = interpreter.get_tensor(detail["index"])
  return values


def test_sliced_ops_reproduce_the_whole_model_exactly(flatbuffer):
  sliced = op_profile.single_op_models(flatbuffer)
  assert [op["op"] for op in sliced] == ["CONV_2D", "TANH", "RESHAPE", "CUMSUM"]
  inputs = op_profile.example_inputs(flatbuffer)
  whole = op_profile.intermediate_tensors(flatbuffer, inputs)
  chained = run_op_by_op(flatbuffer, inputs)
  for op in sliced:  # every intermediate tensor, not only the output
    for index in op["outputs"]:
      np.testing.assert_array_equal(chained[index], whole[index])
  output = int(op_profile.read_model(flatbuffer).subgraphs[0].outputs[0])
  # XNNPACK's kernels round differently from the builtin ones, a little.
  np.testing.assert_allclose(chained[output], export.TFLiteModel(flatbuffer)(inputs[0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chained[output], conv_tanh_cumsum(inputs[0]), atol=1e-4)


def test_int8_slices_reproduce_the_whole_model_exactly():
  rng = np.random.default_rng(1)
  fn = lambda x: jnp.tanh(jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, WEIGHTS, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  flatbuffer = export.function_to_tflite(fn, SHAPE, "int8",
                                         rng.normal(size=(16, *SHAPE)).astype(np.float32))
  inputs = op_profile.example_inputs(flatbuffer)
  whole = op_profile.intermediate_tensors(flatbuffer, inputs)
  chained = run_op_by_op(flatbuffer, inputs)
  assert [op["op"] for op in op_profile.single_op_models(flatbuffer)] == [
      "QUANTIZE", "CONV_2D", "TANH", "DEQUANTIZE"]
  for index, value in chained.items():
    np.testing.assert_array_equal(value, whole[index])
  facts = op_profile.graph_facts(flatbuffer)
  assert facts["input_types"] == facts["output_types"] == ["FLOAT32"]
  assert facts["quantize_ops"] == [dict(index=0, at_input=True)]
  assert facts["dequantize_ops"] == [dict(index=3, at_output=True)]
  assert facts["weights"] == "per-channel" and facts["float_ops"] == []


def test_profile_lists_times_and_delegation(flatbuffer):
  profile = op_profile.profile(flatbuffer, runs=5, rounds=1, top=2)
  assert [(o["op"], o["xnnpack"]) for o in profile["ops"]] == [
      ("CONV_2D", True), ("TANH", True), ("RESHAPE", True), ("CUMSUM", False)]
  assert profile["not_delegated"] == ["CUMSUM"] and profile["partitions"] >= 1
  assert all(o["ms"] >= 0 for o in profile["ops"]) and profile["whole_ms"] >= 0
  assert sum(o["share"] for o in profile["ops"]) == pytest.approx(1.0)
  assert profile["sum_ms"] == pytest.approx(sum(o["ms"] for o in profile["ops"]))
  assert len(profile["slowest"]) == 2
  assert profile["slowest"][0]["ms"] == max(o["ms"] for o in profile["ops"])
  assert set(profile["by_op"]) == {"CONV_2D", "TANH", "RESHAPE", "CUMSUM"}
  facts = op_profile.graph_facts(flatbuffer)
  assert facts["weights"] == "float" and facts["quantize_ops"] == []
