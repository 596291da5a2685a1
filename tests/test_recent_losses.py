"""DIST, SRD, SKD, NKD, WKD-L and MLKD against references written from their formulas.

Each reference below is a plain NumPy loop over the formula in the loss's docstring.
The pinned constants are the same losses computed in float64 by the authors' own
PyTorch functions (DIST: hunto/image_classification_sota; SRD: torchdistill's
`SRDLoss`; SKD: torchdistill's `SKDInstanceLoss` + `SKDDirectionLoss`; NKD:
yzd-v/cls_KD `NKDLoss`; WKD-L: JiamingLv/WKD; MLKD: `KD_ours` with KD weight 1).
"""
import jax
from jax.test_util import check_grads
import numpy as np
import pytest

from kd_jax import losses

S3 = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
T3 = np.array([[2.0, 1.0, 0.0], [0.0, -0.5, 3.0]])
S4 = np.array([[1.0, 2.0, 0.5, -0.5], [0.3, -1.0, 2.0, 0.0], [0.0, 0.5, 0.2, 1.5]])
T4 = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, -0.5, 3.0, 0.5], [0.1, 0.2, 0.3, 2.5]])
LABELS = np.array([0, 2, 3])
W = np.array([[1.0, 0.0, 0.7, -0.2], [0.0, 1.0, 0.7, 0.9]])  # [D, K]


@pytest.fixture(autouse=True)
def _x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(s, t, temperature):
  p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
  return np.mean([np.sum(p_t[b] * np.log(p_t[b] / p_s[b])) for b in range(len(s))])


def _pearson(a, b):
  a, b = a - a.mean(), b - b.mean()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))


@pytest.mark.parametrize("temperature, published", [(1.0, 0.5453904563), (4.0, 6.5448370045)])
def test_dist(temperature, published):
  y_s, y_t = _softmax(S3 / temperature), _softmax(T3 / temperature)
  inter = 1 - np.mean([_pearson(y_s[b], y_t[b]) for b in range(2)])
  intra = 1 - np.mean([_pearson(y_s[:, k], y_t[:, k]) for k in range(3)])
  expected = temperature**2 * (2.0 * inter + 0.5 * intra)
  got = losses.dist(S3, T3, beta=2.0, gamma=0.5, temperature=temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  # With B=2 every centred class column is ±(a, -a): intra is only the eps's trace.
  np.testing.assert_allclose(losses.dist(S3, T3, temperature=temperature), published,
                             rtol=1e-9)


@pytest.mark.parametrize("exponent, published", [(1.0, 1.6315063246), (2.0, 1.0561421797),
                                                 (4.0, 0.4807780348)])
def test_srd(exponent, published):
  f_s = np.array([[1.0, 2.0], [0.5, -1.0]])
  f_t = np.array([[1.5, 1.0], [0.0, -1.0]])
  # sum |f_s - f_t|^p: |(-0.5, 1, 0.5, 0)|^p.
  distance = 0.5**exponent + 1.0 + 0.5**exponent
  expected = 2 * np.log(distance) + _kl(S3, T3, 1.0)
  got = losses.srd(f_s, f_t, S3, T3, exponent=exponent)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  np.testing.assert_allclose(got, published, rtol=1e-9)
  # T enters the KL only, without T^2.
  np.testing.assert_allclose(losses.srd(f_s, f_t, S3, T3, exponent=exponent, temperature=4.0),
                             2 * np.log(distance) + _kl(S3, T3, 4.0), rtol=1e-10)


def test_srd_standardized_standardizes_both_features_over_the_batch():
  f_s = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
  f_t = np.array([[1.5, 1.0], [0.0, -1.0], [1.0, 1.0]])
  s, t = np.concatenate([S3, S3[:1]]), np.concatenate([T3, T3[:1]])
  standard = lambda x: (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-4)
  expected = (2 * np.log(np.sum(np.abs(standard(f_s) - standard(f_t)) ** 4))
              + _kl(s, t, 1.0))
  np.testing.assert_allclose(losses.srd_standardized(f_s, f_t, s, t), expected, rtol=1e-9)
  # The feature term alone, as the authors' batch-statistics BatchNorm gives it.
  np.testing.assert_allclose(expected - _kl(s, t, 1.0), 3.4347072701, rtol=1e-9)


def test_skd():
  np.testing.assert_allclose(losses.skd_instance(S3, T3, temperature=4.0), _kl(S3, T3, 4.0),
                             rtol=1e-10)
  z_s = S3 / np.linalg.norm(S3, axis=1, keepdims=True)
  z_t = T3 / np.linalg.norm(T3, axis=1, keepdims=True)
  d = z_t @ z_t.T - z_s @ z_s.T
  covariance = np.cov(d, rowvar=False) + 0.1 * np.eye(2)  # rows are observations
  inverse = np.linalg.inv(covariance)
  expected = np.mean([np.sqrt(d[b] @ inverse @ d[b]) for b in range(2)])
  np.testing.assert_allclose(losses.skd_direction(S3, T3, tikhonov=0.1), expected, rtol=1e-9)
  np.testing.assert_allclose(losses.skd_direction(S3, T3), 0.1939038672, rtol=1e-8)
  np.testing.assert_allclose(losses.skd_instance(S3, T3, 1.0) + losses.skd_direction(S3, T3),
                             0.4391158307, rtol=1e-8)
  grad = jax.grad(lambda z: losses.skd_direction(z, T3))(S3)
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)


