"""Tests for kd_jax.losses: NumPy reference values, gradients, jit, invariances.

The NumPy implementations below are written from the papers / reference code in
float64 and never call the JAX code. Feature maps are NHWC; the NumPy versions
work in NCHW, as the PyTorch references do, so layout handling is tested too.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses

# ---------------------------------------------------------------------------
# Independent NumPy references (float64).
# ---------------------------------------------------------------------------


def np_softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_kl_rows(p, q):
  """sum_c p log(p / q) per row, with 0 log 0 = 0."""
  safe_p = np.where(p > 0, p, 1.0)
  return np.sum(np.where(p > 0, p * np.log(safe_p / q), 0.0), axis=-1)


def np_cross_entropy(logits, labels, label_smoothing=0.0):
  batch, classes = logits.shape
  q = np.full((batch, classes), label_smoothing / classes)
  q[np.arange(batch), labels] += 1.0 - label_smoothing
  return -np.mean(np.sum(q * np.log(np_softmax(logits)), axis=-1))


def np_kd(s, t, temperature=4.0):
  kl = np_kl_rows(np_softmax(t / temperature), np_softmax(s / temperature))
  return kl.mean() * temperature**2


def np_standardize(z, eps=1e-7):
  std = z.std(-1, ddof=1, keepdims=True)
  return (z - z.mean(-1, keepdims=True)) / (eps + std)


def np_lskd(s, t, temperature=2.0):
  return np_kd(np_standardize(s), np_standardize(t), temperature)


def np_dkd(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0):
  """DKD as in the paper: the non-target distribution drops the gt class."""
  total = 0.0
  for zs, zt, y in zip(s, t, labels):
    ps, pt = np_softmax(zs / temperature), np_softmax(zt / temperature)
    bs = np.array([ps[y], ps.sum() - ps[y]])
    bt = np.array([pt[y], pt.sum() - pt[y]])
    rest = np.arange(len(zs)) != y
    tckd = np_kl_rows(bt, bs)
    nckd = np_kl_rows(pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum())
    total += alpha * tckd + beta * nckd
  return total / len(labels) * temperature**2


def np_fitnet(s, t):
  return np.mean((s - t)**2)


def to_nchw(x):
  return np.transpose(x, (0, 3, 1, 2))


def np_pool_nchw(f, size):
  """Block average of an NCHW map to size x size (adaptive_avg_pool2d)."""
  k = f.shape[2] // size
  out = np.zeros(f.shape[:2] + (size, size))
  for i in range(size):
    for j in range(size):
      block = f[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
      out[:, :, i, j] = block.mean(axis=(2, 3))
  return out


def np_match(s, t):
  s, t = to_nchw(s), to_nchw(t)
  size = min(s.shape[2], t.shape[2])
  return np_pool_nchw(s, size), np_pool_nchw(t, size)


def np_attention_transfer(s, t, p=2):
  s, t = np_match(s, t)

  def attention(f):
    a = (f**p).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)

  return np.mean((attention(s) - attention(t))**2)


def np_similarity_preserving(s, t):
  batch = len(s)

  def gram(f):
    f = to_nchw(f).reshape(batch, -1)
    g = f @ f.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)

  return np.sum((gram(s) - gram(t))**2) / batch**2


def np_correlation_congruence(s, t):
  delta = np.abs(s - t)
  return sum(delta[b] @ delta[b + 1] for b in range(len(s) - 1)) / (len(s) - 1)


def np_huber(x, y):
  d = np.abs(x - y)
  return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def np_rkd(s, t, distance_weight=25.0, angle_weight=50.0):

  def distances(e):
    d = np.linalg.norm(e[:, None, :] - e[None, :, :], axis=-1)
    return d / d[~np.eye(len(e), dtype=bool)].mean()

  def angles(e):
    n = len(e)
    a = np.zeros((n, n, n))
    for i in range(n):
      for j in range(n):
        for k in range(n):
          if j != i and k != i:
            u, v = e[j] - e[i], e[k] - e[i]
            a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return a

  return (distance_weight * np_huber(distances(s), distances(t))
          + angle_weight * np_huber(angles(s), angles(t)))


def np_pkt(s, t, eps=1e-7):

  def probabilities(e):
    e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
    c = (e @ e.T + 1) / 2
    return c / c.sum(axis=1, keepdims=True)

  ps, pt = probabilities(s), probabilities(t)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_nst(s, t):
  s, t = np_match(s, t)

  def channel_maps(f):
    f = f.reshape(f.shape[0], f.shape[1], -1)
    return f / np.linalg.norm(f, axis=2, keepdims=True)

  def mean_kernel(a, b):
    return np.mean(np.einsum("bin,bjn->bij", a, b)**2)

  s, t = channel_maps(s), channel_maps(t)
  return mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)


# ---------------------------------------------------------------------------
# The cases: loss, NumPy reference, and inputs (student, teacher, extras).
# ---------------------------------------------------------------------------

BATCH, CLASSES = 6, 7


def _inputs(seed, student_shape, teacher_shape, teacher_shift=0.5):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=student_shape)
  teacher = rng.normal(size=teacher_shape) + teacher_shift
  return student.astype(np.float32), teacher.astype(np.float32)


LABELS = np.array([0, 3, 6, 2, 2, 5])
LOGITS = _inputs(0, (BATCH, CLASSES), (BATCH, CLASSES))
LOGITS = (3.0 * LOGITS[0], 4.0 * LOGITS[1])
FEATURES = _inputs(1, (BATCH, 4, 4, 3), (BATCH, 4, 4, 5))
SAME_SHAPE_FEATURES = _inputs(2, (BATCH, 4, 4, 3), (BATCH, 4, 4, 3))
LARGER_STUDENT = _inputs(3, (BATCH, 8, 8, 3), (BATCH, 4, 4, 5))
LARGER_TEACHER = _inputs(4, (BATCH, 2, 2, 3), (BATCH, 4, 4, 5))
EMBEDDINGS = _inputs(5, (BATCH, 5), (BATCH, 9))
SAME_WIDTH_EMBEDDINGS = _inputs(6, (BATCH, 8), (BATCH, 8))

# name -> (loss(student, teacher), numpy_reference(student, teacher), inputs)
CASES = {
    "cross_entropy": (
        lambda s, t: losses.cross_entropy(s, LABELS),
        lambda s, t: np_cross_entropy(s, LABELS), LOGITS),
    "cross_entropy_smoothed": (
        lambda s, t: losses.cross_entropy(s, LABELS, label_smoothing=0.1),
        lambda s, t: np_cross_entropy(s, LABELS, 0.1), LOGITS),
    "kd": (losses.kd, np_kd, LOGITS),
    "kd_t1": (functools.partial(losses.kd, temperature=1.0),
              functools.partial(np_kd, temperature=1.0), LOGITS),
    "lskd": (losses.lskd, np_lskd, LOGITS),
    "dkd": (lambda s, t: losses.dkd(s, t, LABELS),
            lambda s, t: np_dkd(s, t, LABELS), LOGITS),
    "dkd_weights": (
        lambda s, t: losses.dkd(s, t, LABELS, alpha=0.5, beta=2.0,
                                temperature=2.0),
        lambda s, t: np_dkd(s, t, LABELS, 0.5, 2.0, 2.0), LOGITS),
    "fitnet": (losses.fitnet, np_fitnet, SAME_SHAPE_FEATURES),
    "attention_transfer": (losses.attention_transfer, np_attention_transfer,
                           FEATURES),
    "attention_transfer_p4": (
        functools.partial(losses.attention_transfer, p=4),
        functools.partial(np_attention_transfer, p=4), FEATURES),
    "attention_transfer_pool_student": (
        losses.attention_transfer, np_attention_transfer, LARGER_STUDENT),
    "attention_transfer_pool_teacher": (
        losses.attention_transfer, np_attention_transfer, LARGER_TEACHER),
    "similarity_preserving": (losses.similarity_preserving,
                              np_similarity_preserving, LARGER_STUDENT),
    "correlation_congruence": (losses.correlation_congruence,
                               np_correlation_congruence,
                               SAME_WIDTH_EMBEDDINGS),
    "rkd": (losses.rkd, np_rkd, EMBEDDINGS),
    "rkd_weights": (
        functools.partial(losses.rkd, distance_weight=1.0, angle_weight=3.0),
        functools.partial(np_rkd, distance_weight=1.0, angle_weight=3.0),
        EMBEDDINGS),
    "pkt": (losses.pkt, np_pkt, EMBEDDINGS),
    "nst": (losses.nst, np_nst, FEATURES),
    "nst_pool_student": (losses.nst, np_nst, LARGER_STUDENT),
    "nst_pool_teacher": (losses.nst, np_nst, LARGER_TEACHER),
}

# Losses that vanish when the student equals the teacher (not cross-entropy).
DISTILLATION_CASES = sorted(n for n in CASES if "cross_entropy" not in n)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reference(name):
  loss_fn, reference_fn, (student, teacher) = CASES[name]
  value = jax.jit(loss_fn)(student, teacher)
  assert value.shape == () and value.dtype == jnp.float32
  expected = reference_fn(student.astype(np.float64),
                          teacher.astype(np.float64))
  assert expected > 1e-3  # a non-trivial value
  np.testing.assert_allclose(float(value), expected, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_matches_eager(name):
  loss_fn, _, (student, teacher) = CASES[name]
  np.testing.assert_allclose(jax.jit(loss_fn)(student, teacher),
                             loss_fn(student, teacher), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_wrt_student(name):
  loss_fn, _, (student, teacher) = CASES[name]
  with jax.enable_x64(True):
    student = jnp.asarray(student, jnp.float64)
    teacher = jnp.asarray(teacher, jnp.float64)
    check_grads(jax.jit(lambda s: loss_fn(s, teacher)), (student,), order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DISTILLATION_CASES)
def test_zero_when_student_equals_teacher(name):
  loss_fn, _, (student, _) = CASES[name]
  value, gradient = jax.jit(jax.value_and_grad(loss_fn))(student, student)
  np.testing.assert_allclose(float(value), 0.0, atol=1e-6)
  assert np.all(np.isfinite(gradient))
  np.testing.assert_allclose(gradient, 0.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reduced_precision_inputs_give_float32(name):
  loss_fn, _, (student, teacher) = CASES[name]
  value = jax.jit(loss_fn)(jnp.asarray(student, jnp.bfloat16),
                          jnp.asarray(teacher, jnp.bfloat16))
  assert value.shape == () and value.dtype == jnp.float32


@pytest.mark.parametrize("name", DISTILLATION_CASES)
def test_no_gradient_reaches_the_teacher(name):
  loss_fn, _, (student, teacher) = CASES[name]
  gradient = jax.jit(jax.grad(loss_fn, argnums=1))(student, teacher)
  np.testing.assert_array_equal(gradient, 0.0)


# ---------------------------------------------------------------------------
# Hand-computed values and invariances.
# ---------------------------------------------------------------------------


def test_kd_hand_computed():
  # Two classes, T = 2. Row 1: teacher logits (2 ln 3, 0) / T = (ln 3, 0), so
  # p_t = (3/4, 1/4); student logits (0, 0), so p_s = (1/2, 1/2).
  #   KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2)
  #      = 3/4 ln 3 - ln 2 = 0.1308120...
  # Row 2: student == teacher, KL = 0.
  # Loss = T^2 * mean(KL) = 4 * 0.1308120 / 2 = 0.2616240.
  student = jnp.array([[0.0, 0.0], [1.0, -1.0]])
  teacher = jnp.array([[2.0 * math.log(3.0), 0.0], [1.0, -1.0]])
  expected = 4.0 * (0.75 * math.log(3.0) - math.log(2.0)) / 2.0
  np.testing.assert_allclose(losses.kd(student, teacher, temperature=2.0),
                             expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 0.2616240, rtol=1e-6)


def test_cross_entropy_hand_computed():
  # Uniform logits over 2 classes: -ln(1/2) = ln 2, with or without smoothing.
  logits = jnp.zeros((3, 2))
  labels = jnp.array([0, 1, 1])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(
      losses.cross_entropy(logits, labels, label_smoothing=0.2), math.log(2.0),
      rtol=1e-6)


def test_dkd_with_two_classes_is_kd():
  # With two classes the non-target distribution has a single class, so NCKD
  # vanishes, and the binary target/rest split is the full distribution, so
  # TCKD equals KD.
  student, teacher = _inputs(7, (BATCH, 2), (BATCH, 2))
  labels = np.array([0, 1, 0, 1, 1, 0])
  np.testing.assert_allclose(
      losses.dkd(student, teacher, labels, alpha=1.0, beta=8.0,
                 temperature=3.0),
      losses.kd(student, teacher, temperature=3.0), rtol=1e-5)


def test_dkd_is_finite_for_a_confident_teacher():
  # p_t(gt) rounds to 1 in float32; the log-space target/rest split keeps
  # log(1 - p_t(gt)) finite.
  student, teacher = LOGITS
  teacher = 200.0 * jax.nn.one_hot(LABELS, CLASSES)
  value, gradient = jax.jit(jax.value_and_grad(losses.dkd))(student, teacher,
                                                             LABELS)
  assert np.isfinite(value) and np.all(np.isfinite(gradient))


def test_lskd_is_invariant_to_logit_shift_and_scale():
  student, teacher = LOGITS
  np.testing.assert_allclose(losses.lskd(3.0 * student + 1.0, teacher - 2.0),
                             losses.lskd(student, teacher), rtol=1e-4)


def test_lskd_gradient_is_finite_for_constant_logits():
  student = jnp.zeros((BATCH, CLASSES))
  gradient = jax.jit(jax.grad(losses.lskd))(student, LOGITS[1])
  assert np.all(np.isfinite(gradient))


def test_similarity_preserving_ignores_feature_layout():
  # The batch Gram matrix does not depend on how features are flattened, so
  # NHWC and NCHW inputs give the same loss.
  student, teacher = LARGER_STUDENT
  np.testing.assert_allclose(
      losses.similarity_preserving(student, teacher),
      losses.similarity_preserving(to_nchw(student), to_nchw(teacher)),
      rtol=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.attention_transfer, losses.nst])
def test_spatial_pooling_is_symmetric(loss_fn):
  # Whichever side is larger is pooled, and both losses are symmetric, so
  # swapping the arguments gives the same value.
  small, large = _inputs(8, (BATCH, 2, 2, 4), (BATCH, 8, 8, 6))
  np.testing.assert_allclose(loss_fn(small, large), loss_fn(large, small),
                             rtol=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.attention_transfer, losses.nst])
def test_non_integer_pooling_factor_is_rejected(loss_fn):
  student, teacher = _inputs(9, (BATCH, 6, 6, 3), (BATCH, 4, 4, 3))
  with pytest.raises(ValueError, match="integer multiples"):
    loss_fn(student, teacher)


def test_rkd_gradient_is_finite_for_coincident_embeddings():
  # Two identical students: the off-diagonal distance is 0 there, where sqrt
  # and the direction normalisation are not differentiable.
  student, teacher = EMBEDDINGS
  student = student.copy()
  student[1] = student[0]
  value, gradient = jax.jit(jax.value_and_grad(losses.rkd))(student, teacher)
  assert np.isfinite(value) and np.all(np.isfinite(gradient))


def test_pkt_gradient_is_finite_for_a_zero_embedding():
  student, teacher = EMBEDDINGS
  student = student.copy()
  student[2] = 0.0
  value, gradient = jax.jit(jax.value_and_grad(losses.pkt))(student, teacher)
  assert np.isfinite(value) and np.all(np.isfinite(gradient))


def test_fitnet_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="adapter"):
    losses.fitnet(*FEATURES)
