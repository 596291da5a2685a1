"""The default workflow: one distillation run, end to end.

Phases, each in its own folder of the workdir and resumable (`kd_jax.phase`):
`teacher/` (trained with cross-entropy, or loaded from `teacher.checkpoint`),
`vanilla/` (the student with cross-entropy only) and `distilled/` (the same student from
the same initialisation with the config's objective), then the edge phases the config
turns on (`kd_jax.edge.phases`), the TFLite export of the distilled student and
`<workdir>/summary.json`. `kd-jax distill` runs it when the config's `workflow` is unset.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from kd_jax import data as data_lib
from kd_jax import deploy
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import pretrained
from kd_jax import rundir
from kd_jax import checkpoint as ckpt_lib
from kd_jax import teacher_pass
from kd_jax import train as train_lib
from kd_jax.edge import phases as edge_phases
from kd_jax.metric_writer import MetricWriter, log


def teacher_phase(config, workdir: str, mesh, info, writer: MetricWriter) -> phase_lib.PhaseResult:
  """Loads the teacher named by `teacher.checkpoint`, or trains (and saves) one."""
  teacher = rundir.model(config, "teacher", info.num_classes)
  like = phase_lib.variables_like(teacher, info.image_shape)
  source = rundir.teacher_source(config, workdir)
  if (pretrained.is_checkpoint_file(config.teacher.checkpoint)
      and not ckpt_lib.has_variables(source)):
    pretrained.import_teacher(config.teacher.checkpoint, config.teacher.name,
                              info.num_classes, workdir, config)
  if config.teacher.checkpoint and not ckpt_lib.has_variables(source):
    raise FileNotFoundError(
        f"teacher checkpoint {source!r} not found; train one with `kd-jax train-teacher "
        f"--workdir=DIR` (then --config.teacher.checkpoint=DIR) or unset "
        f"--config.teacher.checkpoint to train the teacher in this run")
  if ckpt_lib.has_variables(source):
    meta = rundir.check_teacher_meta(config, source, info)
    try:
      variables, meta = ckpt_lib.load_variables(source, like)
    except ckpt_lib.Damaged as e:
      checkpoints = os.path.join(source, "checkpoints")
      if config.teacher.checkpoint or not os.path.isdir(checkpoints):
        raise ValueError(f"the teacher variables in {source} are damaged ({e}) and there "
                         "are no teacher checkpoints to restore them from; train the "
                         "teacher again in a new --workdir") from None
      log(f"teacher: the variables in {source} are damaged ({e}); restoring the teacher "
          f"from {checkpoints}")
    else:
      log(f"teacher: loaded {meta['model']} from {source} "
          f"(accuracy {meta.get('metrics', {}).get('accuracy', float('nan')):.4f})")
      return phase_lib.PhaseResult(variables, meta.get("metrics", {}),
                                   meta.get("selection", {}))
  return phase_lib.train_phase(config, phase=rundir.TEACHER, model=teacher,
                     train_config=config.teacher.train, distill_config={"ce_weight": 1.0},
                     workdir=workdir, mesh=mesh, info=info, writer=writer,
                     seed=config.seed + 1)


def student_phases(config, workdir, mesh, info, writer, teacher_result):
  """Trains the vanilla (CE only) and the distilled student from the same init."""
  student = rundir.model(config, "student", info.num_classes)
  teacher = rundir.model(config, "teacher", info.num_classes)
  t_vars = parallel.replicate(teacher_result.variables, mesh)
  vanilla = None
  if config.train_vanilla:
    vanilla = phase_lib.train_phase(config, phase=rundir.VANILLA, model=student, train_config=config.train,
                          distill_config={"ce_weight": 1.0}, workdir=workdir, mesh=mesh,
                          info=info, writer=writer, teacher=teacher,
                          teacher_variables=t_vars)
  curriculum = teacher_pass.curriculum_for_run(
      config, workdir, train_data=phase_lib.training_data(config, "student"), teacher=teacher,
      teacher_variables=t_vars, mesh=mesh)
  distilled = phase_lib.train_phase(config, phase=rundir.DISTILLED, model=student, train_config=config.train,
                          distill_config=config.distill, workdir=workdir, mesh=mesh,
                          info=info, writer=writer, teacher=teacher, teacher_variables=t_vars,
                          curriculum=curriculum)
  return student, vanilla, distilled


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Teacher, vanilla and distilled student, edge phases, export; `summary.json`."""
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.data_mesh()
  info = data_lib.get_info(config.data)
  writer = MetricWriter(workdir)
  log(f"{jax.process_count()} process(es), {mesh.devices.size} {jax.default_backend()} "
       f"device(s); dataset {config.data.name}: {info.num_train} train / "
       f"{info.num_eval} eval, {info.num_classes} classes, images {tuple(info.image_shape)}")
  teacher = teacher_phase(config, workdir, mesh, info, writer)
  student, vanilla, distilled = student_phases(config, workdir, mesh, info, writer, teacher)
  summary = {
      "teacher": config.teacher.name, "student": config.student.name,
      "dataset": config.data.name,
      "teacher_accuracy": teacher.metrics.get("accuracy"),
      "student_accuracy": vanilla.metrics["accuracy"] if vanilla else None,
      "distilled_accuracy": distilled.metrics["accuracy"],
      "teacher_metrics": teacher.metrics,
      "student_metrics": vanilla.metrics if vanilla else None,
      "distilled_metrics": distilled.metrics,
      "student_fingerprint": train_lib.fingerprint(distilled.variables["params"]),
      "phases": {name: rundir.phase_summary(result) for name, result in (
          (rundir.TEACHER, teacher), (rundir.VANILLA, vanilla),
          (rundir.DISTILLED, distilled)) if result is not None},
  }
  if jax.process_index() == 0 and config.export.variants:
    summary["tflite"] = rundir.export_student(config, workdir, student, distilled.variables, info)
  else:
    summary["tflite"] = {}
  summary["edge"], edge_rows = edge_phases.run(
      config, workdir, mesh=mesh, info=info, writer=writer,
      teacher=rundir.model(config, "teacher", info.num_classes),
      teacher_variables=parallel.replicate(teacher.variables, mesh), student=student,
      distilled=distilled)
  if jax.process_index() == 0:
    rundir.write_export_table(workdir, student, distilled, info, summary["tflite"], edge_rows)
    deployment, _ = rundir.check_deployment(config, workdir)
    if deployment:
      summary["deployment"] = deployment
      log(f"deployment check: {deployment['pick'] or 'nothing fits'} "
          f"(export/{deploy.DEPLOY_MD})")
  summary["wall_seconds"] = time.perf_counter() - t0
  writer.close()
  if jax.process_index() == 0:
    rundir.write_summary(workdir, summary)
  return summary


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> phase_lib.PhaseResult:
  """`kd-jax train-teacher`: the teacher phase alone (reuse it with teacher.checkpoint)."""
  os.makedirs(workdir, exist_ok=True)
  info = data_lib.get_info(config.data)
  writer = MetricWriter(workdir)
  result = teacher_phase(config, workdir, parallel.data_mesh(), info, writer)
  writer.close()
  return result
