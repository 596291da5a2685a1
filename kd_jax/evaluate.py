"""Evaluation: top-1, top-5, NLL, calibration, teacher agreement and feature alignment.

Every metric is accumulated as sums over the eval split (padded examples carry mask 0),
so a sharded, multi-host evaluation counts each example exactly once:

    ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|   over `num_bins` equal-width bins.

Feature alignment between the student (after a term's adapter) and the teacher is
minibatch linear CKA (Kornblith et al., Similarity of Neural Network Representations
Revisited, ICML 2019), accumulated over eval batches with the unbiased HSIC estimator
as in Nguyen, Raghu & Kornblith, Do Wide and Deep Networks Learn the Same Things?,
ICLR 2021:

    CKA = Σ_b HSIC₁(K_b, L_b) / √(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),

with K_b = X_b X_bᵀ and L_b = Y_b Y_bᵀ the linear Gram matrices of one batch's
flattened student and teacher features (shapes may differ).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kd_jax import objective as objective_lib
from kd_jax import parallel

NUM_BINS = 15


def unbiased_hsic(k: jax.Array, l: jax.Array, n: jax.Array) -> jax.Array:
  """HSIC₁ of Song et al. (JMLR 2012) from Gram matrices whose padding rows are zero.

    HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)),

  K̃, L̃ being K, L with zeroed diagonals and n the number of real rows; 0 when n ≤ 3.
  """
  k = k * (1.0 - jnp.eye(k.shape[0], dtype=k.dtype))
  l = l * (1.0 - jnp.eye(l.shape[0], dtype=l.dtype))
  k_sum, l_sum = jnp.sum(k, 1), jnp.sum(l, 1)
  safe = jnp.maximum(n, 4.0)
  hsic = (jnp.sum(k * l) + jnp.sum(k_sum) * jnp.sum(l_sum) / ((safe - 1) * (safe - 2))
          - 2.0 / (safe - 2) * jnp.dot(k_sum, l_sum)) / (safe * (safe - 3))
  return jnp.where(n > 3, hsic, 0.0)


def cka_sums(student_feat: jax.Array, teacher_feat: jax.Array,
             mask: jax.Array) -> jax.Array:
  """`[HSIC₁(K, L), HSIC₁(K, K), HSIC₁(L, L)]` of one batch; `finalize` forms CKA.

  Features are flattened per example and centred over the real rows first (HSIC₁ is
  invariant to translation; centring keeps float32 accurate for ReLU features).
  """
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)

  def gram(feat):
    x = feat.reshape(feat.shape[0], -1).astype(jnp.float32) * mask[:, None]
    x = (x - jnp.sum(x, 0) / jnp.maximum(n, 1.0)) * mask[:, None]
    return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)

  k, l = gram(student_feat), gram(teacher_feat)
  return jnp.stack([unbiased_hsic(k, l, n), unbiased_hsic(k, k, n),
                    unbiased_hsic(l, l, n)])


def aligned_features(objective: objective_lib.Objective | None, term_variables: Any,
                     student_taps: Mapping[str, jax.Array],
                     teacher_taps: Mapping[str, jax.Array]
                     ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The (student, teacher) feature pairs whose alignment evaluation reports.

  Always the penultimate embeddings (`embedding`); then each feature or embedding
  term of `objective`: through its adapter (named after the term, e.g.
  `fitnet/stage_2`, using the adapter's parameters and BatchNorm statistics from
  `term_variables`), or, without one, the raw taps (named after the tap, or
  `student_tap-teacher_tap` when they differ). Multi-tap terms are left out.
  """
  pairs = {"embedding": (student_taps["embedding"], teacher_taps["embedding"])}
  for term in objective.terms if objective is not None else ():
    if term.method.inputs not in (objective_lib.FEATURES, objective_lib.EMBEDDING):
      continue
    student = student_taps[term.student_tap]
    if term.adapter:
      variables = {collection: tree[term.name_]["adapter"]
                   for collection, tree in term_variables.items()
                   if "adapter" in tree.get(term.name_, {})}
      student = objective_lib.Adapter(term.adapter, term.teacher_features).apply(
          variables, student, train=False)
      name = term.name_
    elif term.student_tap == term.teacher_tap:
      name = term.student_tap
    else:
      name = f"{term.student_tap}-{term.teacher_tap}"
    pairs[name] = (student, teacher_taps[term.teacher_tap])
  return pairs


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array,
               teacher_logits: jax.Array | None = None,
               num_bins: int = NUM_BINS,
               feature_pairs: Mapping[str, tuple[jax.Array, jax.Array]] | None = None
               ) -> dict[str, Any]:
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
  if feature_pairs:
    sums["cka"] = {name: cka_sums(s, t, mask) for name, (s, t) in feature_pairs.items()}
  return sums


