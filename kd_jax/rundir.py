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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import deploy
from kd_jax import export as export_lib
from kd_jax import files
from kd_jax import models
from kd_jax import phase as phase_lib
from kd_jax import pretrained
from kd_jax.edge import cost
from kd_jax.metric_writer import log

TEACHER, VANILLA, DISTILLED = phase_lib.TEACHER, "vanilla", "distilled"
SUMMARY = "summary.json"
LOCK = ".kd_jax.lock"


class WorkdirLock:
  """One writing process per workdir: `<workdir>/.kd_jax.lock` holds the holder's host,
  pid and command while it runs (process 0 of a multi-process run holds it for all).

  `acquire` fails at once with one line naming the holder; a lock left by a process
  that is gone (same host, pid no longer running) is taken over with a warning. A lock
  on another host cannot be checked: its line says how to remove it if that run died.
  """

  def __init__(self, workdir: str, command: str):
    self.path = os.path.join(workdir, LOCK)
    self.command = command
    self.held = False

  def acquire(self) -> None:
    if self.held or jax.process_index() != 0:
      return
    import socket
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command}
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None and self._age_s() < 10:  # being written by its taker
          holder = {"command": "?", "pid": "?", "host": "?"}
        elif holder is None or self._dead(holder, me["host"]) or holder == me:
          log(f"taking over the lock of a run that is gone ({self._describe(holder)})")
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        raise ValueError(f"{os.path.dirname(self.path)} is in use by "
                         f"{self._describe(holder)}; wait for it to end, or use another "
                         f"--workdir (if that process is dead, delete {self.path})")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return
    raise ValueError(f"could not take the lock {self.path}; another kd-jax command took it "
                     "at the same moment")

  def release(self) -> None:
    if not self.held:
      return
    try:
      holder = self._holder()
      if holder and holder.get("pid") == os.getpid():
        os.remove(self.path)
    except OSError:
      pass
    self.held = False

  def _age_s(self) -> float:
    import time
    try:
      return time.time() - os.path.getmtime(self.path)
    except OSError:
      return 0.0

  def _holder(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
      return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
      return None

  @staticmethod
  def _dead(holder: dict[str, Any], host: str) -> bool:
    if holder.get("host") != host:
      return False
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, KeyError, ValueError, TypeError):
      return False
    return False

  @staticmethod
  def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
      return "an unreadable lock"
    return (f"`kd-jax {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')})")


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


def check_teacher_meta(config, source: str, info) -> dict[str, Any]:
  """The `model.json` of the teacher in `source`, checked against `teacher.name` and the
  dataset's class count before any variables are read."""
  meta = ckpt_lib.read_meta(source)
  if meta.get("model") != config.teacher.name:
    raise ValueError(f"the teacher checkpoint in {source!r} is a {meta.get('model')}, not "
                     f"teacher.name={config.teacher.name!r}; set "
                     f"--config.teacher.name={meta.get('model')} or point "
                     "--config.teacher.checkpoint at another teacher")
  classes = meta.get("num_classes")
  if classes is not None and classes != info.num_classes:
    raise ValueError(f"the teacher checkpoint in {source!r} predicts {classes} classes but "
                     f"dataset {config.data.name} has {info.num_classes}; use a teacher "
                     "of this dataset")
  return meta


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
  # The exported model's figures: a re-parameterisable student's fused form.
  deployed, deployed_variables = models.export_form(student, distilled.variables)
  macs = cost.macs(deployed.clone(dtype=jnp.float32), deployed_variables, shape)
  params = cost.count_params(deployed_variables)
  student_rows = {f"student {variant}": dict(
      row, jax_accuracy=distilled.metrics["accuracy"], macs=macs, params=params)
      for variant, row in tflite.items()}
  rows = {**student_rows, **{k: v for k, v in rows.items() if k not in student_rows},
          **(other_rows or {})}
  if rows:
    export_lib.write_table(json.loads(json.dumps(rows, default=json_default)), out_dir)


def check_deployment(config, workdir: str) -> tuple[dict[str, Any] | None, str]:
  """The deployment check (`kd_jax.deploy`) of every row of `<workdir>/export/export.json`
  against `export.target`: writes `export/deploy.{json,md}`; returns (the result, its
  Markdown), or (None, '') when the target limits nothing or nothing was exported."""
  out_dir = os.path.join(workdir, "export")
  path = os.path.join(out_dir, "export.json")
  if not os.path.exists(path):
    return None, ""
  with open(path) as f:
    rows = json.load(f)
  result = deploy.check(rows, config.export.target, export_lib.machines_line(rows))
  if result is None:
    return None, ""
  return result, deploy.write(result, out_dir)


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
  files.write_json(path, summary, default=json_default)
  log(f"wrote {path}")
  return path


def read_summary(workdir: str) -> dict[str, Any]:
  """`<workdir>/summary.json`, or {} where the run wrote none."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)
