"""One pass of the teacher over the training split: difficulty scores for the curriculum.

The curriculum's pacing and sampling are tf.data (`kd_jax.data.curriculum`); ranking the
examples needs the teacher's forward, so it lives here, beside the teacher-logit cache
(`kd_jax.teacher_cache`). Scorings (`kd_jax.data.curriculum.SCORINGS`):

  teacher_loss: −log p_t(y)                        (Hacohen & Weinshall, ICML 2019)
  margin:       max_{c≠y} p_t(c) − p_t(y)          (in [−1, 1]; > 0 when misclassified)
  entropy:      −Σ_c p_t(c) log p_t(c)             (ignores the label)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import data as data_lib
from kd_jax import losses
from kd_jax import parallel
from kd_jax.data import curriculum as curriculum_lib


def difficulty(logits: jax.Array, labels: jax.Array, scoring: str) -> jax.Array:
  """[B] difficulty of each example from the teacher's logits (higher is harder)."""
  logits = logits.astype(jnp.float32)
  if scoring == "teacher_loss":
    return losses.cross_entropy_per_example(logits, labels)
  probs = jax.nn.softmax(logits, axis=-1)
  if scoring == "margin":
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
    label_prob = jnp.sum(jnp.where(is_label, probs, 0.0), axis=-1)
    return jnp.max(jnp.where(is_label, -1.0, probs), axis=-1) - label_prob
  if scoring == "entropy":
    return -jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  raise ValueError(f"curriculum.scoring={scoring!r} is unknown; use one of "
                   f"{', '.join(curriculum_lib.SCORINGS)}")


def difficulty_scores(model: nn.Module, variables: Any,
                      batches: Iterable[Mapping[str, np.ndarray]], mesh,
                      scoring: str) -> np.ndarray:
  """float32 [N] difficulty of every real example of `batches`, in their order.

  `batches` are host-local eval batches (with 'mask'); every host gets all scores.
  """
  def score(variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=False)
    return {"score": difficulty(logits, batch["label"], scoring)}

  return parallel.gather_outputs(score, variables, batches, mesh)["score"].astype(np.float32)


def curriculum_for_run(config: ml_collections.ConfigDict, workdir: str, *, train_data,
                       teacher, teacher_variables,
                       mesh) -> Optional[curriculum_lib.Curriculum]:
  """The distilled phase's curriculum from `config.curriculum` (None when off).

  Scores the student's training split `train_data` with the teacher, or reuses the
  scores saved in `<workdir>/curriculum/difficulty_<scoring>.npy` by an earlier attempt
  of the run. Epochs count `config.train.batch_size` batches of that split.
  """
  spec = curriculum_lib.settings(config.curriculum)
  if spec["pacing"] == "none":
    return None
  scoring = spec["scoring"]
  path = os.path.join(workdir, "curriculum", f"difficulty_{scoring}.npy")
  if os.path.exists(path):
    scores = np.load(path)
  else:
    scores = difficulty_scores(
        teacher, teacher_variables,
        data_lib.eval_iterator(train_data, batch_size=config.eval_batch_size,
                               split="train"), mesh, scoring)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "wb") as f:
        np.save(f, scores)
      os.replace(path + ".tmp", path)
  return curriculum_lib.from_scores(scores, spec, config.train.batch_size)
