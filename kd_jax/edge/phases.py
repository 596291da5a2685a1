"""The edge phases of a run: QAT, pruning and early exits after the distilled student.

Each phase starts from the distilled student and keeps the teacher as its guide:

  qat      the student with int8 arithmetic simulated (`quantize.quant_aware`),
           fine-tuned by the run's objective, exported to full-int8 TFLite;
  pruned   the student pruned to `flops_ratio` of its MACs (`prune.prune`), then
           distilled again to recover, exported to fp32 and int8 TFLite;
  exits    exit heads on the frozen student (`early_exit.train_exit_heads`), the
           accuracy / average-MACs table per confidence threshold, the cascade
           exported as chained TFLite segments (each stage computed once) and
           measured at the deployed threshold against the full model.

A student with an export form (`kd_jax.models.export_form`: RepVGG's fused 3x3 convs)
takes part in QAT and exits in that form, the graph it is deployed as: QAT then rounds
the fused kernels the int8 model holds, not each branch's.

QAT and pruned train in their own workdir folders (`qat/`, `pruned/`) with the same
checkpointing and exact resume as the other phases; exits save their heads in `exits/`.
Every exported model is measured in the LiteRT interpreter and added to
`<workdir>/export/export.{json,md}` (`rows`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import phase as phase_lib
from kd_jax import export as export_lib
from kd_jax import models
from kd_jax import parallel
from kd_jax.edge import cost
from kd_jax.edge import early_exit
from kd_jax.edge import prune as prune_lib
from kd_jax.edge import quantize

QAT, PRUNED, EXITS = "qat", "pruned", "exits"
_CONFIG_KEYS = {QAT: "qat", PRUNED: "prune", EXITS: "exits"}  # phase -> config.edge.<key>


# The `edge` block of an experiment config: each phase off by default; a phase's
# `train` block overrides keys of the student's recipe (`train`).
DEFAULTS = dict(
    # Activation ranges: EMA of the batch min/max with `range_momentum` (quantize.py).
    qat=dict(enabled=False, bits=8, range_momentum=0.99,
             train=dict(epochs=15.0, learning_rate=0.01)),
    prune=dict(enabled=False, flops_ratio=0.5, criterion="bn_scale",
               train=dict(epochs=30.0, learning_rate=0.02)),
    # Exit heads (GAP, optionally a `hidden`-wide 1x1 conv-BN-ReLU, dense) on `taps`,
    # trained `steps` steps on ce_weight · CE + kd_weight · KD at `temperature`; the
    # cascade is tabulated at each confidence threshold.
    # `threshold` is the deployed one: the exported cascade is measured at it.
    exits=dict(enabled=False, taps=("stage_1", "stage_2"), hidden=64, steps=600,
               batch_size=32, learning_rate=0.01, temperature=4.0, ce_weight=0.1,
               kd_weight=0.9,
               thresholds=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.01),
               threshold=0.9))


def default_config() -> ml_collections.ConfigDict:
  """The `edge` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def check_config(edge: Mapping[str, Any]) -> None:
  """One-line errors for an `edge` block the phases cannot run."""
  if edge["qat"]["bits"] != 8:
    raise ValueError(f"edge.qat.bits={edge['qat']['bits']} is not supported; use 8")
  if not 0 <= edge["qat"]["range_momentum"] < 1:
    raise ValueError("edge.qat.range_momentum must be in [0, 1), got "
                     f"{edge['qat']['range_momentum']}")
  if not 0 < edge["prune"]["flops_ratio"] <= 1:
    raise ValueError("edge.prune.flops_ratio must be in (0, 1], got "
                     f"{edge['prune']['flops_ratio']}")
  if edge["prune"]["criterion"] not in prune_lib.CRITERIA:
    raise ValueError(f"edge.prune.criterion={edge['prune']['criterion']!r} is unknown; "
                     f"use one of {', '.join(prune_lib.CRITERIA)}")
  exits = edge["exits"]
  for key in ("steps", "batch_size"):
    if exits[key] < 1:
      raise ValueError(f"edge.exits.{key} must be at least 1, got {exits[key]}")
  if not 0 <= exits["threshold"] < float("inf"):
    raise ValueError("edge.exits.threshold must be a finite number >= 0, got "
                     f"{exits['threshold']}")
  if exits["enabled"] and not exits["taps"]:
    raise ValueError("edge.exits.taps names no tap; give e.g. ('stage_1', 'stage_2')")


def enabled(config: ml_collections.ConfigDict) -> list[str]:
  """The edge phases a config turns on, in the order they run."""
  return [phase for phase, key in _CONFIG_KEYS.items() if config.edge[key].enabled]


