"""The phase runner: trains one model for one phase of a run, and evaluates it.

A phase trains in `<workdir>/<phase>/` with orbax checkpoints every
`checkpoint_every_steps` (`<workdir>/<phase>/checkpoints/<step>`); rerunning it resumes
from the latest checkpoint, so an interrupted phase ends with the same parameters as an
uninterrupted one. Non-finite steps roll back to the last good checkpoint with a lower
learning rate. The finished phase's variables and metrics are saved in `<workdir>/<phase>/`
for later phases, `kd-jax evaluate` and `kd-jax export`.

Workflows (`kd_jax.workflows`) and the edge phases (`kd_jax.edge.phases`) compose phases;
this module knows nothing of them.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import preemption
from kd_jax import registry
from kd_jax import teacher_cache
from kd_jax import train as train_lib
from kd_jax.data import curriculum as curriculum_lib
from kd_jax.metric_writer import MetricWriter, log, read_records

TEACHER = "teacher"


# Validation during a phase (the `validation` config block): every `every_steps` steps
# and at the last step the model is evaluated on the validation split, and the train
# state with the best `metric` is kept. Metrics where lower is better:
_LOWER_IS_BETTER = ("nll", "ece")
VALIDATION_METRICS = ("accuracy", "top5_accuracy", *_LOWER_IS_BETTER)
VALIDATION_DEFAULTS = dict(every_steps=100, metric="accuracy")


@dataclasses.dataclass
class PhaseResult:
  """A finished phase: the model's variables (on the host) and its eval metrics.

  `variables` and `metrics` are the last step's (test split). With a validation split,
  `selection` holds `best_step`, `best_validation` and `last_validation` (validation
  metrics) and `best_test` (test-split metrics of the best-by-validation model).
  """
  variables: Any
  metrics: dict[str, float]
  selection: dict[str, Any] = dataclasses.field(default_factory=dict)


def default_validation_config() -> ml_collections.ConfigDict:
  """The `validation` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(VALIDATION_DEFAULTS))


def validation_settings(spec: Mapping[str, Any] | None) -> dict[str, Any]:
  """The `validation` config block with its defaults; one-line errors."""
  spec = registry.section("validation", spec, VALIDATION_DEFAULTS)
  if int(spec["every_steps"]) < 1:
    raise ValueError(f"validation.every_steps must be at least 1, got {spec['every_steps']}")
  if spec["metric"] not in VALIDATION_METRICS:
    raise ValueError(f"validation.metric={spec['metric']!r} is unknown; use one of "
                     f"{', '.join(VALIDATION_METRICS)}")
  return spec


