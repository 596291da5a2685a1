"""The edge phases end to end on the tiny digits_edge config: QAT, pruned, exits, table."""
import json
import os

import flax
import jax
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tflite_schema

from kd_jax import checkpoint as ckpt_lib
from kd_jax import cli, export, machine, models
from kd_jax.edge import cost, phases, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "kd_jax", "experiments", "digits_edge.py") + ":tiny"


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("edge"))
  cli.main(["kd-jax", "distill", f"--config={TINY}", f"--workdir={workdir}"])
  with open(os.path.join(workdir, "summary.json")) as f:
    return workdir, json.load(f)


def test_every_edge_phase_ran(edge_run):
  workdir, s = edge_run
  assert set(s["edge"]) == {phases.QAT, phases.PRUNED, phases.EXITS}
  for folder in ("qat/model.json", "pruned/model.json", "exits/model.json",
                 "exits/thresholds.md", "export/export.md", "export/export.json"):
    assert os.path.exists(os.path.join(workdir, folder)), folder
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = {r["phase"]: r for r in map(json.loads, f) if r["kind"] == "eval"}
  assert evals["qat"]["accuracy"] == s["edge"]["qat"]["accuracy"]
  assert evals["pruned"]["accuracy"] == s["edge"]["pruned"]["accuracy_after_recovery"]


def test_qat_int8_export_tracks_the_qat_model(edge_run):
  _, s = edge_run
  qat = s["edge"]["qat"]
  row = qat["tflite_int8"]
  assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} <= set(row["ops"])
  assert row["bytes"] < 0.4 * s["tflite"]["fp32"]["bytes"]
  # One example of 359 is 0.28 points; a barely trained tiny model sits close to
  # decision boundaries, so this bound is looser than the full run's 0.5 point.
  assert abs(row["accuracy"] - qat["accuracy"]) <= 0.03
  # The int8 logits against the QAT model's evaluation logits, in steps of the int8
  # logit scale: integer requantisation rounds differently from the float simulation,
  # by about a step per layer at most (measured: 2.0 steps on this run).
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(open(row["path"], "rb").read()), 0)
  graph = model.subgraphs[0]
  (dequantize,) = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex]
                   .builtinCode == tflite_schema.BuiltinOperator.DEQUANTIZE]
  logit_step = float(graph.tensors[dequantize.inputs[0]].quantization.scale[0])
  assert row["max_abs_logit_diff"] <= 3 * logit_step, row["max_abs_logit_diff"] / logit_step


def test_qat_checkpoint_holds_the_learned_ranges(edge_run):
  workdir, _ = edge_run
  qat = quantize.quant_aware(models.create("resnet8", 10))
  like = jax.eval_shape(lambda: qat.init(jax.random.key(0), np.zeros((1, 8, 8, 1))))
  variables, _ = ckpt_lib.load_variables(os.path.join(workdir, "qat"), like)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = max(r["step"] for r in map(json.loads, f) if r["phase"] == "qat")
  # The ranges are saved beside BatchNorm's statistics, each updated once per training
  # step of the phase (the saved state is its best step, at most the last).
  seen = {k: int(v) for k, v in flax.traverse_util.flatten_dict(
      variables["batch_stats"], sep="/").items() if k.endswith("_seen")}
  assert len(seen) == 15 and len(set(seen.values())) == 1
  assert 0 < seen["input_seen"] <= steps
  lo, hi = np.asarray(variables["batch_stats"]["input_range"])
  assert lo < 0 < hi  # normalised digits


def test_pruned_model_is_what_the_ratio_says(edge_run):
  workdir, s = edge_run
  pruned = s["edge"]["pruned"]
  assert pruned["macs_after"] <= 0.5 * pruned["macs_before"]
  assert pruned["macs_before"] == s["edge"]["exits"]["macs"]["final"]
  # The saved phase holds the narrower architecture, whose size is the reported one.
  with open(os.path.join(workdir, "pruned", "model.json")) as f:
    meta = json.load(f)
  model = models.create("resnet8", 10, mid_widths=meta["model_kwargs"]["mid_widths"])
  like = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 1))))
  variables, _ = ckpt_lib.load_variables(os.path.join(workdir, "pruned"), like)
  assert cost.count_params(variables) == pruned["params_after"] < pruned["params_before"]
  assert cost.macs(model, variables, (8, 8, 1)) == pruned["macs_after"]
  fp32 = pruned["tflite"]["fp32"]
  assert fp32["max_abs_logit_diff"] < 1e-4
  assert fp32["accuracy"] == pytest.approx(pruned["accuracy_after_recovery"], abs=1 / 359)
  assert fp32["bytes"] < 0.6 * s["tflite"]["fp32"]["bytes"]


