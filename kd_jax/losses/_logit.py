"""Losses on logits: cross-entropy, Hinton KD, DeiT's distillation-token loss,
logit-standardised KD and DKD.

Reductions follow RepDistiller (`DistillKL`), mdistiller (`dkd_loss`) and DeiT's
official code (`DistillationLoss`), so the
published loss weights and temperatures carry over unchanged. Each loss has a
`*_per_example` form returning the `[B]` values whose batch mean it is, for callers
that weigh examples (self-paced learning).
"""
import jax
import jax.numpy as jnp

from kd_jax.losses import _common


def cross_entropy(logits: jax.typing.ArrayLike,
                  labels: jax.typing.ArrayLike,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy with integer labels, averaged over the batch.

  With smoothing `e` over `K` classes the target is
  `q = (1 - e) onehot(y) + e / K` (PyTorch's `label_smoothing=e`), and

    L = -1/B sum_b sum_c q_bc log softmax(z_b)_c.

  Args:
    logits: `[B, K]` unnormalised scores.
    labels: `[B]` integer class indices.
    label_smoothing: `e` in `[0, 1]`; `0` gives the plain cross-entropy.

  Returns:
    Scalar loss.

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision,
    CVPR 2016 (label smoothing).
  """
  return -jnp.mean(_target_log_likelihood(logits, labels, label_smoothing))


def cross_entropy_per_example(logits: jax.typing.ArrayLike,
                              labels: jax.typing.ArrayLike,
                              label_smoothing: float = 0.0) -> jax.Array:
  """`[B]` cross-entropies `-sum_c q_bc log softmax(z_b)_c`; `cross_entropy` is their mean."""
  return -_target_log_likelihood(logits, labels, label_smoothing)


def _target_log_likelihood(logits, labels, label_smoothing) -> jax.Array:
  """Per-sample `sum_c q_bc log softmax(z_b)_c` for the (smoothed) targets `q`."""
  logits = _common.as_float(logits)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(targets * log_probs, axis=-1)


def _kl_divergence(teacher_log_probs: jax.Array,
                   student_log_probs: jax.Array) -> jax.Array:
  """Per-sample `KL(p_t || p_s)` from log-probabilities; `0 log 0 = 0`."""
  teacher_probs = jnp.exp(teacher_log_probs)
  return jnp.sum(teacher_probs * (teacher_log_probs - student_log_probs),
                 axis=-1)


def kd(student_logits: jax.typing.ArrayLike,
       teacher_logits: jax.typing.ArrayLike,
       temperature: float = 4.0) -> jax.Array:
  """Hinton knowledge distillation: temperature-softened KL, scaled by T^2.

  With `p = softmax(z / T)`,

    L = T^2 / B sum_b KL(p_t,b || p_s,b)
      = T^2 / B sum_b sum_c p_t,bc (log p_t,bc - log p_s,bc).

  Args:
    student_logits: `[B, K]` student logits.
    teacher_logits: `[B, K]` teacher logits (no gradient flows into them).
    temperature: softmax temperature `T`.

  Returns:
    Scalar loss.

  References:
    Hinton, Vinyals and Dean, Distilling the Knowledge in a Neural Network,
    NeurIPS Deep Learning Workshop 2014.
  """
  return jnp.mean(_tempered_kl(student_logits, teacher_logits, temperature)
                  ) * temperature**2


def kd_per_example(student_logits: jax.typing.ArrayLike,
                   teacher_logits: jax.typing.ArrayLike,
                   temperature: float = 4.0) -> jax.Array:
  """`[B]` values `T^2 KL(p_t,b || p_s,b)`; `kd` is their mean."""
  return _tempered_kl(student_logits, teacher_logits, temperature) * temperature**2


def deit(student_logits: jax.typing.ArrayLike,
         teacher_logits: jax.typing.ArrayLike,
         hard: bool = True,
         temperature: float = 3.0) -> jax.Array:
  """DeiT's distillation-token loss, on the student's distillation head `z_d`.

  Hard (`hard=True`): cross-entropy with the teacher's decision,

    L = -1/B sum_b log softmax(z_d,b)_{argmax_c z_t,bc};

  soft: the tempered KL of Hinton KD, reduced as the official code reduces it (the
  summed KL divided by the number of logits `B K`, not by `B`),

    L = T^2 / (B K) sum_b KL(softmax(z_t,b / T) || softmax(z_d,b / T)),

  i.e. `kd(z_d, z_t, T) / K`; the paper's soft setting is `T = 3` with weight 0.1
  against 0.9 on the class head's cross-entropy, its hard setting weights 1/2 each.

  Args:
    student_logits: `[B, K]` logits of the student's distillation head.
    teacher_logits: `[B, K]` teacher logits (no gradient flows into them).
    hard: the hard-label variant (the paper's choice) instead of the soft one.
    temperature: softmax temperature `T` of the soft variant (unused when hard).

  Returns:
    Scalar loss.

  References:
    Touvron et al., Training data-efficient image transformers & distillation
    through attention, ICML 2021.
  """
  return jnp.mean(deit_per_example(student_logits, teacher_logits, hard, temperature))


def deit_per_example(student_logits: jax.typing.ArrayLike,
                     teacher_logits: jax.typing.ArrayLike,
                     hard: bool = True,
                     temperature: float = 3.0) -> jax.Array:
  """`[B]` values whose mean is `deit`: `CE_b` (hard) or `T^2 KL_b / K` (soft)."""
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  if hard:
    return -_target_log_likelihood(student, jnp.argmax(teacher, axis=-1), 0.0)
  return kd_per_example(student, teacher, temperature) / student.shape[-1]


def _tempered_kl(student_logits, teacher_logits, temperature) -> jax.Array:
  """Per-sample `KL(softmax(z_t / T) || softmax(z_s / T))`, the teacher a constant."""
  student, teacher = _common.as_student_and_teacher(student_logits,
                                                     teacher_logits)
  student_log_probs = jax.nn.log_softmax(student / temperature, axis=-1)
  teacher_log_probs = jax.nn.log_softmax(teacher / temperature, axis=-1)
  return _kl_divergence(teacher_log_probs, student_log_probs)


def standardize_logits(logits: jax.typing.ArrayLike,
                       eps: float = 1e-7) -> jax.Array:
  """Z-scores each row of logits: `(z - mean(z)) / (eps + std(z))`.

  `std` is the unbiased sample standard deviation over the classes (as
  `torch.std`), matching the authors' code.

  Args:
    logits: `[..., K]` logits.
    eps: added to the standard deviation.

  Returns:
    Standardised logits shaped like `logits`.

  References:
    Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024.
  """
  logits = _common.as_float(logits)
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  variance = (jnp.sum(jnp.square(centred), axis=-1, keepdims=True)
              / (logits.shape[-1] - 1))
  return centred / (eps + _common.safe_sqrt(variance))


def lskd(student_logits: jax.typing.ArrayLike,
         teacher_logits: jax.typing.ArrayLike,
         temperature: float = 2.0,
         eps: float = 1e-7) -> jax.Array:
  """KD on standardised logits (logit standardisation, Sun et al. 2024).

  With `Z(z) = (z - mean(z)) / (eps + std(z))` per sample,

    L = kd(Z(z_s), Z(z_t), T) = T^2 / B sum_b KL(softmax(Z(z_t,b) / T)
                                              || softmax(Z(z_s,b) / T)).

  The authors' CIFAR-100 runs use `T = 2` with loss weight 9 (the default here
  is that temperature; the weight belongs to the caller). Apply
  `standardize_logits` to both inputs of `dkd` for their DKD variant.

  Args:
    student_logits: `[B, K]` student logits.
    teacher_logits: `[B, K]` teacher logits (no gradient flows into them).
    temperature: softmax temperature `T` applied after standardisation.
    eps: added to the standard deviation.

  Returns:
    Scalar loss.

  References:
    Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024.
  """
  return kd(standardize_logits(student_logits, eps),
            standardize_logits(teacher_logits, eps), temperature)


def lskd_per_example(student_logits: jax.typing.ArrayLike,
                     teacher_logits: jax.typing.ArrayLike,
                     temperature: float = 2.0,
                     eps: float = 1e-7) -> jax.Array:
  """`[B]` per-sample values whose mean is `lskd`."""
  return kd_per_example(standardize_logits(student_logits, eps),
                        standardize_logits(teacher_logits, eps), temperature)


def dkd(student_logits: jax.typing.ArrayLike,
        teacher_logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        mask_offset: float = 1000.0) -> jax.Array:
  """Decoupled KD: target-class (TCKD) plus non-target-class (NCKD) KL terms.

  With `p = softmax(z / T)`, `g` the label and `m = onehot(g)`:

    b = [p_g, 1 - p_g]                                   (binary target/rest)
    TCKD = T^2 / B sum_b KL(b_t || b_s)
    q = softmax(z / T - mask_offset * m)                 (gt class masked out)
    NCKD = T^2 / B sum_b KL(q_t || q_s)
    L = alpha TCKD + beta NCKD.

  As in mdistiller's `dkd_loss`, the gt class is removed from `q` by
  subtracting 1000 from its tempered logit. mdistiller's warm-up factor
  `min(epoch / warmup, 1)` is applied by its distiller, not by the loss, and is
  left to the caller's weight schedule here as well.

  Args:
    student_logits: `[B, K]` student logits.
    teacher_logits: `[B, K]` teacher logits (no gradient flows into them).
    labels: `[B]` integer ground-truth classes.
    alpha: weight of TCKD.
    beta: weight of NCKD.
    temperature: softmax temperature `T`.
    mask_offset: amount subtracted from the gt class's tempered logit for NCKD.

  Returns:
    Scalar loss.

  References:
    Zhao et al., Decoupled Knowledge Distillation, CVPR 2022.
  """
  return jnp.mean(dkd_per_example(student_logits, teacher_logits, labels, alpha, beta,
                                  temperature, mask_offset))


def dkd_per_example(student_logits: jax.typing.ArrayLike,
                    teacher_logits: jax.typing.ArrayLike,
                    labels: jax.typing.ArrayLike,
                    alpha: float = 1.0,
                    beta: float = 8.0,
                    temperature: float = 4.0,
                    mask_offset: float = 1000.0) -> jax.Array:
  """`[B]` values `(alpha TCKD_b + beta NCKD_b) T^2`; `dkd` is their mean."""
  tckd, nckd = _dkd_parts(student_logits, teacher_logits, labels, temperature,
                          mask_offset)
  return (alpha * tckd + beta * nckd) * temperature**2


def _dkd_parts(student_logits, teacher_logits, labels, temperature,
               mask_offset) -> tuple[jax.Array, jax.Array]:
  """Per-sample (TCKD, NCKD) KL divergences of `dkd`, before the T^2 factor."""
  student, teacher = _common.as_student_and_teacher(student_logits,
                                                     teacher_logits)
  labels = jnp.reshape(jnp.asarray(labels), (-1,))
  gt_mask = jax.nn.one_hot(labels, student.shape[-1], dtype=jnp.bool_)

  def binary_log_probs(logits):
    # log [p_g, sum_{c != g} p_c], computed in log space so that neither entry
    # underflows to log(0) for a confident model.
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    log_gt = jnp.sum(jnp.where(gt_mask, log_probs, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(gt_mask, -jnp.inf, log_probs),
                                axis=-1)
    return jnp.stack([log_gt, log_rest], axis=-1)

  def non_target_log_probs(logits):
    return jax.nn.log_softmax(logits / temperature - mask_offset * gt_mask,
                              axis=-1)

  return (_kl_divergence(binary_log_probs(teacher), binary_log_probs(student)),
          _kl_divergence(non_target_log_probs(teacher),
                         non_target_log_probs(student)))
