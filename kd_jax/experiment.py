"""One experiment, end to end: teacher, vanilla student, distilled student, export, summary.

Each phase trains in its own folder of the workdir (`teacher/`, `vanilla/`, `distilled/`)
with orbax checkpoints every `train.checkpoint_every_steps`; rerunning the same command
resumes every phase from its latest checkpoint and skips finished ones, so an interrupted
run ends with the same parameters as an uninterrupted one. Everything here is importable
from a notebook: `distill(config, workdir)` is what `kd-jax distill` calls.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import models
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import teacher_cache
from kd_jax import train as train_lib
from kd_jax.metric_writer import MetricWriter

TEACHER, VANILLA, DISTILLED = "teacher", "vanilla", "distilled"


@dataclasses.dataclass
class PhaseResult:
  variables: Any
  metrics: dict[str, float]


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[kd-jax] {msg}", flush=True)


def _model(config: ml_collections.ConfigDict, which: str, num_classes: int):
  """The teacher or student; `mixed_precision=True` computes in bfloat16 (params stay fp32)."""
  spec = config[which]
  kw = dict(spec.get("kwargs", {}) or {})
  kw.setdefault("dtype", jnp.bfloat16 if config.get("mixed_precision") else jnp.float32)
  return models.create(spec.name, num_classes, **kw)


def student_recipe(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The student's training recipe (`config.train`) with a phase's overrides."""
  return ml_collections.ConfigDict({**config.train.to_dict(), **dict(overrides or {})})


def _train_data(config: ml_collections.ConfigDict, which: str) -> ml_collections.ConfigDict:
  """The data config a model trains on: `data`, with `<which>.train_split` if set."""
  split = config[which].get("train_split")
  if not split:
    return config.data
  data_config = config.data.copy_and_resolve_references()
  data_config.train_split = split
  return data_config


def _variables_like(model, input_shape) -> Any:
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, *input_shape)), train=False))


