"""Tests for kd_jax.export: conversion, parity in the LiteRT interpreter, metrics."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import energy, export, machine
from kd_jax.models import create

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


def structured_images(rng, n):
  """Smooth random images: 2x2 blobs upsampled to 8x8, plus a little pixel noise."""
  coarse = rng.normal(size=(n, 2, 2, 1))
  images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  return (images + 0.3 * rng.normal(size=(n, *IMAGE_SHAPE))).astype(np.float32)


@pytest.fixture(scope="module")
def student():
  """resnet8 whose BatchNorm statistics come from data, so folding them matters."""
  model = create("resnet8", num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  _, updates = model.apply(variables, structured_images(rng, 256), train=True,
                           mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  images = structured_images(rng, 128)
  logits = np.asarray(model.apply(variables, images, train=False)[0])
  return dict(model=model, variables=variables, images=images, logits=logits,
              calibration=structured_images(rng, 128))


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("tflite"))
  # Labels are JAX's own predictions, so accuracy measures agreement with JAX.
  predictions = student["logits"].argmax(-1)
  batches_fn = lambda: ({"image": student["images"][i:i + 32], "label": predictions[i:i + 32]}
                        for i in range(0, len(predictions), 32))
  results = export.export_all(
      student["model"], student["variables"], IMAGE_SHAPE, out_dir,
      variants=export.QUANTIZATIONS, representative_images=student["calibration"],
      eval_batches_fn=batches_fn, parity_images=student["images"])
  return dict(out_dir=out_dir, results=results)


def test_export_all_writes_every_variant(exported):
  assert set(exported["results"]) == set(export.QUANTIZATIONS)
  for variant, result in exported["results"].items():
    assert result["path"] == os.path.join(exported["out_dir"], f"student_{variant}.tflite")
    assert os.path.getsize(result["path"]) == result["bytes"] > 0
    assert result["num_examples"] == 128
    assert (0 < result["latency_ms"] <= result["latency_p90_ms"]
            <= result["latency_p99_ms"])
    assert (0 < result["latency_all_threads_ms"] <= result["latency_all_threads_p90_ms"]
            <= result["latency_all_threads_p99_ms"])
    assert 0 < result["init_ms"] < 10_000
    # A fresh process's peak RSS growth holds at least the weights it read.
    assert result["peak_memory_bytes"] > 0.5 * result["bytes"]
    assert result["memory_kind"] == export.MEMORY_KIND
    assert result["arena_bytes"] == energy.activation_arena_bytes(
        open(result["path"], "rb").read())
    assert result["graph"]["xnnpack_partitions"] >= 1
    assert result["graph"]["input_types"] == result["graph"]["output_types"] == ["FLOAT32"]
    assert result["threads"] == export.all_threads()


def test_fp32_matches_jax(exported, student):
  result = exported["results"]["fp32"]
  assert result["max_abs_logit_diff"] < 1e-4
  assert result["accuracy"] == 1.0
  logits = export.TFLiteModel(result["path"])(student["images"])
  np.testing.assert_allclose(logits, student["logits"], atol=1e-4)


def test_ops_are_builtins_only(exported):
  builtin_names = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for result in exported["results"].values():
    assert set(result["ops"]) <= builtin_names, result["ops"]
    assert "CONV_2D" in result["ops"]
    # BatchNorm is folded into the convolutions: no stand-alone scale/shift.
    assert "MUL" not in result["ops"]
  assert {"QUANTIZE", "DEQUANTIZE"} <= set(exported["results"]["int8"]["ops"])


def test_int8_is_small_and_agrees_with_jax(exported, student):
  fp32, int8 = exported["results"]["fp32"], exported["results"]["int8"]
  assert int8["bytes"] / fp32["bytes"] < 0.4
  assert int8["accuracy"] >= 0.9  # argmax agreement with JAX
  logits = export.TFLiteModel(int8["path"])(student["images"])
  assert np.abs(logits - student["logits"]).max() < 0.1 * np.ptp(student["logits"])


def test_float_io_for_every_variant(exported, student):
  for result in exported["results"].values():
    assert result["max_abs_logit_diff"] < 0.1 * np.ptp(student["logits"])
    model = export.TFLiteModel(result["path"])
    assert model.input_shape == (1, *IMAGE_SHAPE)
    assert model(student["images"][:3]).dtype == np.float32


def test_fixed_batch_pads_last_chunk(student):
  flatbuffer = export.to_tflite(student["model"], student["variables"], IMAGE_SHAPE,
                                batch_size=4)
  model = export.TFLiteModel(flatbuffer)
  assert model.input_shape == (4, *IMAGE_SHAPE)
  np.testing.assert_allclose(model(student["images"][:10]), student["logits"][:10],
                             atol=1e-4)


def test_batch_polymorphic_signature(student):
  flatbuffer = export.to_tflite(student["model"], student["variables"], IMAGE_SHAPE,
                                batch_size=None)
  model = export.TFLiteModel(flatbuffer)
  assert model.polymorphic
  for n in (1, 7, 70):  # 70: two chunks of at most DYNAMIC_CHUNK rows
    np.testing.assert_allclose(model(student["images"][:n]), student["logits"][:n],
                               atol=1e-4)


def test_prefix_function_exports_only_the_prefix(student):
  """Only the ops an output depends on reach the flatbuffer."""
  model, variables = student["model"], student["variables"]
  full = export.to_tflite(model, variables, IMAGE_SHAPE)
  prefix = export.function_to_tflite(
      lambda x: model.apply(variables, x)[1]["stage_1"].mean(axis=(1, 2)), IMAGE_SHAPE)
  # stage_1 of resnet8 holds 4,800 of its 78,000 weights (stem 144 + 2 x 2,304).
  assert len(prefix) < len(full) / 8
  assert "FULLY_CONNECTED" not in export.op_names(prefix)


def test_write_table(exported, tmp_path):
  rows = {f"student {v}": dict(r, jax_accuracy=1.0, macs=1000, params=10)
          for v, r in exported["results"].items()}
  text = export.write_table(rows, str(tmp_path))
  with open(tmp_path / "export.json") as f:
    assert json.load(f) == rows
  assert (tmp_path / "export.md").read_text() == text
  table = [line for line in text.splitlines() if line.startswith("| student")]
  assert len(table) == len(export.QUANTIZATIONS)
  fp32 = next(line for line in table if line.startswith("| student fp32 "))
  assert f"| {rows['student fp32']['bytes']:,} |" in fp32
  assert f"| {rows['student fp32']['latency_ms']:.3f} |" in fp32
  assert f"| {rows['student fp32']['latency_p99_ms']:.3f} |" in fp32
  assert f"| {rows['student fp32']['init_ms']:.2f} |" in fp32
  assert f"| {rows['student fp32']['peak_memory_bytes']:,} |" in fp32
  assert f"| {rows['student fp32']['arena_bytes']:,} |" in fp32
  assert "| init ms | latency ms | latency p90 ms | latency p99 ms |" in text
  assert f"Peak memory: {export.MEMORY_KIND}." in text
  # Energy per inference, labelled: RAPL where readable, else the estimate (fp32
  # weights cost 4x the int8 bytes, so the estimate orders the variants).
  for r in rows.values():
    assert r["energy"]["kind"] in ("measured", "estimated") and r["energy"]["uj"] > 0
    assert f"| {r['energy']['uj']:.3g} µJ {r['energy']['kind']} |" in text
  if rows["student int8"]["energy"]["kind"] == "estimated":
    assert rows["student int8"]["energy"]["uj"] < 0.5 * rows["student fp32"]["energy"]["uj"]
  # Every row says which CPU its latencies were measured on, and the table says it too.
  here = machine.cpu(threads=1)
  assert all(r["machine"] == here for r in rows.values())
  assert f"measured on {here['cpu']} ({here['isa']})." in text
  rows["student fp16"] = dict(rows["student fp16"], machine=dict(here, cpu="Other CPU"))
  assert (f"measured on {here['cpu']} ({here['isa']}) (student fp32, student dynamic, "
          f"student int8); Other CPU ({here['isa']}) (student fp16)."
          in export.write_table(rows, str(tmp_path)))


def test_evaluate_counts_only_unmasked_rows(exported, student):
  model = export.TFLiteModel(exported["results"]["fp32"]["path"])
  predictions = student["logits"].argmax(-1)
  wrong = (predictions + 1) % NUM_CLASSES
  # Batch 1: right, wrong, right + two padding rows (right, must not count).
  # Batch 2 (no mask): right, wrong, wrong, right, wrong. 4 right of 8 counted.
  batches = [
      {"image": student["images"][:5],
       "label": np.array([predictions[0], wrong[1], predictions[2], predictions[3],
                          predictions[4]]),
       "mask": np.array([1, 1, 1, 0, 0])},
      {"image": student["images"][5:10],
       "label": np.array([predictions[5], wrong[6], wrong[7], predictions[8], wrong[9]])},
  ]
  assert export.evaluate_tflite(model, batches) == dict(accuracy=0.5, num_examples=8)


def test_latency_is_positive(exported):
  with open(exported["results"]["fp32"]["path"], "rb") as f:
    flatbuffer = f.read()
  latency = export.latency_ms(flatbuffer, IMAGE_SHAPE, runs=10, warmup=2)
  assert 0 < latency["median_ms"] <= latency["p90_ms"]


def test_int8_without_representative_images_raises(student):
  with pytest.raises(ValueError, match="representative_images") as error:
    export.to_tflite(student["model"], student["variables"], IMAGE_SHAPE, "int8")
  assert "\n" not in str(error.value)


class _Spectrum(nn.Module):
  """FFT magnitudes as logits: StableHLO's fft has no TFLite builtin."""

  @nn.compact
  def __call__(self, x, train=False):
    logits = jnp.abs(jnp.fft.fft(x.reshape(len(x), -1)))[:, :NUM_CLASSES]
    return logits, {"embedding": logits}


