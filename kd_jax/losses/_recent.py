"""Losses of 2022–2026 (DIST, DIST+, SRD, SKD, NKD, WKD-L, MLKD, CTKD) and the rest of the
CRD canon (FSP, AB, FT).

Each is reduced as its authors' public code reduces it (or, where the method's
signature follows torchdistill's re-implementation, as that does), so published
weights and temperatures carry over; every docstring says where the two differ. As in
the rest of `kd_jax.losses`, the teacher is a constant and features are NHWC or
`[B, D]`.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.losses import _common
from kd_jax.losses import _logit
from kd_jax.models.layers import torch_default_init


def _batch_kl(student_logits, teacher_logits, temperature) -> jax.Array:
  """`1/B sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T))`, the teacher a constant."""
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  log_p_s = jax.nn.log_softmax(student / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))


def _pearson_rows(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Per-row Pearson correlation of `a` and `b` `[N, M]`: the cosine of the rows
  centred on their means, `eps` added to the product of the two norms."""
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  norms = (_common.safe_sqrt(jnp.sum(a * a, axis=1))
           * _common.safe_sqrt(jnp.sum(b * b, axis=1)))
  return jnp.sum(a * b, axis=1) / (norms + eps)


def dist(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
         beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> jax.Array:
  """DIST: relations of the softened predictions instead of their exact values.

  With `Y = softmax(z / T)` (`[B, K]`) and `rho(a, b)` the Pearson correlation of
  two vectors (centred cosine, eps 1e-8 added to the norms' product),

    inter = 1 - 1/B sum_b rho(Y_s[b, :], Y_t[b, :])   (classes of each sample)
    intra = 1 - 1/K sum_k rho(Y_s[:, k], Y_t[:, k])   (samples of each class)
    L = T^2 (beta inter + gamma intra).

  The authors weight the whole loss by 2 on top of CE 1, with T=4 on CIFAR-100 and
  T=1 on ImageNet (`weight=2.0` in a config's term).

  References:
    Huang, You, Wang, Qian and Xu, Knowledge Distillation from A Stronger Teacher,
    NeurIPS 2022 (code: hunto/image_classification_sota, `dist_kd.py`).
  """
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  y_s = jax.nn.softmax(student / temperature, axis=-1)
  y_t = jax.nn.softmax(teacher / temperature, axis=-1)
  inter = 1.0 - jnp.mean(_pearson_rows(y_s, y_t))
  intra = 1.0 - jnp.mean(_pearson_rows(y_s.T, y_t.T))
  return temperature**2 * (beta * inter + gamma * intra)


def srd(student_features: jax.typing.ArrayLike, teacher_features: jax.typing.ArrayLike,
        student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        exponent: float = 1.0, temperature: float = 1.0) -> jax.Array:
  """SRD: a log-distance between projected features plus a batch-mean KL.

    L = 2 log sum_{b,d} |f_s[b, d] - f_t[b, d]|^p
        + 1/B sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T))

  over every element of the two feature arrays (one log of the whole sum), with no
  T^2 on the KL (torchdistill's `SRDLoss`; the authors' code multiplies the KL by
  T^2, which is the same at their T=1). The features are the caller's: in the
  authors' ImageNet recipe the student's pooled last stage goes through a linear
  projector to the teacher's width, both are batch-standardised (BatchNorm without
  affine, eps 1e-4), and p=4, T=1 — what the objective's `srd` method does.

  References:
    Miles and Mikolajczyk, Understanding the Role of the Projector in Knowledge
    Distillation, AAAI 2024 (code: roymiles/Simple-Recipe-Distillation).
  """
  student, teacher = _common.as_student_and_teacher(student_features, teacher_features)
  distance = jnp.sum(jnp.abs(student - teacher) ** exponent)
  return 2.0 * jnp.log(distance) + _batch_kl(student_logits, teacher_logits, temperature)


def batch_standardize(x: jax.typing.ArrayLike, eps: float = 1e-4) -> jax.Array:
  """Each feature of `[B, ..., D]` standardised over the batch (biased variance): the
  training-mode output of a BatchNorm without scale and shift."""
  x = _common.as_float(x)
  mean = jnp.mean(x, axis=0, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=0, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + eps)


def srd_standardized(student_features: jax.typing.ArrayLike,
                     teacher_features: jax.typing.ArrayLike,
                     student_logits: jax.typing.ArrayLike,
                     teacher_logits: jax.typing.ArrayLike,
                     exponent: float = 4.0, temperature: float = 1.0) -> jax.Array:
  """`srd` on batch-standardised features, at the authors' ImageNet p=4, T=1.

  The objective's `srd` method: each device standardises its own shard of the batch,
  as the authors' unsynchronised BatchNorm does under DDP.
  """
  return srd(batch_standardize(student_features),
             batch_standardize(jax.lax.stop_gradient(teacher_features)),
             student_logits, teacher_logits, exponent=exponent, temperature=temperature)


def skd_instance(student_logits: jax.typing.ArrayLike,
                 teacher_logits: jax.typing.ArrayLike,
                 temperature: float = 4.0) -> jax.Array:
  """Streamlined KD's instance term: `1/B sum_b KL(softmax(z_t/T) || softmax(z_s/T))`.

  No T^2 factor (torchdistill's `SKDInstanceLoss`); the authors' code multiplies by
  T^2 — `kd` is that form.

  References:
    Jeong, Lee and Choi, Streamlined Knowledge Distillation, CVPR 2026 (code:
    HyunJunSik/StreamLined).
  """
  return _batch_kl(student_logits, teacher_logits, temperature)


def skd_direction(student_logits: jax.typing.ArrayLike,
                  teacher_logits: jax.typing.ArrayLike,
                  tikhonov: float = 0.1) -> jax.Array:
  """Streamlined KD's direction term: Mahalanobis norms of the Gramians' difference.

  With `Z` the L2-normalised logits (rows), `G = Z Z^T` (`[B, B]`) and
  `D = G_t - G_s`, each row `d_b` of D is measured from zero under the unbiased
  covariance of D's rows plus `tikhonov · I`:

    S = cov(rows of D) + tikhonov I,   L = 1/B sum_b sqrt(d_b^T S^{-1} d_b).

  Gradients flow through S too. As torchdistill's `SKDDirectionLoss`; the authors'
  code also divides both Gramians by the number of classes.

  References:
    Jeong, Lee and Choi, Streamlined Knowledge Distillation, CVPR 2026.
  """
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  z_s, z_t = _common.l2_normalize(student), _common.l2_normalize(teacher)
  d = z_t @ z_t.T - z_s @ z_s.T
  batch = d.shape[0]
  centred = d - jnp.mean(d, axis=0, keepdims=True)
  covariance = centred.T @ centred / (batch - 1) + tikhonov * jnp.eye(batch, dtype=d.dtype)
  factor = jax.scipy.linalg.cho_factor(covariance, lower=True)
  solved = jax.scipy.linalg.cho_solve(factor, d.T).T  # rows: S^{-1} d_b
  return jnp.mean(_common.safe_sqrt(jnp.sum(d * solved, axis=1)))


def _non_target(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`[B, K-1]`: each row without its label's column, the other columns in order."""
  num_classes = logits.shape[-1]
  keep = jnp.arange(num_classes - 1)[None, :]
  columns = keep + (keep >= labels[:, None])  # skip the target column
  return jnp.take_along_axis(logits, columns, axis=1)


def _target_term(student: jax.Array, teacher: jax.Array, labels: jax.Array) -> jax.Array:
  """`-1/B sum_b p_t[b, y_b] log p_s[b, y_b]` at temperature 1 (NKD's and WKD's)."""
  log_p_s = jax.nn.log_softmax(student, axis=-1)
  p_t = jax.nn.softmax(teacher, axis=-1)
  index = labels[:, None]
  return -jnp.mean(jnp.take_along_axis(p_t, index, axis=1)
                   * jnp.take_along_axis(log_p_s, index, axis=1))


def nkd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
        labels: jax.typing.ArrayLike, temperature: float = 1.0,
        gamma: float = 1.5) -> jax.Array:
  """Normalized KD: the target class and the renormalised non-target classes apart.

  With `p = softmax(z)` and `q = softmax(z' / T)` over the K-1 non-target logits `z'`,

    L = -1/B sum_b p_t[y_b] log p_s[y_b]
        - gamma T^2 / B sum_b sum_{k != y_b} q_t,k log q_s,k,

  a cross-entropy (the teacher's entropy is not subtracted), as the authors'
  `NKDLoss`. ImageNet: T=1, gamma=1.5; the authors' CIFAR-100 config: T=3, gamma=3.5.

  References:
    Yang, Zeng, Li, Zhang, Yuan and Li, From Knowledge Distillation to
    Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
    Customized Soft Labels, ICCV 2023 (code: yzd-v/cls_KD).
  """
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  labels = jnp.asarray(labels)
  log_q_s = jax.nn.log_softmax(_non_target(student, labels) / temperature, axis=-1)
  q_t = jax.nn.softmax(_non_target(teacher, labels) / temperature, axis=-1)
  non_target = -jnp.mean(jnp.sum(q_t * log_q_s, axis=-1))
  return _target_term(student, teacher, labels) + gamma * temperature**2 * non_target


def wkd_cost_matrix(classifier_weights: jax.typing.ArrayLike,
                    kappa: float = 1.0) -> jax.Array:
  """WKD-L's class-to-class cost from a classifier's weights `[D, K]` (Dense layout).

  With `c_ij` the cosine similarity of class vectors `w_i`, `w_j` (columns),
  `C = 1 - exp(-kappa (1 - c))`, or `1 - c` when `kappa == 0` — the authors' "fc"
  cost (their released configs load a CKA-based matrix instead).

  References:
    Lv, Yang, Li and Wang, Wasserstein Distance Rivals Kullback-Leibler Divergence
    for Knowledge Distillation, NeurIPS 2024 (code: JiamingLv/WKD).
  """
  weights = _common.l2_normalize(jax.lax.stop_gradient(_common.as_float(classifier_weights)).T)
  cost = 1.0 - weights @ weights.T
  return cost if kappa == 0 else 1.0 - jnp.exp(-kappa * cost)


def wkd_logit(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
              labels: jax.typing.ArrayLike, cost_matrix: jax.typing.ArrayLike,
              temperature: float = 2.0, gamma: float = 30.0,
              sinkhorn_lambda: float = 0.05, sinkhorn_iters: int = 10) -> jax.Array:
  """WKD-L: NKD's target term plus the Wasserstein distance of the non-target classes.

  For each sample, `q_s`, `q_t` are the softened (T) distributions over the K-1
  non-target classes and `C'` the cost matrix without the target's row and column
  (`relu(C') + 1e-8`). Sinkhorn with kernel `exp(-C'/lambda)`, `u = 1/(K-1)` and
  `sinkhorn_iters` rounds of `v = q_t / (K^T u + 1e-8)`, `u = q_s / (K v + 1e-8)` gives
  the plan `pi = diag(u) K diag(v)`, and

    L = -1/B sum_b p_t[y_b] log p_s[y_b] + gamma / B sum_b sum_ij pi_ij C'_ij.

  Gradients flow through the Sinkhorn iterations (the student's distribution enters
  the second term only through the plan). No T^2. The authors decay gamma along a
  cosine in training (a term's `schedule`); ImageNet R34->R18: T=2, gamma=30;
  CIFAR-100 resnet32x4->resnet8x4: T=8, gamma=600.

  References:
    Lv, Yang, Li and Wang, Wasserstein Distance Rivals Kullback-Leibler Divergence
    for Knowledge Distillation, NeurIPS 2024 (code: JiamingLv/WKD).
  """
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  labels = jnp.asarray(labels)
  cost = jax.lax.stop_gradient(_common.as_float(cost_matrix))
  num_classes = cost.shape[0]
  q_s = jax.nn.softmax(_non_target(student, labels) / temperature, axis=-1)
  q_t = jax.nn.softmax(_non_target(teacher, labels) / temperature, axis=-1)
  keep = jnp.arange(num_classes - 1)[None, :]
  index = keep + (keep >= labels[:, None])  # [B, K-1] the non-target classes
  sub = cost[index[:, :, None], index[:, None, :]]  # [B, K-1, K-1]
  sub = jnp.maximum(sub, 0.0) + 1e-8
  kernel = jnp.exp(-sub / sinkhorn_lambda)
  u = jnp.full_like(q_s, 1.0 / (num_classes - 1))
  v = u
  for _ in range(int(sinkhorn_iters)):
    v = q_t / (jnp.einsum("bij,bi->bj", kernel, u) + 1e-8)
    u = q_s / (jnp.einsum("bij,bj->bi", kernel, v) + 1e-8)
  plan = u[:, :, None] * kernel * v[:, None, :]
  wasserstein = jnp.mean(jnp.sum(plan * sub, axis=(1, 2)))
  return _target_term(student, teacher, labels) + gamma * wasserstein


def _percentile_mask_fraction(values: jax.Array, percentile: float) -> jax.Array:
  """The share of `values` at or below their `percentile` (linear interpolation)."""
  threshold = jnp.percentile(values, percentile)
  return jnp.mean((values <= threshold).astype(values.dtype))


def mlkd(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
         temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
         confidence_percentile: float = 50.0) -> jax.Array:
  """MLKD's loss on one view: instance, class and batch level at several temperatures.

  With `P = softmax(z / T)` (`[B, K]`), `kd_T` Hinton's KD at T (× T^2),

    L = sum_T [ rho_b kd_T + rho_c ||P_t^T P_t - P_s^T P_s||_F^2 / K
                + rho_b ||P_t P_t^T - P_s P_s^T||_F^2 / B ],

  where rho_b is the share of samples whose teacher confidence (max of softmax(z_t))
  is at most its `confidence_percentile`-th percentile and rho_c the share of classes
  whose summed teacher probability is: the authors multiply each (scalar) loss by
  those masks and average, which scales it by the share. The authors' training step
  adds KD on a strongly augmented view (see `kd_jax.objective`); on ImageNet they use
  temperatures (1, 2, 3, 5, 6).

  References:
    Jin, Wang and Lin, Multi-Level Logit Distillation, CVPR 2023 (code:
    Jin-Ying/Multi-Level-Logit-Distillation, `KD_ours.py`).
  """
  student, teacher = _common.as_student_and_teacher(student_logits, teacher_logits)
  batch, num_classes = student.shape
  p_t1 = jax.nn.softmax(teacher, axis=-1)
  rho_b = _percentile_mask_fraction(jnp.max(p_t1, axis=-1), confidence_percentile)
  rho_c = _percentile_mask_fraction(jnp.sum(p_t1, axis=0), confidence_percentile)
  total = jnp.zeros((), student.dtype)
  for temperature in temperatures:
    p_s = jax.nn.softmax(student / temperature, axis=-1)
    p_t = jax.nn.softmax(teacher / temperature, axis=-1)
    kd_t = _logit.kd(student, teacher, temperature)
    class_level = jnp.sum(jnp.square(p_t.T @ p_t - p_s.T @ p_s)) / num_classes
    batch_level = jnp.sum(jnp.square(p_t @ p_t.T - p_s @ p_s.T)) / batch
    total = total + rho_b * kd_t + rho_c * class_level + rho_b * batch_level
  return total




@jax.custom_vjp
def gradient_reversal(x: jax.Array, strength: jax.Array) -> jax.Array:
  """The identity forward; the backward pass multiplies the gradient by `-strength`."""
  return x


def _reversal_fwd(x, strength):
  return x, strength


def _reversal_bwd(strength, g):
  return -strength * g, jnp.zeros_like(strength)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


class CTKD(nn.Module):
  """Curriculum temperature KD: Hinton KD at a learned, adversarially trained T.

  One scalar parameter `p` (initialised to 1) gives `T = t_start + t_range ·
  sigmoid(p)` (T in (1, 21) by default, 15.62 at the start); `p` trains with the
  student's optimizer through a gradient-reversal layer, so it *raises* the KD loss,
  with a strength that grows along a cosine from 0 to `max_reversal` over the first
  `loops` epochs (epochs counted from 1, constant within an epoch):

    lambda(e) = max_reversal · (1 - cos(min(e, loops) · pi / loops)) / 2,
    L = T^2 / B sum_b KL(softmax(z_t / T) || softmax(z_s / T)).

  The student's gradient is the ordinary KD gradient at T. The authors' CIFAR-100
  recipe: 0.1·CE + 0.9·CTKD, loops 10.

  Attributes:
    num_train, bn_axis_name: unused (module-method protocol).
    steps_per_epoch: set by the objective, to count epochs from the step.
    t_start, t_range, max_reversal, loops: as above.

  References:
    Li, Li, Yang, Song, Zhang, Li and Yang, Curriculum Temperature for Knowledge
    Distillation, AAAI 2023 (code: zhengli97/CTKD, global temperature).
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  steps_per_epoch: int = 1
  t_start: float = 1.0
  t_range: float = 20.0
  max_reversal: float = 1.0
  loops: float = 10.0

  @nn.compact
  def __call__(self, student_logits, teacher_logits, *, labels=None, index=None,
               train: bool = True, step=None):
    p = self.param("temperature_logit", nn.initializers.ones, ())
    epoch = (jnp.asarray(0 if step is None else step) // max(1, self.steps_per_epoch)) + 1
    progress = jnp.minimum(epoch, self.loops) / self.loops
    strength = self.max_reversal * (1.0 - jnp.cos(jnp.pi * progress)) / 2.0
    temperature = self.t_start + self.t_range * jax.nn.sigmoid(
        gradient_reversal(p, strength.astype(p.dtype)))
    return _logit.kd(student_logits, teacher_logits, temperature)


def fsp_matrix(bottom: jax.Array, top: jax.Array) -> jax.Array:
  """`[B, C_top, C_bottom]`: `1/(HW) sum_hw top[b, h, w, j] bottom[b, h, w, i]`, the
  larger NHWC map first average-pooled to the smaller one's size."""
  bottom, top = _common.match_spatial(_common.as_float(bottom), _common.as_float(top))
  height, width = top.shape[1:3]
  return jnp.einsum("bhwj,bhwi->bji", top, bottom) / (height * width)


def fsp(student_features: Sequence[jax.typing.ArrayLike],
        teacher_features: Sequence[jax.typing.ArrayLike]) -> jax.Array:
  """FSP: the flow between consecutive feature maps, matched.

  For consecutive pairs (f_k, f_k+1) of each network's maps, the FSP matrices
  (`fsp_matrix`) are compared by their mean squared difference; the pairs' losses are
  summed (RepDistiller's `FSP` with weight 1 per pair). RepDistiller uses this loss
  alone in a 30-epoch stage before training with CE; here it is a term like any
  other. Student and teacher maps must have equal channels.

  References:
    Yim, Joo, Bae and Kim, A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning, CVPR 2017.
  """
  student = [_common.as_float(f) for f in student_features]
  teacher = [jax.lax.stop_gradient(_common.as_float(f)) for f in teacher_features]
  if len(student) != len(teacher) or len(student) < 2:
    raise ValueError(f"fsp needs the same number (>= 2) of student and teacher maps, got "
                     f"{len(student)} and {len(teacher)}")
  total = jnp.zeros((), student[0].dtype)
  for k in range(len(student) - 1):
    g_s, g_t = fsp_matrix(student[k], student[k + 1]), fsp_matrix(teacher[k], teacher[k + 1])
    if g_s.shape != g_t.shape:
      raise ValueError(f"fsp pair {k}: student matrix {g_s.shape[1:]} but teacher "
                       f"{g_t.shape[1:]}; pick taps of equal channels")
    total = total + jnp.mean(jnp.square(g_s - g_t))
  return total


def activation_boundary(student_features: Sequence[jax.typing.ArrayLike],
                        teacher_features: Sequence[jax.typing.ArrayLike],
                        margin: float = 1.0) -> jax.Array:
  """AB: the student's pre-activations on the teacher's side of each ReLU boundary.

  Per element, `relu(m - s)^2` where the teacher's pre-activation t > 0 and
  `relu(s + m)^2` where t <= 0; layer k of L is weighted `2^(k - L + 1)` (the deepest
  1), and each layer's sum over all elements is divided by the batch size and scaled
  by 3/1000, as RepDistiller's `ABLoss`. Pass pre-activation maps (`preact_stage_k`
  taps) of equal shapes. RepDistiller uses it alone in a 30-epoch stage before
  training with CE; here it is a term like any other.

  References:
    Heo, Lee, Yun and Choi, Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons, AAAI 2019.
  """
  student = [_common.as_float(f) for f in student_features]
  teacher = [jax.lax.stop_gradient(_common.as_float(f)) for f in teacher_features]
  layers = len(student)
  total = jnp.zeros((), student[0].dtype)
  for k, (s, t) in enumerate(zip(student, teacher)):
    penalty = jnp.where(t > 0, jax.nn.relu(margin - s) ** 2, jax.nn.relu(s + margin) ** 2)
    total = total + 2.0 ** (k - layers + 1) * jnp.sum(penalty) / s.shape[0] / 1000 * 3
  return total


# --- DIST+ ----------------------------------------------------------------------------


def _as_map(x: jax.Array) -> jax.Array:
  """An NHWC map as is; a `[B, D]` embedding as a `[B, 1, 1, D]` map."""
  return x[:, None, None, :] if x.ndim == 2 else x


def dist_feature_relations(student_features: jax.typing.ArrayLike,
                           teacher_features: jax.typing.ArrayLike,
                           temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """DIST's two relations on feature maps: `(channel, spatial)`.

  With `P = softmax_c(F / T)` the channel distribution at each position of an NHWC map
  (flattened to `[B·H·W, C]`; the larger map first average-pooled to the smaller's size),

    channel = 1 - 1/(BHW) sum_n rho(P_s[n, :], P_t[n, :])   (channels at each position)
    spatial = 1 - 1/C     sum_c rho(P_s[:, c], P_t[:, c])   (positions of each channel)

  `rho` as in `dist`. Student and teacher maps need the same channels.
  """
  student, teacher = _common.as_student_and_teacher(student_features, teacher_features)
  student, teacher = _common.match_spatial(_as_map(student), _as_map(teacher))
  if student.shape[-1] != teacher.shape[-1]:
    raise ValueError(f"dist_plus compares maps of equal channels, got student "
                     f"{student.shape[-1]} and teacher {teacher.shape[-1]}; add "
                     "adapter='conv1x1' to the term")
  channels = teacher.shape[-1]
  p_s = jax.nn.softmax(student.reshape(-1, channels) / temperature, axis=-1)
  p_t = jax.nn.softmax(teacher.reshape(-1, channels) / temperature, axis=-1)
  return (1.0 - jnp.mean(_pearson_rows(p_s, p_t)),
          1.0 - jnp.mean(_pearson_rows(p_s.T, p_t.T)))


def dist_plus(student_features: jax.typing.ArrayLike,
              teacher_features: jax.typing.ArrayLike,
              student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
              beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
              channel_weight: float = 1.0, spatial_weight: float = 1.0,
              feature_temperature: float = 1.0) -> jax.Array:
  """DIST+: DIST on the logits plus DIST's relations on a feature map.

    L = dist(z_s, z_t; beta, gamma, T)
        + channel_weight · channel + spatial_weight · spatial

  with `channel` and `spatial` the relations of `dist_feature_relations` at
  `feature_temperature`: the correlation of the softened channel distribution at each
  position (DIST's inter-class relation, channels in place of classes) and of each
  channel's values over all positions of the batch (its intra-class relation).

  What this is based on: the DIST+ paper's text was not available to check its
  feature-level formula. The feature terms follow the authors' public dense-prediction
  code (hunto/DIST_KD, `segmentation/losses/dist_kd.py`: an NCHW map flattened to
  `[B·H·W, C]`, softmax over channels at T = 1, inter relation over rows, intra over
  columns, no T²), applied to an intermediate feature map instead of the per-pixel
  logits; DIST+'s teacher acclimation (adapting the teacher during distillation) is
  not implemented. `[B, D]` embeddings count as `1 x 1` maps.

  References:
    Huang, You, Wang, Qian and Xu, DIST+: Knowledge Distillation From a Stronger
    Adaptive Teacher, IEEE TPAMI 47(7), 2025; Knowledge Distillation from A Stronger
    Teacher, NeurIPS 2022.
  """
  channel, spatial = dist_feature_relations(student_features, teacher_features,
                                            feature_temperature)
  return (dist(student_logits, teacher_logits, beta=beta, gamma=gamma,
               temperature=temperature)
          + channel_weight * channel + spatial_weight * spatial)


# --- FT -------------------------------------------------------------------------------

# The variable collection of a `FactorTransfer` term holding its pre-trained, frozen
# paraphraser (the optimizer never sees it; it is checkpointed with the train state).
PARAPHRASER = "paraphraser"


def factor(features: jax.typing.ArrayLike, exponent: float = 2.0) -> jax.Array:
  """`[B, H·W]`: RepDistiller's factor of an NHWC map, `normalize(mean_c f^exponent)`
  (L2 over the positions, torch `F.normalize`)."""
  features = _common.as_float(features)
  pooled = jnp.mean(features ** exponent, axis=-1)
  return _common.l2_normalize(pooled.reshape(pooled.shape[0], -1))


def factor_transfer(student_factor: jax.typing.ArrayLike,
                    teacher_factor: jax.typing.ArrayLike, p: int = 1,
                    exponent: float = 2.0) -> jax.Array:
  """FT's loss between the translator's and the paraphraser's factors (NHWC).

    L = mean_{b,n} |factor(F_s)[b, n] - factor(F_t)[b, n]|^p,
    factor(F) = normalize_n(1/C sum_c F[..., c]^exponent)  (`factor`),

  the larger map first average-pooled to the smaller's size: RepDistiller's
  `FactorTransfer(p1=2, p2=1)` exactly. The paper instead L2-normalises the whole
  flattened factor `vec(F)` (no channel mean) and compares with the p-norm of the
  difference; RepDistiller's reduction turns factors into attention-like maps, and
  its weight (200) is tuned for it.

  References:
    Kim, Park and Kwak, Paraphrasing Complex Network: Network Compression via Factor
    Transfer, NeurIPS 2018; RepDistiller `distiller_zoo/FT.py`.
  """
  student, teacher = _common.as_student_and_teacher(student_factor, teacher_factor)
  student, teacher = _common.match_spatial(student, teacher)
  difference = factor(student, exponent) - factor(teacher, exponent)
  return jnp.mean(jnp.abs(difference) if p == 1 else difference ** p)


def _conv_stack(x, widths, transpose=False, batch_norm=False, train=False,
                bn_axis_name=None, prefix="conv"):
  """3x3 convolutions (stride 1, SAME), each with optional BatchNorm then
  LeakyReLU(0.1), as RepDistiller's paraphraser and translator."""
  layer = nn.ConvTranspose if transpose else nn.Conv
  for i, width in enumerate(widths):
    x = layer(width, (3, 3), padding="SAME", kernel_init=torch_default_init,
              name=f"{prefix}_{i}")(x)
    if batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=bn_axis_name, name=f"{prefix}_bn_{i}")(x)
    x = nn.leaky_relu(x, 0.1)
  return x


class Paraphraser(nn.Module):
  """FT's paraphraser: a convolutional autoencoder of the teacher's map.

  Encoder: three 3x3 convolutions C -> C -> kC -> kC; decoder: three 3x3 transposed
  convolutions kC -> kC -> C -> C; LeakyReLU(0.1) after each, no BatchNorm
  (RepDistiller's `Paraphraser(t_shape, k=0.5, use_bn=False)`). Returns the factor
  and, with `decode`, the reconstruction `(factor, reconstruction)`.
  """
  channels: int
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, decode: bool = True):
    width = int(self.channels * self.rate)
    factor_ = _conv_stack(x, (self.channels, width, width), prefix="encoder")
    if not decode:
      return factor_
    return factor_, _conv_stack(factor_, (width, self.channels, self.channels),
                                transpose=True, prefix="decoder")