def _nkd_reference(s, t, y, temperature, gamma):
  p_s, p_t = _softmax(s), _softmax(t)
  target = -np.mean([p_t[b, y[b]] * np.log(p_s[b, y[b]]) for b in range(len(s))])
  non = 0.0
  for b in range(len(s)):
    others = [k for k in range(s.shape[1]) if k != y[b]]
    q_s, q_t = _softmax(s[b, others] / temperature), _softmax(t[b, others] / temperature)
    non += -np.sum(q_t * np.log(q_s))
  return target + gamma * temperature**2 * non / len(s)


@pytest.mark.parametrize("temperature, gamma, published", [
    (1.0, 1.5, 2.1074620934), (4.0, 1.5, 26.7942756034), (3.0, 3.5, 34.8439857872)])
def test_nkd(temperature, gamma, published):
  got = losses.nkd(S4, T4, LABELS, temperature=temperature, gamma=gamma)
  np.testing.assert_allclose(got, _nkd_reference(S4, T4, LABELS, temperature, gamma),
                             rtol=1e-10)
  np.testing.assert_allclose(got, published, rtol=1e-9)


def test_wkd_cost_matrix():
  w = W / np.linalg.norm(W, axis=0, keepdims=True)
  cosine = w.T @ w
  np.testing.assert_allclose(losses.wkd_cost_matrix(W, kappa=0.0), 1 - cosine, atol=1e-12)
  np.testing.assert_allclose(losses.wkd_cost_matrix(W, kappa=1.0),
                             1 - np.exp(-(1 - cosine)), atol=1e-12)
  np.testing.assert_allclose(losses.wkd_cost_matrix(W)[0, 1], 1 - np.exp(-1.0), rtol=1e-12)


def _wkd_reference(s, t, y, cost, temperature, gamma, lam, iters):
  p_s, p_t = _softmax(s), _softmax(t)
  target = -np.mean([p_t[b, y[b]] * np.log(p_s[b, y[b]]) for b in range(len(s))])
  distances = []
  for b in range(len(s)):
    others = [k for k in range(s.shape[1]) if k != y[b]]
    q_s, q_t = _softmax(s[b, others] / temperature), _softmax(t[b, others] / temperature)
    c = np.maximum(cost[np.ix_(others, others)], 0) + 1e-8
    kernel = np.exp(-c / lam)
    u = np.full(len(others), 1.0 / len(others))
    for _ in range(iters):
      v = q_t / (kernel.T @ u + 1e-8)
      u = q_s / (kernel @ v + 1e-8)
    plan = u[:, None] * kernel * v[None, :]
    distances.append(np.sum(plan * c))
  return target + gamma * np.mean(distances)


def test_wkd_logit():
  cost = np.asarray(losses.wkd_cost_matrix(W))
  got = losses.wkd_logit(S4, T4, LABELS, cost)
  np.testing.assert_allclose(got, _wkd_reference(S4, T4, LABELS, cost, 2.0, 30.0, 0.05, 10),
                             rtol=1e-10)
  np.testing.assert_allclose(got, 0.7485444145, rtol=1e-9)
  # The student's distribution reaches the transport term only through the plan:
  # gradients flow through the Sinkhorn iterations (the authors' gradient, float64).
  grad = jax.grad(lambda z: losses.wkd_logit(z, T4, LABELS, cost))(S4)
  np.testing.assert_allclose(grad[0], [-0.1674435410, 0.2196176382, -0.0914180333,
                                       0.0392439362], atol=1e-9)


