"""Decoupled task heads: one distilled student trunk shared by several classifiers.

A task (`heads.tasks`, task name -> declaration) is a label set, declared as
  - a label map over the dataset's classes, class c -> task class `map[c]` (a tuple),
    e.g. the parity of a digit;
  - a map by class name, `dict(map={'cat': 'mammal', 'dog': 'mammal', 'owl': 'bird'})`
    (a folder's class subfolders, a TFDS label's names), task classes numbered in the
    sorted order of the names they get; converted to the label map once;
  - a second label feature of the dataset, `dict(feature='coarse_label')` (a TFDS
    ClassLabel beside the label, e.g. CIFAR-100's 20 superclasses): its classes are
    the feature's, and the batches carry it (`data.extra_labels`, set by the workflow).
    Where every class of the training split has one value of the feature, the
    feature is a function of the class and that map is derived from the data
    (CIFAR-100's coarse_label); otherwise the task has no map.
The trunk's own classifier answers the base task (`heads.base`, 'digit' on the
digits). Each head reads one tap of the trunk (an NHWC stage output): an optional 1x1
conv-BN-ReLU, a global average pool and a dense layer
(`kd_jax.edge.early_exit.ExitHead`); the trunk keeps its own classifier, the head of
the base task ('digit'). A head of a task with a map learns from the teacher: the
teacher's class probabilities summed within the task's groups are exactly its
probabilities for the derived task, and the head matches them at temperature T
(`grouped_kd`):

    P_t(g) = Σ_{c: map[c] = g} softmax(z_t / T)_c,
    L      = T² · mean_b KL(P_t,b || softmax(z_head,b / T));

a head of a feature task also learns from the feature's labels (`task_ce`, weight
`heads.label_weight`), and from them alone where the task has no map. A model without
the head of a task answers it from its class probabilities summed per group, and has
no answer (null accuracy) to a task without a map.

The workflow (`run`, `workflow='heads'`), every phase resumable:
  1. teacher    loaded (`teacher.checkpoint`) or trained;
  2. distilled  the single-head student with the run's objective (the baseline);
  3. trunk      the student with the `heads.joint` heads, trained together: the run's
                objective (CE + KD + feature alignment on the shared taps) plus one
                `grouped_kd` term per head;
  4. added      the `heads.added` heads on the trained, frozen trunk, trained alone
                (the trunk is a constant of the model: bit-identical afterwards);
  5. export     the trunk with the `heads.export` heads as one TFLite model whose
                output is their logits side by side, checked against JAX.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import data as data_lib
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax import export as export_lib
from kd_jax import losses
from kd_jax import models
from kd_jax import objective as objective_lib
from kd_jax.edge.early_exit import ExitHead
from kd_jax.workflows import common
from kd_jax.workflows import distill as distill_workflow

BASE = "digit"  # the default name of the trunk's own classifier: the identity task
# The default derived tasks, of the 10 digit classes: class c -> task class map[c].
TASKS: dict[str, tuple[int, ...]] = {
    "parity": (0, 1, 0, 1, 0, 1, 0, 1, 0, 1),  # even / odd
    "large": (0, 0, 0, 0, 0, 1, 1, 1, 1, 1),   # digit < 5 / digit >= 5
}
LOGITS_TAP = "logits"  # the teacher's logits, as a tap of `WithLogitsTap`


def grouped_kd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
               groups: Sequence[int], temperature: float = 4.0) -> jax.Array:
  """KD of a head over task classes from a teacher over the base classes.

  With `M` the one-hot [K, G] map of base class c to task class `groups[c]`, the
  teacher's task probabilities are `P_t = softmax(z_t / T) M`, and

    L = T² / B Σ_b KL(P_t,b || softmax(z_s,b / T)),

  Hinton KD (`kd_jax.losses.kd`) against the logits `T log P_t`.

  Args:
    student_logits: `[B, G]` logits of the task head.
    teacher_logits: `[B, K]` logits of the teacher over the base classes.
    groups: length-K task class of each base class, in 0..G-1.
    temperature: softmax temperature `T`.

  Returns:
    Scalar loss.
  """
  student_logits = jnp.asarray(student_logits)
  mapping = jax.nn.one_hot(jnp.asarray(groups), student_logits.shape[-1])
  probs = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature) @ mapping
  tiny = jnp.finfo(jnp.float32).tiny
  return losses.kd(student_logits, temperature * jnp.log(jnp.maximum(probs, tiny)),
                   temperature)


objective_lib.register("grouped_kd", grouped_kd, objective_lib.FEATURES)


def task_ce(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
            labels: jax.typing.ArrayLike) -> jax.Array:
  """Cross-entropy of a head's logits with its task's labels (the term's `labels`);
  the teacher's logits are unused."""
  del teacher_logits
  return losses.cross_entropy(student_logits, labels)


objective_lib.register("task_ce", task_ce, objective_lib.FEATURES, needs_labels=True)


def task_labels(labels: np.ndarray, label_map: Sequence[int] | None) -> np.ndarray:
  """The task labels of base-class `labels` under `label_map` (None: the base task)."""
  return np.asarray(labels) if label_map is None else np.asarray(label_map)[labels]


def task_predictions(logits: np.ndarray, label_map: Sequence[int] | None) -> np.ndarray:
  """A base classifier's answers to a task: its class probabilities summed per group
  of `label_map` (None: the base task, its own argmax)."""
  if label_map is None:
    return np.argmax(logits, -1)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
  return np.argmax(probs @ np.eye(max(label_map) + 1)[list(label_map)], -1)


class Task(NamedTuple):
  """A task's labels: its number of classes, its label map (class c -> task class
  groups[c]; None: none) and the label feature holding them (None: the map's)."""
  num_classes: int
  groups: tuple[int, ...] | None = None
  feature: str | None = None

  @classmethod
  def of_map(cls, groups: Sequence[int]) -> Task:
    return cls(max(groups) + 1, tuple(groups))

  def labels(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The task labels of a batch."""
    if self.feature is not None:
      return np.asarray(batch[data_lib.label_key(self.feature)])
    return task_labels(batch["label"], self.groups)


def name_map(mapping: Mapping[str, Any], class_names: Sequence[str],
             task: str) -> tuple[int, ...]:
  """The label map of a map by class name: class c -> the index of its value among the
  sorted distinct values."""
  unknown = [name for name in mapping if name not in class_names]
  if unknown:
    raise ValueError(f"heads.tasks.{task}.map names unknown classes {unknown}; the "
                     f"classes are {', '.join(class_names)}")
  missing = [name for name in class_names if name not in mapping]
  if missing:
    raise ValueError(f"heads.tasks.{task}.map leaves out classes {missing}; map every "
                     "class")
  values = sorted({str(value) for value in mapping.values()})
  return tuple(values.index(str(mapping[name])) for name in class_names)


def groups_of(labels: np.ndarray, values: np.ndarray,
              num_classes: int) -> tuple[int, ...] | None:
  """The label map class c -> the one value its examples take; None where a class
  takes several values or has no example."""
  pairs = set(zip(np.asarray(labels).tolist(), np.asarray(values).tolist()))
  groups = dict(pairs)
  if len(groups) != len(pairs) or len(groups) != num_classes:
    return None
  return tuple(groups[c] for c in range(num_classes))


class HeadSpec(NamedTuple):
  """One task head: its task's name and labels, the trunk tap it reads and its 1x1
  conv width (0: none)."""
  task: str
  labels: Task
  tap: str
  hidden: int = 0

  @property
  def num_classes(self) -> int:
    return self.labels.num_classes


def _heads(specs: Sequence[HeadSpec], dtype, bn_axis_name) -> dict[str, nn.Module]:
  return {spec.task: ExitHead(spec.num_classes, dtype=dtype, bn_axis_name=bn_axis_name,
                              hidden=spec.hidden or None) for spec in specs}


def _with_heads(heads: Mapping[str, nn.Module], specs: Sequence[HeadSpec], taps,
                train: bool) -> dict[str, jax.Array]:
  """`taps` plus each head's logits as the tap `head/<task>`."""
  return {**taps, **{f"head/{spec.task}": heads[spec.task](taps[spec.tap], train)
                     for spec in specs}}


def _overrides(**fields) -> dict[str, Any]:
  return {k: v for k, v in fields.items() if v is not None}


class MultiHeadStudent(nn.Module):
  """A zoo model (the trunk, with its classifier) and task heads on its taps.

  Returns the trunk's `(logits, taps)`, the taps with each head's logits added as
  `head/<task>`. The trunk's variables sit at the top level (it shares this
  module's scope), each head's under `head_<task>`, so the variables of a trained
  zoo model are the trunk's as they are.
  """
  trunk: nn.Module
  heads: tuple[HeadSpec, ...] = ()
  dtype: Any = None
  bn_axis_name: str | None = None

  def setup(self):
    self.body = self.trunk.clone(**_overrides(dtype=self.dtype,
                                              bn_axis_name=self.bn_axis_name))
    nn.share_scope(self, self.body)
    self.head = _heads(self.heads, self.body.dtype, self.bn_axis_name)

  def __call__(self, x, train: bool = False):
    logits, taps = self.body(x, train=train)
    return logits, _with_heads(self.head, self.heads, taps, train)


class HeadsOnFrozenTrunk(nn.Module):
  """New heads on a trained trunk that is a constant: only the heads have variables.

  The trunk (a `MultiHeadStudent` with `trunk_variables`) runs in inference mode
  with its outputs cut from the gradient; outputs as `MultiHeadStudent`'s, with the
  new heads' logits added.
  """
  trunk: MultiHeadStudent
  trunk_variables: Any
  heads: tuple[HeadSpec, ...]
  dtype: Any = None
  bn_axis_name: str | None = None

  def setup(self):
    self.head = _heads(self.heads, self.dtype or self.trunk.trunk.dtype,
                       self.bn_axis_name)

  def __call__(self, x, train: bool = False):
    logits, taps = jax.lax.stop_gradient(
        self.trunk.apply(self.trunk_variables, x, train=False))
    return logits, _with_heads(self.head, self.heads, taps, train)


class WithLogitsTap(nn.Module):
  """A zoo model whose taps also hold its logits (`logits`), with the same variables."""
  model: nn.Module
  dtype: Any = None

  def setup(self):
    self.body = self.model.clone(**_overrides(dtype=self.dtype))
    nn.share_scope(self, self.body)

  def __call__(self, x, train: bool = False):
    logits, taps = self.body(x, train=train)
    return logits, {**taps, LOGITS_TAP: logits}


def merge_variables(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of a `MultiHeadStudent` from its trunk's and its heads' (by collection)."""
  merged: dict[str, Any] = {}
  for tree in trees:
    for collection, values in tree.items():
      merged[collection] = {**merged.get(collection, {}), **values}
  return merged


def head_terms(specs: Sequence[HeadSpec], weight: float, temperature: float,
               label_weight: float) -> list[dict[str, Any]]:
  """The objective terms of the heads: `grouped_kd` against the teacher's logits for
  a task with a map, `task_ce` (`head_ce/<task>`) with a feature task's labels."""
  terms = []
  for spec in specs:
    tap, task = f"head/{spec.task}", spec.labels
    if task.groups is not None:
      terms.append(dict(method="grouped_kd", name=tap, weight=weight, student_tap=tap,
                        teacher_tap=LOGITS_TAP, groups=task.groups,
                        temperature=temperature))
    if task.feature is not None:
      terms.append(dict(method="task_ce", name=f"head_ce/{spec.task}",
                        weight=label_weight, student_tap=tap, teacher_tap=LOGITS_TAP,
                        labels=data_lib.label_key(task.feature)))
  return terms


def export_function(model: MultiHeadStudent, variables: Any, tasks: Sequence[str],
                    base: str = BASE):
  """`images -> logits of `tasks` side by side` (`base`: the trunk's classifier)."""
  def fn(images):
    logits, taps = model.apply(variables, images, train=False)
    return jnp.concatenate([logits if task == base else taps[f"head/{task}"]
                            for task in tasks], axis=-1)
  return fn


def split_outputs(outputs: np.ndarray, names: Sequence[str],
                  tasks: Mapping[str, Task]) -> dict[str, np.ndarray]:
  """The exported model's output split back into the logits of each task of `names`."""
  sizes = [tasks[name].num_classes for name in names]
  return dict(zip(names, np.split(outputs, np.cumsum(sizes)[:-1], axis=-1)))


def _declared_task(config: ml_collections.ConfigDict, name: str, spec: Any,
                   class_names: Sequence[str]) -> Task:
  """The task of one `heads.tasks` entry (a feature task's map left unknown)."""
  if isinstance(spec, (dict, ml_collections.ConfigDict)):
    spec = dict(spec)
    if set(spec) == {"feature"}:
      feature = str(spec["feature"])
      return Task(len(data_lib.label_names(config.data, feature,
                                           key=f"heads.tasks.{name}.feature")),
                  feature=feature)
    if set(spec) != {"map"}:
      raise ValueError(f"heads.tasks.{name} must be a label map (a tuple), dict("
                       f"feature=NAME) or dict(map={{class: task class}}), got {spec}")
    spec = name_map(dict(spec["map"]), class_names, name)
  groups = list(spec)
  if (len(groups) != len(class_names) or not all(isinstance(g, int) for g in groups)
      or sorted(set(groups)) != list(range(max(groups, default=-1) + 1))
      or len(set(groups)) < 2):
    raise ValueError(f"heads.tasks.{name} must map each of the {len(class_names)} "
                     f"classes of {config.data.name} to a task class 0..G-1 (every one "
                     f"used, G >= 2), got {groups}")
  return Task.of_map(groups)


def tasks_of(config: ml_collections.ConfigDict) -> dict[str, Task]:
  """The `heads` block's tasks: the base task (the identity map) first, then
  `heads.tasks` in order; feature tasks without their map (`with_feature_maps`)."""
  class_names = data_lib.label_names(config.data)
  return {str(config.heads.base): Task.of_map(range(len(class_names))),
          **{str(name): _declared_task(config, str(name), spec, class_names)
             for name, spec in dict(config.heads.tasks).items()}}


def with_feature_maps(data_config, tasks: Mapping[str, Task]) -> dict[str, Task]:
  """`tasks` with the map of each feature task whose feature is a function of the
  class on the training split (`groups_of`); `data_config` carries the features."""
  features = {task.feature for task in tasks.values() if task.feature is not None}
  if not features:
    return dict(tasks)
  features = sorted(features)
  columns = data_lib.train_label_features(data_config, features)
  labels = columns[:, 0]
  values = {feature: columns[:, 1 + i] for i, feature in enumerate(features)}
  num_classes = len(data_lib.label_names(data_config))
  return {name: task if task.feature is None else task._replace(groups=groups_of(
      labels, values[task.feature], num_classes))
          for name, task in tasks.items()}


def task_accuracies(predict, data_config, batch_size: int, tasks: Mapping[str, Task],
                    base: str = BASE) -> dict[str, float | None]:
  """Accuracy on each task of `predict(images) -> {task: logits}` over the eval split.

  A task `predict` has no head for is answered from the `base` task's logits
  (`task_predictions`), and has no accuracy (None) without a map.
  """
  correct = dict.fromkeys(tasks, 0)
  count = 0
  for batch in data_lib.host_eval_iterator(data_config, batch_size=batch_size):
    keep = np.asarray(batch["mask"]) > 0
    outputs = predict(batch["image"])
    for name, task in tasks.items():
      if name in outputs:
        predictions = np.argmax(np.asarray(outputs[name])[keep], -1)
      elif task.groups is not None:
        predictions = task_predictions(np.asarray(outputs[base])[keep], task.groups)
      else:
        correct[name] = None
        continue
      correct[name] += int(np.sum(predictions == task.labels(batch)[keep]))
    count += int(keep.sum())
  return {name: None if correct[name] is None else correct[name] / count
          for name in tasks}


def head_specs(config: ml_collections.ConfigDict, names: Sequence[str],
               tasks: Mapping[str, Task]) -> tuple[HeadSpec, ...]:
  """The heads of the tasks `names` as the `heads` config block places them."""
  return tuple(HeadSpec(name, tasks[name], config.heads.tap, config.heads.hidden)
               for name in names)


# The `heads` block of an experiment config. `tasks` declares each task (module
# docstring): a label map over the dataset's classes (class c -> task class map[c],
# task classes 0..G-1), dict(map={class name: task class name}) or
# dict(feature=NAME); `base` names the trunk's own classifier. Each head: GAP + dense
# on the trunk's `tap` (hidden > 0: a 1x1 conv-BN-ReLU first), distilled with
# weight · grouped KD at `temperature` where its task has a map, plus
# label_weight · CE with a feature task's labels; `joint` heads train with the trunk,
# `added` ones afterwards on the frozen trunk (`train` overrides keys of the student's
# recipe for that phase), and `export` names the heads of the exported TFLite model.
DEFAULTS = dict(tasks=dict(TASKS), base=BASE, tap="stage_3", hidden=0,
                joint=("parity",), added=("large",),
                export=("digit", "large"), weight=1.0, temperature=4.0,
                label_weight=1.0, train=dict(epochs=30.0, learning_rate=0.05))


def default_config() -> ml_collections.ConfigDict:
  """The `heads` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def check_config(config: ml_collections.ConfigDict) -> dict[str, Task]:
  """One-line errors for a `heads` block the workflow cannot run; its tasks
  (`tasks_of`) otherwise."""
  block = config.heads
  joint, added = tuple(block.joint), tuple(block.added)
  declared = dict(block.tasks)
  if str(block.base) in declared:
    raise ValueError(f"heads.base={block.base!r} is also a key of heads.tasks; give the "
                     "base task another name")
  for key, tasks in (("joint", joint), ("added", added)):
    unknown = [t for t in tasks if t not in declared]
    if unknown:
      raise ValueError(f"heads.{key} names unknown tasks {unknown}; declare them in "
                       f"heads.tasks (declared: {', '.join(declared) or 'none'})")
  if not added:
    raise ValueError("heads.added names no task; the workflow adds at least one head to "
                     "the frozen trunk, e.g. --config.heads.added=\"('large',)\"")
  if set(joint) & set(added) or len(set(joint + added)) != len(joint + added):
    raise ValueError(f"heads.joint {list(joint)} and heads.added {list(added)} must "
                     "name each task once")
  base = str(block.base)
  exported = [t for t in block.export if t not in (base, *joint, *added)]
  if exported or not block.export:
    raise ValueError(f"heads.export must name some of {[base, *joint, *added]}, "
                     f"got {list(block.export)}")
  return tasks_of(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`workflow='heads'`: the phases of the module docstring; writes summary.json."""
  tasks = check_config(config)
  config = copy.deepcopy(config)
  config.data.extra_labels = tuple(dict.fromkeys((
      *config.data.extra_labels,
      *(task.feature for task in tasks.values() if task.feature is not None))))
  tasks = with_feature_maps(config.data, tasks)
  block = config.heads
  context = common.start(config, workdir)
  info = context.info
  student, _, single = distill_workflow.student_phases(config, workdir, context.mesh, info,
                                                 context.writer, context.teacher)
  teacher = WithLogitsTap(rundir.model(config, "teacher", info.num_classes))
  t_vars = context.teacher_variables
  joint = head_specs(config, block.joint, tasks)
  added = head_specs(config, block.added, tasks)
  settings = (float(block.weight), float(block.temperature), float(block.label_weight))

  trunk_model = MultiHeadStudent(student, joint)
  distill = config.distill.to_dict()
  distill["terms"] = list(distill["terms"]) + head_terms(joint, *settings)
  trunk = phase_lib.train_phase(
      config, phase="trunk", model=trunk_model, train_config=config.train,
      distill_config=distill, teacher=teacher, teacher_variables=t_vars,
      **context.phase_args)
  added_model = HeadsOnFrozenTrunk(trunk_model, trunk.variables, added)
  new_heads = phase_lib.train_phase(
      config, phase="added", model=added_model,
      train_config=phase_lib.student_recipe(config, block.train),
      distill_config={"ce_weight": 0.0, "terms": head_terms(added, *settings)},
      teacher=teacher, teacher_variables=t_vars, **context.phase_args)

  full_model = MultiHeadStudent(student.clone(dtype=jnp.float32), joint + added)
  full_variables = merge_variables(trunk.variables, new_heads.variables)
  base = str(block.base)
  batch_size = config.eval_batch_size

  def predictor(model, variables, head_tasks):
    forward = jax.jit(lambda variables, images: model.apply(variables, images))

    def predict(images):
      logits, taps = forward(variables, images)
      return {base: logits, **{t: taps[f"head/{t}"] for t in head_tasks}}
    return predict

  # One compiled forward each for the trunk alone and the trunk with every head.
  trunk_predict = predictor(trunk_model, trunk.variables, block.joint)
  full_predict = predictor(full_model, full_variables, (*block.joint, *block.added))
  accuracies = {
      name: task_accuracies(predict, config.data, batch_size, tasks, base)
      for name, predict in (
          ("teacher", predictor(teacher, context.teacher.variables, ())),
          ("distilled", predictor(student, single.variables, ())),
          ("trunk", trunk_predict), ("added", full_predict))}
  summary = {
      "workflow": "heads", "teacher": config.teacher.name, "student": config.student.name,
      "joint_heads": list(block.joint), "added_heads": list(block.added),
      "tasks": {name: (None if task.groups is None else list(task.groups))
                for name, task in tasks.items()},
      "features": {name: task.feature for name, task in tasks.items()
                   if task.feature is not None},
      "accuracy": accuracies,
      # Adding heads must leave the trunk as it was: its logits and the joint heads'
      # on the test images, before and after, compared exactly.
      "trunk_max_abs_diff": trunk_difference(trunk_predict, full_predict, config.data,
                                             batch_size),
  }
  if jax.process_index() == 0:
    summary["tflite"] = export_heads(config, workdir, full_model, full_variables,
                                     tuple(block.export), info, tasks, base)
  return common.finish(context, summary)


def trunk_difference(before, after, data_config, batch_size: int) -> float:
  """The largest |difference| between `before`'s outputs and the same outputs of
  `after` on the eval split."""
  largest = 0.0
  for batch in data_lib.host_eval_iterator(data_config, batch_size=batch_size):
    a, b = before(batch["image"]), after(batch["image"])
    for task in a:
      largest = max(largest, float(np.max(np.abs(np.asarray(a[task], np.float64)
                                                 - np.asarray(b[task], np.float64)))))
  return largest


def export_heads(config: ml_collections.ConfigDict, workdir: str, model: MultiHeadStudent,
                 variables: Any, names: tuple[str, ...], info,
                 tasks: Mapping[str, Task], base: str = BASE) -> dict[str, Any]:
  """The trunk with the heads of the tasks `names` as one fp32 TFLite model, and as
  one model per task, measured.

  Writes `<workdir>/export/heads_<task>+<task>_fp32.tflite` and
  `heads_<task>_fp32.tflite` per task; returns the multi-output model's path,
  `kd_jax.export.measure` results (parity against JAX on calibration images), the
  output layout and each task's accuracy in the LiteRT interpreter, and under
  `per_task` the same for each single-task model.
  """
  portable = model.clone(trunk=models.portable(model.trunk))
  images = data_lib.representative_images(config.data, 16)

  def one(names: tuple[str, ...]) -> dict[str, Any]:
    result = export_lib.export_and_measure(
        export_function(portable, variables, names, base), tuple(info.image_shape),
        os.path.join(workdir, "export", f"heads_{'+'.join(names)}_fp32.tflite"),
        parity_images=images, latency_runs=config.export.latency_runs)
    with open(result["path"], "rb") as f:
      interpreter = export_lib.TFLiteModel(f.read())
    predict = lambda images: split_outputs(interpreter(images), names, tasks)
    result.update(outputs=list(names), accuracy=task_accuracies(
        predict, config.data, config.eval_batch_size,
        {name: tasks[name] for name in names}, base))
    return result

  result = one(names)
  if len(names) > 1:
    result["per_task"] = {name: one((name,)) for name in names}
  return result