class Translator(nn.Module):
  """FT's translator: three 3x3 convolutions C_s -> C_s -> kC_t -> kC_t, each with
  BatchNorm and LeakyReLU(0.1) (RepDistiller's `Translator(s_shape, t_shape, k=0.5)`)."""
  factor_channels: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    return _conv_stack(x, (x.shape[-1], self.factor_channels, self.factor_channels),
                       batch_norm=True, train=train, bn_axis_name=self.bn_axis_name,
                       prefix="translator")


class FactorTransfer(nn.Module):
  """FT: the student's translated factor against the teacher's paraphrased one.

    L = factor_transfer(translator(F_s), paraphraser.encode(F_t); p, exponent)

  The translator trains with the student; the paraphraser (`PARAPHRASER` collection)
  is pre-trained on the teacher's map by its own phase (`kd_jax.phase`: 30 epochs of
  the reconstruction MSE, `ParaphraserOnTeacher`) before the phase that uses it, then
  frozen: no gradient reaches it and the optimizer never sees it (RepDistiller keeps
  it out of the optimizer and in eval mode; it has no BatchNorm).

  Attributes:
    rate: factor channels over the teacher's channels (the paper's k).
    p: the power of the factor difference (RepDistiller's p2; 1: absolute).
    exponent: the power averaged over channels (RepDistiller's p1).

  References:
    Kim, Park and Kwak, Paraphrasing Complex Network: Network Compression via Factor
    Transfer, NeurIPS 2018; RepDistiller `distiller_zoo/FT.py`, `models/util.py`.
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  rate: float = 0.5
  p: int = 1
  exponent: float = 2.0

  @nn.compact
  def __call__(self, student, teacher, *, labels=None, index=None, train=False):
    del labels, index
    student, teacher = _common.as_student_and_teacher(student, teacher)
    paraphraser = Paraphraser(teacher.shape[-1], self.rate, parent=None)
    weights = self.variable(PARAPHRASER, "params", lambda: paraphraser.init(
        self.make_rng("params"), teacher, decode=False)["params"])
    teacher_factor = paraphraser.apply({"params": jax.lax.stop_gradient(weights.value)},
                                       teacher, decode=False)
    student_factor = Translator(int(teacher.shape[-1] * self.rate), self.bn_axis_name,
                                name="translator")(student, train)
    return factor_transfer(student_factor, jax.lax.stop_gradient(teacher_factor),
                           p=self.p, exponent=self.exponent)


class ParaphraserOnTeacher(nn.Module):
  """The model FT's pre-training phase trains: the teacher (its variables under
  `teacher`, kept frozen by the phase) with a `Paraphraser` (`paraphraser`) on its
  tap `tap`. Returns the teacher's logits and taps (constants) with `reconstruction`,
  the paraphraser's reconstruction of the tap, which the phase regresses onto the
  teacher's tap by mean squared error (RepDistiller's `nn.MSELoss`)."""
  teacher: nn.Module
  tap: str
  rate: float = 0.5
  bn_axis_name: Optional[str] = None  # the phase's protocol; the teacher runs frozen

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    logits, taps = self.teacher(x, train=False)
    features = jax.lax.stop_gradient(_common.as_float(taps[self.tap]))
    _, reconstruction = Paraphraser(features.shape[-1], self.rate,
                                    name="paraphraser")(features)
    logits, taps = jax.lax.stop_gradient((logits, taps))
    return logits, {**taps, "reconstruction": reconstruction}