def run(config, workdir: str, *, mesh, info, writer, teacher, teacher_variables,
        student, distilled) -> tuple[dict[str, Any], dict[str, dict]]:
  """Runs the enabled edge phases after the distilled student.

  Args:
    config, workdir, mesh, info, writer: the run's.
    teacher, teacher_variables: the teacher module and its replicated variables.
    student: the student module; distilled: the distilled phase's `PhaseResult`.

  Returns:
    `(summary, rows)`: per phase a summary dict for summary.json, and the exported
    models' rows for the export table ({} on processes other than 0).
  """
  phases = enabled(config)
  if not phases:
    return {}, {}
  edge = config.edge
  shape = tuple(info.image_shape)
  ecfg = config.export
  export_dir = os.path.join(workdir, "export")
  rep = data_lib.representative_images(config.data, int(ecfg.num_calibration_images))
  parity = rep[:16]
  runs = ecfg.latency_runs
  eval_fn = lambda: data_lib.eval_iterator(config.data, batch_size=config.eval_batch_size)
  host_eval_fn = lambda: data_lib.host_eval_iterator(config.data,
                                                     batch_size=config.eval_batch_size)
  write = jax.process_index() == 0
  phase_args = dict(workdir=workdir, mesh=mesh, info=info, writer=writer, teacher=teacher,
                    teacher_variables=teacher_variables)
  summary, rows = {}, {}
  deployed, deployed_variables = models.export_form(student, distilled.variables)
  deployed_variables = jax.device_get(deployed_variables)  # on the host, as a phase's
  student_macs = cost.macs(deployed, deployed_variables, shape)

  if QAT in phases:
    qcfg = edge.qat
    bits, momentum = qcfg.bits, qcfg.range_momentum
    qat_model = quantize.quant_aware(deployed, bits, momentum)
    result = phase_lib.train_phase(
        config, phase=QAT, model=qat_model,
        train_config=phase_lib.student_recipe(config, qcfg.train),
        distill_config=config.distill,
        init_variables=quantize.with_ranges(qat_model, deployed_variables, shape),
        model_meta={"quantization": f"int{bits} fake-quant (QAT)"}, **phase_args)
    summary[QAT] = {"accuracy": result.metrics["accuracy"], "metrics": result.metrics}
    if write:
      weights = quantize.materialize(result.variables, bits)
      float_student = deployed.clone(dtype=jnp.float32)
      qat_float = quantize.quant_aware(float_student, bits, momentum)
      # The int8 model is quantised over the ranges learned in training (found in the
      # calibrated graph by value on a few images), not over calibrated ones.
      probe = rep[:4]
      ranges = quantize.export_ranges(qat_float, result.variables, probe)
      row = dict(export_lib.export_and_measure(
          export_lib.logits_function(float_student, weights), shape,
          os.path.join(export_dir, "qat_int8.tflite"), "int8", representative_images=rep,
          parity_images=parity, eval_batches_fn=host_eval_fn, latency_runs=runs,
          reference_fn=lambda x: qat_float.apply(result.variables, x, train=False)[0],
          activation_ranges=(probe, ranges)),
          jax_accuracy=result.metrics["accuracy"], macs=student_macs,
          params=cost.count_params(weights))
      rows["qat int8"] = row
      summary[QAT]["tflite_int8"] = row

  if PRUNED in phases:
    pcfg = edge.prune
    pruned = prune_lib.prune(student, distilled.variables, shape,
                             pcfg.flops_ratio, pcfg.criterion)
    before = eval_lib.evaluate(pruned.model, parallel.replicate(pruned.variables, mesh),
                               eval_fn(), mesh, num_classes=info.num_classes)
    result = phase_lib.train_phase(
        config, phase=PRUNED, model=pruned.model,
        train_config=phase_lib.student_recipe(config, pcfg.train),
        distill_config=config.distill, init_variables=pruned.variables,
        model_meta={"model_kwargs": {"mid_widths": list(pruned.mid_widths)}}, **phase_args)
    summary[PRUNED] = {
        "flops_ratio": float(pcfg.flops_ratio), "mid_widths": list(pruned.mid_widths),
        "params_before": pruned.params_before, "params_after": pruned.params_after,
        "macs_before": pruned.macs_before, "macs_after": pruned.macs_after,
        "accuracy_before_pruning": distilled.metrics["accuracy"],
        "accuracy_after_pruning": before["accuracy"],
        "accuracy_after_recovery": result.metrics["accuracy"], "metrics": result.metrics}
    if write:
      results = export_lib.export_all(
          pruned.model.clone(dtype=jnp.float32), result.variables, shape, export_dir,
          variants=("fp32", "int8"),
          representative_images=rep, eval_batches_fn=host_eval_fn, parity_images=parity,
          latency_runs=runs, name="pruned")
      for variant, row in results.items():
        rows[f"pruned {variant}"] = dict(row, jax_accuracy=result.metrics["accuracy"],
                                         macs=pruned.macs_after,
                                         params=pruned.params_after)
      summary[PRUNED]["tflite"] = results

  if EXITS in phases:
    summary[EXITS], exit_rows = _exits(config, workdir, mesh=mesh, info=info,
                                       teacher=teacher, teacher_variables=teacher_variables,
                                       student=deployed, distilled=dataclasses.replace(
                                           distilled, variables=deployed_variables),
                                       parity=parity, runs=runs, eval_fn=eval_fn,
                                       host_eval_fn=host_eval_fn, write=write)
    rows.update(exit_rows)
  return summary, rows