def test_mlkd():
  p_t1 = _softmax(T4)
  confidence = p_t1.max(1)
  rho_b = np.mean(confidence <= np.percentile(confidence, 50))  # 2/3
  class_confidence = p_t1.sum(0)
  rho_c = np.mean(class_confidence <= np.percentile(class_confidence, 50))  # 1/2
  assert (rho_b, rho_c) == (2 / 3, 0.5)
  expected = 0.0
  for temperature in (2.0, 3.0, 4.0, 5.0, 6.0):
    p_s, p_t = _softmax(S4 / temperature), _softmax(T4 / temperature)
    expected += (rho_b * temperature**2 * _kl(S4, T4, temperature)
                 + rho_c * np.sum((p_t.T @ p_t - p_s.T @ p_s) ** 2) / 4
                 + rho_b * np.sum((p_t @ p_t.T - p_s @ p_s.T) ** 2) / 3)
  got = losses.mlkd(S4, T4)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  np.testing.assert_allclose(got, 0.6752829664, rtol=1e-9)


@pytest.mark.parametrize("loss", [
    lambda s, t: losses.dist(s, t), lambda s, t: losses.skd_instance(s, t),
    lambda s, t: losses.skd_direction(s, t), lambda s, t: losses.nkd(s, t, LABELS),
    lambda s, t: losses.mlkd(s, t),
    lambda s, t: losses.wkd_logit(s, t, LABELS, losses.wkd_cost_matrix(W))])
def test_finite_at_the_teacher_and_the_teacher_is_a_constant(loss):
  value = float(loss(T4, T4))
  grad = np.asarray(jax.grad(lambda z: loss(z, T4))(T4))
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  assert not np.any(np.asarray(jax.grad(lambda t: loss(S4, t))(T4)))  # teacher: constant


# --- CTKD, FSP, AB: values of the authors' code (RepDistiller, zhengli97/CTKD) -------

CTKD_S = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 1.5, 2.0]])
CTKD_T = np.array([[3.0, 1.0, 0.0, -2.0], [-1.0, 0.5, 2.5, 1.0]])


def test_ctkd_temperature_and_reversed_gradient():
  from kd_jax import losses as L
  module = L.CTKD(steps_per_epoch=10)
  variables = module.init(jax.random.key(0), CTKD_S, CTKD_T, step=0)
  assert float(variables["params"]["temperature_logit"]) == 1.0
  temperature = 1 + 20 / (1 + np.exp(-1.0))  # 15.6212
  value = module.apply(variables, CTKD_S, CTKD_T, step=0)
  np.testing.assert_allclose(value, temperature**2 * _kl(CTKD_S, CTKD_T, temperature),
                             rtol=1e-10)
  np.testing.assert_allclose(value, 0.6630490241, rtol=1e-9)
  # Epoch 5 (steps 40..49): strength (1 - cos(pi/2)) / 2 = 0.5; the temperature's
  # gradient of 0.9 · L is reversed: -0.5 · 0.9 · dL/dT · dT/dp.
  grad = jax.grad(lambda v: 0.9 * module.apply(v, CTKD_S, CTKD_T, step=45))(variables)
  np.testing.assert_allclose(grad["params"]["temperature_logit"], 2.8003705018e-03,
                             rtol=1e-8)
  # From epoch 10 on, full strength; the student's gradient is plain KD's at T.
  grad = jax.grad(lambda v: 0.9 * module.apply(v, CTKD_S, CTKD_T, step=500))(variables)
  np.testing.assert_allclose(grad["params"]["temperature_logit"], 5.6007410036e-03,
                             rtol=1e-8)
  student_grad = jax.grad(lambda z: module.apply(variables, z, CTKD_T, step=0))(CTKD_S)
  np.testing.assert_allclose(student_grad, jax.grad(
      lambda z: losses.kd(z, CTKD_T, temperature))(CTKD_S), rtol=1e-10)


def test_fsp():
  a = np.arange(64).reshape(2, 4, 4, 2)
  b = np.arange(96).reshape(2, 4, 4, 3)
  c = np.arange(24).reshape(2, 2, 2, 3)
  s = [((a % 7) - 3) / 4, np.cos(0.3 * b), np.sin(0.9 * c)]
  t = [((a % 5) - 2) / 3, np.sin(0.5 * b), np.cos(1.1 * c)]

  def matrix(bottom, top):  # the larger map average-pooled 2×2 to the smaller
    if bottom.shape[1] > top.shape[1]:
      bottom = bottom.reshape(2, 2, 2, 2, 2, -1).mean(axis=(2, 4))
    h, w = top.shape[1:3]
    return np.einsum("bhwj,bhwi->bji", top, bottom) / (h * w)

  expected = sum(np.mean((matrix(s[k], s[k + 1]) - matrix(t[k], t[k + 1])) ** 2)
                 for k in range(2))
  np.testing.assert_allclose(losses.fsp(s, t), expected, rtol=1e-10)
  np.testing.assert_allclose(losses.fsp(s, t), 0.025315535896377816 + 0.11219425537966793,
                             rtol=1e-9)