class _Cholesky(nn.Module):
  """A Cholesky factor as logits: a LAPACK custom call on CPU."""

  @nn.compact
  def __call__(self, x, train=False):
    gram = jnp.einsum("bhwc,bgwc->bhg", x, x) + 8 * jnp.eye(x.shape[1])
    logits = jnp.linalg.cholesky(gram).reshape(len(x), -1)[:, :NUM_CLASSES]
    return logits, {"embedding": logits}


@pytest.mark.parametrize("module, op", [(_Spectrum(), "fft"), (_Cholesky(), "lapack")])
def test_non_builtin_ops_are_rejected_by_name(module, op):
  with pytest.raises(ValueError, match=f"outside TFLITE_BUILTINS.*{op}"):
    export.to_tflite(module, {}, IMAGE_SHAPE)


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")
def test_tflite_model_quantizes_integer_io():
  """A model made elsewhere with int8 input and output tensors still takes floats."""
  tf = export._tensorflow()
  weights = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)

  @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 1), tf.float32)])
  def linear(images):
    return tf.matmul(tf.reshape(images, (1, 16)), weights)

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [linear.get_concrete_function()], linear)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  calibration = np.random.default_rng(1).uniform(size=(32, 1, 4, 4, 1)).astype(np.float32)
  converter.representative_dataset = lambda: ([image] for image in calibration)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = converter.inference_output_type = tf.int8
  model = export.TFLiteModel(converter.convert())

  images = calibration[:5, 0]
  expected = images.reshape(5, 16) @ weights
  assert model._input["dtype"] == model._output["dtype"] == np.int8
  np.testing.assert_allclose(model(images), expected, atol=0.05 * np.ptp(expected))


@pytest.mark.parametrize("name, op", [("MobileNetV2", "DEPTHWISE_CONV_2D"),
                                      ("vgg8", "MAX_POOL_2D")])
def test_window_ops_export_as_their_tflite_ops(name, op):
  """The CPU traces depthwise convs and max pools as shifted views; exports keep the ops."""
  model = create(name, num_classes=NUM_CLASSES)
  rng = np.random.default_rng(1)
  images = structured_images(rng, 16)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  _, updates = model.apply(variables, structured_images(rng, 64), train=True,
                           mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  flatbuffer = export.to_tflite(model, variables, IMAGE_SHAPE)
  ops = export.op_names(flatbuffer)
  assert op in ops and not {"MUL", "MAXIMUM", "SELECT", "SELECT_V2"} & set(ops), ops
  np.testing.assert_allclose(export.TFLiteModel(flatbuffer)(images),
                             model.apply(variables, images)[0], atol=1e-4)
