"""Distillation methods with learned parts or state, as Flax modules: VID, CRD,
ReviewKD and class-prior matching.

Every method is a `flax.linen.Module` with the fields `num_train` (the size of the
training split) and `bn_axis_name` (the data-parallel axis inside the train step,
None outside it), its hyper-parameters as fields with the reference defaults, and

    __call__(student, teacher, *, labels, index, train) -> scalar loss.

Parameters train with the student; the other collections (`batch_stats`, `memory`,
`priors`) live in the train state and change only when `train=True`. Under data
parallelism each state update is computed from the batch all-gathered over
`bn_axis_name`, so every device keeps the same state, equal to the state a single
device reaches on the whole batch.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _common
from kd_jax.models.layers import torch_default_init

# PyTorch's `kaiming_uniform_(a=1)` (ReviewKD's ABF convolutions): U(±sqrt(3 / fan_in)).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_HIGHEST = jax.lax.Precision.HIGHEST


def _torch_bias_init(fan_in: int):
  """PyTorch's default bias init of Conv2d / Linear: U(±1 / sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _all_gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """`x` of every device along `axis_name`, concatenated on axis 0 (`x` if None)."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _as_map(x: jax.Array) -> jax.Array:
  """NHWC maps unchanged; `[B, D]` embeddings as `[B, 1, 1, D]` maps."""
  return x.reshape(x.shape[0], 1, 1, -1) if x.ndim == 2 else x