def test_activation_boundary():
  x = np.arange(24).reshape(2, 2, 2, 3)
  s, t = ((x % 7) - 3) / 2, ((x * 5 % 11) - 5) / 4
  penalty = lambda s, t: np.sum(np.where(t > 0, np.maximum(1 - s, 0) ** 2,
                                         np.maximum(s + 1, 0) ** 2))
  assert penalty(s, t) == 39.25
  np.testing.assert_allclose(losses.activation_boundary([s], [t]), 39.25 / 2 / 1000 * 3)
  got = losses.activation_boundary([s, 2 * s, s - 0.5], [t, t, -t])
  np.testing.assert_allclose(got, (0.25 * 39.25 + 0.5 * 83.0 + 59.75) / 2 / 1000 * 3)
  np.testing.assert_allclose(got, 0.16659375)


# --- DIST+ and FT ---------------------------------------------------------------------


def test_dist_plus():
  rng = np.random.default_rng(0)
  f_s, f_t = rng.normal(size=(2, 1, 2, 3)), rng.normal(size=(2, 1, 2, 3))  # NHWC
  p_s = _softmax(f_s.reshape(4, 3) / 2.0)
  p_t = _softmax(f_t.reshape(4, 3) / 2.0)
  channel = 1 - np.mean([_pearson(p_s[n], p_t[n]) for n in range(4)])
  spatial = 1 - np.mean([_pearson(p_s[:, c], p_t[:, c]) for c in range(3)])
  expected = float(losses.dist(S3, T3, temperature=4.0)) + 0.5 * channel + 3.0 * spatial
  got = losses.dist_plus(f_s, f_t, S3, T3, temperature=4.0, channel_weight=0.5,
                         spatial_weight=3.0, feature_temperature=2.0)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  np.testing.assert_allclose(jax.jit(losses.dist_plus)(f_s, f_t, S3, T3),
                             losses.dist_plus(f_s, f_t, S3, T3), rtol=1e-12)
  # Equal maps relate perfectly: only the logit part remains.
  np.testing.assert_allclose(losses.dist_plus(f_t, f_t, S3, T3), losses.dist(S3, T3),
                             atol=1e-5)  # up to the eps of the correlations
  # A [B, D] embedding is a 1 x 1 map; a 2x2 map is pooled to its teacher's 1x1.
  e_s, e_t = f_s[:, 0, 0], f_t[:, 0, 0]
  np.testing.assert_allclose(
      losses.dist_plus(np.broadcast_to(e_s[:, None, None], (2, 2, 2, 3)), e_t, S3, T3),
      losses.dist_plus(e_s, e_t, S3, T3), rtol=1e-10)
  assert not np.any(np.asarray(jax.grad(
      lambda t: losses.dist_plus(f_s, t, S3, T3))(f_t)))  # teacher: constant
  with pytest.raises(ValueError, match="adapter='conv1x1'"):
    losses.dist_plus(f_s, f_t[..., :2], S3, T3)


def test_factor_transfer():
  # One position per row of two channels: mean_c f^2 = (1+9)/2, (0+4)/2 for the student,
  # 0, (1+1)/2 for the teacher; normalised: (5, 2)/sqrt(29) and (0, 1).
  s = np.array([[[[1.0, 3.0], [0.0, 2.0]]]])  # [1, 1, 2, 2]
  t = np.array([[[[0.0, 0.0], [1.0, 1.0]]]])
  np.testing.assert_allclose(losses.factor(s), [[5 / np.sqrt(29), 2 / np.sqrt(29)]])
  l1 = (5 / np.sqrt(29) + 1 - 2 / np.sqrt(29)) / 2
  np.testing.assert_allclose(losses.factor_transfer(s, t), l1, rtol=1e-12)
  l2 = ((5 / np.sqrt(29)) ** 2 + (2 / np.sqrt(29) - 1) ** 2) / 2
  np.testing.assert_allclose(losses.factor_transfer(s, t, p=2), l2, rtol=1e-12)
  np.testing.assert_allclose(jax.jit(losses.factor_transfer)(s, t), l1, rtol=1e-12)
  # Pooled to the teacher's single position, every factor is 1: no loss.
  assert float(losses.factor_transfer(np.abs(s) + 1, t[:, :, 1:])) == 0.0
  assert not np.any(np.asarray(jax.grad(
      lambda x: losses.factor_transfer(s, x))(t + 0.5)))  # teacher: constant
  check_grads(lambda x: losses.factor_transfer(x, t), (s + 0.1,), order=1,
                            modes=["rev"])
