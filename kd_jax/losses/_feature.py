"""Losses between intermediate feature maps (NHWC): FitNet, AT, SP and NST.

Each function takes one student/teacher pair; sum over several taps in the
caller. Reductions follow RepDistiller's `distiller_zoo`, so the published loss
weights (e.g. AT's 1000, SP's 3000, NST's 50) carry over.
"""
import jax
import jax.numpy as jnp

from kd_jax.losses import _common


def fitnet(student_feat: jax.typing.ArrayLike,
           teacher_feat: jax.typing.ArrayLike) -> jax.Array:
  """FitNets hint loss: mean squared error over all elements.

    L = mean((f_s - f_t)^2)

  The regressor that maps the student's width to the teacher's is a model
  parameter applied by the caller before this loss.

  Args:
    student_feat: student features (after the adapter), any shape.
    teacher_feat: teacher features of the same shape (no gradient).

  Returns:
    Scalar loss.

  References:
    Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015.
  """
  student, teacher = _common.as_student_and_teacher(student_feat, teacher_feat)
  if student.shape != teacher.shape:
    raise ValueError(f"fitnet needs equal shapes, got {student.shape} and "
                     f"{teacher.shape}; apply an adapter to the student first")
  return jnp.mean(jnp.square(student - teacher))


def _attention_map(feat: jax.Array, p: float) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H*W]`: channel mean of `f^p`, L2-normalised."""
  attention = jnp.mean(feat**p, axis=-1).reshape(feat.shape[0], -1)
  return _common.l2_normalize(attention, axis=-1)


def attention_transfer(student_feat: jax.typing.ArrayLike,
                       teacher_feat: jax.typing.ArrayLike,
                       p: float = 2) -> jax.Array:
  """Attention transfer: squared distance between normalised attention maps.

  With `a(f) = vec(mean_c f^p) / ||vec(mean_c f^p)||_2` (one vector of `H*W`
  spatial positions per sample),

    L = 1 / (B H W) sum_b ||a(f_s,b) - a(f_t,b)||^2.

  When the spatial sizes differ, the larger map is first average-pooled down to
  the smaller one (integer factors). Channel counts may differ. RepDistiller
  multiplies this by beta = 1000 outside the loss; so should the caller.

  Args:
    student_feat: `[B, H_s, W_s, C_s]` student map.
    teacher_feat: `[B, H_t, W_t, C_t]` teacher map (no gradient).
    p: power applied to the activations before the channel mean.

  Returns:
    Scalar loss.

  References:
    Zagoruyko and Komodakis, Paying More Attention to Attention, ICLR 2017.
  """
  student, teacher = _common.as_student_and_teacher(student_feat, teacher_feat)
  student, teacher = _common.match_spatial(student, teacher)
  return jnp.mean(
      jnp.square(_attention_map(student, p) - _attention_map(teacher, p)))


def _normalized_gram(feat: jax.Array) -> jax.Array:
  """`[B, ...]` -> `[B, B]` batch Gram matrix with L2-normalised rows."""
  flat = feat.reshape(feat.shape[0], -1)
  return _common.l2_normalize(flat @ flat.T, axis=-1)


def similarity_preserving(student_feat: jax.typing.ArrayLike,
                          teacher_feat: jax.typing.ArrayLike) -> jax.Array:
  """Similarity-preserving KD: match the row-normalised batch Gram matrices.

  With `F` the `[B, D]` flattened features, `G = F F^T` and each row of `G`
  divided by its L2 norm,

    L = ||G_s - G_t||_F^2 / B^2.

  The Gram matrix does not depend on the order of the flattened feature
  positions, so NHWC and NCHW inputs give the same value; student and teacher
  may have different shapes beyond the batch axis.

  Args:
    student_feat: `[B, ...]` student features.
    teacher_feat: `[B, ...]` teacher features (no gradient).

  Returns:
    Scalar loss.

  References:
    Tung and Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019.
  """
  student, teacher = _common.as_student_and_teacher(student_feat, teacher_feat)
  batch = student.shape[0]
  difference = _normalized_gram(student) - _normalized_gram(teacher)
  return jnp.sum(jnp.square(difference)) / (batch * batch)


def _channel_maps(feat: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C, H*W]`: channel spatial maps, L2-normalised."""
  batch, height, width, channels = feat.shape
  maps = feat.reshape(batch, height * width, channels).transpose(0, 2, 1)
  return _common.l2_normalize(maps, axis=-1)


def _mean_polynomial_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over the batch and all channel pairs of `(a_i . b_j)^2`."""
  return jnp.mean(jnp.square(jnp.einsum("bin,bjn->bij", a, b)))


def nst(student_feat: jax.typing.ArrayLike,
        teacher_feat: jax.typing.ArrayLike) -> jax.Array:
  """Neuron selectivity transfer: MMD between channel maps, polynomial kernel.

  Each channel's spatial activation map is a sample: `x_i = f[..., i]` flattened
  over the `H*W` positions and L2-normalised. With `k(x, y) = (x . y)^2` and the
  means taken over the batch and all channel pairs,

    L = mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j).

  When the spatial sizes differ, the larger map is first average-pooled down to
  the smaller one (integer factors). Channel counts may differ.

  Args:
    student_feat: `[B, H_s, W_s, C_s]` student map.
    teacher_feat: `[B, H_t, W_t, C_t]` teacher map (no gradient).

  Returns:
    Scalar loss.

  References:
    Huang and Wang, Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer, arXiv:1707.01219, 2017.
  """
  student, teacher = _common.as_student_and_teacher(student_feat, teacher_feat)
  student, teacher = _common.match_spatial(student, teacher)
  student, teacher = _channel_maps(student), _channel_maps(teacher)
  return (_mean_polynomial_kernel(teacher, teacher)
          + _mean_polynomial_kernel(student, student)
          - 2.0 * _mean_polynomial_kernel(student, teacher))
