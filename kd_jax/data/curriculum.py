"""Curriculum sampling: the teacher ranks the training examples, a pacing function
decides how many of the easiest ones each step may draw from.

1. Difficulty: one pass of the teacher over the student's training split (eval
   preprocessing, file order) scores every example (`SCORINGS`; the pass itself is
   `kd_jax.teacher_pass`, above this tf.data package):

     teacher_loss: −log p_t(y)                        (Hacohen & Weinshall, ICML 2019)
     margin:       max_{c≠y} p_t(c) − p_t(y)          (in [−1, 1]; > 0 when misclassified)
     entropy:      −Σ_c p_t(c) log p_t(c)             (ignores the label)

   The scores are saved in `<workdir>/curriculum/difficulty_<scoring>.npy` and reused
   when the run resumes.
2. Pacing (`PACINGS`): the fraction g(t) of the training split, easiest first, that
   step t may draw from grows from `start_fraction` g₀ to 1 at step T
   (`full_at_epoch` epochs), with p = min(t / T, 1):

     linear:    g₀ + (1 − g₀) p                       (Platanios et al., NAACL 2019)
     root:      √(g₀² + (1 − g₀²) p)                  (Platanios et al., NAACL 2019)
     geometric: g₀^(1 − p)                             (a constant growth factor)
     step:      g₀ + (1 − g₀) ⌊stages · p⌋ / stages     (Hacohen & Weinshall, ICML 2019)

   The pool at step t is the ceil(g(t) · N) easiest examples (never fewer than the
   global batch).
3. Sampling (in tf.data, see `kd_jax.data.pipeline`): global batch t is B distinct
   examples of that pool, drawn with seeds (seed, t); host i of P takes draws
   [i · B/P, (i + 1) · B/P). So hosts hold disjoint examples, every draw is a function
   of (seed, step) alone, and a resumed run continues the same curriculum. The sampler
   holds the scores and the ranking only (8 bytes per example); the pipeline reads the
   drawn images by index.

Training logs `curriculum_fraction` (the pool's share of the split) and
`curriculum_difficulty` (the mean score of the step's global batch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from kd_jax import registry
from kd_jax.data import salts

SCORINGS = ("teacher_loss", "margin", "entropy")
PACINGS = ("linear", "root", "geometric", "step")
# The `curriculum` block of an experiment config: off (pacing 'none') by default.
DEFAULTS = dict(pacing="none", scoring="teacher_loss", start_fraction=0.3,
                full_at_epoch=30.0, stages=4)


def default_config() -> ml_collections.ConfigDict:
  """The `curriculum` block of an experiment config, at its defaults."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULTS))


