"""Domain adaptation by distillation: from a clean source to an unlabelled target domain.

The target domain is the dataset under one edge corruption of `kd_jax.data.augment`
at a fixed severity (`domain.corruption`, `domain.severity`): training images are
corrupted on the fly (`data.edge_augment`, probability 1), evaluation images with
the fixed per-example seeds of `kd_jax.data.eval_iterator(corruption=...)`.

The workflow (`run`, `workflow='domain_adaptation'`), every phase resumable:
  1. teacher    trained on the clean source (or loaded from `teacher.checkpoint`);
  2. distilled  the student distilled on the clean source (the run's objective,
                labelled budget `student.train_split`): the deployed model;
  3. adapted    that student distilled further on the target images of
                `domain.train_split`, without their labels: the objective
                `domain.distill` must have CE weight 0 and no term that reads labels
                (the teacher's soft labels and feature alignment through adapters).
Teacher and student are evaluated on the clean and on the corrupted test split.

Reference: the unlabelled-target setting of knowledge adaptation, Ruder, Ghaffari and
Breslin, "Knowledge Adaptation: Teaching to Adapt", arXiv:1702.02052 (2017).
"""
from __future__ import annotations

import copy
from typing import Any

import ml_collections

from kd_jax import data as data_lib
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax import objective as objective_lib
from kd_jax.workflows import common
from kd_jax.workflows import distill as distill_workflow

ADAPTED = "adapted"


# The `domain` block of an experiment config: the target domain is the training split
# `train_split` under `corruption` at `severity` (kd_jax/data/augment.py), unlabelled;
# `distill` and `train` override keys of the run's objective and student recipe.
DEFAULTS = dict(
    corruption="motion_blur", severity=3, train_split="train",
    distill=dict(ce_weight=0.0, terms=[
        dict(method="kd", weight=1.0, temperature=4.0),
        dict(method="fitnet", weight=10.0, student_tap="stage_2",
             teacher_tap="stage_2", adapter="conv1x1")]),
    train=dict(epochs=20.0, learning_rate=0.01))


def default_config() -> ml_collections.ConfigDict:
  """The `domain` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `domain` block the workflow cannot run."""
  block = config.domain
  data_lib.augment.parse(target_augment(block))
  distill = block.distill
  if float(distill.ce_weight) != 0.0:
    raise ValueError("the target images are unlabelled: set "
                     "--config.domain.distill.ce_weight=0")
  objective = objective_lib.build(distill, total_steps=1, steps_per_epoch=1)
  labelled = [t.name_ for t in objective.terms if t.method.needs_labels]
  if labelled or not objective.terms:
    raise ValueError(f"domain.distill.terms must be teacher-only terms (no labels), "
                     f"got {labelled or 'none'}; use e.g. kd and fitnet")


def target_augment(block: ml_collections.ConfigDict) -> tuple[dict[str, Any], ...]:
  """`data.edge_augment` of the target domain: the corruption on every image."""
  return ({"op": block.corruption, "prob": 1.0, "severity": int(block.severity)},)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`workflow='domain_adaptation'`: the phases of the module docstring; summary.json."""
  check_config(config)
  block = config.domain
  context = common.start(config, workdir)
  info = context.info
  student, _, source = distill_workflow.student_phases(config, workdir, context.mesh, info,
                                                 context.writer, context.teacher)
  teacher = rundir.model(config, "teacher", info.num_classes)
  target_config = common.derived(config, {
      "data.edge_augment": target_augment(block),
      "student.train_split": block.train_split, "student.validation_split": None})
  adapted = phase_lib.train_phase(
      target_config, phase=ADAPTED, model=student,
      train_config=phase_lib.student_recipe(config, block.train),
      distill_config=block.distill.to_dict(), teacher=teacher,
      teacher_variables=context.teacher_variables,
      init_variables=source.variables, **context.phase_args)

  corruption = (block.corruption, int(block.severity))
  teacher_accuracy = common.accuracy_fn(teacher, context, config.eval_batch_size)
  student_accuracy = common.accuracy_fn(student, context, config.eval_batch_size)
  accuracy = {}
  for name, accuracy_of, variables in (
      ("teacher", teacher_accuracy, context.teacher.variables),
      ("distilled", student_accuracy, source.variables),
      (ADAPTED, student_accuracy, adapted.variables)):
    accuracy[name] = {domain: accuracy_of(variables, config.data, corrupt)
                      for domain, corrupt in (("source", None), ("target", corruption))}
  summary = {"workflow": "domain_adaptation", "teacher": config.teacher.name,
             "student": config.student.name, "target": f"{corruption[0]}@{corruption[1]}",
             "accuracy": accuracy}
  return common.finish(context, summary)