def _pooling_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of PyTorch's `adaptive_avg_pool` along one axis.

  Output `i` averages inputs `floor(i in / out) <= j < ceil((i + 1) in / out)`.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_average_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's `adaptive_avg_pool2d` of an NHWC map to `height` x `width`.

  Unlike `_common.average_pool_to`, the sizes need not divide: output cell `i`
  averages the input cells `floor(i H / h) .. ceil((i + 1) H / h) - 1`.
  """
  if x.shape[1:3] == (height, width):
    return x
  rows = jnp.asarray(_pooling_matrix(x.shape[1], height), x.dtype)
  cols = jnp.asarray(_pooling_matrix(x.shape[2], width), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x, precision=_HIGHEST)


def _resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's `F.interpolate(mode='nearest')` of an NHWC map: source `floor(i in / out)`."""
  if x.shape[1:3] == (height, width):
    return x
  rows = (np.arange(height) * x.shape[1]) // height
  cols = (np.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


# --- VID ------------------------------------------------------------------------------


class VID(nn.Module):
  """Variational information distillation: a Gaussian likelihood of the teacher's map.

  A regressor `mu` (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no biases) maps the
  student map to the teacher's channels; each teacher channel `c` gets a learned
  variance `sigma_c^2 = softplus(alpha_c) + eps`, with `alpha` initialised so that
  `sigma^2 = init_pred_var`. The loss is the negative log-likelihood without its
  constant, averaged over all `B C H W` elements:

    L = mean_{b,h,w,c} 1/2 [ (mu(f_s)_bhwc - f_t,bhwc)^2 / sigma_c^2 + log sigma_c^2 ].

  When the spatial sizes differ, the larger map is first average-pooled down to the
  smaller one (integer factors; the reference's `adaptive_avg_pool2d`), before the
  regressor as in the reference.

  Attributes:
    num_train: unused (module-method protocol).
    bn_axis_name: unused (module-method protocol).
    mid_channels: width of the regressor's hidden layers; None -> the teacher's
      channels (RepDistiller builds `VIDLoss(s_c, t_c, t_c)`).
    init_pred_var: initial variance `sigma^2`.
    eps: lower bound added to the variance.

  Call args: student `[B, H_s, W_s, C_s]`, teacher `[B, H_t, W_t, C_t]` (no gradient);
  labels, index, train are unused. Returns the scalar loss.

  References:
    Ahn, Hu, Damianou, Lawrence, Dai, Variational Information Distillation for
    Knowledge Transfer, CVPR 2019; RepDistiller `distiller_zoo/VID.py`.
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  mid_channels: Optional[int] = None
  init_pred_var: float = 5.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, student, teacher, *, labels=None, index=None, train=False):
    del labels, index, train
    student, teacher = _common.as_student_and_teacher(student, teacher)
    student, teacher = _common.match_spatial(student, teacher)
    channels = teacher.shape[-1]
    hidden = self.mid_channels or channels
    x = student
    for i, width in enumerate((hidden, hidden, channels)):
      if i:
        x = nn.relu(x)
      x = nn.Conv(width, (1, 1), use_bias=False, kernel_init=torch_default_init,
                  name=f"regressor_{i}")(x)
    alpha = self.param(
        "alpha", nn.initializers.constant(np.log(np.expm1(self.init_pred_var - self.eps))),
        (channels,))
    variance = jax.nn.softplus(alpha) + self.eps
    return jnp.mean(0.5 * (jnp.square(x - teacher) / variance + jnp.log(variance)))


# --- CRD ------------------------------------------------------------------------------

_NCE_EPS = 1e-7  # RepDistiller's `eps` in ContrastLoss.


def contrast_loss(scores: jax.Array, num_data: int) -> jax.Array:
  """CRD's NCE loss (the paper's Eq. 18) on normalised scores of one anchor side.

  `scores[:, 0]` is the positive pair's `P = exp(v . m / T) / Z`, `scores[:, 1:]` the
  `K` negatives'. With noise distribution `P_n = 1 / N` and `c = K P_n`,

    L = -1/B sum_b [ log(P_b0 / (P_b0 + c + eps)) + sum_k log(c / (P_bk + c + eps)) ].

  Args:
    scores: `[B, K + 1]` positive scores (positive first).
    num_data: `N`, the number of training examples (rows of the memory).

  Returns:
    Scalar loss.
  """
  batch, negatives = scores.shape[0], scores.shape[1] - 1
  noise = negatives / float(num_data)
  positive, negative = scores[:, 0], scores[:, 1:]
  log_d1 = jnp.log(positive / (positive + noise + _NCE_EPS))
  log_d0 = jnp.log(noise / (negative + noise + _NCE_EPS))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / batch


def _momentum_update(memory: jax.Array, index: jax.Array, value: jax.Array,
                     momentum: float) -> jax.Array:
  """Rows `index` of `memory` <- normalise(momentum · row + (1 - momentum) · value);
  indices past the last row are dropped (rows another device holds)."""
  rows = memory[index] * momentum + value * (1.0 - momentum)
  return memory.at[index].set(_common.l2_normalize(rows).astype(memory.dtype),
                              mode="drop")


class CRD(nn.Module):
  """Contrastive representation distillation with memory banks of past embeddings.

  Both embeddings are projected to `feat_dim` and L2-normalised: `v_s = g_s(f_s)`,
  `v_t = g_t(f_t)` (a linear layer each). Two memory banks `M_s, M_t` (`[N, feat_dim]`,
  `N = num_train`) hold one vector per training example. Each example `i` is
  contrasted with its own row (positive) and `K = nce_k` rows drawn uniformly:

    P_s(i, j) = exp(v_s,i . M_t[j] / T) / Z_s,   P_t(i, j) = exp(v_t,i . M_s[j] / T) / Z_t,

  (memories are constants), with `Z = N · mean(exp(...))` estimated on the first
  training batch and then fixed. The loss is `contrast_loss(P_s) + contrast_loss(P_t)`.
  After each training call the batch's rows become
  `M[i] <- normalise(nce_m · M[i] + (1 - nce_m) · v_i)`.

  State (collection 'memory'): `student` and `teacher` banks (initialised
  U(±1 / sqrt(feat_dim / 3)) as the reference), `z_student`, `z_teacher` (-1 until
  set), and `key`, `draws`: the negatives of a call are drawn from
  `fold_in(key, draws)` with `draws` counting training calls, so the draws are
  deterministic and survive a checkpoint/resume. Under data parallelism the
  negatives of the whole global batch are drawn and each device takes its rows, and
  embeddings and indices are all-gathered before the memory update: the sharded
  step computes exactly what one device computes on the global batch.

  Sharded banks (`memory_shards = S > 1`): the banks get `ceil(N / S) · S` rows (the
  padding is never drawn) in `S` blocks, and each anchor's negatives are `K / S`
  uniform draws from each block's real rows (uniform over the split when `S` divides
  `N`). The train step may then hold the banks sharded over the data axis when `S` is
  its device count (`train.make_train_step`): each device keeps its block of `N / S`
  rows, scores every anchor of the global batch (all-gathered, `[S B, F]`) against
  its own block's negatives, and an `all_to_all` hands each device its anchors'
  scores; the positives are summed over devices (`psum_scatter`) and each device
  updates its own rows. The loss equals the replicated banks' (same draws), up to
  float summation order.

  Difference from RepDistiller's CIFAR script: its data loader draws the negatives
  from the examples of other classes (`mode='exact'`); here they are uniform over
  the training split, as `ContrastMemory` draws them when given no `contrast_idx`.

  Attributes:
    num_train: `N`, the number of training examples.
    bn_axis_name: the data-parallel axis (None outside the train step).
    feat_dim: dimension of the contrastive embedding.
    nce_k: negatives per positive.
    nce_t: temperature `T`.
    nce_m: momentum of the memory update.
    memory_shards: `S`, the blocks of the banks (see above); 1 -> one uniform draw.

  Call args: student `[B, ...]` and teacher `[B, ...]` embeddings (flattened);
  index: int `[B]`, each example's position in the training split (`batch['index']`);
  train: update the memory. Returns the scalar loss.

  References:
    Tian, Krishnan, Isola, Contrastive Representation Distillation, ICLR 2020;
    RepDistiller `crd/criterion.py`, `crd/memory.py`.
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  feat_dim: int = 128
  nce_k: int = 16384
  nce_t: float = 0.07
  nce_m: float = 0.5
  memory_shards: int = 1

  @property
  def memory_rows(self) -> int:
    """Rows of each bank: `num_train` padded to a multiple of `memory_shards`."""
    return -(-self.num_train // self.memory_shards) * self.memory_shards

  @nn.compact
  def __call__(self, student, teacher, *, labels=None, index=None, train=False):
    del labels
    if index is None:
      raise ValueError("crd needs each example's position in the training split: "
                       "pass the batch's 'index' (kd_jax.data.train_iterator yields it)")
    if self.num_train <= 0:
      raise ValueError(f"crd needs num_train > 0 (its memory has one row per training "
                       f"example), got {self.num_train}; pass num_train to objective.build")
    if self.memory_shards < 1 or self.nce_k % self.memory_shards:
      raise ValueError(f"crd memory_shards={self.memory_shards} must be at least 1 and "
                       f"divide nce_k={self.nce_k}; change one of them")
    student, teacher = _common.as_student_and_teacher(student, teacher)
    batch = student.shape[0]
    v_s = self._embed(student.reshape(batch, -1), "embed_student")
    v_t = self._embed(teacher.reshape(batch, -1), "embed_teacher")

    stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
    bank = lambda: jnp.pad(jax.random.uniform(self.make_rng("params"), (
        self.num_train, self.feat_dim), jnp.float32, -stdv, stdv),
                           ((0, self.memory_rows - self.num_train), (0, 0)))
    memory_s = self.variable("memory", "student", bank)
    memory_t = self.variable("memory", "teacher", bank)
    z_s = self.variable("memory", "z_student", lambda: jnp.array(-1.0, jnp.float32))
    z_t = self.variable("memory", "z_teacher", lambda: jnp.array(-1.0, jnp.float32))
    key = self.variable("memory", "key",
                        lambda: jax.random.key_data(self.make_rng("params")))
    draws = self.variable("memory", "draws", lambda: jnp.zeros((), jnp.int32))

    index = jnp.asarray(index, jnp.int32)
    negatives = self._negatives(key.value, draws.value, batch)     # [S B, S, K / S]
    if self._sharded(memory_s.value):
      all_index = _all_gather(index, self.bn_axis_name)
      scores_s = self._sharded_scores(memory_t.value, all_index, negatives, v_s)
      scores_t = self._sharded_scores(memory_s.value, all_index, negatives, v_t)
    else:
      rank = 0 if self.bn_axis_name is None else jax.lax.axis_index(self.bn_axis_name)
      mine = jax.lax.dynamic_slice_in_dim(negatives, rank * batch, batch)
      contrast = jnp.concatenate([index[:, None], mine.reshape(batch, -1)],
                                 axis=1)                              # [B, K + 1]
      scores_s = self._scores(memory_t.value, contrast, v_s)         # student anchor
      scores_t = self._scores(memory_s.value, contrast, v_t)         # teacher anchor
    norm_s, norm_t = self._normaliser(z_s.value, scores_s), self._normaliser(
        z_t.value, scores_t)
    loss = (contrast_loss(scores_s / norm_s, self.num_train)
            + contrast_loss(scores_t / norm_t, self.num_train))
    if train and not self.is_initializing():
      z_s.value, z_t.value = norm_s, norm_t
      all_index = _all_gather(index, self.bn_axis_name)
      if self._sharded(memory_s.value):  # This device's rows; the others' dropped.
        rows = memory_s.value.shape[0]
        local = all_index - jax.lax.axis_index(self.bn_axis_name) * rows
        all_index = jnp.where((local >= 0) & (local < rows), local, rows)
      for memory, v in ((memory_s, v_s), (memory_t, v_t)):
        memory.value = _momentum_update(
            memory.value, all_index,
            _all_gather(jax.lax.stop_gradient(v), self.bn_axis_name), self.nce_m)
      draws.value = draws.value + 1
    return loss

  def _embed(self, x: jax.Array, name: str) -> jax.Array:
    """RepDistiller's `Embed`: linear to `feat_dim`, then L2 normalisation."""
    x = nn.Dense(self.feat_dim, kernel_init=torch_default_init,
                 bias_init=_torch_bias_init(x.shape[-1]), name=name)(x)
    return _common.l2_normalize(x)

  def _negatives(self, key: jax.Array, draws: jax.Array, batch: int) -> jax.Array:
    """`[devices · batch, S, K / S]`: the global batch's negatives, block by block."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(key), draws)
    devices = 1 if self.bn_axis_name is None else jax.lax.axis_size(self.bn_axis_name)
    shards = self.memory_shards
    if shards == 1:
      drawn = jax.random.randint(rng, (batch * devices, self.nce_k), 0, self.num_train)
      return drawn[:, None, :]
    block = self.memory_rows // shards
    first = np.arange(shards) * block
    real = np.minimum(block, self.num_train - first)  # The last block may be padded.
    drawn = jax.random.randint(rng, (batch * devices, shards, self.nce_k // shards), 0,
                               real[None, :, None])
    return drawn + first[None, :, None]

  def _sharded(self, memory: jax.Array) -> bool:
    """Whether this call holds one device's block of the banks (static)."""
    if memory.shape[0] == self.memory_rows:
      return False
    devices = None if self.bn_axis_name is None else jax.lax.axis_size(
        self.bn_axis_name)
    if devices != self.memory_shards or memory.shape[0] * devices != self.memory_rows:
      raise ValueError(f"crd: a bank of {memory.shape[0]} rows is neither the whole "
                       f"{self.memory_rows} nor 1/{self.memory_shards} of it on "
                       f"{devices} devices; set memory_shards to the device count")
    return True

  def _sharded_scores(self, memory: jax.Array, all_index: jax.Array,
                      negatives: jax.Array, v: jax.Array) -> jax.Array:
    """`_scores` with the bank sharded over `bn_axis_name`: `[B, K + 1]` for this
    device's anchors, each device scoring the global batch against its own block."""
    axis, rows = self.bn_axis_name, memory.shape[0]
    rank = jax.lax.axis_index(axis)
    memory = jax.lax.stop_gradient(memory)
    v_all = _all_gather(v, axis)                                       # [S B, F]
    own = jax.lax.dynamic_index_in_dim(negatives, rank, axis=1, keepdims=False)
    dots = jnp.einsum("bkd,bd->bk", memory[own - rank * rows], v_all)  # [S B, K / S]
    dots = jax.lax.all_to_all(dots, axis, 0, 1, tiled=True)            # [B, K]
    local = all_index - rank * rows
    held = (local >= 0) & (local < rows)
    positive = jnp.where(held, jnp.einsum(
        "bd,bd->b", memory[jnp.clip(local, 0, rows - 1)], v_all), 0.0)
    positive = jax.lax.psum_scatter(positive, axis, scatter_dimension=0, tiled=True)
    return jnp.exp(jnp.concatenate([positive[:, None], dots], axis=1) / self.nce_t)

  def _scores(self, memory: jax.Array, contrast: jax.Array, v: jax.Array) -> jax.Array:
    """`exp(M[contrast_bk] . v_b / T)`, `[B, K + 1]`; the memory is a constant."""
    rows = jax.lax.stop_gradient(memory)[contrast]                  # [B, K + 1, D]
    return jnp.exp(jnp.einsum("bkd,bd->bk", rows, v) / self.nce_t)

  def _normaliser(self, z: jax.Array, scores: jax.Array) -> jax.Array:
    """`Z`: the stored constant, or `N · mean(scores)` over the global batch if unset."""
    mean = jnp.mean(scores)
    if self.bn_axis_name is not None:
      mean = jax.lax.pmean(mean, self.bn_axis_name)
    return jnp.where(z < 0, jax.lax.stop_gradient(mean * self.num_train), z)


# --- ReviewKD -------------------------------------------------------------------------


def hierarchical_context_loss(student: Sequence[jax.typing.ArrayLike],
                              teacher: Sequence[jax.typing.ArrayLike],
                              levels: Sequence[int] = (4, 2, 1)) -> jax.Array:
  """ReviewKD's hierarchical context loss: MSE on a spatial pyramid, summed over taps.

  For each pair of `[B, H, W, C]` maps, with `pool_l` the adaptive average pool to
  `l x l` and only the levels `l < H` taken, weights `w_0 = 1, w_j = 2^-j`:

    L = sum_taps ( MSE(f_s, f_t) + sum_j w_j MSE(pool_lj(f_s), pool_lj(f_t)) )
                 / ( 1 + sum_j w_j ).

  Args:
    student: NHWC student maps (after ReviewKD's fusion), one per tap.
    teacher: NHWC teacher maps of the same shapes (no gradient).
    levels: pyramid sizes.

  Returns:
    Scalar loss.

  References:
    Chen, Liu, Zhao, Jia, Distilling Knowledge via Knowledge Review, CVPR 2021;
    github.com/dvlab-research/ReviewKD `CIFAR-100/model/reviewkd.py` (`hcl`).
  """
  total = 0.0
  for fs, ft in zip(student, teacher):
    fs, ft = _common.as_student_and_teacher(fs, ft)
    loss, weight, weights = jnp.mean(jnp.square(fs - ft)), 1.0, 1.0
    for level in levels:
      if level >= fs.shape[1]:
        continue
      weight /= 2.0
      loss = loss + weight * jnp.mean(jnp.square(
          adaptive_average_pool(fs, level, level) - adaptive_average_pool(ft, level, level)))
      weights += weight
    total = total + loss / weights
  return total


class _AttentionBasedFusion(nn.Module):
  """ReviewKD's ABF: 1x1 conv+BN, fusion with the deeper level, 3x3 conv+BN.

  Returns `(output, residual)`: the output at the teacher's channels and size, and
  the fused mid-channel map passed on to the next shallower level.
  """
  mid_channels: int
  out_channels: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, residual, out_size, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, axis_name=self.bn_axis_name)
    x = nn.Conv(self.mid_channels, (1, 1), use_bias=False,
                kernel_init=_kaiming_uniform_a1, name="conv1")(x)
    x = norm(name="bn1")(x)
    if residual is not None:
      residual = _resize_nearest(residual, *x.shape[1:3])
      attention = nn.sigmoid(nn.Conv(
          2, (1, 1), kernel_init=torch_default_init,
          bias_init=_torch_bias_init(2 * self.mid_channels), name="att_conv")(
              jnp.concatenate([x, residual], axis=-1)))
      x = x * attention[..., :1] + residual * attention[..., 1:]
    x = _resize_nearest(x, *out_size)
    out = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=_kaiming_uniform_a1, name="conv2")(x)
    return norm(name="bn2")(out), x


