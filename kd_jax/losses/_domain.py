"""Domain-adaptation losses: aligning source and target features, teacher pseudo-labels.

CORAL and MMD compare the *student's* features on two domains (a labelled source
batch and an unlabelled target batch), so gradients flow into both sides. The
pseudo-label loss trains the student on the teacher's confident predictions for
target images (self-training); the teacher is a constant.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses import _common
from kd_jax.losses import _logit


def _rows(x: jax.typing.ArrayLike) -> jax.Array:
  x = _common.as_float(x)
  return x.reshape(x.shape[0], -1)


def coral(source_feat: jax.typing.ArrayLike,
          target_feat: jax.typing.ArrayLike) -> jax.Array:
  """Deep CORAL: the distance between the two domains' feature covariances.

    L = ||C_s − C_t||²_F / (4 d²),  C = (XᵀX − (1ᵀX)ᵀ(1ᵀX) / n) / (n − 1)

  with `X` the `[n, d]` features of one domain (unbiased covariance, as the paper).

  Args:
    source_feat: `[n_s, ...]` features of source images (flattened per sample).
    target_feat: `[n_t, ...]` features of target images, same width.

  Returns:
    Scalar loss; gradients reach both inputs.

  References:
    Sun and Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation,
    ECCV 2016 Workshops.
  """
  source, target = _rows(source_feat), _rows(target_feat)
  d = source.shape[1]

  def covariance(x):
    centred = x - jnp.mean(x, axis=0, keepdims=True)
    return centred.T @ centred / (x.shape[0] - 1)

  return jnp.sum(jnp.square(covariance(source) - covariance(target))) / (4.0 * d * d)


def mmd(source_feat: jax.typing.ArrayLike, target_feat: jax.typing.ArrayLike,
        kernel_scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> jax.Array:
  """Squared maximum mean discrepancy under a sum of Gaussian kernels.

    MMD² = mean K(s, s') + mean K(t, t') − 2 mean K(s, t),
    K(x, y) = Σ_m exp(−||x − y||² / (m · σ²))

  the biased (V-statistic) estimate over all pairs, `σ²` the mean squared distance
  between all pairs of the joint batch (a constant: no gradient flows through the
  bandwidth), `m` over `kernel_scales` (a multi-kernel family, as DAN).

  Args:
    source_feat: `[n_s, ...]` features of source images.
    target_feat: `[n_t, ...]` features of target images.
    kernel_scales: bandwidth multipliers `m`.

  Returns:
    Scalar loss (≥ 0 up to rounding); gradients reach both inputs.

  References:
    Gretton et al., A Kernel Two-Sample Test, JMLR 2012; Long et al., Learning
    Transferable Features with Deep Adaptation Networks, ICML 2015.
  """
  source, target = _rows(source_feat), _rows(target_feat)
  joint = jnp.concatenate([source, target], axis=0)
  squared = jnp.sum(jnp.square(joint[:, None, :] - joint[None, :, :]), axis=-1)
  n = joint.shape[0]
  bandwidth = jax.lax.stop_gradient(jnp.sum(squared) / (n * n - n))
  kernel = sum(jnp.exp(-squared / (m * bandwidth)) for m in kernel_scales)
  ns = source.shape[0]
  return (jnp.mean(kernel[:ns, :ns]) + jnp.mean(kernel[ns:, ns:])
          - 2.0 * jnp.mean(kernel[:ns, ns:]))


def pseudo_label_per_example(student_logits: jax.typing.ArrayLike,
                             teacher_logits: jax.typing.ArrayLike,
                             threshold: float = 0.9) -> jax.Array:
  """`[B]` values whose mean is `pseudo_label`: masked cross-entropies."""
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  probs = jax.nn.softmax(teacher, axis=-1)
  confident = (jnp.max(probs, axis=-1) >= threshold).astype(student.dtype)
  labels = jnp.argmax(teacher, axis=-1)
  return confident * _logit.cross_entropy_per_example(student, labels)


def pseudo_label(student_logits: jax.typing.ArrayLike,
                 teacher_logits: jax.typing.ArrayLike,
                 threshold: float = 0.9) -> jax.Array:
  """Self-training on the teacher's confident predictions.

    L = mean_b 1[max_k p_t,bk ≥ threshold] · CE(z_s,b, argmax_k p_t,bk)

  averaged over the whole batch (unconfident samples count as zero), as FixMatch.

  Args:
    student_logits: `[B, K]` student logits on target images.
    teacher_logits: `[B, K]` teacher logits on the same (or paired) images.
    threshold: the teacher's softmax confidence a sample needs to be used.

  Returns:
    Scalar loss.

  References:
    Lee, Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method,
    ICML 2013 Workshops; Sohn et al., FixMatch, NeurIPS 2020.
  """
  return jnp.mean(pseudo_label_per_example(student_logits, teacher_logits, threshold))
