"""Offline distillation: the teacher's logits, computed once for a fixed training set.

Without data augmentation a training example reaches the teacher as the same image in
every epoch, so the teacher's logits can be computed once, stored, and looked up by
the example's `index` (its position in the training split) instead of running the
teacher at every step; a KD step then costs a student step. With augmentation the
teacher's input changes every epoch and stored logits would be wrong, so the cache
refuses augmented data. Cached logits serve logit terms only (kd, dkd, ...): feature
terms need the teacher's taps, which are not stored.

  logits = teacher_cache.load_or_compute(path, teacher, teacher_variables, data_config,
                                         objective, mesh, batch_size=256)
  batches = teacher_cache.attach(data.train_iterator(data_config, ...), logits)
  # each batch now carries 'teacher_logits'; train.make_train_step uses them
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kd_jax import data as data_lib
from kd_jax import objective as objective_lib
from kd_jax import parallel
from kd_jax import train as train_lib

Batch = Mapping[str, np.ndarray]


def check_cacheable(data_config: ml_collections.ConfigDict,
                    objective: objective_lib.Objective) -> None:
  """Raises a one-line ValueError unless cached logits equal the teacher's at every step.

  Args:
    data_config: the `data` block the student trains on.
    objective: the distillation objective that will consume the logits.

  Raises:
    ValueError: augmentation is not explicitly off (`data.augment='none'`), edge
      augmentations are configured, or a term needs more than the teacher's logits.
  """
  if data_config.augment != "none" or data_config.edge_augment:
    raise ValueError(
        "distill.cache_teacher_logits needs a fixed, unaugmented training set (augmented "
        "images change every epoch, cached teacher logits would not); set "
        "--config.data.augment=none (and no data.edge_augment) or "
        "--config.distill.cache_teacher_logits=False")
  if objective.teacher_views not in ((), (objective_lib.MAIN_VIEW,)):
    raise ValueError(
        "distill.cache_teacher_logits stores the teacher's logits of the training images, "
        f"but the objective shows it views {list(objective.teacher_views)}; set "
        "--config.distill.cache_teacher_logits=False")
  for term in objective.terms:
    if term.method.inputs not in objective_lib.TEACHER_LOGITS_ONLY:
      raise ValueError(
          f"distill.cache_teacher_logits stores logits only, but term {term.name_!r} "
          "compares the teacher's features; set --config.distill.cache_teacher_logits=False")


def compute_logits(model: nn.Module, variables: Any,
                   batches: Iterable[Batch], mesh) -> np.ndarray:
  """float32 [N, classes]: the model's inference-mode logits for every real example.

  Args:
    model: the teacher.
    variables: its variables (host or replicated).
    batches: host-local eval batches with 'image' and 'mask' (`data.eval_iterator`);
      rows come out in their order, padding (mask 0) dropped.
    mesh: the data mesh; every host gets all rows.
  """
  def forward(variables, batch):
    return {"logits": model.apply(variables, batch["image"], train=False)[0]}

  return parallel.gather_outputs(forward, variables, batches, mesh)["logits"].astype(
      np.float32)


def training_set_logits(model: nn.Module, variables: Any,
                        data_config: ml_collections.ConfigDict, mesh,
                        batch_size: int) -> np.ndarray:
  """The model's logits for the training split, row `i` for the example with index `i`.

  The split is read in file order (the order `index` counts) with the evaluation
  preprocessing, which equals the training preprocessing when `augment` is 'none'.
  """
  return compute_logits(
      model, variables,
      data_lib.eval_iterator(data_config, batch_size=batch_size, split="train"), mesh)


def load_or_compute(path: str, teacher: nn.Module, teacher_variables: Any,
                    data_config: ml_collections.ConfigDict,
                    objective: objective_lib.Objective, mesh, *,
                    batch_size: int) -> np.ndarray:
  """The teacher's training-set logits, from `path` (.npy) or computed and saved there.

  The file is reused only if its sidecar `path + '.json'` names the same teacher
  (fingerprint of its variables) and the same data config; otherwise it is recomputed.

  Raises:
    ValueError: from `check_cacheable`.
  """
  check_cacheable(data_config, objective)
  key = {"teacher": train_lib.fingerprint(parallel.to_host(teacher_variables)),
         "data": json.loads(data_config.to_json(sort_keys=True))}
  if os.path.exists(path) and os.path.exists(path + ".json"):
    with open(path + ".json") as f:
      if json.load(f) == key:
        return np.load(path, mmap_mode="r")
  logits = training_set_logits(teacher, teacher_variables, data_config, mesh, batch_size)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      np.save(f, logits)
    os.replace(path + ".tmp", path)
    with open(path + ".json", "w") as f:
      json.dump(key, f)
  return logits


def attach(batches: Iterable[Batch],
           logits: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """Adds `teacher_logits` (the rows of `logits` at each example's `index`) to batches."""
  for batch in batches:
    yield {**batch, "teacher_logits": np.asarray(logits[batch["index"]])}