def test_exit_cascade_table(edge_run):
  _, s = edge_run
  exits = s["edge"]["exits"]
  rows = {r["threshold"]: r for r in exits["thresholds"]}
  assert rows[0.0]["exit_share"]["stage_1"] == 1.0  # everything leaves at the first exit
  assert rows[0.0]["accuracy"] == exits["accuracy"]["stage_1"]
  assert rows[0.0]["avg_macs"] < exits["macs"]["final"]  # stage 1 and its head only
  assert rows[1.01]["exit_share"]["final"] == 1.0  # no softmax reaches 1.01
  assert rows[1.01]["accuracy"] == exits["accuracy"]["final"] == s["distilled_accuracy"]
  macs = exits["macs"]
  assert macs["stage_1"] < macs["stage_2"] < macs["final"]
  # The exported cascade: chained segments, each stage computed once.
  segments, cascade = exits["tflite"]["segments"], exits["tflite"]["cascade"]
  assert list(segments) == ["stage_1", "stage_2", "final"]
  assert sum(s["backbone_macs"] for s in segments.values()) == macs["final"]
  assert cascade["max_abs_logit_diff"] < 1e-4
  # At the deployed threshold the interpreter's cascade stops where JAX's does (fp32
  # parity), so it costs what the threshold table says: an image that stops at segment
  # k ran segments 1..k once each (heads included). Whether that is below the student
  # alone depends on how many images leave early (the tiny model is barely trained).
  assert cascade["threshold"] == 0.2 and cascade["images"] == 359
  assert cascade["macs"] == pytest.approx(cascade["jax_macs"], rel=1e-9)
  assert cascade["accuracy"] == pytest.approx(cascade["jax_accuracy"], abs=1 / 359)
  ran = np.cumsum([segment["macs"] for segment in segments.values()])
  assert cascade["macs"] == pytest.approx(
      sum(cascade["exit_share"][name] * ran[k] for k, name in enumerate(segments)),
      rel=1e-9)
  assert cascade["full_macs"] == macs["final"]
  assert cascade["latency_ms"] > 0 and cascade["full_latency_ms"] > 0


def test_energy_per_inference_is_labelled_in_the_summary(edge_run):
  _, s = edge_run
  variants = {**{f"student {v}": r for v, r in s["tflite"].items()},
              "qat int8": s["edge"]["qat"]["tflite_int8"],
              "exit cascade fp32": s["edge"]["exits"]["tflite"]["cascade"]}
  for label, row in variants.items():
    assert row["energy"]["kind"] in ("measured", "estimated") and row["energy"]["uj"] > 0
  if variants["student int8"]["energy"]["kind"] == "estimated":
    # A quarter of the weight bytes and int8 MACs: under half the fp32 estimate.
    assert (variants["student int8"]["energy"]["uj"]
            < 0.5 * variants["student fp32"]["energy"]["uj"])


def test_export_table_lists_every_model(edge_run):
  workdir, s = edge_run
  with open(os.path.join(workdir, "export", "export.json")) as f:
    rows = json.load(f)
  table = open(os.path.join(workdir, "export", "export.md")).read()
  assert list(rows) == ["student fp32", "student int8", "qat int8", "pruned fp32",
                        "pruned int8", "exit cascade fp32"]
  builtins = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for label, row in rows.items():
    assert set(row["ops"]) <= builtins, label
    paths = row.get("paths", [row.get("path")])
    assert sum(os.path.getsize(p) for p in paths) == row["bytes"], label
    assert row["machine"] == machine.cpu(threads=1), label  # where latency was measured
    assert row["energy"]["kind"] in ("measured", "estimated"), label  # always labelled
    assert f"| {row['energy']['uj']:.3g} µJ {row['energy']['kind']} |" in table, label
  assert f"| pruned fp32 | {rows['pruned fp32']['bytes']:,} |" in table
  assert f"measured on {machine.cpu()['cpu']} ({machine.cpu()['isa']})." in table
  cascade = rows["exit cascade fp32"]
  assert (f"exit cascade fp32 at threshold 0.2: mean {cascade['latency_ms']:.3f} ms and "
          f"{cascade['macs']:,.0f} MACs per image, against the full model's "
          f"{cascade['full_latency_ms']:.3f} ms and {cascade['full_macs']:,} MACs") in table
