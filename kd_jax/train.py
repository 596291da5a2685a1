"""Training: the train state, the optimizer recipe and the data-parallel distillation step.

`train_step(state, teacher_variables, batch, rng) -> (state, metrics)` is a pure,
per-shard function run under `jax.shard_map` inside `jax.jit` over the ``'data'`` mesh:
the teacher runs in inference mode outside the differentiated function, the student in
train mode with cross-device BatchNorm statistics (`lax.pmean` inside BatchNorm), and
gradients are averaged with `lax.pmean(grads, 'data')`. Teachers are trained by the same
step with an objective of plain cross-entropy.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import registry


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the data position and RNG derive from `step`."""
  step: jax.Array
  params: Any        # {'student': ..., 'terms': {term name: ...}}
  batch_stats: Any   # {'student': ...}
  term_state: Any    # the terms' non-parameter collections (adapter BN, memory banks)
  opt_state: Any
  nonfinite: jax.Array  # consecutive steps skipped for a non-finite loss or gradient
  nonfinite_peak: jax.Array  # the longest such run since the host last looked
  lr_scale: jax.Array   # multiplies every update; lowered by a rollback

  @property
  def student_variables(self) -> dict[str, Any]:
    return {"params": self.params["student"],
            "batch_stats": self.batch_stats["student"]}


# The training recipe (`train`, `teacher.train`): every key with its default. A phase's
# override block (`heads.train`, `edge.qat.train`, ...) may set any of these keys.
RECIPE_DEFAULTS = dict(
    optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
    schedule="cosine", decay_epochs=(), decay_factor=0.1, warmup_epochs=0.0,
    batch_size=64, epochs=30.0, checkpoint_every_steps=100, accumulation_steps=1,
    # optimizer="dot": the task (CE) gradient's momentum is momentum - dot_delta, the
    # distillation gradient's momentum + dot_delta (`dot`).
    dot_delta=0.075,
    # Rollback on non-finite steps (kd_jax/phase.py): after `max_nonfinite_steps`
    # skipped steps in a row, restart from the last good checkpoint with the learning
    # rate times `rollback_lr_factor`, at most `max_rollbacks` times.
    max_nonfinite_steps=5, rollback_lr_factor=0.5, max_rollbacks=3)
OPTIMIZERS = ("sgd", "adamw", "dot")
LR_SCHEDULES = ("step", "cosine", "constant")


def default_recipe() -> ml_collections.ConfigDict:
  """The `train` block of an experiment config, with every key at its default."""
  return ml_collections.ConfigDict(copy.deepcopy(RECIPE_DEFAULTS))


def recipe(train_config: Mapping[str, Any]) -> dict[str, Any]:
  """`train_config` with the defaults of the keys it leaves out; unknown keys fail."""
  return registry.section("train", train_config, RECIPE_DEFAULTS)


