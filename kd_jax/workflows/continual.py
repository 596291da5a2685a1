"""Continual updates: a deployed student learns a sequence of new tasks without
forgetting the old ones, through updates that can be lightweight.

`continual.tasks` is a sequence of class sets over the dataset (class-incremental: the
classifier keeps all the dataset's classes throughout and no task identity is given at
test time). Task 0 is what the deployed model knows: the student is distilled on its
training images (phase `base`). Every later task is one update, trained on
`continual.new_percent` % of each of its classes' training images, starting from the
model the previous update produced. No update sees an earlier task's images, except
through the replay buffer.

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
             (`replay_size` images; written to the update's folder as replay.json);
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
    last_stage  the last stage of the backbone and the classifier.
  The classifier is trained in every subset, because the new classes' logits live there.

After every update each model is evaluated on every task's test images: row i of the
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

Class subsets come from `kd_digits_by_class`, the `kd_digits` splits regrouped per
class (splits `train_<c>`, `test_<c>`), so a subset is TFDS split syntax such as
`train_5[:20%]+train_6[:20%]`.

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
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from kd_jax import data as data_lib
from kd_jax import files
from kd_jax import losses
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax import train as train_lib
from kd_jax.data import kd_digits
from kd_jax.data import pipeline
from kd_jax.workflows import common

BASE = "base"
STRATEGIES = ("none", "lwf", "teacher", "replay", "ewc")
TRAINABLE = ("all", "head", "batchnorm", "last_stage")


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


class KdDigitsByClass(kd_digits.KdDigits):
  """`kd_digits` regrouped per class: splits `train_<c>` and `test_<c>`, c = 0..9."""

  RELEASE_NOTES = {"1.0.0": "kd_digits 1.0.0 split per class."}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    images, labels, splits = self._arrays()
    return {f"{name}_{c}": self._generate_examples(images, labels,
                                                   indices[labels[indices] == c])
            for name, indices in splits.items() for c in range(10)}


def class_split(split: str, classes: Sequence[int], percent: int = 100) -> str:
  """TFDS split syntax for the first `percent` % of each class of `split`."""
  part = "" if percent == 100 else f"[:{percent}%]"
  return "+".join(f"{split}_{c}{part}" for c in classes)


def by_class_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.data` on `kd_digits_by_class` (prepared on first use), all classes.

  Preprocessed as `kd_digits` is: the pipeline looks dataset defaults up by name, so
  `kd_digits`' are pinned here.
  """
  builder = tfds.builder(KdDigitsByClass.name, data_dir=config.data.data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  data = config.data.copy_and_resolve_references()
  data.name = KdDigitsByClass.name
  data.train_split = class_split("train", range(10))
  data.eval_split = class_split("test", range(10))
  for key, value in pipeline.dataset_defaults(kd_digits.KdDigits.name).items():
    if data[key] is None:
      data[key] = value
  return data


# The `continual` block of an experiment config: task 0 (`tasks[0]`) is what the
# deployed student knows; every later task is an update trained on `new_percent`% of
# the training images of its classes, in every sequence of `runs` (STRATEGY:TRAINABLE,
# see the module docstring); `anchor_weight` and `temperature` weigh the lwf and
# teacher anchors, `replay_size` bounds the replay buffer (images), `ewc_strength` is
# EWC's λ; `train` overrides keys of the student's recipe for the updates.
DEFAULTS = dict(tasks=((0, 1, 2, 3), (4, 5), (6, 7), (8, 9)), new_percent=50,
                runs=("lwf:all", "none:all", "teacher:all", "replay:all", "ewc:all",
                      "lwf:head", "lwf:batchnorm", "lwf:last_stage"),
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


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `continual` block the workflow cannot run."""
  block = config.continual
  if config.data.name != kd_digits.KdDigits.name:
    raise ValueError("the continual workflow splits kd_digits by class; set "
                     "data.name=kd_digits")
  tasks = [list(t) for t in block.tasks]
  flat = [c for t in tasks for c in t]
  if (len(tasks) < 2 or not all(tasks) or len(set(flat)) != len(flat)
      or not set(flat) <= set(range(10))):
    raise ValueError(f"continual.tasks {tasks} must be at least two disjoint, non-empty "
                     "sets of digits 0..9 (the deployed task, then one per update)")
  if not 0 < int(block.new_percent) <= 100:
    raise ValueError(f"continual.new_percent must be in 1..100, got {block.new_percent}")
  if not block.runs:
    raise ValueError("continual.runs is empty; name at least one STRATEGY:TRAINABLE, "
                     "e.g. 'lwf:all'")
  names = [parse_run(spec) for spec in block.runs]
  if len(set(names)) != len(names):
    raise ValueError(f"continual.runs {list(block.runs)} names a sequence twice")
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


def split_of(examples: Sequence[tuple[int, int]], split: str = "train") -> str:
  """TFDS split syntax for (class, index in `<split>_<class>`) pairs, consecutive
  indices merged into one slice."""
  parts = []
  for c in sorted({c for c, _ in examples}):
    indices = sorted(i for k, i in examples if k == c)
    start = prev = indices[0]
    for i in indices[1:] + [None]:
      if i is not None and i == prev + 1:
        prev = i
        continue
      parts.append(f"{split}_{c}[{start}:{prev + 1}]")
      if i is not None:
        start = prev = i
  return "+".join(parts)


def _class_sizes(data: ml_collections.ConfigDict, classes: Sequence[int],
                 percent: int) -> dict[int, int]:
  """The number of training examples of each class in `train_<c>[:percent%]`."""
  builder = tfds.builder(data.name, data_dir=data.data_dir)
  part = "" if percent == 100 else f"[:{percent}%]"
  return {c: builder.info.splits[f"train_{c}{part}"].num_examples for c in classes}


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`workflow='continual'`: the phases of the module docstring; writes summary.json."""
  check_config(config)
  block = config.continual
  context = common.start(config, workdir)
  info = context.info
  teacher = rundir.model(config, "teacher", info.num_classes)
  student = rundir.model(config, "student", info.num_classes)
  t_vars = context.teacher_variables
  data = by_class_data(config)
  tasks = [tuple(int(c) for c in t) for t in block.tasks]
  base_config = common.derived(config, {
      "data": data, "data.eval_split": class_split("test", tasks[0]),
      "student.train_split": class_split("train", tasks[0]),
      "student.validation_split": None})
  deployed = phase_lib.train_phase(
      base_config, phase=BASE, model=student, train_config=config.train,
      distill_config=config.distill, teacher=teacher, teacher_variables=t_vars,
      **context.phase_args)

  test_data = [common.derived(data, {"eval_split": class_split("test", t)}) for t in tasks]
  accuracy_of = common.accuracy_fn(student, context, config.eval_batch_size)
  row_of = lambda variables: [accuracy_of(variables, d) for d in test_data]
  fresh = jax.device_get(student.init(jax.random.key(config.seed),
                                      np.zeros((1, *info.image_shape), np.float32),
                                      train=False))
  baseline = row_of(fresh)
  deployed_row = row_of(deployed.variables)
  teacher_row = [common.accuracy_fn(teacher, context, config.eval_batch_size)(
      context.teacher.variables, d) for d in test_data]
  recipe = phase_lib.student_recipe(config, block.train)
  sizes = {t: _class_sizes(data, t, 100 if i == 0 else int(block.new_percent))
           for i, t in enumerate(tasks)}

  def fisher_of(i: int, variables: Any) -> Any:
    """The Fisher information of `variables` on task i's training images."""
    percent = 100 if i == 0 else int(block.new_percent)
    task_data = common.derived(data, {"eval_split": class_split("train", tasks[i],
                                                                percent)})
    return fisher_diagonal(student, variables, data_lib.eval_iterator(
        task_data, batch_size=config.eval_batch_size))

  runs = {}
  for spec in block.runs:
    strategy, subset = parse_run(spec)
    name = f"{strategy}:{subset}"
    previous, matrix, updates = deployed.variables, [deployed_row], []
    fisher = None
    masks = trainable_masks(previous, subset)
    for i in range(1, len(tasks)):
      seen = tuple(c for t in tasks[:i] for c in t)
      phase = f"update{i}_{strategy}_{subset}"
      split = class_split("train", tasks[i], int(block.new_percent))
      replayed = 0
      if strategy == "replay":
        buffer = _replay_buffer(os.path.join(workdir, phase, "replay.json"), tasks[:i],
                                sizes, int(block.replay_size), config.seed * 1000 + i)
        split, replayed = f"{split}+{split_of(buffer)}", len(buffer)
      transform = masked_optimizer(masks["params"])
      if strategy == "ewc":  # the penalty's gradient added before the masked optimizer
        step_fisher = fisher_of(i - 1, previous)
        fisher = step_fisher if fisher is None else jax.tree.map(np.add, fisher, step_fisher)
        transform = functools.partial(_after, ewc_gradient(
            fisher, previous["params"], float(block.ewc_strength)), transform)
      update_config = common.derived(base_config, {
          "data.eval_split": class_split("test", seen + tasks[i]),
          "data.validation_fraction": 0.0, "student.train_split": split})
      anchor = ((student, parallel.replicate(previous, context.mesh))
                if strategy == "lwf" else (teacher, t_vars))
      result = phase_lib.train_phase(
          update_config, phase=phase, model=student, train_config=recipe,
          distill_config=update_objective(strategy, block, seen), teacher=anchor[0],
          teacher_variables=anchor[1], init_variables=previous,
          optimizer_transform=transform, batch_stats_mask=masks["batch_stats"],
          **context.phase_args)
      updated = result.variables
      delta_bytes = write_delta(os.path.join(workdir, phase, "delta.npz"), previous, updated)
      trained = [np.asarray(x) for m, x in zip(jax.tree.leaves(masks["params"]),
                                               jax.tree.leaves(updated["params"])) if m]
      matrix.append(row_of(updated))
      updates.append({"task": i, "classes": list(tasks[i]),
                      "train_images": sum(sizes[tasks[i]].values()),
                      "replay_images": replayed,
                      "trained_parameters": int(sum(x.size for x in trained)),
                      "trained_bytes": int(sum(x.nbytes for x in trained)),
                      "delta_bytes": delta_bytes, "model_bytes": _nbytes(updated)})
      previous = updated
    runs[name] = {"strategy": strategy, "trainable": subset, "accuracy_matrix": matrix,
                  **transfer(matrix, baseline),
                  "delta_bytes": [u["delta_bytes"] for u in updates], "updates": updates}

  first = runs[next(iter(runs))]
  summary = {"workflow": "continual", "teacher": config.teacher.name,
             "student": config.student.name, "tasks": [list(t) for t in tasks],
             "new_percent": int(block.new_percent), "run": next(iter(runs)),
             **{k: first[k] for k in ("accuracy_matrix", "average_accuracy",
                                      "backward_transfer", "forward_transfer",
                                      "delta_bytes", "updates")},
             "runs": runs, "teacher_accuracy": teacher_row,
             "fresh_student_accuracy": baseline}
  return common.finish(context, summary)


def _replay_buffer(path: str, tasks: Sequence[tuple[int, ...]],
                   sizes: Mapping[tuple[int, ...], Mapping[int, int]], capacity: int,
                   seed: int) -> list[tuple[int, int]]:
  """The replay buffer of an update: read from `path` when an earlier attempt wrote it,
  else drawn by reservoir sampling over the earlier tasks' training images (in task
  order, each class in file order) and written there."""
  if os.path.exists(path):
    with open(path) as f:
      return [tuple(e) for e in json.load(f)["examples"]]
  stream = [(c, k) for t in tasks for c in t for k in range(sizes[t][c])]
  buffer = sorted(reservoir(stream, capacity, seed))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {"capacity": capacity, "seen": len(stream),
                            "examples": [list(e) for e in buffer]})
  return buffer
