"""Evaluation: top-1, top-5, NLL, expected calibration error and teacher agreement.

Every metric is accumulated as sums over the eval split (padded examples carry mask 0),
so a sharded, multi-host evaluation counts each example exactly once:

    ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|   over `num_bins` equal-width bins.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kd_jax import parallel

NUM_BINS = 15


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array,
               teacher_logits: jax.Array | None = None,
               num_bins: int = NUM_BINS) -> dict[str, jax.Array]:
  """Per-batch sums from which `finalize` computes the metrics."""
  mask = mask.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  pred = jnp.argmax(logits, -1)
  correct = (pred == labels).astype(jnp.float32)
  conf = jnp.exp(jnp.max(logp, -1))
  bins = jnp.clip((conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
  onehot_bins = jax.nn.one_hot(bins, num_bins) * mask[:, None]
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  sums = {
      "count": jnp.sum(mask),
      "correct": jnp.sum(correct * mask),
      "top5_correct": jnp.sum(top5 * mask),
      "nll": -jnp.sum(jnp.take_along_axis(logp, labels[:, None], -1)[:, 0] * mask),
      "bin_count": jnp.sum(onehot_bins, 0),
      "bin_confidence": jnp.sum(onehot_bins * conf[:, None], 0),
      "bin_correct": jnp.sum(onehot_bins * correct[:, None], 0),
  }
  if teacher_logits is not None:
    agree = (pred == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
    sums["agreement"] = jnp.sum(agree * mask)
  return sums


def finalize(sums: Mapping[str, np.ndarray], num_classes: int) -> dict[str, float]:
  n = float(sums["count"])
  out = {"accuracy": float(sums["correct"]) / n, "nll": float(sums["nll"]) / n,
         "ece": float(np.sum(np.abs(sums["bin_correct"] - sums["bin_confidence"]))) / n,
         "num_examples": int(n)}
  if num_classes > 5:
    out["top5_accuracy"] = float(sums["top5_correct"]) / n
  if "agreement" in sums:
    out["teacher_agreement"] = float(sums["agreement"]) / n
  return out


def make_eval_step(model: nn.Module, teacher: nn.Module | None = None) -> Callable[..., Any]:
  """jit(variables, teacher_variables, batch) -> sums; XLA partitions the global batch."""
  def step(variables, teacher_variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=False)
    t_logits = None
    if teacher is not None:
      t_logits, _ = teacher.apply(teacher_variables, batch["image"], train=False)
    return batch_sums(logits, batch["label"], batch["mask"], t_logits)
  return jax.jit(step)


def evaluate(model: nn.Module, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, *, num_classes: int, teacher: nn.Module | None = None,
             teacher_variables: Any = None,
             eval_step: Callable[..., Any] | None = None) -> dict[str, float]:
  """Metrics of `model` over host-local `batches` (with 'mask'), all hosts together."""
  eval_step = eval_step or make_eval_step(model, teacher)
  total = None
  for batch in batches:
    sums = eval_step(variables, teacher_variables, parallel.to_global(batch, mesh))
    sums = parallel.to_host(sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("the eval split is empty; set data.eval_split to a split with examples")
  return finalize(total, num_classes)
