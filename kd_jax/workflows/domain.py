"""Domain adaptation: a distilled student moved from a labelled source to an unlabelled
target domain, by each of several methods, measured on both domains.

The source is the run's dataset (`data`). The target (`domain.target`) is either
  - another dataset, named like any `data.name` (a TFDS name or `folder:PATH`, of the
    same classes): its training images are an unpaired stream beside the source's, or
  - '' : the source under the edge corruption `domain.corruption` at `domain.severity`
    (`kd_jax.data.augment`): each source image has a paired corrupted twin.
Target labels are never trained on; the target's eval split (its labels) only measures.

The workflow (`workflow='domain_adaptation'`), every phase resumable:
  1. teacher    trained on the source (or loaded from `teacher.checkpoint`);
  2. distilled  the student distilled on the source (the run's objective): the model
                before adaptation;
  3. one model per method of `domain.methods`, each from the distilled student. A
     training batch holds labelled source images (`image`, `label`) and unlabelled
     target images (view `target`); CE on the source has weight `domain.source_ce`:
       kd            the terms of `domain.distill` (teacher-only terms, e.g. KD + FitNet)
                     with teacher and student on the target images (Ruder et al.,
                     "Knowledge Adaptation: Teaching to Adapt", arXiv:1702.02052);
       pseudo_label  CE on the teacher's predictions for target images whose confidence
                     is at least `domain.pseudo_label_threshold` (Lee, ICML-W 2013);
       coral         CORAL between the student's source and target embeddings, weight
                     `domain.coral_weight` (Sun & Saenko, ECCV-W 2016);
       mmd           multi-kernel Gaussian MMD between them, weight `domain.mmd_weight`
                     (Long et al., DAN, ICML 2015);
       adabn         no training: the BatchNorm statistics re-estimated on the target's
                     training images (Li et al., "Revisiting Batch Normalization for
                     Practical Domain Adaptation", arXiv:1603.04779); also reported for
                     the teacher;
       paired        KD with the teacher on the clean source image and the student on
                     its corrupted twin (only for a corruption target: a paired view).
Every model is evaluated on the source's and the target's eval splits; `summary.json`
gives both accuracies of each, and each method's target gain over `distilled`.
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import data as data_lib
from kd_jax import objective as objective_lib
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax.workflows import common
from kd_jax.workflows import distill as distill_workflow

TARGET_VIEW = "target"
METHODS = ("kd", "pseudo_label", "coral", "mmd", "adabn", "paired")
TRAINED = tuple(m for m in METHODS if m != "adabn")

# The `domain` block of an experiment config. `target`: '' (the source under
# `corruption` at `severity`) or a dataset name; `train_split`: the target's training
# split, for a corruption target the source split whose images (and labels, for the
# source CE) the adaptation phases train on; `target_data_dir`, `eval_split` ('' -> the
# dataset's) locate a dataset target; `distill`: the kd method's terms; `train`
# overrides keys of the student recipe for every method.
DEFAULTS = dict(
    target="", target_data_dir="", train_split="train", eval_split="",
    corruption="motion_blur", severity=3,
    methods=("kd", "pseudo_label", "coral", "mmd", "adabn", "paired"),
    source_ce=1.0, pseudo_label_threshold=0.9, coral_weight=10.0, mmd_weight=1.0,
    distill=dict(ce_weight=0.0, terms=[
        dict(method="kd", weight=1.0, temperature=4.0),
        dict(method="fitnet", weight=10.0, student_tap="stage_2",
             teacher_tap="stage_2", adapter="conv1x1")]),
    train=dict(epochs=20.0, learning_rate=0.01))


def default_config() -> ml_collections.ConfigDict:
  """The `domain` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def is_corruption(block: ml_collections.ConfigDict) -> bool:
  """Whether the target is the source under a corruption (a paired view exists)."""
  return not block.target


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `domain` block the workflow cannot run."""
  block = config.domain
  methods = tuple(block.methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods or len(set(methods)) != len(methods):
    raise ValueError(f"domain.methods must name each of {', '.join(METHODS)} at most "
                     f"once, got {list(methods)}")
  if "paired" in methods and not is_corruption(block):
    raise ValueError("domain.methods: 'paired' needs the target to be the source under "
                     "a corruption (domain.target=''); remove it for "
                     f"target {block.target!r}")
  if is_corruption(block):
    data_lib.augment.parse(target_augment(block))
  for key in ("source_ce", "coral_weight", "mmd_weight"):
    if not float(block[key]) >= 0:
      raise ValueError(f"domain.{key} must not be negative, got {block[key]}")
  if not 0.0 <= float(block.pseudo_label_threshold) <= 1.0:
    raise ValueError("domain.pseudo_label_threshold must be in [0, 1], got "
                     f"{block.pseudo_label_threshold}")
  objective = objective_lib.build(block.distill, total_steps=1, steps_per_epoch=1)
  labelled = [t.name_ for t in objective.terms if t.method.needs_labels]
  if labelled or not objective.needs_teacher:
    raise ValueError(f"domain.distill.terms must be teacher-only terms (no labels), "
                     f"got {labelled or 'none'}; use e.g. kd and fitnet")
  if float(block.distill.ce_weight) != 0.0:
    raise ValueError("domain.distill's terms run on the unlabelled target: its CE weight "
                     "is domain.source_ce; set --config.domain.distill.ce_weight=0")


def target_augment(block: ml_collections.ConfigDict) -> tuple[dict[str, Any], ...]:
  """The edge ops of a corruption target: the corruption on every image."""
  return ({"op": block.corruption, "prob": 1.0, "severity": int(block.severity)},)


def target_data(config: ml_collections.ConfigDict,
                info: data_lib.DatasetInfo) -> ml_collections.ConfigDict:
  """The data config of a dataset target: its images at the source's size and channels,
  augmented as the source's, normalised with its own statistics unless the source's
  mean/std are set explicitly."""
  block = config.domain
  target = config.data.copy_and_resolve_references()
  target.name = block.target
  target.data_dir = block.target_data_dir or None
  target.train_split = block.train_split
  target.eval_split = block.eval_split or None
  target.validation_fraction, target.validation_split = 0.0, None
  target.image_size = info.image_shape[0]
  target.edge_augment, target.views = (), ()
  target.channels = info.image_shape[-1]
  target_info = data_lib.get_info(target)
  if target_info.num_classes != info.num_classes:
    raise ValueError(f"domain.target {block.target!r} has {target_info.num_classes} "
                     f"classes but the source {config.data.name!r} has "
                     f"{info.num_classes}; the target must share the source's classes")
  if target_info.image_shape != tuple(info.image_shape):
    raise ValueError(f"domain.target {block.target!r} gives images of shape "
                     f"{target_info.image_shape}, the source {tuple(info.image_shape)}; "
                     "set --config.data.channels to match")
  return target


def method_objective(config: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
  """The `distill` block of the phase of a trained method: source CE plus its terms."""
  block = config.domain
  source_ce = float(block.source_ce)
  on_target = dict(student_view=TARGET_VIEW, teacher_view=TARGET_VIEW)
  if method == "kd":
    terms = [{**on_target, **dict(term)} for term in block.distill.terms]
  elif method == "pseudo_label":
    terms = [dict(method="pseudo_label", threshold=float(block.pseudo_label_threshold),
                  **on_target)]
  elif method in ("coral", "mmd"):
    terms = [dict(method=method, weight=float(block[f"{method}_weight"]),
                  target_view=TARGET_VIEW)]
  else:  # paired: the teacher on the clean image, the student on its corrupted twin
    terms = [dict(method="kd", temperature=4.0, student_view=TARGET_VIEW,
                  teacher_view=objective_lib.MAIN_VIEW)]
  distill = block.distill.to_dict()
  distill.update(ce_weight=source_ce, terms=terms)
  return distill


def batch_statistics(model, variables: Any, images: jax.Array) -> Any:
  """The batch means and (biased) variances every BatchNorm of `model` computes on
  `images` in training mode, in the layout of `variables['batch_stats']`.

  Flax updates running statistics as `r ← m·r + (1 − m)·b`; two forward passes from
  `r = 0` and `r = 1` give `m` and `b` for each BatchNorm, whatever its momentum.
  """
  stats = variables["batch_stats"]

  def updated(fill):
    start = jax.tree.map(lambda s: jnp.full_like(s, fill), stats)
    _, new = model.apply({**variables, "batch_stats": start}, images, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return new["batch_stats"]

  from_zero, from_one = updated(0.0), updated(1.0)
  return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)


def adabn(model, variables: Any, data_config: ml_collections.ConfigDict, *,
          batch_size: int, corruption: tuple[str, int] | None = None) -> Any:
  """`variables` with BatchNorm statistics re-estimated on the training images of
  `data_config` (evaluation preprocessing, file order, under `corruption` if given):
  the mean over full batches (of the adaptation phases' batch size) of each batch's
  statistics (AdaBN). Every process reads all the images, so all agree."""
  step = jax.jit(lambda v, x: batch_statistics(model, v, x))
  total, count = None, 0
  for batch in data_lib.eval_iterator(data_config, batch_size=batch_size, split="train",
                                      process_index=0, process_count=1,
                                      corruption=corruption):
    if not np.all(batch["mask"]):  # the padded last batch
      continue
    stats = jax.device_get(step(variables, batch["image"]))
    total = stats if total is None else jax.tree.map(np.add, total, stats)
    count += 1
  if count == 0:
    raise ValueError(f"the training split of {data_config.name} has fewer than "
                     f"{batch_size} images; lower domain.train.batch_size for AdaBN")
  return {**variables, "batch_stats": jax.tree.map(lambda t: t / count, total)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`workflow='domain_adaptation'`: the phases of the module docstring; summary.json."""
  check_config(config)
  block = config.domain
  context = common.start(config, workdir)
  info = context.info
  student, _, source = distill_workflow.student_phases(config, workdir, context.mesh, info,
                                                       context.writer, context.teacher)
  teacher = rundir.model(config, "teacher", info.num_classes)
  if is_corruption(block):
    corruption = (block.corruption, int(block.severity))
    target_name = f"{corruption[0]}@{corruption[1]}"
    # A paired view: the same crop of each source image, corrupted.
    views = (*config.data.views, dict(name=TARGET_VIEW, edge_augment=target_augment(block),
                                      same_crop=True))
    train_config = common.derived(config, {"data.views": views,
                                           "student.train_split": block.train_split})
    target_eval, extra_views = config.data, None
    target_train = common.derived(config, {"data.train_split": block.train_split}).data
  else:
    corruption, target_name = None, block.target
    target_eval = target_train = target_data(config, info)
    train_config, extra_views = config, {TARGET_VIEW: target_eval}

  adapted = {}
  for method in block.methods:
    if method == "adabn":
      continue
    adapted[method] = phase_lib.train_phase(
        common.derived(train_config, {"student.validation_split": None}),
        phase=f"adapted_{method}", model=student,
        train_config=phase_lib.student_recipe(config, block.train),
        distill_config=method_objective(config, method), teacher=teacher,
        teacher_variables=context.teacher_variables, init_variables=source.variables,
        extra_views=extra_views, **context.phase_args).variables

  teacher_accuracy = common.accuracy_fn(teacher, context, config.eval_batch_size)
  student_accuracy = common.accuracy_fn(student, context, config.eval_batch_size)
  models = [("teacher", teacher_accuracy, context.teacher.variables),
            ("distilled", student_accuracy, source.variables)]
  if "adabn" in block.methods:
    batch_size = phase_lib.student_recipe(config, block.train)["batch_size"]
    models += [(name, accuracy_of, adabn(model, variables, target_train,
                                         batch_size=batch_size,
                                         corruption=corruption))
               for name, accuracy_of, model, variables in (
                   ("teacher_adabn", teacher_accuracy, teacher, context.teacher.variables),
                   ("adabn", student_accuracy, student, source.variables))]
  models += [(method, student_accuracy, variables) for method, variables in adapted.items()]
  accuracy = {name: {"source": accuracy_of(variables, config.data),
                     "target": accuracy_of(variables, target_eval, corruption)}
              for name, accuracy_of, variables in models}
  before = accuracy["distilled"]["target"]
  summary = {"workflow": "domain_adaptation", "teacher": config.teacher.name,
             "student": config.student.name, "target": target_name,
             "methods": list(block.methods), "accuracy": accuracy,
             "target_gain": {m: accuracy[m]["target"] - before for m in block.methods}}
  return common.finish(context, summary)