class ReviewKD(nn.Module):
  """Knowledge review: student stages fused deep-to-shallow, matched to the teacher's.

  Taps come ordered shallow to deep (e.g. the CIFAR ResNet recipe: student
  `stage_1, stage_2, stage_3, embedding`, teacher `preact_stage_1, preact_stage_2,
  preact_stage_3, embedding`); `[B, D]` embeddings are `1 x 1` maps. Starting at
  the deepest tap, an attention-based fusion (ABF) module maps each student map to
  `mid_channels` (1x1 conv + BN), fuses it with the nearest-upsampled residual `r`
  from the deeper level through a 2-channel sigmoid attention `a = sigma(conv([x, r]))`,
  `x <- a_0 x + a_1 r` (not for the deepest), resizes it to the teacher's size and
  maps it to the teacher's channels (3x3 conv + BN). The loss is
  `hierarchical_context_loss(outputs, teacher maps)`.

  State: the ABF BatchNorm statistics (collection 'batch_stats', cross-device
  under data parallelism).

  Attributes:
    num_train: unused (module-method protocol).
    bn_axis_name: the data-parallel axis for BatchNorm (None outside the train step).
    mid_channels: ABF width; None -> min(512, channels of the deepest student tap).

  Call args: student and teacher tuples of NHWC maps / embeddings; train: BatchNorm
  with batch statistics. Returns the scalar loss.

  References:
    Chen, Liu, Zhao, Jia, Distilling Knowledge via Knowledge Review, CVPR 2021;
    github.com/dvlab-research/ReviewKD `CIFAR-100/model/reviewkd.py`.
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  mid_channels: Optional[int] = None

  @nn.compact
  def __call__(self, student, teacher, *, labels=None, index=None, train=False):
    del labels, index
    if len(student) != len(teacher):
      raise ValueError(f"review_kd pairs taps one to one, got {len(student)} student "
                       f"and {len(teacher)} teacher taps")
    student = [_as_map(_common.as_float(s)) for s in student]
    teacher = [jax.lax.stop_gradient(_as_map(_common.as_float(t))) for t in teacher]
    mid = self.mid_channels or min(512, student[-1].shape[-1])
    outputs, residual = [None] * len(student), None
    for level in reversed(range(len(student))):
      outputs[level], residual = _AttentionBasedFusion(
          mid, teacher[level].shape[-1], self.bn_axis_name, name=f"abf_{level}")(
              student[level], residual, teacher[level].shape[1:3], train)
    return hierarchical_context_loss(outputs, teacher)


# --- class-prior matching -------------------------------------------------------------


def _class_means(probs: jax.Array, labels: jax.Array, num_classes: int):
  """Mean row of `probs` per label (`[C, K]`, zero for absent classes), and presence `[C]`."""
  n = jax.ops.segment_sum(jnp.ones_like(labels), labels, num_segments=num_classes)
  sums = jax.ops.segment_sum(probs, labels, num_segments=num_classes)
  return sums / jnp.maximum(n, 1)[:, None].astype(probs.dtype), n > 0


def _update_class_means(prior: jax.Array, count: jax.Array, labels: jax.Array,
                        probs: jax.Array, momentum: float):
  """Running per-class means of `probs` (see `ClassPrior`); returns (prior, count)."""
  mean, present = _class_means(probs, labels, prior.shape[0])
  blended = jnp.where((count > 0)[:, None],
                      momentum * prior + (1.0 - momentum) * mean, mean)
  return (jnp.where(present[:, None], blended, prior).astype(prior.dtype),
          count + present)


class ClassPrior(nn.Module):
  """Class-wise prior matching: the student's mean prediction per class vs the teacher's.

  With `p = softmax(z / T)`, the state holds for each class `c` a running mean of the
  teacher's predictions on examples of class `c`: on the first batch that contains
  `c`, `pi_c = mean_{i: y_i = c} p_t,i`; afterwards

    pi_c <- m pi_c + (1 - m) mean_{i: y_i = c} p_t,i,

  for each class present in the batch (all-gathered over the data-parallel axis),
  and `pi_c` unchanged for absent classes. In training the loss uses the updated
  `pi` (so the first batch has a target). With `q_c = mean_{i: y_i = c} p_s,i`
  over the (per-device) batch and `P` the classes present in it,

    L = T^2 / |P| sum_{c in P} KL(pi_c || q_c)
      = T^2 / |P| sum_{c in P} sum_k pi_ck (log pi_ck - log q_ck),

  scaled by `T^2` as Hinton's KD so that the gradient scale does not depend on `T`.
  Unlike KD, it matches class-conditional averages rather than each example, so the
  student keeps freedom per example while inheriting the teacher's inter-class
  structure (which classes a class is confused with).

  State (collection 'priors'): `prior` `[C, C]` (uniform until a class is seen) and
  `count` `[C]` (batches in which each class appeared).

  Attributes:
    num_train: unused (module-method protocol).
    bn_axis_name: the data-parallel axis (None outside the train step).
    temperature: `T`.
    momentum: `m`.

  Call args: student and teacher logits `[B, C]`, labels int `[B]`; train: update
  the priors. Returns the scalar loss.

  This method is this framework's own (no reference implementation to match).
  """
  num_train: int = 0
  bn_axis_name: Optional[str] = None
  temperature: float = 4.0
  momentum: float = 0.9

  @nn.compact
  def __call__(self, student, teacher, *, labels=None, index=None, train=False):
    del index
    if labels is None:
      raise ValueError("class_prior needs the batch's labels")
    student, teacher = _common.as_student_and_teacher(student, teacher)
    num_classes = student.shape[-1]
    labels = jnp.asarray(labels, jnp.int32)
    prior = self.variable("priors", "prior", lambda: jnp.full(
        (num_classes, num_classes), 1.0 / num_classes, jnp.float32))
    count = self.variable("priors", "count", lambda: jnp.zeros((num_classes,), jnp.int32))
    if train and not self.is_initializing():
      prior.value, count.value = _update_class_means(
          prior.value, count.value, _all_gather(labels, self.bn_axis_name),
          _all_gather(jax.nn.softmax(teacher / self.temperature), self.bn_axis_name),
          self.momentum)
    target = jax.lax.stop_gradient(prior.value)
    q, present = _class_means(jax.nn.softmax(student / self.temperature), labels,
                              num_classes)
    q = jnp.where(present[:, None], q, 1.0)  # absent classes: finite, then masked out
    kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * jnp.log(q), axis=-1)
    return (self.temperature ** 2 * jnp.sum(jnp.where(present, kl, 0.0))
            / jnp.sum(present))
