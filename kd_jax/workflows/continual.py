"""Continual updates: a deployed student learns a sequence of new tasks without
forgetting the old ones, through updates that can be lightweight.

The tasks are one of two kinds (`continual.mode`), over any dataset (a TFDS name or
`folder:PATH`):

  class    `continual.tasks` is a sequence of class sets (class-incremental: the
           classifier keeps all the dataset's classes throughout, labels are the
           dataset's own and no task identity is given at test time); a task's images
           are the training examples of its classes (`data.classes`), its test images
           the eval split's;
  domain   `continual.domains` is a sequence of domains over all classes
           (domain-incremental): 'none' (the source), 'OP@SEVERITY', the source under
           that `kd_jax.data.augment` corruption (training images and test split
           alike, e.g. 'motion_blur@3'), or another dataset of the same classes (a TFDS
           name or 'folder:PATH', resized to the source's input).

Task 0 is what the deployed model knows: the student is distilled on its training
images (phase `base`). Every later task is one update, trained on
`continual.new_percent` % of each class's training images of the task (the first ones
in file order, `data.examples`), starting from the model the previous update produced.
No update sees an earlier task's images, except through the replay buffer.

Each entry of `continual.runs` is one sequence of updates, `STRATEGY:TRAINABLE`:

  strategies (what keeps the old tasks)
    none     plain fine-tuning: cross-entropy on the new labels;
    lwf      CE + Learning without Forgetting: Hinton KD from the previous model,
             restricted to the logits of the classes seen so far (`lwf`),
                 L = CE + w · T² · mean_b KL(softmax(z_prev,b[seen] / T)
                                              || softmax(z_b[seen] / T));
    teacher  CE + w · KD to the teacher (which knows every class);
    replay   CE on the new images plus a bounded buffer of earlier tasks' training
             images, kept by reservoir sampling over every image seen so far
             (`replay_size` positions in the training split; written to the update's
             folder as replay.json and read back on a rerun; class mode only, as one
             update's images share one domain);
    ewc      CE + online Elastic Weight Consolidation: the gradient of
                 (λ/2) Σ_i F_i (θ_i − θ*_i)²
             is added to the student's gradients (θ* the previous model, F the sum of
             the diagonal Fisher information of every earlier task, computed exactly
             as E_x Σ_y p(y|x) (∂ log p(y|x) / ∂θ)² on that task's training images with
             the model that had just learnt it; λ = `ewc_strength`). The logged loss
             leaves the penalty out.

  trainable subsets (what an update changes; optax masking, frozen parameters get no
  update and frozen BatchNorm layers keep the previous model's running statistics)
    all         every parameter;
    head        the classifier only;
    batchnorm   BatchNorm scales, biases and statistics, and the classifier;
    last_stage  the last stage of the backbone and the classifier;
    adapters    residual 1×1-conv adapters added after every block of the deployed
                model, zero-initialised so that the update starts from it exactly
                (`kd_jax.models.adapters`), and the classifier.
  The classifier is trained in every subset, because the new classes' logits live there.

After every update each model is evaluated on every task's test images (in domain
mode: each domain's test split, under its corruption): row i of the
accuracy matrix R holds the accuracies after update i (row 0: the deployed model), and

  average accuracy    ACC = mean_j R[T-1, j]
  backward transfer   BWT = mean_{j<T-1} (R[T-1, j] − R[j, j])   (negative: forgetting)
  forward transfer    FWT = mean_{j≥1} (R[j-1, j] − b_j), b_j a freshly initialised
                      student's accuracy on task j

(Lopez-Paz and Ranzato, GEM, NeurIPS 2017). Each update writes what changed against
the model it updated — the changed variables, as `delta.npz` in the update's folder —
and the summary gives its bytes next to the trained parameters' and the full model's.
`summary.json` holds every run under `runs`, and the first run's figures at the top
level (`accuracy_matrix`, `average_accuracy`, `backward_transfer`, `forward_transfer`,
`delta_bytes`, `updates`).

References: Li and Hoiem, Learning without Forgetting, ECCV 2016; Kirkpatrick et al.,
Overcoming catastrophic forgetting in neural networks, PNAS 2017; Schwarz et al.,
Progress & Compress (online EWC), ICML 2018; Vitter, Random sampling with a
reservoir, ACM TOMS 1985 (the buffer); Rebuffi et al., iCaRL, CVPR 2017 (replay in
class-incremental learning).
"""
from __future__ import annotations