def student_recipe(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The student's training recipe (`config.train`) with a phase's overrides."""
  return ml_collections.ConfigDict({**config.train.to_dict(), **dict(overrides or {})})


def training_data(config: ml_collections.ConfigDict, which: str) -> ml_collections.ConfigDict:
  """The data config a model trains on: `data`, with `<which>.train_split` and
  `<which>.validation_split` (a named split instead of the held-out fraction) if set."""
  split, validation = config[which].train_split, config[which].validation_split
  if not split and not validation:
    return config.data
  data_config = config.data.copy_and_resolve_references()
  if split:
    data_config.train_split = split
  if validation:
    data_config.validation_split, data_config.validation_fraction = validation, 0.0
  return data_config


def variables_like(model, input_shape) -> Any:
  """Shapes and dtypes of `model`'s variables for one example of `input_shape`, with
  the (empty) `batch_stats` that a phase saves for a model without BatchNorm."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, *input_shape)), train=False))
  return {"batch_stats": {}, **variables}


def curriculum_metrics(curriculum: curriculum_lib.Curriculum, step: int,
                       batch: Mapping[str, jax.Array]) -> dict[str, float]:
  """`curriculum_fraction` at `step` and `curriculum_difficulty`, the mean score of
  `batch` (a global batch with 'difficulty', as the train step receives it)."""
  size = batch["difficulty"].shape[0]
  return {"curriculum_fraction": curriculum.fraction(step, size),
          "curriculum_difficulty": float(parallel.to_host(jnp.mean(batch["difficulty"])))}


def train_phase(config: ml_collections.ConfigDict, *, phase: str, model, train_config,
                distill_config: Mapping[str, Any], workdir: str, mesh, info,
                writer: MetricWriter, teacher=None, teacher_variables=None,
                seed: int | None = None,
                curriculum: curriculum_lib.Curriculum | None = None,
                init_variables: Any = None,
                model_meta: Mapping[str, Any] | None = None,
                optimizer_transform: Callable[[optax.GradientTransformation],
                                              optax.GradientTransformation] | None = None,
                batch_stats_mask: Any = None,
                extra_views: Mapping[str, ml_collections.ConfigDict] | None = None
                ) -> PhaseResult:
  """Trains `model` for one phase (resuming from its checkpoints) and evaluates it.

  `init_variables` (host variables of `model`) replace its random initialisation,
  e.g. to fine-tune a trained student; `model_meta` joins the metadata saved with
  the phase's final variables (e.g. the `model_kwargs` of a pruned architecture).
  `optimizer_transform` wraps the recipe's optimizer (e.g. a mask of the trainable
  parameters, or a penalty's gradient added to the gradients); `batch_stats_mask`
  (bools over the student's batch statistics) freezes the statistics where False.
  `extra_views` ({view name: data config}) draws a training stream of another dataset
  beside the run's: its images join each batch as `view/<name>`, its labels are
  dropped (e.g. unlabelled target-domain images), each stream with its own epochs from
  the same step, so a resumed phase sees the same pairs.

  With `curriculum`, batches are drawn by the curriculum sampler and its fraction and
  batch difficulty are logged with the train metrics.
  """
  seed = config.seed if seed is None else seed
  recipe = train_lib.recipe(train_config)
  batch = recipe["batch_size"]
  train_data = training_data(config, TEACHER if phase == TEACHER else "student")
  train_info = data_lib.get_info(train_data)
  num_train = train_info.num_train
  steps_per_epoch = num_train // batch
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={batch} exceeds the {num_train} training "
                     "examples; lower it")
  total_steps = int(round(recipe["epochs"] * steps_per_epoch))
  validation = validation_settings(config.validation)
  validate_every = int(validation["every_steps"])
  has_validation = train_info.num_validation > 0
  objective = objective_lib.build(distill_config, total_steps=total_steps,
                                  steps_per_epoch=steps_per_epoch, num_train=num_train)
  accumulate = recipe["accumulation_steps"]
  schedule = train_lib.learning_rate_schedule(  # in optimizer updates
      train_config, max(1, steps_per_epoch // accumulate), max(1, total_steps // accumulate))
  optimizer = train_lib.make_optimizer(train_config, schedule)
  if optimizer_transform is not None:
    optimizer = optimizer_transform(optimizer)
  input_shape = tuple(info.image_shape)
  if objective.terms:
    x = jnp.zeros((2, *input_shape))
    s_taps = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), x, train=False)[0][1])
    t_taps = jax.eval_shape(lambda: teacher.apply(teacher_variables, x, train=False)[1]
                            ) if objective.needs_teacher else {}
    objective = objective_lib.resolve(objective, s_taps, t_taps, config.student.name,
                                      config.teacher.name,
                                      teacher_params=parallel.to_host(teacher_variables["params"]))
  # Parts of terms pre-trained by phases of their own (FT's paraphraser), frozen here.
  pretrained_parts = pretrain_parts(
      config, phase=phase, objective=objective, teacher=teacher,
      teacher_variables=teacher_variables, workdir=workdir, mesh=mesh, info=info,
      writer=writer, seed=seed)

  def fresh_state():
    state = train_lib.init_state(
        model, optimizer, input_shape, jax.random.key(seed), objective, teacher,
        teacher_variables, batch_size=batch // jax.device_count())
    if init_variables is not None:
      state = state.replace(
          params={**state.params, "student": init_variables["params"]},
          batch_stats={"student": init_variables.get("batch_stats", {})})
    for collection, parts in pretrained_parts.items():
      state = state.replace(term_state={**state.term_state, collection: {
          **state.term_state[collection], **parts}})
    return parallel.replicate(state, mesh)

  state = fresh_state()
  phase_dir = os.path.join(workdir, phase)
  save_every = recipe["checkpoint_every_steps"]
  checkpointer = ckpt_lib.Checkpointer(os.path.join(phase_dir, "checkpoints"))
  best = None
  if has_validation:
    metric = validation["metric"]
    best = ckpt_lib.BestCheckpointer(os.path.join(phase_dir, "best"), metric,
                                     "min" if metric in _LOWER_IS_BETTER else "max")
    validation_step = eval_lib.make_eval_step(model)
    validations = {}  # step -> validation metrics of this phase

    def validate(step, state):
      """Validation metrics at `step`: logged, and the state kept if the best so far."""
      metrics = eval_lib.evaluate(
          model, state.student_variables,
          data_lib.eval_iterator(train_data, batch_size=config.eval_batch_size,
                                 split="validation"),
          mesh, num_classes=info.num_classes, eval_step=validation_step)
      writer.write(phase, step, metrics, kind="validation")
      best.save(step, state, metrics)
      validations[step] = metrics
  restored = checkpointer.restore(state)
  start = 0
  if restored:
    start, state = restored
    writer.drop_after(phase, start)
    log(f"{phase}: resuming from step {start}/{total_steps}")
  if best is not None:
    best.drop_after(start)
    validations.update(  # logged by earlier attempts, up to the restored step
        (r["step"], r) for r in read_records(workdir)
        if r["phase"] == phase and r["kind"] == "validation" and r["step"] <= start)

  max_nonfinite = recipe["max_nonfinite_steps"]
  rollback_factor = recipe["rollback_lr_factor"]
  max_rollbacks = recipe["max_rollbacks"]
  rollbacks = 0
  if start < total_steps:
    step_fn = train_lib.make_train_step(
        model, teacher, objective, optimizer, mesh,
        teacher_bf16=config.teacher.bf16_forward,
        split_gradients=recipe["optimizer"] == "dot", batch_stats_mask=batch_stats_mask)
    cached_logits = None
    if objective.needs_teacher and objective.cache_teacher_logits:
      cached_logits = teacher_cache.load_or_compute(
          os.path.join(phase_dir, "teacher_logits.npy"), teacher, teacher_variables,
          train_data, objective, mesh, batch_size=batch)  # the step's per-device shapes
    t_vars = teacher_variables if objective.needs_teacher and cached_logits is None else {}

    def batches_from(step):
      """Global batches from `step` on (with cached teacher logits), prefetched."""
      batches = data_lib.train_iterator(train_data, global_batch_size=batch, seed=seed,
                                        start_step=step, curriculum=curriculum)
      if extra_views:
        batches = _with_views(batches, {
            name: data_lib.train_iterator(view_data, global_batch_size=batch,
                                          seed=seed + 1 + i, start_step=step)
            for i, (name, view_data) in enumerate(sorted(extra_views.items()))})
      if cached_logits is not None:
        batches = teacher_cache.attach(batches, cached_logits)
      return parallel.prefetch_to_device(batches, mesh)

    log_every = config.log_every_steps
    progress = _progress(phase, start, total_steps)
    batches = batches_from(start)
    t0, seen, step = time.perf_counter(), 0, start
    # A signal while training only sets a flag: the step in flight finishes, its state
    # is saved, then `Preempted` ends the run (kd_jax.preemption).
    with preemption.deferred():
      while step < total_steps:
        batch_arrays = next(batches)
        state, metrics = step_fn(state, t_vars, batch_arrays, train_lib.step_rng(seed, step))
        step += 1
        seen += batch
        save_now = step % save_every == 0 or step == total_steps
        look = save_now or step % log_every == 0  # the host reads the state only here
        # Non-finite steps are skipped inside the step; a run of `max_nonfinite` of them
        # since the last look rolls back with a lower learning rate.
        if look and int(state.nonfinite_peak) >= max_nonfinite:
          if rollbacks == max_rollbacks:
            raise FloatingPointError(
                f"{phase}: {max_nonfinite} non-finite steps in a row after {rollbacks} "
                "rollbacks; lower train.learning_rate or check the data")
          rollbacks += 1
          lr_scale = float(state.lr_scale) * rollback_factor
          restored = checkpointer.restore(state, before=step)
          good, state = restored if restored else (0, fresh_state())
          state = state.replace(lr_scale=jnp.full_like(state.lr_scale, lr_scale),
                                nonfinite=jnp.zeros_like(state.nonfinite),
                                nonfinite_peak=jnp.zeros_like(state.nonfinite_peak))
          writer.write(phase, good, {"rollback_from_step": step, "lr_scale": lr_scale},
                       kind="rollback")
          if best is not None:
            best.drop_after(good)
          log(f"{phase}: {max_nonfinite} non-finite steps in a row at step {step}; rolled "
               f"back to step {good} with learning rate x{lr_scale:g}")
          step = good
          batches = batches_from(step)
          progress.reset(total=total_steps)
          progress.update(step)
          continue
        if look:
          state = state.replace(nonfinite_peak=jnp.zeros_like(state.nonfinite_peak))
        if step % log_every == 0 or step == total_steps:
          metrics = jax.device_get(metrics)
          rate = seen / (time.perf_counter() - t0)
          if curriculum is not None:
            metrics.update(curriculum_metrics(curriculum, step - 1, batch_arrays))
          writer.write(phase, step, {**metrics, "images_per_second": rate,
                                     "learning_rate": schedule((step - 1) // accumulate)
                                     * float(state.lr_scale)})
          progress.set_postfix(loss=f"{float(metrics['loss']):.3f}", img_s=f"{rate:.0f}")
          t0, seen = time.perf_counter(), 0
        progress.update(1)
        if has_validation and (step % validate_every == 0 or step == total_steps):
          validate(step, state)
        stop = preemption.should_stop(step)
        if save_now or stop:
          checkpointer.save(step, state)
        if stop:
          progress.close()
          checkpointer.close()
          raise preemption.Preempted(
              preemption.requested(),
              f"{phase} at step {step}/{total_steps} in {checkpointer.directory}")
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
  selection = {}
  if best is not None:
    selection = _select_best(best, state, phase, validations, total_steps,
                             validation["metric"],
                             lambda variables: eval_lib.evaluate(
                                 model, variables,
                                 data_lib.eval_iterator(config.data,
                                                        batch_size=config.eval_batch_size),
                                 mesh, num_classes=info.num_classes), writer)
    best.close()
  # The finished phase's model, for `teacher.checkpoint`, evaluate and export.
  ckpt_lib.save_variables(phase_dir, variables, {
      "model": config.teacher.name if phase == TEACHER else config.student.name,
      "phase": phase, "num_classes": info.num_classes, "dataset": config.data.name,
      "steps": total_steps, "metrics": metrics, "selection": selection,
      **(model_meta or {})})
  log(f"{phase}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                if isinstance(v, float)))
  if selection:
    log(f"{phase}: best validation {validation['metric']} "
        f"{selection['best_validation'][validation['metric']]:.4f} at step "
        f"{selection['best_step']} (test accuracy {selection['best_test']['accuracy']:.4f}); "
        f"last {selection['last_validation'][validation['metric']]:.4f}")
  return PhaseResult(variables, metrics, selection)


def pretrain_parts(config: ml_collections.ConfigDict, *, phase: str,
                   objective: objective_lib.Objective, teacher, teacher_variables,
                   workdir: str, mesh, info, writer: MetricWriter,
                   seed: int) -> dict[str, dict[str, Any]]:
  """Trains (or resumes) the pre-trained part of each term that has one.

  Each such term (`Method.pretraining`, e.g. FT's paraphraser) gets a phase of its own,
  `<phase>_pretrain_<term>`, run by `train_phase` (checkpoints, exact resume): the
  teacher, frozen, with the part on the term's teacher tap, trained on the mean squared
  error of the part's output against that tap, with no cross-entropy; only the part's
  parameters reach the optimizer. Returns `{collection: {term name: variables}}`,
  the trained parts, which the calling phase puts into its terms' variables (its own
  checkpoints then carry them, so its resume stays exact). A finished part's phase
  resumes at its last step and only evaluates again.
  """
  parts: dict[str, dict[str, Any]] = {}
  for term in objective.terms:
    spec = term.method.pretraining
    if spec is None:
      continue
    settings = inspect.signature(spec.model).parameters
    model = spec.model(teacher, term.teacher_tap,
                       **{k: v for k, v in term.hyper.items() if k in settings})
    host_teacher = parallel.to_host(teacher_variables)
    fresh = model.init(jax.random.key(seed), jnp.zeros((1, *info.image_shape)),
                       train=False)
    init = {"params": {**fresh["params"], "teacher": host_teacher["params"]},
            "batch_stats": {"teacher": host_teacher.get("batch_stats", {})}}

    def only_the_part(optimizer, part=spec.part):
      """`optimizer` on `params['student'][part]`; every other parameter stays put."""
      return train_lib.only_trainable(optimizer, lambda path: path[:2] == ("student", part))

    name = f"{phase}_pretrain_{term.name_.replace('/', '_')}"
    recipe = student_recipe(config, {**spec.recipe, **dict(term.pretrain or {})})
    result = train_phase(
        config, phase=name, model=model, train_config=recipe,
        distill_config={"ce_weight": 0.0, "terms": [dict(
            method="fitnet", weight=1.0, student_tap=spec.output,
            teacher_tap=term.teacher_tap)]},
        workdir=workdir, mesh=mesh, info=info, writer=writer, teacher=teacher,
        teacher_variables=teacher_variables, seed=seed, init_variables=init,
        model_meta={"model": f"{config.teacher.name}+{spec.part}", "term": term.name_},
        optimizer_transform=only_the_part)
    parts.setdefault(spec.collection, {})[term.name_] = {  # Term's module is `method`
        "method": {"params": result.variables["params"][spec.part]}}
  return parts


def _with_views(batches, streams):
  """`batches` with the images of each stream in `streams` added as `view/<name>`."""
  for batch in batches:
    yield {**batch, **{f"view/{name}": next(stream)["image"]
                       for name, stream in streams.items()}}


def _select_best(best: ckpt_lib.BestCheckpointer, state, phase: str,
                 validations: Mapping[int, Mapping[str, Any]], last_step: int,
                 metric: str, test_metrics, writer: MetricWriter) -> dict[str, Any]:
  """Best-by-validation against last: their validation metrics and the best model's
  test-split metrics (the test split's one use for the best model)."""
  best_step, best_state = best.restore(state)
  best_test = test_metrics(best_state.student_variables)
  writer.write(phase, best_step, best_test, kind="best_eval")
  keep = lambda r: {k: v for k, v in r.items() if k not in ("phase", "kind", "step")}
  return {"metric": metric, "best_step": int(best_step),
          "best_validation": keep(validations[best_step]),
          "last_validation": keep(validations[last_step]), "best_test": best_test}


def _progress(phase: str, start: int, total: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc=phase, unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0)
