"""The run directory: the layout of a workdir and every read and write of it.

  <workdir>/config.json            the run's config (`kd_jax.configs.save_run_config`)
  <workdir>/metrics.jsonl          train / eval / rollback records (`kd_jax.metric_writer`)
  <workdir>/<phase>/               a phase (`kd_jax.phase`): checkpoints/<step>, and the
                                   finished model's variables + model.json
  <workdir>/export/                TFLite files and the export table (export.{json,md})
  <workdir>/summary.json           what a workflow measured

Report, evaluate, export and the workflows read and write a workdir through this module.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import export as export_lib
from kd_jax import models
from kd_jax import phase as phase_lib
from kd_jax import pretrained
from kd_jax.edge import cost
from kd_jax.metric_writer import log

TEACHER, VANILLA, DISTILLED = phase_lib.TEACHER, "vanilla", "distilled"
SUMMARY = "summary.json"


def model(config: ml_collections.ConfigDict, which: str, num_classes: int):
  """The teacher or student; `mixed_precision=True` computes in bfloat16 (params stay fp32)."""
  spec = config[which]
  kw = dict(spec.kwargs)
  kw.setdefault("dtype", jnp.bfloat16 if config.mixed_precision else jnp.float32)
  return models.create(spec.name, num_classes, **kw)


def teacher_source(config, workdir: str) -> str:
  """The folder holding a run's teacher variables.

  `teacher.checkpoint` (a `kd-jax train-teacher` workdir or its `teacher/` folder),
  else `<workdir>/teacher`, where a run also imports a `teacher.checkpoint` that is a
  PyTorch / safetensors file (`kd_jax.pretrained.import_teacher`).
  """
  source = config.teacher.checkpoint
  if not source or pretrained.is_checkpoint_file(source):
    return os.path.join(workdir, TEACHER)
  inner = os.path.join(source, TEACHER)
  return inner if os.path.isdir(inner) else source


def _load(config, which: str, directory: str, missing: str, info) -> tuple[Any, Any]:
  """The `which` model ('teacher' / 'student') and the variables saved in `directory`."""
  net = model(config, which, info.num_classes)
  if not ckpt_lib.has_variables(directory):
    raise FileNotFoundError(missing)
  variables, _ = ckpt_lib.load_variables(directory,
                                         phase_lib.variables_like(net, info.image_shape))
  return net, variables


def load_phase(config, workdir: str, phase: str, info) -> tuple[Any, Any]:
  """The student model and the final variables a finished phase saved in `workdir`."""
  directory = os.path.join(workdir, phase)
  return _load(config, "student", directory,
               f"no finished {phase} phase in {directory}; run "
               f"`kd-jax distill --workdir={workdir}` first (it resumes)", info)


def load_teacher(config, workdir: str, info) -> tuple[Any, Any]:
  """The teacher model and the variables a run uses (see `teacher_source`)."""
  source = teacher_source(config, workdir)
  return _load(config, "teacher", source,
               f"no teacher in {source}; run `kd-jax distill --workdir={workdir}` first "
               "(it resumes)", info)


def export_student(config, workdir: str, student, variables, info) -> dict[str, Any]:
  """TFLite variants of the distilled student, evaluated in the LiteRT interpreter."""
  ecfg = config.export
  rep = data_lib.representative_images(config.data, int(ecfg.num_calibration_images))
  return export_lib.export_all(
      student.clone(dtype=jnp.float32), variables, tuple(info.image_shape),
      os.path.join(workdir, "export"),
      variants=tuple(ecfg.variants), representative_images=rep,
      eval_batches_fn=lambda: data_lib.host_eval_iterator(
          config.data, batch_size=config.eval_batch_size),
      parity_images=rep[:16], latency_runs=ecfg.latency_runs)


def write_export_table(workdir, student, distilled, info, tflite, other_rows=None):
  """`<workdir>/export/export.{json,md}`: the student's variants, then any other rows.

  Rows already in export.json that are not rewritten here (e.g. the edge phases' when
  only the student is re-exported) are kept.
  """
  out_dir = os.path.join(workdir, "export")
  path = os.path.join(out_dir, "export.json")
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      rows = json.load(f)
  shape = tuple(info.image_shape)
  macs = cost.macs(student.clone(dtype=jnp.float32), distilled.variables, shape)
  params = cost.count_params(distilled.variables)
  student_rows = {f"student {variant}": dict(
      row, jax_accuracy=distilled.metrics["accuracy"], macs=macs, params=params)
      for variant, row in tflite.items()}
  rows = {**student_rows, **{k: v for k, v in rows.items() if k not in student_rows},
          **(other_rows or {})}
  if rows:
    export_lib.write_table(json.loads(json.dumps(rows, default=json_default)), out_dir)


def json_default(x):
  """`json.dump(default=...)` for NumPy scalars and arrays."""
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def phase_summary(result: phase_lib.PhaseResult) -> dict[str, Any]:
  """A phase's figures for summary.json: the last model's and, where the run held out
  a validation split, the best-by-validation model's (step, validation metrics, and
  test-split accuracy)."""
  out = {"last": {"test_accuracy": result.metrics.get("accuracy")}}
  selection = result.selection
  if selection:
    out["last"]["validation"] = selection["last_validation"]
    out["best"] = {"step": selection["best_step"], "metric": selection["metric"],
                   "validation": selection["best_validation"],
                   "test_accuracy": selection["best_test"]["accuracy"],
                   "test_metrics": selection["best_test"]}
  return out


def write_summary(workdir: str, summary: dict[str, Any]) -> str:
  """Writes `<workdir>/summary.json`; returns its path."""
  path = os.path.join(workdir, SUMMARY)
  with open(path, "w") as f:
    json.dump(summary, f, indent=2, default=json_default)
  log(f"wrote {path}")
  return path


def read_summary(workdir: str) -> dict[str, Any]:
  """`<workdir>/summary.json`, or {} where the run wrote none."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)