import copy
import functools
import io
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from kd_jax import data as data_lib
from kd_jax import files
from kd_jax import losses
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax import train as train_lib
from kd_jax.models import adapters
from kd_jax.workflows import common

BASE = "base"
MODES = ("class", "domain")
STRATEGIES = ("none", "lwf", "teacher", "replay", "ewc")
TRAINABLE = ("all", "head", "batchnorm", "last_stage", "adapters")


def lwf(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        classes: Sequence[int], temperature: float = 2.0) -> jax.Array:
  """Learning without Forgetting: Hinton KD on the logits of `classes` only.

    L = T² / B Σ_b KL(softmax(z_t,b[classes] / T) || softmax(z_s,b[classes] / T)).

  Args:
    student_logits: `[B, K]` logits of the model being fine-tuned.
    teacher_logits: `[B, K]` logits of the previous model (the anchor).
    classes: the old task's class indices.
    temperature: softmax temperature `T` (2 in the paper).

  Returns:
    Scalar loss.

  References:
    Li and Hoiem, Learning without Forgetting, ECCV 2016.
  """
  index = jnp.asarray(classes)
  return losses.kd(jnp.asarray(student_logits)[:, index],
                   jnp.asarray(teacher_logits)[:, index], temperature)


objective_lib.register("lwf", lwf, objective_lib.LOGITS)


# The `continual` block of an experiment config: `mode` 'class' (the tasks are the
# class sets of `tasks`) or 'domain' (the tasks are `domains`: 'none', 'OP@SEVERITY'
# or a dataset name); task 0 is what the deployed student knows; every later task is
# an update trained on `new_percent`% of each class's training images of the task, in
# every sequence of `runs` (STRATEGY:TRAINABLE, see the module docstring);
# `anchor_weight` and `temperature` weigh the lwf and teacher anchors, `replay_size`
# bounds the replay buffer (images), `ewc_strength` is EWC's λ; `train` overrides keys
# of the student's recipe for the updates.
DEFAULTS = dict(mode="class", tasks=((0, 1, 2, 3), (4, 5), (6, 7), (8, 9)),
                domains=("none", "motion_blur@3", "gaussian_noise@3"), new_percent=50,
                runs=("lwf:all", "none:all", "teacher:all", "replay:all", "ewc:all",
                      "lwf:head", "lwf:batchnorm", "lwf:last_stage", "lwf:adapters"),
                anchor_weight=1.0, temperature=2.0, replay_size=60, ewc_strength=100.0,
                train=dict(epochs=10.0, learning_rate=0.01))