def _exits(config, workdir, *, mesh, info, teacher, teacher_variables, student, distilled,
           parity, runs, eval_fn, host_eval_fn, write):
  """Trains (or reloads) the exit heads, tabulates thresholds, exports and measures the
  cascade's segments at the deployed threshold."""
  xcfg = config.edge.exits
  heads = early_exit.ExitHeads(info.num_classes, taps=tuple(xcfg.taps),
                               hidden=xcfg.hidden or None)
  directory = os.path.join(workdir, EXITS)
  shape = tuple(info.image_shape)
  like = jax.eval_shape(lambda: early_exit.init_exit_heads(
      heads, student, distilled.variables, shape))
  data_config = phase_lib.training_data(config, "student")
  if ckpt_lib.has_variables(directory):
    head_vars, _ = ckpt_lib.load_variables(directory, like)
  else:
    head_vars, history = early_exit.train_exit_heads(
        student, distilled.variables, teacher, teacher_variables, data_config, heads=heads,
        steps=xcfg.steps, batch_size=xcfg.batch_size, learning_rate=xcfg.learning_rate,
        temperature=xcfg.temperature, ce_weight=xcfg.ce_weight, kd_weight=xcfg.kd_weight,
        seed=config.seed, mesh=mesh)
    ckpt_lib.save_variables(directory, head_vars, {
        "taps": list(heads.taps), "hidden": heads.hidden, "steps": int(xcfg.steps),
        "final_loss": float(np.asarray(history["loss"])[-1])})
  outputs, labels = early_exit.exit_outputs(student, distilled.variables, heads, head_vars,
                                            eval_fn(), mesh=mesh)
  macs = early_exit.exit_macs(student, distilled.variables, heads, head_vars, shape)
  table = early_exit.threshold_table(outputs, labels, macs, tuple(xcfg.thresholds))
  accuracy = {name: float(np.mean(np.argmax(logits, -1) == labels))
              for name, logits in outputs.items()}
  summary = {"taps": list(heads.taps), "accuracy": accuracy,
             "macs": {name: m["macs"] for name, m in macs.items()}, "thresholds": table}
  if data_lib.get_info(data_config).num_validation:
    # Thresholds are chosen on held-out validation data; `thresholds` (the eval
    # split) gives the final figures of each.
    validation_outputs, validation_labels = early_exit.exit_outputs(
        student, distilled.variables, heads, head_vars,
        data_lib.eval_iterator(data_config, batch_size=config.eval_batch_size,
                               split="validation"), mesh=mesh)
    summary["validation_thresholds"] = early_exit.threshold_table(
        validation_outputs, validation_labels, macs, tuple(xcfg.thresholds))
  rows = {}
  if write:
    float_student = student.clone(dtype=jnp.float32)
    threshold = float(xcfg.threshold)
    exported = early_exit.export_cascade(
        float_student, distilled.variables, heads, head_vars, shape,
        os.path.join(workdir, "export"), parity_images=parity)
    images, image_labels = _host_images(host_eval_fn())
    full_model = export_lib.function_to_tflite(early_exit.exit_function(
        float_student, distilled.variables, heads, head_vars, early_exit.FINAL), shape)
    measured = early_exit.measure_cascade(
        exported["paths"], full_model, exported["segments"], images, image_labels,
        threshold, full_macs=macs[early_exit.FINAL]["macs"])
    (at_threshold,) = early_exit.threshold_table(outputs, labels, macs, [threshold])
    rows["exit cascade fp32"] = dict(
        measured, paths=exported["paths"], bytes=exported["bytes"],
        ops=sorted({op for s in exported["segments"].values() for op in s["ops"]}),
        max_abs_logit_diff=exported["max_abs_logit_diff"],
        jax_accuracy=at_threshold["accuracy"], jax_macs=at_threshold["avg_macs"],
        threads=1)
    summary["tflite"] = {"segments": exported["segments"],
                         "cascade": rows["exit cascade fp32"]}
    with open(os.path.join(directory, "thresholds.md"), "w") as f:
      if "validation_thresholds" in summary:
        f.write("Validation split (choose the threshold here):\n\n"
                + threshold_markdown(summary["validation_thresholds"], heads.taps)
                + "\nEvaluation split (the final figures):\n\n")
      f.write(threshold_markdown(table, heads.taps))
  return summary, rows


def _host_images(batches) -> tuple[np.ndarray, np.ndarray]:
  """The unpadded images and labels of host evaluation batches, concatenated."""
  images, labels = [], []
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]))), bool)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels)


def threshold_markdown(table, taps) -> str:
  """The exit cascade's accuracy / MACs table (`early_exit.threshold_table` rows)."""
  exits = [*taps, early_exit.FINAL]
  lines = ["| threshold | accuracy | avg MACs | × full | "
           + " / ".join(exits) + " share |", "|---|---|---|---|---|"]
  for r in table:
    shares = " / ".join(f"{r['exit_share'][e]:.3f}" for e in exits)
    lines.append(f"| {r['threshold']:g} | {r['accuracy']:.4f} | {r['avg_macs']:,.0f} | "
                 f"{r['macs_ratio']:.3f} | {shares} |")
  return "\n".join(lines) + "\n"