def finalize(sums: Mapping[str, Any], num_classes: int) -> dict[str, float]:
  """Metrics from summed `batch_sums`; CKA of each feature pair as `cka/<name>`."""
  n = float(sums["count"])
  out = {"accuracy": float(sums["correct"]) / n, "nll": float(sums["nll"]) / n,
         "ece": float(np.sum(np.abs(sums["bin_correct"] - sums["bin_confidence"]))) / n,
         "num_examples": int(n)}
  if num_classes > 5:
    out["top5_accuracy"] = float(sums["top5_correct"]) / n
  if "agreement" in sums:
    out["teacher_agreement"] = float(sums["agreement"]) / n
  for name, (cross, student, teacher) in sums.get("cka", {}).items():
    out[f"cka/{name}"] = float(cross) / float(np.sqrt(student * teacher))
  return out


def make_eval_step(model: nn.Module, teacher: nn.Module | None = None,
                   objective: objective_lib.Objective | None = None
                   ) -> Callable[..., Any]:
  """jit(variables, teacher_variables, batch, term_variables=None) -> sums.

  XLA partitions the global batch. With a teacher, the sums include teacher agreement
  and the CKA of every pair of `aligned_features(objective, term_variables, ...)`.
  """
  def step(variables, teacher_variables, batch, term_variables=None):
    logits, taps = model.apply(variables, batch["image"], train=False)
    t_logits, pairs = None, None
    if teacher is not None:
      t_logits, t_taps = teacher.apply(teacher_variables, batch["image"], train=False)
      pairs = aligned_features(objective, term_variables, taps, t_taps)
    return batch_sums(logits, batch["label"], batch["mask"], t_logits,
                      feature_pairs=pairs)
  return jax.jit(step)


def evaluate(model: nn.Module, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, *, num_classes: int, teacher: nn.Module | None = None,
             teacher_variables: Any = None,
             eval_step: Callable[..., Any] | None = None,
             objective: objective_lib.Objective | None = None,
             term_variables: Any = None) -> dict[str, float]:
  """Metrics of `model` over host-local `batches` (with 'mask'), all hosts together.

  With a teacher: agreement and `cka/<name>` alignments (see `aligned_features`;
  `objective` and its `term_variables` add each term's taps, through its adapter).
  """
  eval_step = eval_step or make_eval_step(model, teacher, objective)
  total = None
  for batch in batches:
    sums = eval_step(variables, teacher_variables, parallel.to_global(batch, mesh),
                     term_variables)
    sums = parallel.to_host(sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("the eval split is empty; set data.eval_split to a split with examples")
  return finalize(total, num_classes)


def predict(model: nn.Module, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
            *, attention_tap: str | None = None) -> dict[str, np.ndarray]:
  """Per-example outputs on one device, padding dropped, in the order of `batches`.

  Returns:
    `logits` [N, K], `label` [N], `embedding` [N, D] and, with `attention_tap`, its
    attention map `attention` [N, H, W]: the channel mean of the squared activations
    (the map attention transfer compares, before normalisation).
  """
  @jax.jit
  def forward(variables, images):
    logits, taps = model.apply(variables, images, train=False)
    out = {"logits": logits, "embedding": taps["embedding"].astype(jnp.float32)}
    if attention_tap:
      out["attention"] = jnp.mean(jnp.square(taps[attention_tap].astype(jnp.float32)), -1)
    return out

  parts = []
  for batch in batches:
    keep = np.asarray(batch["mask"]) > 0
    out = jax.device_get(forward(variables, batch["image"]))
    parts.append({"label": np.asarray(batch["label"])[keep],
                  **{k: np.asarray(v)[keep] for k, v in out.items()}})
  if not parts:
    raise ValueError("the eval split is empty; set data.eval_split to a split with examples")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