def default_config() -> ml_collections.ConfigDict:
  """The `continual` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def parse_run(spec: str) -> tuple[str, str]:
  """'lwf:head' -> ('lwf', 'head'); a strategy alone trains every parameter."""
  strategy, _, trainable = str(spec).partition(":")
  trainable = trainable or "all"
  if strategy not in STRATEGIES or trainable not in TRAINABLE:
    raise ValueError(f"continual.runs entry {spec!r} is not STRATEGY:TRAINABLE with a "
                     f"strategy of {', '.join(STRATEGIES)} and a subset of "
                     f"{', '.join(TRAINABLE)}")
  return strategy, trainable


def parse_domain(spec: str) -> tuple[str | None, tuple[str, int] | None]:
  """A domain as (dataset name or None for the source, corruption or None):
  'none' -> (None, None), 'motion_blur@3' -> (None, ('motion_blur', 3)),
  'folder:PATH' -> ('folder:PATH', None)."""
  op, at, severity = str(spec).partition("@")
  if str(spec) == "none":
    return None, None
  if not at:
    return str(spec), None
  if op not in data_lib.augment.OPS or not severity.isdigit():
    raise ValueError(f"continual.domains entry {spec!r} is not OP@SEVERITY with an op of "
                     f"{', '.join(data_lib.augment.OPS)}")
  data_lib.augment.parse([{"op": op, "severity": int(severity)}])
  return None, (op, int(severity))


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `continual` block the workflow cannot run."""
  block = config.continual
  if block.mode not in MODES:
    raise ValueError(f"continual.mode must be one of {', '.join(MODES)}, got "
                     f"{block.mode!r}")
  if block.mode == "class":
    tasks = [list(t) for t in block.tasks]
    flat = [c for t in tasks for c in t]
    if (len(tasks) < 2 or not all(tasks) or len(set(flat)) != len(flat)
        or min(flat) < 0):
      raise ValueError(f"continual.tasks {tasks} must be at least two disjoint, non-empty "
                       "sets of class labels (the deployed task, then one per update)")
  else:
    if len(block.domains) < 2:
      raise ValueError(f"continual.domains {list(block.domains)} must name at least two "
                       "domains (the deployed one, then one per update)")
    for spec in block.domains:
      parse_domain(spec)
  if not 0 < int(block.new_percent) <= 100:
    raise ValueError(f"continual.new_percent must be in 1..100, got {block.new_percent}")
  if not block.runs:
    raise ValueError("continual.runs is empty; name at least one STRATEGY:TRAINABLE, "
                     "e.g. 'lwf:all'")
  names = [parse_run(spec) for spec in block.runs]
  if len(set(names)) != len(names):
    raise ValueError(f"continual.runs {list(block.runs)} names a sequence twice")
  if block.mode == "domain" and any(strategy == "replay" for strategy, _ in names):
    raise ValueError("continual.runs: replay needs continual.mode='class' (an update's "
                     "images share one domain); remove it from continual.runs")
  if int(block.replay_size) < 1:
    raise ValueError(f"continual.replay_size must be at least 1, got {block.replay_size}")
  if float(block.ewc_strength) < 0:
    raise ValueError(f"continual.ewc_strength must be >= 0, got {block.ewc_strength}")


def update_objective(strategy: str, block: ml_collections.ConfigDict,
                     seen: Sequence[int]) -> dict[str, Any]:
  """The objective of an update with `strategy`; `seen`: the earlier tasks' classes."""
  weight, temperature = float(block.anchor_weight), float(block.temperature)
  terms = {"lwf": [dict(method="lwf", weight=weight, temperature=temperature,
                        classes=tuple(seen))],
           "teacher": [dict(method="kd", weight=weight, temperature=temperature)]}
  return {"ce_weight": 1.0, "terms": terms.get(strategy, [])}


# --- trainable subsets ----------------------------------------------------------------


def _group(name: str) -> tuple[str, int] | None:
  """('stage', 3) for 'stage3_block0'; None for an unnumbered module ('stem', 'head_conv')."""
  prefix = name.split("_")[0]
  digits = len(prefix) - len(prefix.rstrip("0123456789"))
  return (prefix[:-digits], int(prefix[-digits:])) if digits else None


