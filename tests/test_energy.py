"""`kd_jax.energy`: energy per inference, measured (RAPL) or estimated, always labelled."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import energy, export

CALIBRATION = np.random.default_rng(1).normal(size=(8, 4, 4, 2)).astype(np.float32)


def _conv(x):
  """One 3x3 convolution, 2 -> 3 channels, on a 4x4 map, padded to keep it 4x4."""
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 3)), jnp.float32)
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture(scope="module")
def flatbuffers():
  return {q: export.function_to_tflite(_conv, (4, 4, 2), q, CALIBRATION)
          for q in ("fp32", "int8")}


def test_graph_costs_by_hand(flatbuffers):
  # 4*4*3 outputs x 3*3*2 taps = 864 MACs. fp32: the conv reads 4*4*2 floats (128 B)
  # and writes 4*4*3 (192 B); weights 3*3*3*2 floats + 3 bias floats = 228 B.
  assert energy.graph_costs(flatbuffers["fp32"]) == dict(
      macs_int8=0, macs_fp32=864, activation_bytes=320, weight_bytes=228)
  # int8: QUANTIZE 128 B in, 32 B out; CONV_2D 32 in, 48 out; DEQUANTIZE 48 in, 192 out;
  # weights 54 int8 + 3 int32 bias = 66 B.
  assert energy.graph_costs(flatbuffers["int8"]) == dict(
      macs_int8=864, macs_fp32=0, activation_bytes=480, weight_bytes=66)



def test_activation_arena_by_hand(flatbuffers):
  # fp32: the conv's input (128 B) and output (192 B) alive together.
  assert energy.activation_arena_bytes(flatbuffers["fp32"]) == 320
  # int8: QUANTIZE 128 + 32 B, then CONV_2D 32 + 48 B (the float input is no longer
  # read), then DEQUANTIZE 48 + 192 B: the peak is the last op's 240 B.
  assert energy.activation_arena_bytes(flatbuffers["int8"]) == 240


def test_estimate_by_hand(flatbuffers):
  fp32 = energy.estimate_uj(energy.graph_costs(flatbuffers["fp32"]))
  # 864 x (3.7 + 0.9) pJ + 320 B x 5/4 pJ (SRAM) + 228 B x 640/4 pJ (DRAM) = 40854.4 pJ
  assert fp32["uj"] == pytest.approx(40854.4e-6, rel=1e-12)
  assert fp32["kind"] == "estimated" and "45nm_dram_weights" in fp32["basis"]
  int8 = energy.estimate_uj(energy.graph_costs(flatbuffers["int8"]))
  # 864 x (0.2 + 0.1) + 480 x 1.25 + 66 x 160 = 11419.2 pJ
  assert int8["uj"] == pytest.approx(11419.2e-6, rel=1e-12)
  # Weights in SRAM: 864 x 0.3 + (480 + 66) x 1.25 = 941.7 pJ
  assert energy.estimate_uj(energy.graph_costs(flatbuffers["int8"]), "45nm_sram")["uj"] == (
      pytest.approx(941.7e-6, rel=1e-12))
  with pytest.raises(ValueError, match="45nm_sram"):
    energy.estimate_uj(energy.graph_costs(flatbuffers["int8"]), "7nm")


def _fake_rapl(root, energy_uj, wrap):
  for name, value in (("intel-rapl:0", energy_uj), ("intel-rapl:0:0", 5)):
    os.makedirs(root / name)
    (root / name / "energy_uj").write_text(f"{value}\n")
    (root / name / "max_energy_range_uj").write_text(f"{wrap}\n")


def test_rapl_is_read_around_the_calls(tmp_path, flatbuffers):
  wrap = 10 ** 9
  _fake_rapl(tmp_path, wrap - 10, wrap)  # it wraps at the second call
  counter = tmp_path / "intel-rapl:0" / "energy_uj"

  def run():  # each call spends 7 µJ
    counter.write_text(str((int(counter.read_text()) + 7) % wrap))

  assert energy.rapl_domains(str(tmp_path)) == [str(tmp_path / "intel-rapl:0")]
  measured = energy.per_inference(flatbuffers["int8"], run, root=str(tmp_path))
  assert measured["kind"] == "measured" and measured["uj"] == pytest.approx(7.0)
  assert "intel-rapl:0 " in measured["basis"]
  # No readable counter: the estimate, labelled so.
  estimated = energy.per_inference(flatbuffers["int8"], run, root=str(tmp_path / "none"))
  assert estimated["kind"] == "estimated"
  assert estimated["uj"] == pytest.approx(11419.2e-6, rel=1e-12)