def pacing_fraction(kind: str, step, *, start_fraction: float, full_step: int,
                    stages: int = 4) -> np.ndarray:
  """g(step): the share of the split, easiest first, available at `step` (docstring)."""
  step = np.asarray(step, np.float64)
  progress = np.minimum(step / full_step, 1.0) if full_step > 0 else np.ones_like(step)
  g0 = float(start_fraction)
  if kind == "linear":
    return g0 + (1.0 - g0) * progress
  if kind == "root":
    return np.sqrt(g0**2 + (1.0 - g0**2) * progress)
  if kind == "geometric":
    return g0 ** (1.0 - progress)
  if kind == "step":
    return g0 + (1.0 - g0) * np.floor(stages * progress) / stages
  raise ValueError(f"curriculum.pacing={kind!r} is unknown; use none or one of "
                   f"{', '.join(PACINGS)}")


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Difficulty scores and a pacing function: what the curriculum sampler draws from.

  Attributes:
    difficulty: float32 [N], the score of each training example in file order.
    pacing: one of `PACINGS`.
    start_fraction: g₀, the share of the split available at step 0, in (0, 1].
    full_step: T, the step from which the whole split is available.
    stages: the number of increments of the 'step' pacing.
  """
  difficulty: np.ndarray
  pacing: str
  start_fraction: float
  full_step: int
  stages: int = 4

  @property
  def order(self) -> np.ndarray:
    """Example indices from easiest to hardest (ties in file order)."""
    return np.argsort(self.difficulty, kind="stable").astype(np.int32)

  def pool_size(self, step, global_batch_size: int) -> np.ndarray:
    """Examples available at `step`: ceil(g(step) · N), at least the global batch."""
    n = len(self.difficulty)
    fraction = pacing_fraction(self.pacing, step, start_fraction=self.start_fraction,
                               full_step=self.full_step, stages=self.stages)
    # The tolerance keeps float error (0.3 · 1000 = 300.00000000000006) out of ceil.
    return np.clip(np.ceil(fraction * n - 1e-9), global_batch_size, n).astype(np.int64)

  def sampler(self, *, seed: int, global_batch_size: int, process_index: int,
              process_count: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """`host_indices(step) -> int32 [B/P]`: this host's examples of global batch `step`.

    The B draws of a step are the top B of uniform keys (seeded by (seed, step)) over
    the pool's ranks, so they are distinct, in random order, and equal on every host;
    host i keeps draws [i · B/P, (i + 1) · B/P).
    """
    n = len(self.difficulty)
    if global_batch_size > n:
      raise ValueError(f"global batch size {global_batch_size} exceeds the {n} examples "
                       "the curriculum ranks")
    per_host = global_batch_size // process_count
    order = tf.constant(self.order)
    pool_sizes = tf.constant(self.pool_size(np.arange(self.full_step + 1),
                                            global_batch_size))
    ranks = tf.range(n, dtype=tf.int64)
    base_seed = tf.constant([seed, salts.CURRICULUM], tf.int64)

    def host_indices(step: tf.Tensor) -> tf.Tensor:
      step = tf.cast(step, tf.int64)
      pool = pool_sizes[tf.minimum(step, self.full_step)]
      keys = tf.random.stateless_uniform(
          [n], tf.random.experimental.stateless_fold_in(base_seed, step))
      keys = tf.where(ranks < pool, keys, -1.0)
      drawn = tf.math.top_k(keys, global_batch_size, sorted=True).indices
      mine = drawn[process_index * per_host:(process_index + 1) * per_host]
      return tf.gather(order, mine)

    return host_indices

  def fraction(self, step: int, global_batch_size: int) -> float:
    """`curriculum_fraction`: the share of the split available at `step`."""
    return float(self.pool_size(step, global_batch_size)) / len(self.difficulty)


def settings(spec: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """The `curriculum` config block with defaults for absent or unset (None) fields.

  Raises:
    ValueError: an unknown key or a value out of range, in one line.
  """
  spec = registry.section("curriculum", spec, DEFAULTS)
  if spec["pacing"] not in ("none", *PACINGS):
    raise ValueError(f"curriculum.pacing={spec['pacing']!r} is unknown; use none or one "
                     f"of {', '.join(PACINGS)}")
  if spec["scoring"] not in SCORINGS:
    raise ValueError(f"curriculum.scoring={spec['scoring']!r} is unknown; use one of "
                     f"{', '.join(SCORINGS)}")
  if not 0 < spec["start_fraction"] <= 1:
    raise ValueError("curriculum.start_fraction must be in (0, 1], got "
                     f"{spec['start_fraction']}")
  if spec["full_at_epoch"] < 0:
    raise ValueError("curriculum.full_at_epoch must not be negative, got "
                     f"{spec['full_at_epoch']}")
  if spec["stages"] < 1:
    raise ValueError(f"curriculum.stages must be at least 1, got {spec['stages']}")
  return spec


def from_scores(scores: np.ndarray, spec: Mapping[str, Any],
                batch_size: int) -> Curriculum:
  """The curriculum of `settings(spec)` over `scores`; epochs count `batch_size` batches."""
  spec = settings(spec)
  steps_per_epoch = len(scores) // int(batch_size)
  return Curriculum(scores, spec["pacing"], float(spec["start_fraction"]),
                    round(spec["full_at_epoch"] * steps_per_epoch), int(spec["stages"]))