def trainable_masks(variables: Mapping[str, Any], subset: str) -> dict[str, Any]:
  """Boolean trees over `variables` (params and batch_stats): True where `subset` trains.

  The classifier is the top-level `classifier` module; BatchNorm layers are the modules
  that hold batch statistics; the last stage is the highest-numbered top-level group
  (`stage3_*`, `group6_*`, `block4_*`) with the unnumbered modules after the stages
  (`final_bn`, `head_conv`, the classifier).
  """
  params = variables["params"]
  groups = [g for g in map(_group, params) if g is not None]
  top = max(groups, key=lambda g: g[1]) if groups else None
  last = {n for n in params if n != "stem" and _group(n) in (None, top)}
  stats_paths = {path[:-1] for path, _ in _leaves(variables.get("batch_stats", {}))}

  def trains(path: tuple[str, ...], is_stat: bool) -> bool:
    if subset == "all" or path[0] == "classifier":
      return True
    if subset == "head":
      return False
    if subset == "last_stage":
      return path[0] in last
    if subset == "adapters":
      return path[0].startswith(adapters.PREFIX)
    return is_stat or path[:-1] in stats_paths  # batchnorm

  def mask(tree, is_stat):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: trains(train_lib.path_names(p), is_stat), tree)
  return {"params": mask(params, False),
          "batch_stats": mask(variables.get("batch_stats", {}), True)}


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  return [(train_lib.path_names(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def masked_optimizer(student_mask: Any) -> Callable[[optax.GradientTransformation],
                                                    optax.GradientTransformation]:
  """Wraps an optimizer so that only the student's parameters where `student_mask`
  is True are updated (objective-term parameters always train)."""
  trains = {path: bool(m) for path, m in _leaves(student_mask)}
  return lambda optimizer: train_lib.only_trainable(
      optimizer, lambda path: path[0] != "student" or trains[path[1:]])


def _after(first: optax.GradientTransformation, wrap, optimizer):
  return optax.chain(first, wrap(optimizer))


def ewc_gradient(fisher: Any, anchor: Any, strength: float) -> optax.GradientTransformation:
  """Adds `strength · F ⊙ (θ − θ*)` to the student's gradients: the gradient of
  (strength / 2) Σ F (θ − θ*)², online EWC's penalty (Schwarz et al., 2018)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None):
    student = jax.tree.map(lambda g, f, p, a: g + strength * f * (p - a),
                           grads["student"], fisher, params["student"], anchor)
    return {**grads, "student": student}, state
  return optax.GradientTransformation(init, update)


def fisher_diagonal(model, variables: Any, batches) -> Any:
  """The diagonal Fisher information of `model` at `variables` (eval mode), exactly
  E_x Σ_y p(y|x) (∂ log p(y|x) / ∂θ)², over the examples of `batches` (mask-weighted,
  summed over every host)."""
  def log_probs(params, image):
    logits = model.apply({**variables, "params": params}, image[None], train=False)[0]
    return jax.nn.log_softmax(logits[0].astype(jnp.float32))

  @jax.jit
  def batch_sum(params, images, mask):
    def one(image, weight):
      jac = jax.jacrev(log_probs)(params, image)  # leaves [K, ...]
      p = jnp.exp(log_probs(params, image))
      return jax.tree.map(
          lambda j: weight * jnp.tensordot(p, j.astype(jnp.float32) ** 2, axes=1), jac)
    per_example = jax.vmap(one)(images, mask)
    return jax.tree.map(lambda x: x.sum(0), per_example)

  params = variables["params"]
  total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  count = 0.0
  for batch in batches:
    sums = batch_sum(params, jnp.asarray(batch["image"]), jnp.asarray(batch["mask"]))
    total = jax.tree.map(lambda t, s: t + np.asarray(s, np.float64), total, sums)
    count += float(np.sum(batch["mask"]))
  if jax.process_count() > 1:
    total = jax.tree.map(lambda t: multihost_utils.process_allgather(t).sum(0), total)
    count = float(multihost_utils.process_allgather(np.float64(count)).sum())
  return jax.tree.map(lambda t: (t / max(count, 1.0)).astype(np.float32), total)


# --- replay buffer --------------------------------------------------------------------


def reservoir(stream: Sequence[Any], capacity: int, seed: int) -> list[Any]:
  """Algorithm R (Vitter, 1985): a uniform sample of `capacity` items of `stream`,
  drawn in one pass with a seeded generator (the same buffer on every host and rerun)."""
  rng = np.random.default_rng(seed)
  buffer = list(stream[:capacity])
  for i in range(capacity, len(stream)):
    j = int(rng.integers(0, i + 1))
    if j < capacity:
      buffer[j] = stream[i]
  return buffer


def first_percent(labels: np.ndarray, classes: Sequence[int], percent: int) -> list[int]:
  """The positions of the first `percent` % (rounded down, at least one) of each class
  of `classes` in `labels` (file order), sorted."""
  kept = []
  for c in classes:
    positions = np.flatnonzero(labels == c)
    kept.extend(positions[:max(1, len(positions) * percent // 100)].tolist())
  return sorted(kept)


# --- the workflow -----------------------------------------------------------------------


def _nbytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def write_delta(path: str, before: Any, after: Any) -> int:
  """Writes the variables of `after` that differ from `before` (by path) to `path`
  (.npz, atomically) and returns the file's bytes."""
  changed = {"/".join(k): np.asarray(b) for (k, a), (_, b)
             in zip(_leaves(before), _leaves(after))
             if not np.array_equal(np.asarray(a), np.asarray(b))}
  buffer = io.BytesIO()
  np.savez(buffer, **changed)
  if jax.process_index() == 0:
    files.write_atomic(path, buffer.getvalue())
  return len(buffer.getvalue())


def transfer(matrix: Sequence[Sequence[float]], baseline: Sequence[float]
             ) -> dict[str, float]:
  """ACC, BWT and FWT of an accuracy matrix (row i: after update i; column j: task j)."""
  r = np.asarray(matrix, np.float64)
  last = r.shape[0] - 1
  return {"average_accuracy": float(r[last].mean()),
          "backward_transfer": float(np.mean([r[last, j] - r[j, j] for j in range(last)])),
          "forward_transfer": float(np.mean([r[j - 1, j] - baseline[j]
                                             for j in range(1, last + 1)]))}


def task_data(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo
              ) -> list[tuple[ml_collections.ConfigDict, tuple[str, int] | None]]:
  """Per task, (its data config: training images and test split, its eval
  corruption): the task's classes of `data` (class mode), or its domain."""
  block = config.continual
  if block.mode == "class":
    tasks = [tuple(int(c) for c in t) for t in block.tasks]
    if max(max(t) for t in tasks) >= info.num_classes:
      raise ValueError(f"continual.tasks name a class beyond the {info.num_classes} "
                       f"classes of {config.data.name}; change continual.tasks")
    return [(common.derived(config.data, {"classes": t}), None) for t in tasks]
  out = []
  for spec in block.domains:
    name, corruption = parse_domain(spec)
    data = config.data.copy_and_resolve_references()
    data.edge_augment = () if corruption is None else (
        {"op": corruption[0], "prob": 1.0, "severity": corruption[1]},)
    if name is not None:  # Another dataset, at the source's input size.
      data.name, data.train_split, data.eval_split = name, "train", None
      data.image_size, data.channels = info.image_shape[0], info.image_shape[-1]
      if data_lib.get_info(data).num_classes != info.num_classes:
        raise ValueError(f"continual.domains entry {name!r} has other classes than "
                         f"{config.data.name}; name datasets of the same classes")
    out.append((data, corruption))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`workflow='continual'`: the phases of the module docstring; writes summary.json."""
  check_config(config)
  block = config.continual
  context = common.start(config, workdir)
  info = context.info
  teacher = rundir.model(config, "teacher", info.num_classes)
  student = rundir.model(config, "student", info.num_classes)
  t_vars = context.teacher_variables
  tasks = task_data(config, info)
  classes = [tuple(d.classes or range(info.num_classes)) for d, _ in tasks]
  percent = int(block.new_percent)
  # The training positions of each task (data.examples): all of task 0, then
  # `new_percent`% of each class.
  positions = [np.flatnonzero(np.isin(data_lib.train_labels(d), c)).tolist() if i == 0
               else first_percent(data_lib.train_labels(d), c, percent)
               for i, ((d, _), c) in enumerate(zip(tasks, classes))]
  base_config = common.derived(config, {"data": tasks[0][0], "student.train_split": None,
                                        "student.validation_split": None})
  deployed = phase_lib.train_phase(
      base_config, phase=BASE, model=student, train_config=config.train,
      distill_config=config.distill, teacher=teacher, teacher_variables=t_vars,
      **context.phase_args)

  accuracy_of = common.accuracy_fn(student, context, config.eval_batch_size)
  row_of = lambda variables: [accuracy_of(variables, d, c) for d, c in tasks]
  fresh = jax.device_get(student.init(jax.random.key(config.seed),
                                      np.zeros((1, *info.image_shape), np.float32),
                                      train=False))
  baseline = row_of(fresh)
  deployed_row = row_of(deployed.variables)
  teacher_accuracy = common.accuracy_fn(teacher, context, config.eval_batch_size)
  teacher_row = [teacher_accuracy(context.teacher.variables, d, c) for d, c in tasks]
  recipe = phase_lib.student_recipe(config, block.train)

  def update_data(i: int, replay: Sequence[int] = ()) -> ml_collections.ConfigDict:
    """Task i's update images (and `replay` positions); its eval: the classes so far."""
    seen = tuple(c for t in classes[:i + 1] for c in t)
    return common.derived(tasks[i][0], {
        "examples": tuple(sorted(set(positions[i]) | set(replay))),
        "classes": seen if block.mode == "class" else None,
        "validation_fraction": 0.0})

  def fisher_of(model, i: int, variables: Any) -> Any:
    """The Fisher information of `model`'s `variables` on task i's training images."""
    return fisher_diagonal(model, variables, data_lib.eval_iterator(
        update_data(i), batch_size=config.eval_batch_size, split="train",
        corruption=tasks[i][1]))

  runs = {}
  for spec in block.runs:
    strategy, subset = parse_run(spec)
    name = f"{strategy}:{subset}"
    model, previous, run_row = student, deployed.variables, row_of
    if subset == "adapters":  # the deployed model with zero adapters: the same outputs
      model = adapters.with_adapters(student, info.image_shape)
      zero = jax.device_get(model.init(jax.random.key(0),
                                       np.zeros((1, *info.image_shape), np.float32)))
      previous = {**previous, "params": {**zero["params"], **previous["params"]}}
      run_accuracy = common.accuracy_fn(model, context, config.eval_batch_size)
      run_row = lambda variables: [run_accuracy(variables, d, c) for d, c in tasks]
    matrix, updates = [deployed_row], []
    fisher = None
    masks = trainable_masks(previous, subset)
    for i in range(1, len(tasks)):
      seen = tuple(sorted({c for t in classes[:i] for c in t}))
      phase = f"update{i}_{strategy}_{subset}"
      replay = []
      if strategy == "replay":
        replay = _replay_buffer(os.path.join(workdir, phase, "replay.json"),
                                [p for t in positions[:i] for p in t],
                                int(block.replay_size), config.seed * 1000 + i)
      transform = masked_optimizer(masks["params"])
      if strategy == "ewc":  # the penalty's gradient added before the masked optimizer
        step_fisher = fisher_of(model, i - 1, previous)
        fisher = step_fisher if fisher is None else jax.tree.map(np.add, fisher, step_fisher)
        transform = functools.partial(_after, ewc_gradient(
            fisher, previous["params"], float(block.ewc_strength)), transform)
      update_config = common.derived(base_config, {"data": update_data(i, replay)})
      anchor = ((model, parallel.replicate(previous, context.mesh))
                if strategy == "lwf" else (teacher, t_vars))
      result = phase_lib.train_phase(
          update_config, phase=phase, model=model, train_config=recipe,
          distill_config=update_objective(strategy, block, seen), teacher=anchor[0],
          teacher_variables=anchor[1], init_variables=previous,
          optimizer_transform=transform, batch_stats_mask=masks["batch_stats"],
          **context.phase_args)
      updated = result.variables
      delta_bytes = write_delta(os.path.join(workdir, phase, "delta.npz"), previous, updated)
      trained = [np.asarray(x) for m, x in zip(jax.tree.leaves(masks["params"]),
                                               jax.tree.leaves(updated["params"])) if m]
      matrix.append(run_row(updated))
      updates.append({"task": i, "classes": list(classes[i]),
                      "train_images": len(positions[i]), "replay_images": len(replay),
                      "trained_parameters": int(sum(x.size for x in trained)),
                      "trained_bytes": int(sum(x.nbytes for x in trained)),
                      "delta_bytes": delta_bytes, "model_bytes": _nbytes(updated)})
      previous = updated
    runs[name] = {"strategy": strategy, "trainable": subset, "accuracy_matrix": matrix,
                  **transfer(matrix, baseline),
                  "delta_bytes": [u["delta_bytes"] for u in updates], "updates": updates}

  first = runs[next(iter(runs))]
  tasks_out = ([list(t) for t in classes] if block.mode == "class"
               else list(block.domains))
  summary = {"workflow": "continual", "teacher": config.teacher.name,
             "student": config.student.name, "mode": block.mode, "tasks": tasks_out,
             "new_percent": percent, "run": next(iter(runs)),
             **{k: first[k] for k in ("accuracy_matrix", "average_accuracy",
                                      "backward_transfer", "forward_transfer",
                                      "delta_bytes", "updates")},
             "runs": runs, "teacher_accuracy": teacher_row,
             "fresh_student_accuracy": baseline}
  return common.finish(context, summary)


def _replay_buffer(path: str, stream: Sequence[int], capacity: int,
                   seed: int) -> list[int]:
  """The replay buffer of an update (positions in the training split): read from
  `path` when an earlier attempt wrote it, else drawn by reservoir sampling over the
  earlier tasks' training positions `stream` (task order, then file order) and
  written there."""
  if os.path.exists(path):
    with open(path) as f:
      return [int(p) for p in json.load(f)["examples"]]
  buffer = sorted(reservoir(stream, capacity, seed))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {"capacity": capacity, "seen": len(stream),
                            "examples": buffer})
  return buffer