def train_phase(config: ml_collections.ConfigDict, *, phase: str, model, train_config,
                distill_config: Mapping[str, Any], workdir: str, mesh, info,
                writer: MetricWriter, teacher=None, teacher_variables=None,
                seed: int | None = None,
                curriculum: data_lib.curriculum.Curriculum | None = None,
                init_variables: Any = None,
                model_meta: Mapping[str, Any] | None = None) -> PhaseResult:
  """Trains `model` for one phase (resuming from its checkpoints) and evaluates it.

  `init_variables` (host variables of `model`) replace its random initialisation,
  e.g. to fine-tune a trained student; `model_meta` joins the metadata saved with
  the phase's final variables (e.g. the `model_kwargs` of a pruned architecture).

  With `curriculum`, batches are drawn by the curriculum sampler and its fraction and
  batch difficulty are logged with the train metrics.
  """
  seed = config.seed if seed is None else seed
  batch = int(train_config.batch_size)
  train_data = _train_data(config, TEACHER if phase == TEACHER else "student")
  num_train = data_lib.get_info(train_data).num_train
  steps_per_epoch = num_train // batch
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={batch} exceeds the {num_train} training "
                     "examples; lower it")
  total_steps = int(round(train_config.epochs * steps_per_epoch))
  objective = objective_lib.build(distill_config, total_steps=total_steps,
                                  steps_per_epoch=steps_per_epoch, num_train=num_train)
  accumulate = max(1, int(train_config.get("accumulation_steps", 1)))
  schedule = train_lib.learning_rate_schedule(  # in optimizer updates
      train_config, max(1, steps_per_epoch // accumulate), max(1, total_steps // accumulate))
  optimizer = train_lib.make_optimizer(train_config, schedule)
  input_shape = tuple(info.image_shape)
  if objective.needs_teacher:
    x = jnp.zeros((2, *input_shape))
    s_taps = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), x, train=False)[0][1])
    t_taps = jax.eval_shape(lambda: teacher.apply(teacher_variables, x, train=False)[1])
    objective = objective_lib.resolve(objective, s_taps, t_taps, config.student.name,
                                      config.teacher.name)

  def fresh_state():
    state = train_lib.init_state(
        model, optimizer, input_shape, jax.random.key(seed), objective, teacher,
        teacher_variables, batch_size=batch // jax.device_count())
    if init_variables is not None:
      state = state.replace(
          params={**state.params, "student": init_variables["params"]},
          batch_stats={"student": init_variables.get("batch_stats", {})})
    return parallel.replicate(state, mesh)

  state = fresh_state()
  phase_dir = os.path.join(workdir, phase)
  save_every = max(1, int(train_config.checkpoint_every_steps))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(phase_dir, "checkpoints"))
  restored = checkpointer.restore(state)
  start = 0
  if restored:
    start, state = restored
    writer.drop_after(phase, start)
    _log(f"{phase}: resuming from step {start}/{total_steps}")

  max_nonfinite = int(train_config.get("max_nonfinite_steps", 5))
  rollback_factor = float(train_config.get("rollback_lr_factor", 0.5))
  max_rollbacks = int(train_config.get("max_rollbacks", 3))
  rollbacks = 0
  if start < total_steps:
    step_fn = train_lib.make_train_step(
        model, teacher, objective, optimizer, mesh,
        teacher_bf16=bool(config.teacher.get("bf16_forward", False)))
    cached_logits = None
    if objective.needs_teacher and distill_config.get("cache_teacher_logits", False):
      cached_logits = teacher_cache.load_or_compute(
          os.path.join(phase_dir, "teacher_logits.npy"), teacher, teacher_variables,
          train_data, objective, mesh, batch_size=batch)  # the step's per-device shapes
    t_vars = teacher_variables if objective.needs_teacher and cached_logits is None else {}

    def batches_from(step):
      """Global batches from `step` on (with cached teacher logits), prefetched."""
      batches = data_lib.train_iterator(train_data, global_batch_size=batch, seed=seed,
                                        start_step=step, curriculum=curriculum)
      if cached_logits is not None:
        batches = teacher_cache.attach(batches, cached_logits)
      return parallel.prefetch_to_device(batches, mesh)

    log_every = max(1, int(config.get("log_every_steps", 50)))
    progress = _progress(phase, start, total_steps)
    batches = batches_from(start)
    t0, seen, step = time.perf_counter(), 0, start
    while step < total_steps:
      batch_arrays = next(batches)
      state, metrics = step_fn(state, t_vars, batch_arrays, train_lib.step_rng(seed, step))
      step += 1
      seen += batch
      if int(state.nonfinite) >= max_nonfinite:  # roll back with a lower learning rate
        if rollbacks == max_rollbacks:
          raise FloatingPointError(
              f"{phase}: {max_nonfinite} non-finite steps in a row after {rollbacks} "
              "rollbacks; lower train.learning_rate or check the data")
        rollbacks += 1
        lr_scale = float(state.lr_scale) * rollback_factor
        restored = checkpointer.restore(state, before=step)
        good, state = restored if restored else (0, fresh_state())
        state = state.replace(lr_scale=jnp.full_like(state.lr_scale, lr_scale),
                              nonfinite=jnp.zeros_like(state.nonfinite))
        writer.write(phase, good, {"rollback_from_step": step, "lr_scale": lr_scale},
                     kind="rollback")
        _log(f"{phase}: {max_nonfinite} non-finite steps in a row at step {step}; rolled "
             f"back to step {good} with learning rate x{lr_scale:g}")
        step = good
        batches = batches_from(step)
        progress.reset(total=total_steps)
        progress.update(step)
        continue
      if step % log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        rate = seen / (time.perf_counter() - t0)
        if curriculum is not None:
          metrics.update(curriculum.metrics(step - 1, batch_arrays))
        writer.write(phase, step, {**metrics, "images_per_second": rate,
                                   "learning_rate": schedule((step - 1) // accumulate)
                                   * float(state.lr_scale)})
        progress.set_postfix(loss=f"{float(metrics['loss']):.3f}", img_s=f"{rate:.0f}")
        t0, seen = time.perf_counter(), 0
      progress.update(1)
      if step % save_every == 0 or step == total_steps:
        checkpointer.save(step, state)
    progress.close()
  checkpointer.close()

  variables = parallel.to_host(state.student_variables)
  metrics = eval_lib.evaluate(
      model, state.student_variables,
      data_lib.eval_iterator(config.data, batch_size=config.eval_batch_size), mesh,
      num_classes=info.num_classes,
      teacher=teacher if phase != TEACHER else None,
      teacher_variables=teacher_variables if phase != TEACHER else None,
      objective=objective,
      term_variables={"params": state.params.get("terms", {}), **state.term_state})
  writer.write(phase, total_steps, metrics, kind="eval")
  # The finished phase's model, for `teacher.checkpoint`, evaluate and export.
  ckpt_lib.save_variables(phase_dir, variables, {
      "model": config.teacher.name if phase == TEACHER else config.student.name,
      "phase": phase, "num_classes": info.num_classes, "dataset": config.data.name,
      "steps": total_steps, "metrics": metrics, **(model_meta or {})})
  _log(f"{phase}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                if isinstance(v, float)))
  return PhaseResult(variables, metrics)


def _progress(phase: str, start: int, total: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc=phase, unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0)


def teacher_source(config, workdir: str) -> str:
  """The folder holding a run's teacher variables.

  `teacher.checkpoint` (a `kd-jax train-teacher` workdir or its `teacher/` folder),
  else `<workdir>/teacher`.
  """
  source = config.teacher.get("checkpoint")
  if not source:
    return os.path.join(workdir, TEACHER)
  inner = os.path.join(source, TEACHER)
  return inner if os.path.isdir(inner) else source


def teacher_phase(config, workdir: str, mesh, info, writer: MetricWriter) -> PhaseResult:
  """Loads the teacher named by `teacher.checkpoint`, or trains (and saves) one."""
  teacher = _model(config, "teacher", info.num_classes)
  like = _variables_like(teacher, info.image_shape)
  source = teacher_source(config, workdir)
  if config.teacher.get("checkpoint") and not ckpt_lib.has_variables(source):
    raise FileNotFoundError(
        f"teacher checkpoint {source!r} not found; train one with `kd-jax train-teacher "
        f"--workdir=DIR` (then --config.teacher.checkpoint=DIR) or unset "
        f"--config.teacher.checkpoint to train the teacher in this run")
  if ckpt_lib.has_variables(source):
    variables, meta = ckpt_lib.load_variables(source, like)
    if meta.get("model") != config.teacher.name:
      raise ValueError(f"the teacher checkpoint in {source!r} is a {meta.get('model')}, "
                       f"not teacher.name={config.teacher.name!r}; set "
                       f"--config.teacher.name={meta.get('model')}")
    _log(f"teacher: loaded {meta['model']} from {source} "
         f"(accuracy {meta.get('metrics', {}).get('accuracy', float('nan')):.4f})")
    return PhaseResult(variables, meta.get("metrics", {}))
  return train_phase(config, phase=TEACHER, model=teacher,
                     train_config=config.teacher.train, distill_config={"ce_weight": 1.0},
                     workdir=workdir, mesh=mesh, info=info, writer=writer,
                     seed=config.seed + 1)


def student_phases(config, workdir, mesh, info, writer, teacher_result):
  """Trains the vanilla (CE only) and the distilled student from the same init."""
  student = _model(config, "student", info.num_classes)
  teacher = _model(config, "teacher", info.num_classes)
  t_vars = parallel.replicate(teacher_result.variables, mesh)
  vanilla = None
  if config.get("train_vanilla", True):
    vanilla = train_phase(config, phase=VANILLA, model=student, train_config=config.train,
                          distill_config={"ce_weight": 1.0}, workdir=workdir, mesh=mesh,
                          info=info, writer=writer, teacher=teacher,
                          teacher_variables=t_vars)
  curriculum = data_lib.curriculum.for_run(
      config, workdir, train_data=_train_data(config, "student"), teacher=teacher,
      teacher_variables=t_vars, mesh=mesh)
  distilled = train_phase(config, phase=DISTILLED, model=student, train_config=config.train,
                          distill_config=config.distill, workdir=workdir, mesh=mesh,
                          info=info, writer=writer, teacher=teacher, teacher_variables=t_vars,
                          curriculum=curriculum)
  return student, vanilla, distilled


def export_student(config, workdir: str, student, variables, info) -> dict[str, Any]:
  """TFLite variants of the distilled student, evaluated in the LiteRT interpreter."""
  from kd_jax import export as export_lib
  ecfg = config.export
  rep = data_lib.representative_images(config.data, int(ecfg.num_calibration_images))
  return export_lib.export_all(
      student.clone(dtype=jnp.float32), variables, tuple(info.image_shape),
      os.path.join(workdir, "export"),
      variants=tuple(ecfg.variants), representative_images=rep,
      eval_batches_fn=lambda: data_lib.eval_iterator(
          config.data, batch_size=config.eval_batch_size, process_index=0, process_count=1),
      parity_images=rep[:16], latency_runs=int(ecfg.get("latency_runs", 50)))


def distill(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`kd-jax distill`: all phases, evaluation, export; writes `<workdir>/summary.json`.

  A config that sets `workflow` runs that workflow instead (`kd_jax.workflows`).
  """
  if config.get("workflow"):
    from kd_jax import workflows
    return workflows.run(config, workdir)
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.data_mesh()
  info = data_lib.get_info(config.data)
  writer = MetricWriter(workdir)
  _log(f"{jax.process_count()} process(es), {mesh.devices.size} {jax.default_backend()} "
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
  }
  if jax.process_index() == 0 and config.export.variants:
    summary["tflite"] = export_student(config, workdir, student, distilled.variables, info)
  else:
    summary["tflite"] = {}
  from kd_jax.edge import phases as edge_phases
  summary["edge"], edge_rows = edge_phases.run(
      config, workdir, mesh=mesh, info=info, writer=writer,
      teacher=_model(config, "teacher", info.num_classes),
      teacher_variables=parallel.replicate(teacher.variables, mesh), student=student,
      distilled=distilled)
  if jax.process_index() == 0:
    _write_export_table(workdir, student, distilled, info, summary["tflite"], edge_rows)
  summary["wall_seconds"] = time.perf_counter() - t0
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=_json_default)
    _log(f"wrote {os.path.join(workdir, 'summary.json')}")
  return summary


def _write_export_table(workdir, student, distilled, info, tflite, other_rows=None):
  """`<workdir>/export/export.{json,md}`: the student's variants, then any other rows.

  Rows already in export.json that are not rewritten here (e.g. the edge phases' when
  only the student is re-exported) are kept.
  """
  from kd_jax import export as export_lib
  from kd_jax.edge import cost
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
    export_lib.write_table(json.loads(json.dumps(rows, default=_json_default)), out_dir)


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> PhaseResult:
  """`kd-jax train-teacher`: the teacher phase alone (reuse it with teacher.checkpoint)."""
  os.makedirs(workdir, exist_ok=True)
  info = data_lib.get_info(config.data)
  writer = MetricWriter(workdir)
  result = teacher_phase(config, workdir, parallel.data_mesh(), info, writer)
  writer.close()
  return result


def load_phase(config, workdir: str, phase: str, info) -> tuple[Any, Any]:
  """The student model and the final variables a finished phase saved in `workdir`."""
  model = _model(config, "student", info.num_classes)
  directory = os.path.join(workdir, phase)
  if not ckpt_lib.has_variables(directory):
    raise FileNotFoundError(f"no finished {phase} phase in {directory}; run "
                            f"`kd-jax distill --workdir={workdir}` first (it resumes)")
  variables, _ = ckpt_lib.load_variables(directory,
                                         _variables_like(model, info.image_shape))
  return model, variables


def load_teacher(config, workdir: str, info) -> tuple[Any, Any]:
  """The teacher model and the variables a run uses (see `teacher_source`)."""
  model = _model(config, "teacher", info.num_classes)
  source = teacher_source(config, workdir)
  if not ckpt_lib.has_variables(source):
    raise FileNotFoundError(f"no teacher in {source}; run `kd-jax distill "
                            f"--workdir={workdir}` first (it resumes)")
  variables, _ = ckpt_lib.load_variables(source, _variables_like(model, info.image_shape))
  return model, variables


def evaluate_run(config, workdir: str, robustness: bool = False) -> dict[str, Any]:
  """`kd-jax evaluate`: metrics of the teacher and of each student phase of a run.

  With `robustness`, also their accuracy under every edge corruption at 5 severities
  (`kd_jax.robustness`), under the key 'robustness'.
  """
  mesh = parallel.data_mesh()
  info = data_lib.get_info(config.data)
  teacher, t_vars = load_teacher(config, workdir, info)
  batches = lambda: data_lib.eval_iterator(config.data, batch_size=config.eval_batch_size)
  results = {TEACHER: eval_lib.evaluate(teacher, t_vars, batches(), mesh,
                                        num_classes=info.num_classes)}
  models = {TEACHER: (teacher, t_vars)}
  for phase in (VANILLA, DISTILLED):
    if os.path.isdir(os.path.join(workdir, phase)):
      model, variables = load_phase(config, workdir, phase, info)
      models[phase] = (model, variables)
      results[phase] = eval_lib.evaluate(model, variables, batches(), mesh,
                                         num_classes=info.num_classes, teacher=teacher,
                                         teacher_variables=t_vars)
  for phase, metrics in results.items():
    _log(f"{phase}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                  if isinstance(v, float)))
  if robustness:
    from kd_jax import robustness as robustness_lib
    results["robustness"] = robustness_lib.evaluate_run(config, workdir, models, mesh,
                                                        info.num_classes)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "evaluation.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def export_run(config, workdir: str) -> dict[str, Any]:
  """`kd-jax export`: TFLite variants of a run's distilled student; updates summary.json."""
  info = data_lib.get_info(config.data)
  model, variables = load_phase(config, workdir, DISTILLED, info)
  variables = parallel.to_host(variables)
  results = export_student(config, workdir, model, variables, info)
  path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    summary["tflite"] = results
    with open(path, "w") as f:
      json.dump(summary, f, indent=2, default=_json_default)
  distilled = PhaseResult(variables, summary.get("distilled_metrics") or {"accuracy": None})
  _write_export_table(workdir, model, distilled, info, results)
  for variant, r in results.items():
    _log(f"{variant}: {r['bytes']} bytes, accuracy {r.get('accuracy', float('nan')):.4f}, "
         f"{r['latency_ms']:.3f} ms -> {r['path']}")
  return results


def report_run(config, workdir: str) -> str:
  """`kd-jax report`: `<workdir>/report.md` with its plots (see `kd_jax.report`)."""
  from kd_jax import report
  return report.write_report(config, workdir)