def check_recipe(train_config: Mapping[str, Any], where: str = "train") -> None:
  """One-line errors for a recipe that cannot train (`where` names its config block)."""
  r = recipe(train_config)
  if r["optimizer"] not in OPTIMIZERS:
    raise ValueError(f"{where}.optimizer={r['optimizer']!r} is unknown; use one of "
                     f"{', '.join(OPTIMIZERS)}")
  if r["optimizer"] == "dot" and r["accumulation_steps"] > 1:
    raise ValueError(f"{where}.optimizer='dot' keeps two gradients per step and cannot "
                     f"accumulate them; set {where}.accumulation_steps=1")
  if r["optimizer"] == "dot" and not 0 <= r["dot_delta"] < min(r["momentum"], 1 - r["momentum"]):
    raise ValueError(f"{where}.dot_delta must be in [0, min(momentum, 1 - momentum)), got "
                     f"{r['dot_delta']}")
  if r["schedule"] not in LR_SCHEDULES:
    raise ValueError(f"{where}.schedule={r['schedule']!r} is unknown; use one of "
                     f"{', '.join(LR_SCHEDULES)}")
  ranges = (("learning_rate", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("epochs", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("batch_size", lambda v: v >= 1, "at least 1"),
            ("checkpoint_every_steps", lambda v: v >= 1, "at least 1"),
            ("accumulation_steps", lambda v: v >= 1, "at least 1"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("decay_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("warmup_epochs", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("max_nonfinite_steps", lambda v: v >= 1, "at least 1"),
            ("rollback_lr_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("max_rollbacks", lambda v: v >= 0, "at least 0"))
  for key, ok, want in ranges:
    if not ok(r[key]):
      raise ValueError(f"{where}.{key} must be {want}, got {r[key]!r}")


def learning_rate_schedule(train_config: Mapping[str, Any], steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Step decay (the CRD recipe: ×decay_factor at each of decay_epochs) or cosine."""
  r = recipe(train_config)
  lr = float(r["learning_rate"])
  warmup = int(r["warmup_epochs"] * steps_per_epoch)
  kind = r["schedule"]
  if kind == "step":
    boundaries = {int(e * steps_per_epoch): float(r["decay_factor"])
                  for e in r["decay_epochs"]}
    main = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup:  # join_schedules restarts the count at the boundary: shift it back
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), lambda s: main(s + warmup)], [warmup])
    return main
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(total_steps, warmup + 1))
  if kind == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"train.schedule={kind!r} is unknown; use one of {', '.join(LR_SCHEDULES)}")


def make_optimizer(train_config: Mapping[str, Any],
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (PyTorch's SGD), or AdamW.

  With `accumulation_steps` k > 1 the gradients of k consecutive steps are averaged
  (optax.MultiSteps) before one update, so k steps of batch b update like one of k·b;
  the schedule then counts updates, not steps.
  """
  r = recipe(train_config)
  name, wd = r["optimizer"], float(r["weight_decay"])
  if name == "sgd":
    opt = optax.chain(
        optax.add_decayed_weights(wd) if wd else optax.identity(),
        optax.sgd(schedule, momentum=r["momentum"] or None, nesterov=bool(r["nesterov"])))
  elif name == "adamw":
    opt = optax.adamw(schedule, weight_decay=wd)
  elif name == "dot":
    opt = optax.chain(dot(r["momentum"], r["dot_delta"], wd),
                      optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"train.optimizer={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
  k = int(r["accumulation_steps"])
  return optax.MultiSteps(opt, every_k_schedule=k) if k > 1 else opt


MIXUP_SALT = 0x6d69  # folded into a step's key for mixup's draws (not dropout's)


def mixup(batch: Mapping[str, jax.Array], rng: jax.Array,
          alpha: float) -> dict[str, jax.Array]:
  """Every image view of `batch` mixed with the batch rolled by one example:
  x_b ← λ x_b + (1 − λ) x_(b−1 mod B), one λ ~ Beta(α, α) per batch and for all views,
  as the function-matching authors' code mixes (big_vision's `mixup` with n=2; Beyer et
  al., CVPR 2022; Zhang et al., ICLR 2018). Other entries are unchanged."""
  lam = jax.random.beta(rng, alpha, alpha)
  out = dict(batch)
  for key, value in batch.items():
    if key == "image" or key.startswith("view/"):
      w = lam.astype(value.dtype)
      out[key] = w * value + (1 - w) * jnp.roll(value, 1, axis=0)
  return out


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A pytree key path as plain names: ('student', 'classifier', 'kernel')."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def only_trainable(optimizer: optax.GradientTransformation,
                   trainable: Callable[[tuple[str, ...]], bool]
                   ) -> optax.GradientTransformation:
  """`optimizer` on the parameters whose path (a tuple of keys, e.g. ('student',
  'classifier', 'kernel')) `trainable` accepts; the others get no update at all (no
  weight decay either): `optax.multi_transform` with `set_to_zero`."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if trainable(path_names(path)) else "frozen", params)
  return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                               labels)


class DotState(NamedTuple):
  task_momentum: Any
  distill_momentum: Any


def dot(momentum: float = 0.9, delta: float = 0.075,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
  """DOT's two momenta: the task and the distillation gradients kept apart.

  `update` takes `{'task': g_ce, 'distill': g_kd}` (each shaped like the parameters,
  as `make_train_step(..., split_gradients=True)` gives them) and returns the
  direction `b_ce + b_kd` for a learning-rate scale, where

    b_ce <- (momentum - delta) b_ce + g_ce + weight_decay · w,
    b_kd <- (momentum + delta) b_kd + g_kd,

  both buffers starting at zero (so the first step's are the gradients), as the
  authors' optimizer; with delta = 0 it is SGD with momentum and coupled weight decay.
  A parameter only the distillation terms reach (an adapter) keeps the task buffer
  at its weight decay alone, where the authors' per-tensor rule gives it plain momentum.

  References:
    Zhao, Song, Qiu et al., DOT: A Distillation-Oriented Trainer, ICCV 2023 (code:
    megvii-research/mdistiller, `engine/dot.py`).
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return DotState(zeros, jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    task = grads["task"]
    if weight_decay:
      task = jax.tree.map(lambda g, w: g + weight_decay * w, task, params)
    b_ce = jax.tree.map(lambda b, g: (momentum - delta) * b + g, state.task_momentum, task)
    b_kd = jax.tree.map(lambda b, g: (momentum + delta) * b + g, state.distill_momentum,
                        grads["distill"])
    return jax.tree.map(jnp.add, b_ce, b_kd), DotState(b_ce, b_kd)

  return optax.GradientTransformation(init, update)


def init_state(model: nn.Module, optimizer: optax.GradientTransformation,
               input_shape: tuple[int, ...], rng: jax.Array,
               objective: objective_lib.Objective | None = None,
               teacher: nn.Module | None = None, teacher_variables: Any = None,
               batch_size: int = 2) -> TrainState:
  """Fresh student (and objective-term) variables and optimizer state, unplaced.

  `batch_size` is the per-device batch the terms see (memory-free terms ignore it).
  """
  s_rng, t_rng = jax.random.split(rng)
  x = jnp.zeros((batch_size, *input_shape), jnp.float32)
  variables = model.init(s_rng, x[:1], train=False)
  params = {"student": variables["params"]}
  term_state = {}
  if objective is not None and objective.terms:
    s_logits, s_taps = model.apply(variables, x, train=False)
    t_logits, t_taps = teacher.apply(teacher_variables, x, train=False)
    labels = jnp.zeros((batch_size,), jnp.int32)
    term_vars = objective.init(t_rng, s_logits, s_taps, t_logits, t_taps, labels, labels)
    params["terms"] = term_vars.pop("params", {})
    term_state = term_vars
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats={"student": variables.get("batch_stats", {})},
                    term_state=term_state, opt_state=optimizer.init(params),
                    nonfinite=jnp.zeros((), jnp.int32),
                    nonfinite_peak=jnp.zeros((), jnp.int32),
                    lr_scale=jnp.ones((), jnp.float32))


def make_train_step(student: nn.Module, teacher: nn.Module | None,
                    objective: objective_lib.Objective,
                    optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, teacher_bf16: bool = False,
                    split_gradients: bool = False,
                    batch_stats_mask: Any = None,
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the jitted, data-parallel `train_step(state, teacher_variables, batch, rng)`.

  `batch_stats_mask` (Python bools over the student's batch statistics): where False,
  the running statistics keep their values (frozen BatchNorm layers).

  The state is donated; teacher variables are a separate, non-donated argument that
  is never differentiated. Metrics are global means (replicated scalars).

  The teacher runs once per step, in inference mode and outside the differentiated
  function, so a KD step costs a teacher forward plus a student step. With
  `teacher_bf16` its forward computes in bfloat16 (its variables stay float32; logits
  and taps reach the objective as float32). A batch that carries `teacher_logits`
  (see `kd_jax.teacher_cache`) skips the teacher: those logits are used instead, and
  the objective may then use logits only.

  With `split_gradients` (the `dot` optimizer) the optimizer receives
  `{'task': g, 'distill': g}`: the gradients of `ce_weight · CE` and of the terms, from
  two backward passes through one forward.
  """
  student_train = student.clone(bn_axis_name=parallel.DATA_AXIS)
  axis = parallel.DATA_AXIS
  teacher_forward = (teacher.clone(dtype=jnp.bfloat16)
                     if teacher_bf16 and teacher is not None else teacher)

  student_views = objective.student_views
  teacher_views = objective.teacher_views if objective.needs_teacher else ()
  multi_view = student_views != (objective_lib.MAIN_VIEW,) or teacher_views not in (
      (), (objective_lib.MAIN_VIEW,))

  def images_of(batch, view):
    if view == objective_lib.MAIN_VIEW:
      return batch["image"]
    if f"view/{view}" not in batch:
      raise ValueError(f"the objective uses view {view!r} but the batches have none; add "
                       f"{{'name': {view!r}}} to data.views")
    return batch[f"view/{view}"]

  def teacher_outputs(teacher_variables, batch, view=objective_lib.MAIN_VIEW):
    """(logits, taps) of the teacher for this shard: cached logits or a forward pass."""
    if "teacher_logits" in batch:
      return batch["teacher_logits"], {}
    logits, taps = teacher_forward.apply(teacher_variables, images_of(batch, view),
                                         train=False)
    return lax.stop_gradient(
        (logits, jax.tree.map(lambda t: t.astype(jnp.float32), taps)))

  def frozen_stats(new, old):
    if batch_stats_mask is None:
      return new
    return jax.tree.map(lambda m, n, o: n if m else o, batch_stats_mask, new, old)

  def per_shard_step(state, teacher_variables, batch, rng):
    rng = jax.random.fold_in(rng, lax.axis_index(axis))
    if objective.mixup_alpha > 0:
      batch = mixup(batch, jax.random.fold_in(rng, MIXUP_SALT), objective.mixup_alpha)
    images, labels = batch["image"], batch["label"]
    if not objective.needs_teacher:
      t_logits, t_taps = None, None
    elif multi_view:
      outputs = {view: teacher_outputs(teacher_variables, batch, view)
                 for view in teacher_views}
      t_logits = objective_lib.Views({v: o[0] for v, o in outputs.items()})
      t_taps = objective_lib.Views({v: o[1] for v, o in outputs.items()})
    else:
      t_logits, t_taps = teacher_outputs(teacher_variables, batch)

    def student_outputs(params):
      """The student on each view it sees, in train mode; BatchNorm statistics are
      updated by each view in turn (as one network run on several views does)."""
      batch_stats = state.batch_stats["student"]
      logits, taps = objective_lib.Views(), objective_lib.Views()
      for i, view in enumerate(student_views):
        (logits[view], taps[view]), new_vars = student_train.apply(
            {"params": params["student"], "batch_stats": batch_stats},
            images_of(batch, view), train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(rng, i) if i else rng})
        batch_stats = new_vars["batch_stats"]
      return logits, taps, batch_stats

    def loss_fn(params):
      if multi_view:
        s_logits, s_taps, new_bs = student_outputs(params)
      else:
        (s_logits, s_taps), new_vars = student_train.apply(
            {"params": params["student"], "batch_stats": state.batch_stats["student"]},
            images, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        new_bs = new_vars["batch_stats"]
      term_vars = {"params": params.get("terms", {}), **state.term_state}
      loss, parts, term_state = objective(
          state.step, term_vars, s_logits, s_taps, t_logits, t_taps, labels,
          batch.get("index"), train=True, axis_name=axis, batch=batch)
      main_logits = (s_logits[objective_lib.MAIN_VIEW] if multi_view else s_logits)
      return loss, (parts, main_logits, new_bs, term_state)

    if split_gradients:
      def split(params):
        loss, aux = loss_fn(params)
        task = objective.ce_weight * aux[0]["ce"]
        return (task, loss - task), (loss, aux)

      _, backward, (loss, (parts, logits, new_bs, term_state)) = jax.vjp(
          split, state.params, has_aux=True)
      one, zero = jnp.ones((), loss.dtype), jnp.zeros((), loss.dtype)
      pair = lax.pmean({"task": backward((one, zero))[0],
                        "distill": backward((zero, one))[0]}, axis)
      grads = jax.tree.map(jnp.add, pair["task"], pair["distill"])
    else:
      (loss, (parts, logits, new_bs, term_state)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      grads = lax.pmean(grads, axis)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient (on any device) skips the whole update.
    finite = lax.pmin((jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.int32),
                      axis) == 1
    updates, opt_state = optimizer.update(pair if split_gradients else grads,
                                          state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, **parts,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "grad_norm": grad_norm, **monitors(objective, state.step, grads)}
    if t_logits is not None:
      t_main = t_logits[teacher_views[0]] if multi_view else t_logits
      metrics["teacher_agreement"] = jnp.mean(
          jnp.argmax(logits, -1) == jnp.argmax(t_main, -1))
    metrics = lax.pmean(metrics, axis)
    nonfinite = jnp.where(finite, 0, state.nonfinite + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep({"student": frozen_stats(new_bs, state.batch_stats["student"])},
                         state.batch_stats),
        term_state=keep({**state.term_state, **term_state}, state.term_state),
        opt_state=keep(opt_state, state.opt_state), nonfinite=nonfinite,
        nonfinite_peak=jnp.maximum(state.nonfinite_peak, nonfinite))
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  def step(state, teacher_variables, batch, rng):
    specs = state_specs(state, objective, mesh)
    return jax.shard_map(per_shard_step, mesh=mesh,
                         in_specs=(specs, P(), P(axis), P()), out_specs=(specs, P()),
                         check_vma=False)(state, teacher_variables, batch, rng)

  return jax.jit(step, donate_argnums=(0,))


def state_specs(state: TrainState, objective: objective_lib.Objective,
                mesh: Mesh) -> Any:
  """The step's partition of the state: replicated, except per-example tables.

  A term whose `memory_shards` equals the mesh's device count (CRD) keeps its memory
  banks (`memory/<term>/method/{student,teacher}`) sharded by rows over the data
  axis: each device holds N / D rows (see `kd_jax.losses.CRD`).
  """
  devices = mesh.devices.size
  sharded = {term.name_ for term in objective.terms
             if devices > 1 and term.hyper.get("memory_shards", 1) == devices}

  def spec(path, leaf):
    del leaf
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if (keys[:2] == ["term_state", "memory"] and len(keys) == 5
        and keys[2] in sharded and keys[4] in ("student", "teacher")):
      return P(parallel.DATA_AXIS)
    return P()

  return jax.tree_util.tree_map_with_path(spec, state)


def monitors(objective: objective_lib.Objective, step: jax.Array,
             grads: Any) -> dict[str, jax.Array]:
  """Per-step scalars beside the loss terms, computed from what the step already has.

  `grad_norm/student` and `grad_norm/<term>` (the global norm of the gradient of the
  student's and of each term's learned parameters: adapter, method parameters), and
  `temperature/<term>` for each term with a temperature: its schedule's value at
  `step`, or the constant it sets.
  """
  out = {"grad_norm/student": optax.global_norm(grads["student"])}
  for name, term_grads in grads.get("terms", {}).items():
    out[f"grad_norm/{name}"] = optax.global_norm(term_grads)
  for term in objective.terms:
    if term.temperature is not None:
      out[f"temperature/{term.name_}"] = term.temperature(step)
    elif "temperature" in term.hyper:
      out[f"temperature/{term.name_}"] = jnp.asarray(term.hyper["temperature"], jnp.float32)
  return out


def step_rng(seed: int, step: int | jax.Array) -> jax.Array:
  """The RNG of a step: a function of (seed, step) only, so a resumed run draws the same."""
  return jax.random.fold_in(jax.random.key(seed), step)


def fingerprint(params: Any) -> str:
  """sha256 of the leaves in tree order, as little-endian bytes."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    a = np.asarray(leaf)
    h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
  return h.hexdigest()

