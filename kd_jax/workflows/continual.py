"""Continual updates: a deployed student learns new classes without forgetting old ones.

The old task is a set of classes (`continual.old_classes`, e.g. digits 0-4), the new
task the others (`continual.new_classes`, 5-9). The student is first distilled on the
old classes' training images (the deployed model), then fine-tuned on a small budget
of the new classes' images (`continual.new_percent` % of each class) in one of three
ways (`continual.anchors`), all from the deployed student's variables:

  none     plain fine-tuning: cross-entropy on the new labels;
  student  CE + an anchor to the deployed student: Learning without Forgetting,
           Hinton KD restricted to the old classes' logits (`lwf`),
               L = CE + w · T² · mean_b KL(softmax(z_prev,b[old] / T)
                                            || softmax(z_b[old] / T));
  teacher  CE + w · KD to the teacher (which knows every class).

No phase sees an old-class image after the deployed student. Every model is evaluated
on the old classes' test images, the new ones' and all; the classifier keeps all the
dataset's classes throughout (class-incremental: no task identity at test time).

Class subsets come from `kd_digits_by_class`, the `kd_digits` splits regrouped per
class (splits `train_<c>`, `test_<c>`), so a subset is TFDS split syntax such as
`train_5[:20%]+train_6[:20%]`.

Reference: Li and Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds

from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax import losses
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax.data import kd_digits
from kd_jax.data import pipeline
from kd_jax.workflows import common

OLD, ANCHORS = "old", ("none", "student", "teacher")


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


# The `continual` block of an experiment config: the deployed student knows
# `old_classes`; it is updated on `new_percent`% of the training images of
# `new_classes`, once per `anchors` entry (none | student | teacher, anchored with
# `anchor_weight` at `temperature`); `train` overrides keys of the student's recipe.
DEFAULTS = dict(old_classes=(0, 1, 2, 3, 4), new_classes=(5, 6, 7, 8, 9), new_percent=20,
                anchors=("none", "student", "teacher"), anchor_weight=1.0,
                temperature=2.0, train=dict(epochs=10.0, learning_rate=0.01))


def default_config() -> ml_collections.ConfigDict:
  """The `continual` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `continual` block the workflow cannot run."""
  block = config.continual
  if config.data.name != kd_digits.KdDigits.name:
    raise ValueError("the continual workflow splits kd_digits by class; set "
                     "data.name=kd_digits")
  old, new = list(block.old_classes), list(block.new_classes)
  if (not old or not new or set(old) & set(new)
      or not set(old + new) <= set(range(10))):
    raise ValueError(f"continual.old_classes {old} and new_classes {new} must be "
                     "disjoint, non-empty sets of digits 0..9")
  if not 0 < int(block.new_percent) <= 100:
    raise ValueError(f"continual.new_percent must be in 1..100, got {block.new_percent}")
  unknown = [a for a in block.anchors if a not in ANCHORS]
  if unknown or not block.anchors:
    raise ValueError(f"continual.anchors must be some of {', '.join(ANCHORS)}, "
                     f"got {list(block.anchors)}")


def anchor_objective(anchor: str, block: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fine-tuning objective of `anchor` (see the module docstring)."""
  weight, temperature = float(block.anchor_weight), float(block.temperature)
  terms = {"none": [],
           "student": [dict(method="lwf", weight=weight, temperature=temperature,
                            classes=tuple(block.old_classes))],
           "teacher": [dict(method="kd", weight=weight, temperature=temperature)]}
  return {"ce_weight": 1.0, "terms": terms[anchor]}


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
  old_classes, new_classes = tuple(block.old_classes), tuple(block.new_classes)
  old_config = common.derived(config, {
      "data": data, "data.eval_split": class_split("test", old_classes),
      "student.train_split": class_split("train", old_classes),
      "student.validation_split": None})
  deployed = phase_lib.train_phase(
      old_config, phase=OLD, model=student, train_config=config.train,
      distill_config=config.distill, teacher=teacher, teacher_variables=t_vars,
      **context.phase_args)

  new_config = common.derived(old_config, {
      "data.eval_split": class_split("test", new_classes),
      "student.train_split": class_split("train", new_classes, int(block.new_percent))})
  anchors = {"student": (student, parallel.replicate(deployed.variables, context.mesh)),
             "teacher": (teacher, t_vars), "none": (teacher, t_vars)}
  results = {OLD: deployed}
  for anchor in block.anchors:
    anchor_model, anchor_variables = anchors[anchor]
    results[f"new_{anchor}"] = phase_lib.train_phase(
        new_config, phase=f"new_{anchor}", model=student,
        train_config=phase_lib.student_recipe(config, block.train),
        distill_config=anchor_objective(anchor, block), teacher=anchor_model,
        teacher_variables=anchor_variables, init_variables=deployed.variables,
        **context.phase_args)

  tasks = {"old": old_classes, "new": new_classes, "all": old_classes + new_classes}
  test_data = {task: common.derived(data, {"eval_split": class_split("test", c)})
               for task, c in tasks.items()}
  student_accuracy = common.accuracy_fn(student, context, config.eval_batch_size)
  evaluated = [(name, student_accuracy, result.variables)
               for name, result in results.items()]
  evaluated.append(("teacher", common.accuracy_fn(teacher, context, config.eval_batch_size),
                    context.teacher.variables))
  accuracy = {name: {task: accuracy_of(variables, test_data[task]) for task in tasks}
              for name, accuracy_of, variables in evaluated}
  summary = {"workflow": "continual", "teacher": config.teacher.name,
             "student": config.student.name, "old_classes": list(old_classes),
             "new_classes": list(new_classes), "new_percent": int(block.new_percent),
             "accuracy": accuracy}
  return common.finish(context, summary)
