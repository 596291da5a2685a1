"""What the `kd-jax` commands call, importable from a notebook.

  distill(config, workdir)        the config's workflow (`kd_jax.workflows`; the default
                                  one distills a student and exports it), resumable
  train_teacher(config, workdir)  the teacher phase alone (reuse it with
                                  `teacher.checkpoint`)
  evaluate_run / export_run / report_run   on the files of a finished run
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections

from kd_jax import checkpoint as ckpt_lib
from kd_jax import configs
from kd_jax import data as data_lib
from kd_jax import deploy
from kd_jax import evaluate as eval_lib
from kd_jax import files
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import pretrained
from kd_jax import report
from kd_jax import robustness as robustness_lib
from kd_jax import rundir
from kd_jax import train as train_lib
from kd_jax import workflows
from kd_jax.metric_writer import log
from kd_jax.workflows import distill as distill_workflow


def distill(config: ml_collections.ConfigDict, workdir: str,
            lock: rundir.WorkdirLock | None = None) -> dict[str, Any]:
  """`kd-jax distill`: runs the config's `workflow`; writes `<workdir>/summary.json`.

  Everything is checked first (`check_run`); only then is the workdir locked and
  `config.json` written, so a config that fails leaves the workdir as it was.
  """
  config = configs.validate(config, deep=True)
  check_run(config, workdir)
  with _locked(workdir, "distill", lock):
    configs.save_run_config(config, workdir)
    return workflows.run(config, workdir)


def train_teacher(config: ml_collections.ConfigDict, workdir: str,
                  lock: rundir.WorkdirLock | None = None) -> phase_lib.PhaseResult:
  """`kd-jax train-teacher`: the teacher phase alone (reuse it with teacher.checkpoint)."""
  config = configs.validate(config, deep=True)
  check_run(config, workdir, phases=("teacher",))
  with _locked(workdir, "train-teacher", lock):
    configs.save_run_config(config, workdir)
    return distill_workflow.train_teacher(config, workdir)


@contextlib.contextmanager
def _locked(workdir: str, command: str, lock: rundir.WorkdirLock | None):
  """Holds `lock` (or a new lock of `workdir`) inside; releases a lock it took."""
  own = lock is None
  lock = lock or rundir.WorkdirLock(workdir, command)
  try:
    lock.acquire()
  except OSError as e:
    raise OSError(f"cannot write into --workdir={workdir} ({e.strerror or e}); choose a "
                  "writable folder") from None
  try:
    yield lock
  finally:
    if own:
      lock.release()


def check_run(config: ml_collections.ConfigDict, workdir: str,
              phases: tuple[str, ...] = ("teacher", "student")) -> None:
  """What `configs.validate` cannot see without the data and the workdir, checked
  before anything is written or trained: each phase's dataset and splits resolve,
  batch sizes fit the examples they batch, and an existing teacher matches
  `teacher.name` and the dataset."""
  split_keys = ("train_split", "validation_split")
  infos = {}
  for which in phases:
    data_config = phase_lib.training_data(config, which)
    try:
      infos[which] = data_lib.get_info(data_config)
    except (ValueError, KeyError, AssertionError) as e:
      text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
      if text.startswith(("unknown dataset", "dataset ")):
        raise ValueError(text) from None
      given = [f"{which}.{key}={config[which][key]!r}" for key in split_keys
               if config[which][key]] + [f"data.{key}={config.data[key]!r}"
                                         for key in ("train_split", "eval_split",
                                                     "validation_split")
                                         if config.data[key]]
      raise ValueError(f"the splits of dataset {config.data.name} do not resolve "
                       f"({', '.join(given)}): {text[:300]}") from None
  teacher_dir = rundir.teacher_source(config, workdir)
  teacher_ready = ckpt_lib.has_variables(teacher_dir)
  imported = pretrained.is_checkpoint_file(config.teacher.checkpoint)
  if imported:
    pretrained.family(config.teacher.name)
  if imported and not teacher_ready:
    if not os.path.isfile(config.teacher.checkpoint):
      raise FileNotFoundError(f"teacher checkpoint {config.teacher.checkpoint!r} not found; "
                              "check --config.teacher.checkpoint")
    teacher_ready = True  # imported before the students train (kd_jax.pretrained)
  elif config.teacher.checkpoint and not teacher_ready:
    raise FileNotFoundError(
        f"teacher checkpoint {teacher_dir!r} not found; train one with `kd-jax "
        "train-teacher --workdir=DIR` (then --config.teacher.checkpoint=DIR) or unset "
        "--config.teacher.checkpoint to train the teacher in this run")
  if teacher_ready and not imported:
    rundir.check_teacher_meta(config, teacher_dir, infos.get("student") or infos["teacher"])
  recipes = []
  if "teacher" in infos and not teacher_ready:
    recipes.append(("teacher.train", config.teacher.train, infos["teacher"]))
  if "student" in infos:
    recipes.append(("train", config.train, infos["student"]))
    recipes += [(where, phase_lib.student_recipe(config, overrides), infos["student"])
                for where, overrides in configs.override_blocks(config, "train")]
  for where, recipe, info in recipes:
    batch = train_lib.recipe(recipe)["batch_size"]
    if batch > info.num_train:
      raise ValueError(f"{where}.batch_size={batch} exceeds the {info.num_train} training "
                       f"examples of {info.train_split}; lower it")


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
    files.write_json(os.path.join(workdir, "evaluation.json"), results)
  return results


def export_run(config, workdir: str,
               lock: rundir.WorkdirLock | None = None) -> dict[str, Any]:
  """`kd-jax export`: TFLite variants of a run's distilled student; updates summary.json.

  Variants exported before and not exported again stay in summary.json. With a budget
  in `export.target`, every row of the export table is checked against it
  (`kd_jax.deploy`): `export/deploy.{md,json}`, summary.json's `deployment`, the
  Markdown printed; with `export.target.strict`, `deploy.NothingFits` when no row fits.
  """
  config = configs.validate(config)
  info = data_lib.get_info(config.data)
  model, variables = rundir.load_phase(config, workdir, rundir.DISTILLED, info)
  variables = parallel.to_host(variables)
  with _locked(workdir, "export", lock):
    results = rundir.export_student(config, workdir, model, variables, info)
    summary = rundir.read_summary(workdir)
    distilled = phase_lib.PhaseResult(
        variables, summary.get("distilled_metrics") or {"accuracy": None})
    rundir.write_export_table(workdir, model, distilled, info, results)
    deployment, text = rundir.check_deployment(config, workdir)
    if summary:
      summary["tflite"] = {**summary.get("tflite", {}), **results}
      if deployment:
        summary["deployment"] = deployment
      rundir.write_summary(workdir, summary)
  for variant, r in results.items():
    log(f"{variant}: {r['bytes']} bytes, accuracy {r.get('accuracy', float('nan')):.4f}, "
         f"{r['latency_ms']:.3f} ms -> {r['path']}")
  if deployment:
    print(text, flush=True)
    if deployment["strict"] and deployment["pick"] is None:
      raise deploy.NothingFits(f"no exported variant fits export.target "
                               f"(export.target.strict is set); see "
                               f"{os.path.join(workdir, 'export', deploy.DEPLOY_MD)}")
  return results


def report_run(config, workdir: str) -> str:
  """`kd-jax report`: `<workdir>/report.md` with its plots (see `kd_jax.report`)."""
  return report.write_report(configs.validate(config), workdir)
