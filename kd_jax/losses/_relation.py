"""Relational losses between batches of embeddings: CC, RKD and PKT.

They compare how samples relate to one another inside a batch rather than the
embeddings themselves. Reductions follow RepDistiller's `distiller_zoo`.
"""
import jax
import jax.numpy as jnp

from kd_jax.losses import _common


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def correlation_congruence(student_emb: jax.typing.ArrayLike,
                           teacher_emb: jax.typing.ArrayLike) -> jax.Array:
  """Correlation congruence, in the form RepDistiller ships (`Correlation`).

  With `d_b = |e_s,b - e_t,b|` (elementwise) for consecutive samples,

    L = 1 / (B - 1) sum_{b=1}^{B-1} sum_k d_b,k d_{b+1},k.

  This is the simplified version its authors sent to RepDistiller, not the
  kernel-based correlation matrices of the paper; it is what RepDistiller's
  published CC numbers (weight 0.02) were obtained with.

  Args:
    student_emb: `[B, D]` student embeddings (after the embedding head).
    teacher_emb: `[B, D]` teacher embeddings (no gradient). Higher-rank inputs
      are flattened per sample.

  Returns:
    Scalar loss.

  References:
    Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019.
  """
  student, teacher = _common.as_student_and_teacher(student_emb, teacher_emb)
  delta = jnp.abs(_flatten(student) - _flatten(teacher))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=-1))


def _pairwise_distances(x: jax.Array, eps: float) -> jax.Array:
  """`[B, D]` -> `[B, B]` Euclidean distances, zero diagonal (RKD's `pdist`).

  `sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i . x_j, eps))` off the diagonal; the
  clamp keeps the square root and its gradient finite for coincident points.
  """
  squared_norms = jnp.sum(jnp.square(x), axis=-1)
  squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * (x @ x.T)
  distances = jnp.sqrt(jnp.maximum(squared, eps))
  return jnp.where(jnp.eye(x.shape[0], dtype=jnp.bool_), 0.0, distances)


def _normalized_distances(x: jax.Array, eps: float) -> jax.Array:
  """Pairwise distances divided by the mean of the positive ones."""
  distances = _pairwise_distances(x, eps)
  positive = distances > 0
  mean = (jnp.sum(jnp.where(positive, distances, 0.0))
          / jnp.maximum(jnp.sum(positive), 1))
  return distances / mean


def _angles(x: jax.Array) -> jax.Array:
  """`[B, D]` -> `[B, B, B]`: cosine of the angle j-i-k, `<u_ij, u_ik>`.

  `u_ij` is the unit vector from `x_i` to `x_j` (zero for `i == j`).
  """
  directions = _common.l2_normalize(x[None, :, :] - x[:, None, :], axis=-1)
  return jnp.einsum("ijd,ikd->ijk", directions, directions)


def _smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean Huber loss with threshold 1 (torch `F.smooth_l1_loss`)."""
  difference = jnp.abs(x - y)
  return jnp.mean(jnp.where(difference < 1.0, 0.5 * jnp.square(difference),
                            difference - 0.5))


def rkd(student_emb: jax.typing.ArrayLike,
        teacher_emb: jax.typing.ArrayLike,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        eps: float = 1e-12) -> jax.Array:
  """Relational KD: match normalised pairwise distances and triplet angles.

  With `d_ij = ||e_i - e_j||` divided by the mean of the positive `d_ij`,
  `a_ijk = <(e_j - e_i) / ||e_j - e_i||, (e_k - e_i) / ||e_k - e_i||>` and
  `h` the Huber (smooth L1, threshold 1) loss averaged over all entries,

    L = distance_weight h(d_s, d_t) + angle_weight h(a_s, a_t).

  The means run over all `B^2` distance entries (diagonal included) and all
  `B^3` angle entries, as in RepDistiller's `RKDLoss`. Memory is `O(B^2 D)`.

  Args:
    student_emb: `[B, D_s]` student embeddings; higher-rank inputs are
      flattened per sample.
    teacher_emb: `[B, D_t]` teacher embeddings (no gradient).
    distance_weight: weight of the distance term.
    angle_weight: weight of the angle term.
    eps: lower clamp of the squared distances before the square root.

  Returns:
    Scalar loss.

  References:
    Park et al., Relational Knowledge Distillation, CVPR 2019.
  """
  student, teacher = _common.as_student_and_teacher(student_emb, teacher_emb)
  student, teacher = _flatten(student), _flatten(teacher)
  distance_loss = _smooth_l1(_normalized_distances(student, eps),
                             _normalized_distances(teacher, eps))
  angle_loss = _smooth_l1(_angles(student), _angles(teacher))
  return distance_weight * distance_loss + angle_weight * angle_loss


def _conditional_probabilities(x: jax.Array, eps: float) -> jax.Array:
  """`[B, D]` -> `[B, B]` rows of `(cos + 1) / 2` normalised to sum to one."""
  norms = _common.safe_sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  x = x / (norms + eps)
  similarity = (x @ x.T + 1.0) / 2.0
  return similarity / jnp.sum(similarity, axis=-1, keepdims=True)


def pkt(student_emb: jax.typing.ArrayLike,
        teacher_emb: jax.typing.ArrayLike,
        eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer with the cosine-similarity kernel.

  With `c_ij = (cos(e_i, e_j) + 1) / 2` and `P_ij = c_ij / sum_j c_ij`
  (each embedding divided by `||e|| + eps` for the cosine),

    L = 1 / B^2 sum_ij P_t,ij log((P_t,ij + eps) / (P_s,ij + eps)).

  Args:
    student_emb: `[B, D_s]` student embeddings; higher-rank inputs are
      flattened per sample.
    teacher_emb: `[B, D_t]` teacher embeddings (no gradient).
    eps: stabiliser of the normalisation and of the logarithm.

  Returns:
    Scalar loss.

  References:
    Passalis and Tefas, Learning Deep Representations with Probabilistic
    Knowledge Transfer, ECCV 2018.
  """
  student, teacher = _common.as_student_and_teacher(student_emb, teacher_emb)
  student_probs = _conditional_probabilities(_flatten(student), eps)
  teacher_probs = _conditional_probabilities(_flatten(teacher), eps)
  return jnp.mean(teacher_probs * jnp.log(
      (teacher_probs + eps) / (student_probs + eps)))
