"""What the `kd-jax` commands call, importable from a notebook.

  distill(config, workdir)        the config's workflow (`kd_jax.workflows`; the default
                                  one distills a student and exports it), resumable
  train_teacher(config, workdir)  the teacher phase alone (reuse it with
                                  `teacher.checkpoint`)
  evaluate_run / export_run / report_run   on the files of a finished run
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from kd_jax import configs
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import report
from kd_jax import robustness as robustness_lib
from kd_jax import rundir
from kd_jax import workflows
from kd_jax.metric_writer import log
from kd_jax.workflows import distill as distill_workflow


def distill(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`kd-jax distill`: runs the config's `workflow`; writes `<workdir>/summary.json`."""
  return workflows.run(configs.validate(config), workdir)


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> phase_lib.PhaseResult:
  """`kd-jax train-teacher`: the teacher phase alone (reuse it with teacher.checkpoint)."""
  return distill_workflow.train_teacher(configs.validate(config), workdir)


def evaluate_run(config, workdir: str, robustness: bool = False) -> dict[str, Any]:
  """`kd-jax evaluate`: metrics of the teacher and of each student phase of a run.

  With `robustness`, also their accuracy under every edge corruption at 5 severities
  (`kd_jax.robustness`), under the key 'robustness'.
  """
  config = configs.validate(config)
  mesh = parallel.data_mesh()
  info = data_lib.get_info(config.data)
  teacher, t_vars = rundir.load_teacher(config, workdir, info)
  batches = lambda: data_lib.eval_iterator(config.data, batch_size=config.eval_batch_size)
  results = {rundir.TEACHER: eval_lib.evaluate(teacher, t_vars, batches(), mesh,
                                        num_classes=info.num_classes)}
  models = {rundir.TEACHER: (teacher, t_vars)}
  for phase in (rundir.VANILLA, rundir.DISTILLED):
    if os.path.isdir(os.path.join(workdir, phase)):
      model, variables = rundir.load_phase(config, workdir, phase, info)
      models[phase] = (model, variables)
      results[phase] = eval_lib.evaluate(model, variables, batches(), mesh,
                                         num_classes=info.num_classes, teacher=teacher,
                                         teacher_variables=t_vars)
  for phase, metrics in results.items():
    log(f"{phase}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                  if isinstance(v, float)))
  if robustness:
    results["robustness"] = robustness_lib.evaluate_run(config, workdir, models, mesh,
                                                        info.num_classes)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "evaluation.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def export_run(config, workdir: str) -> dict[str, Any]:
  """`kd-jax export`: TFLite variants of a run's distilled student; updates summary.json."""
  config = configs.validate(config)
  info = data_lib.get_info(config.data)
  model, variables = rundir.load_phase(config, workdir, rundir.DISTILLED, info)
  variables = parallel.to_host(variables)
  results = rundir.export_student(config, workdir, model, variables, info)
  path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    summary["tflite"] = results
    with open(path, "w") as f:
      json.dump(summary, f, indent=2, default=rundir.json_default)
  distilled = phase_lib.PhaseResult(variables, summary.get("distilled_metrics") or {"accuracy": None})
  rundir.write_export_table(workdir, model, distilled, info, results)
  for variant, r in results.items():
    log(f"{variant}: {r['bytes']} bytes, accuracy {r.get('accuracy', float('nan')):.4f}, "
         f"{r['latency_ms']:.3f} ms -> {r['path']}")
  return results


def report_run(config, workdir: str) -> str:
  """`kd-jax report`: `<workdir>/report.md` with its plots (see `kd_jax.report`)."""
  return report.write_report(configs.validate(config), workdir)
