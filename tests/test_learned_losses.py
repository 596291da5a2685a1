"""Tests for the distillation methods with learned parts or state (kd_jax.losses._learned).

Each module is checked against an independent NumPy computation (float64, NCHW as
the PyTorch references) that reads the parameters from the initialised variables;
then gradients, jit == eager, the state updates by hand, and the data-parallel
update under `jax.shard_map` over 4 fake CPU devices (tests/conftest.py).
"""
import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from jax.test_util import check_grads

from kd_jax import losses, models, objective as objective_lib, parallel, train

BATCH = 8  # 2 per device on the 4-device mesh.

# ---------------------------------------------------------------------------
# Independent NumPy references (float64, NCHW).
# ---------------------------------------------------------------------------


def to_nchw(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1, 1, 1) if x.ndim == 2 else np.transpose(x, (0, 3, 1, 2))


def np_softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_normalize(x):
  return x / np.sqrt(np.sum(x**2, axis=-1, keepdims=True))


def np_adaptive_avg_pool(f, out_h, out_w):
  """PyTorch's adaptive_avg_pool2d: window [floor(i*in/out), ceil((i+1)*in/out))."""
  _, _, h, w = f.shape
  out = np.zeros(f.shape[:2] + (out_h, out_w))
  for i in range(out_h):
    r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
    for j in range(out_w):
      c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
      out[:, :, i, j] = f[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
  return out


def np_nearest(f, out_h, out_w):
  """F.interpolate(mode='nearest'): source index floor(i * (in / out))."""
  rows = np.floor(np.arange(out_h) * (f.shape[2] / out_h)).astype(int)
  cols = np.floor(np.arange(out_w) * (f.shape[3] / out_w)).astype(int)
  return f[:, :, rows][:, :, :, cols]


def np_conv(f, kernel, bias=None):
  """NCHW convolution, stride 1, padding k // 2; kernel in Flax's HWIO layout."""
  kernel = np.asarray(kernel, np.float64)
  k = kernel.shape[0]
  pad = k // 2
  _, _, h, w = f.shape
  padded = np.pad(f, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  out = 0.0
  for dy in range(k):
    for dx in range(k):
      out = out + np.einsum("bchw,co->bohw", padded[:, :, dy:dy + h, dx:dx + w],
                            kernel[dy, dx])
  if bias is not None:
    out = out + np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
  return out


def np_batch_norm_train(f, params, eps=1e-5):
  """BatchNorm2d in training mode: batch mean and biased variance per channel."""
  mean, var = f.mean(axis=(0, 2, 3)), f.var(axis=(0, 2, 3))
  channel = lambda v: np.asarray(v, np.float64).reshape(1, -1, 1, 1)
  normalized = (f - channel(mean)) / np.sqrt(channel(var) + eps)
  return normalized * channel(params["scale"]) + channel(params["bias"]), mean


def np_vid(student, teacher, params, eps=1e-5):
  s, t = to_nchw(student), to_nchw(teacher)
  if s.shape[2] > t.shape[2]:
    s = np_adaptive_avg_pool(s, t.shape[2], t.shape[2])
  elif s.shape[2] < t.shape[2]:
    t = np_adaptive_avg_pool(t, s.shape[2], s.shape[2])
  x = s
  for i in range(3):
    x = np_conv(np.maximum(x, 0) if i else x, params[f"regressor_{i}"]["kernel"])
  var = (np.log(1.0 + np.exp(np.asarray(params["alpha"], np.float64))) + eps).reshape(1, -1, 1, 1)
  return np.mean(0.5 * ((x - t)**2 / var + np.log(var)))


def np_contrast_loss(x, n_data):
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / n_data
  log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
  log_d0 = np.log(m * pn / (x[:, 1:] + m * pn + 1e-7))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def np_embed(f, dense):
  f = np.asarray(f, np.float64).reshape(f.shape[0], -1)
  return np_normalize(f @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"]))


def np_crd(student, teacher, params, memory, contrast_idx, n_data, temperature=0.07):
  """RepDistiller's CRDLoss + ContrastMemory.forward; returns (loss, Z_s, Z_t, v_s, v_t)."""
  v1 = np_embed(student, params["embed_student"])
  v2 = np_embed(teacher, params["embed_teacher"])
  mem_v1 = np.asarray(memory["student"], np.float64)
  mem_v2 = np.asarray(memory["teacher"], np.float64)
  out_v2 = np.exp(np.einsum("bkd,bd->bk", mem_v1[contrast_idx], v2) / temperature)
  out_v1 = np.exp(np.einsum("bkd,bd->bk", mem_v2[contrast_idx], v1) / temperature)
  z_v1 = float(memory["z_student"]) if memory["z_student"] > 0 else out_v1.mean() * n_data
  z_v2 = float(memory["z_teacher"]) if memory["z_teacher"] > 0 else out_v2.mean() * n_data
  loss = np_contrast_loss(out_v1 / z_v1, n_data) + np_contrast_loss(out_v2 / z_v2, n_data)
  return loss, z_v1, z_v2, v1, v2


def np_hcl(fstudent, fteacher):
  """ReviewKD's `hcl` on NCHW maps."""
  total = 0.0
  for fs, ft in zip(fstudent, fteacher):
    h = fs.shape[2]
    loss = np.mean((fs - ft)**2)
    cnt, tot = 1.0, 1.0
    for level in (4, 2, 1):
      if level >= h:
        continue
      cnt /= 2.0
      loss += np.mean((np_adaptive_avg_pool(fs, level, level)
                       - np_adaptive_avg_pool(ft, level, level))**2) * cnt
      tot += cnt
    total += loss / tot
  return total


def np_review_kd(student, teacher, params):
  """ReviewKD.forward (ABFs in training mode) then hcl; returns (loss, BN batch means)."""
  xs = [to_nchw(s) for s in student][::-1]
  ts = [to_nchw(t) for t in teacher]
  n = len(xs)
  results, means, residual = [], {}, None
  for k, x in enumerate(xs):
    level = n - 1 - k
    p = params[f"abf_{level}"]
    x, means[(level, "bn1")] = np_batch_norm_train(np_conv(x, p["conv1"]["kernel"]), p["bn1"])
    if residual is not None:
      y = np_nearest(residual, x.shape[2], x.shape[3])
      z = 1.0 / (1.0 + np.exp(-np_conv(np.concatenate([x, y], axis=1),
                                       p["att_conv"]["kernel"], p["att_conv"]["bias"])))
      x = x * z[:, 0:1] + y * z[:, 1:2]
    out_h, out_w = ts[level].shape[2:]
    if x.shape[2:] != (out_h, out_w):
      x = np_nearest(x, out_h, out_w)
    out, means[(level, "bn2")] = np_batch_norm_train(np_conv(x, p["conv2"]["kernel"]), p["bn2"])
    results.insert(0, out)
    residual = x
  return np_hcl(results, ts), means


def np_class_prior_update(prior, count, labels, teacher, temperature=4.0, momentum=0.9):
  prior, count = np.array(prior, np.float64), np.array(count)
  pt = np_softmax(np.asarray(teacher, np.float64) / temperature)
  for c in np.unique(labels):
    mean = pt[labels == c].mean(axis=0)
    prior[c] = mean if count[c] == 0 else momentum * prior[c] + (1 - momentum) * mean
    count[c] += 1
  return prior, count


def np_class_prior_loss(prior, labels, student, temperature=4.0):
  ps = np_softmax(np.asarray(student, np.float64) / temperature)
  kls = []
  for c in np.unique(labels):
    p, q = prior[c], ps[labels == c].mean(axis=0)
    kls.append(np.sum(p * np.log(p / q)))
  return temperature**2 * np.mean(kls)


# ---------------------------------------------------------------------------
# Cases: a module and inputs of batch BATCH.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Case:
  module: Any
  student: Any
  teacher: Any
  labels: Any = None
  index: Any = None

  @functools.cached_property
  def state_collections(self):
    return [c for c in self.init() if c != "params"]

  @functools.cache
  def init(self):
    return jax.jit(lambda: self.module.init(
        jax.random.key(1), self.student, self.teacher, labels=self.labels,
        index=self.index, train=False))()

  def apply(self, variables, student=None, *, train=True, module=None):
    """(loss, updated state) in training mode, the loss alone otherwise."""
    module = module or self.module
    student = self.student if student is None else student
    return module.apply(variables, student, self.teacher, labels=self.labels,
                        index=self.index, train=train,
                        mutable=self.state_collections if train else False)


def normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.cache
def make_case(name):
  labels = np.array([0, 2, 2, 1, 4, 0, 2, 1], np.int32)
  if name == "vid":
    return Case(losses.VID(), normal(0, BATCH, 4, 4, 3), normal(1, BATCH, 4, 4, 5))
  if name == "vid_pool_student":
    return Case(losses.VID(mid_channels=6), normal(0, BATCH, 8, 8, 3),
                normal(1, BATCH, 4, 4, 5))
  if name == "vid_pool_teacher":
    return Case(losses.VID(), normal(0, BATCH, 2, 2, 3), normal(1, BATCH, 4, 4, 5))
  if name == "crd":
    return Case(losses.CRD(num_train=20, feat_dim=6, nce_k=12), normal(2, BATCH, 7),
                normal(3, BATCH, 9), index=np.array([3, 0, 19, 7, 8, 12, 5, 11], np.int32))
  if name == "review_kd":  # resnet-like: three stages and the embedding
    return Case(losses.ReviewKD(),
                (normal(4, BATCH, 8, 8, 3), normal(5, BATCH, 4, 4, 5),
                 normal(6, BATCH, 2, 2, 6), normal(7, BATCH, 6)),
                (normal(8, BATCH, 8, 8, 4), normal(9, BATCH, 4, 4, 6),
                 normal(10, BATCH, 2, 2, 7), normal(11, BATCH, 7)))
  if name == "review_kd_resized":  # teacher maps larger (upsampled) and smaller
    return Case(losses.ReviewKD(mid_channels=4),
                (normal(4, BATCH, 6, 6, 3), normal(5, BATCH, 2, 2, 5),
                 normal(6, BATCH, 5)),
                (normal(8, BATCH, 3, 3, 4), normal(9, BATCH, 4, 4, 6),
                 normal(10, BATCH, 7)))
  if name == "class_prior":
    return Case(losses.ClassPrior(), normal(12, BATCH, 5) * 3, normal(13, BATCH, 5) * 3,
                labels=labels)
  raise ValueError(name)


NAMES = ["vid", "vid_pool_student", "vid_pool_teacher", "crd", "review_kd",
         "review_kd_resized", "class_prior"]


def crd_contrast_idx(case, memory):
  """The contrast indices a call draws: the positive, then nce_k uniform negatives."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(memory["key"]), memory["draws"])
  negatives = jax.random.randint(rng, (len(case.index), case.module.nce_k), 0,
                                 case.module.num_train)
  return np.concatenate([case.index[:, None], np.asarray(negatives)], axis=1)


def reference(name, case, variables):
  params = variables.get("params", {})
  if name.startswith("vid"):
    return np_vid(case.student, case.teacher, params)
  if name == "crd":
    memory = variables["memory"]
    return np_crd(case.student, case.teacher, params, memory,
                  crd_contrast_idx(case, memory), case.module.num_train)[0]
  if name.startswith("review_kd"):
    return np_review_kd(case.student, case.teacher, params)[0]
  prior, _ = np_class_prior_update(variables["priors"]["prior"],
                                   variables["priors"]["count"], case.labels, case.teacher)
  return np_class_prior_loss(prior, case.labels, case.student)


# ---------------------------------------------------------------------------
# Value, gradients, jit.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(name):
  case = make_case(name)
  variables = case.init()
  loss, _ = jax.jit(case.apply)(variables)
  assert loss.shape == () and loss.dtype == jnp.float32
  expected = reference(name, case, variables)
  assert expected > 1e-3
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  case = make_case(name)
  variables = case.init()
  eager_loss, eager_state = case.apply(variables)
  jit_loss, jit_state = jax.jit(case.apply)(variables)
  np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-5)
  chex.assert_trees_all_close(jit_state, eager_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vid_pool_student", "crd", "review_kd_resized",
                                  "class_prior"])
def test_gradients_wrt_student_and_parameters(name):
  case = make_case(name)
  variables = case.init()
  if name == "crd":  # Z is fixed after the first training call: a constant from then on.
    variables = {**variables, **case.apply(variables)[1]}
  state = {c: v for c, v in variables.items() if c != "params"}

  def loss_fn(params, student):
    return case.apply({**state, "params": params}, student)[0]

  params, student = variables.get("params", {}), case.student
  grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, student)
  chex.assert_tree_all_finite(grads)
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    check_grads(jax.jit(loss_fn), (to64(params), to64(student)), order=1,
                modes=["rev"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vid", "crd", "review_kd", "class_prior"])
def test_no_gradient_reaches_the_teacher(name):
  case = make_case(name)
  variables = case.init()
  teacher_grad = jax.grad(lambda t: case.module.apply(
      variables, case.student, t, labels=case.labels, index=case.index, train=False))(
          case.teacher)
  for g in jax.tree.leaves(teacher_grad):
    np.testing.assert_array_equal(g, 0.0)


def test_vid_initial_variance_is_init_pred_var():
  case = make_case("vid")
  alpha = case.init()["params"]["alpha"]
  np.testing.assert_allclose(jax.nn.softplus(alpha) + 1e-5, np.full(5, 5.0), rtol=1e-6)


# ---------------------------------------------------------------------------
# State updates.
# ---------------------------------------------------------------------------


def test_crd_memory_update_and_fixed_normaliser():
  case = make_case("crd")
  variables = case.init()
  memory0 = jax.device_get(variables["memory"])
  stdv = 1.0 / math.sqrt(6 / 3)
  assert memory0["student"].shape == memory0["teacher"].shape == (20, 6)
  assert np.all(np.abs(memory0["student"]) <= stdv)
  assert memory0["z_student"] == memory0["z_teacher"] == -1.0
  _, new = case.apply(variables)
  memory1 = jax.device_get(new["memory"])
  _, z_s, z_t, v_s, v_t = np_crd(case.student, case.teacher, variables["params"], memory0,
                                 crd_contrast_idx(case, memory0), 20)
  np.testing.assert_allclose([memory1["z_student"], memory1["z_teacher"]], [z_s, z_t],
                             rtol=1e-5)
  assert memory1["draws"] == 1
  np.testing.assert_array_equal(memory1["key"], memory0["key"])
  others = np.setdiff1d(np.arange(20), case.index)
  for bank, v in (("student", v_s), ("teacher", v_t)):
    expected = np_normalize(0.5 * memory0[bank][case.index] + 0.5 * v)
    np.testing.assert_allclose(memory1[bank][case.index], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(memory1[bank][case.index], axis=1), 1.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(memory1[bank][others], memory0[bank][others])
  # A second call keeps Z, draws other negatives and contrasts with the updated memory.
  variables = {**variables, **new}
  loss2, new2 = case.apply(variables)
  assert new2["memory"]["z_student"] == memory1["z_student"]
  assert new2["memory"]["draws"] == 2
  expected = np_crd(case.student, case.teacher, variables["params"], memory1,
                    crd_contrast_idx(case, memory1), 20)[0]
  np.testing.assert_allclose(float(loss2), expected, rtol=1e-4)
  assert not np.array_equal(crd_contrast_idx(case, memory1), crd_contrast_idx(case, memory0))


def test_crd_evaluation_changes_no_state_and_needs_index():
  case = make_case("crd")
  variables = case.init()
  loss = case.apply(variables, train=False)  # no mutable collection: would raise if written
  assert np.isfinite(loss)
  with pytest.raises(ValueError, match="index"):
    case.module.apply(variables, case.student, case.teacher, labels=None, index=None,
                      train=True, mutable=["memory"])
  with pytest.raises(ValueError, match="num_train"):
    losses.CRD().init(jax.random.key(0), case.student, case.teacher, labels=None,
                      index=case.index, train=False)


def test_class_prior_running_mean_by_hand():
  case = make_case("class_prior")
  variables = case.init()
  np.testing.assert_array_equal(variables["priors"]["prior"], np.full((5, 5), 0.2, np.float32))
  _, new = case.apply(variables)
  # First sight of classes 0, 1, 2, 4: the batch mean of the teacher's p = softmax(z / 4).
  pt = np_softmax(case.teacher.astype(np.float64) / 4.0)
  prior = new["priors"]["prior"]
  for c in (0, 1, 2, 4):
    np.testing.assert_allclose(prior[c], pt[case.labels == c].mean(0), rtol=1e-5)
  np.testing.assert_array_equal(prior[3], np.full(5, 0.2, np.float32))  # absent: unchanged
  np.testing.assert_array_equal(new["priors"]["count"], [1, 1, 1, 0, 1])
  # Second batch (other labels, other teacher): 0.9 · old + 0.1 · batch mean.
  second = dataclasses.replace(case, labels=np.array([3, 3, 0, 0, 0, 1, 1, 1], np.int32),
                               teacher=normal(14, BATCH, 5) * 3)
  _, new2 = second.apply({**variables, **new})
  pt2 = np_softmax(second.teacher.astype(np.float64) / 4.0)
  prior2 = new2["priors"]["prior"]
  np.testing.assert_allclose(prior2[3], pt2[:2].mean(0), rtol=1e-5)
  for c in (0, 1):
    np.testing.assert_allclose(
        prior2[c], 0.9 * prior[c] + 0.1 * pt2[second.labels == c].mean(0), rtol=1e-5)
  for c in (2, 4):
    np.testing.assert_array_equal(prior2[c], prior[c])
  np.testing.assert_array_equal(new2["priors"]["count"], [2, 2, 1, 1, 1])
  # Evaluation uses the stored priors and changes nothing.
  loss = second.apply({**variables, **new2}, train=False)
  np.testing.assert_allclose(
      float(loss), np_class_prior_loss(np.asarray(prior2, np.float64), second.labels,
                                       second.student), rtol=1e-5)


def test_review_kd_batch_statistics_update():
  case = make_case("review_kd")
  variables = case.init()
  _, new = case.apply(variables)
  _, means = np_review_kd(case.student, case.teacher, variables["params"])
  for (level, bn), mean in means.items():
    # Flax momentum 0.9 (PyTorch's 0.1) from the initial zero mean.
    np.testing.assert_allclose(new["batch_stats"][f"abf_{level}"][bn]["mean"], 0.1 * mean,
                               rtol=1e-4, atol=1e-6)


def test_adaptive_average_pool_windows_and_nearest_resize():
  x = np.arange(7, dtype=np.float32).reshape(1, 7, 1, 1)
  pooled = losses.adaptive_average_pool(jnp.asarray(x), 4, 1)
  # PyTorch's windows for 7 -> 4: [0, 2), [1, 4), [3, 6), [5, 7).
  np.testing.assert_allclose(pooled[0, :, 0, 0], [0.5, 2.0, 4.0, 5.5])
  fs, ft = normal(20, 2, 7, 7, 3), normal(21, 2, 7, 7, 3)
  np.testing.assert_allclose(
      float(losses.hierarchical_context_loss([fs], [ft])),
      np_hcl([to_nchw(fs)], [to_nchw(ft)]), rtol=1e-5)


# ---------------------------------------------------------------------------
# Data parallelism: 4 devices == 1 device on the whole batch.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vid", "crd", "review_kd", "class_prior"])
def test_sharded_update_equals_single_device(name):
  assert jax.device_count() >= 4
  case = make_case(name)
  variables = case.init()
  single_loss, single_state = jax.jit(case.apply)(variables)
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
  sharded = case.module.clone(bn_axis_name="data")

  def per_shard(variables, student, teacher, labels, index):
    loss, state = sharded.apply(variables, student, teacher, labels=labels, index=index,
                                train=True, mutable=case.state_collections)
    return jax.lax.pmean(loss, "data"), state

  step = jax.jit(jax.shard_map(per_shard, mesh=mesh,
                               in_specs=(P(), P("data"), P("data"), P("data"), P("data")),
                               out_specs=(P(), P()), check_vma=False))
  loss, state = step(variables, case.student, case.teacher, case.labels, case.index)
  chex.assert_trees_all_close(state, single_state, atol=1e-5, rtol=1e-5)
  if name != "class_prior":  # its loss is per device (class means of the local batch)
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
  if name in ("crd", "class_prior"):  # the update did happen
    collection = case.state_collections[0]
    assert not np.allclose(jax.tree.leaves(state[collection])[0],
                           jax.tree.leaves(variables[collection])[0])


def test_crd_banks_sharded_over_devices_halve_memory_with_the_same_loss():
  # memory_shards=2 and an odd N (one padding row): the banks whole on 1 device vs
  # sharded in halves over 2 devices. Same draws, so the same loss, gradients and
  # updated banks; the sums differ only in order, so rtol 1e-5 (float32 is ~6e-8).
  case = make_case("crd")
  module = case.module.clone(num_train=21, memory_shards=2)
  variables = jax.jit(lambda: module.init(jax.random.key(1), case.student, case.teacher,
                                          index=case.index, train=False))()
  sharded = module.clone(bn_axis_name="data")

  def per_shard(variables, student, teacher, index):  # As the train step does.
    def loss_fn(params):
      return sharded.apply({**variables, "params": params}, student, teacher,
                           index=index, train=True, mutable=["memory"])
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grads, "data"), state

  def step(devices):
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    banks = {"student": P("data"), "teacher": P("data"), "z_student": P(),
             "z_teacher": P(), "key": P(), "draws": P()}
    specs = {"params": P(), "memory": banks}
    return jax.jit(jax.shard_map(per_shard, mesh=mesh,
                                 in_specs=(specs, P("data"), P("data"), P("data")),
                                 out_specs=(P(), P(), {"memory": banks}),
                                 check_vma=False))

  loss1, grads1, state1 = step(1)(variables, case.student, case.teacher, case.index)
  loss2, grads2, state2 = step(2)(variables, case.student, case.teacher, case.index)
  bank1, bank2 = state1["memory"]["student"], state2["memory"]["student"]
  assert bank1.shape == bank2.shape == (22, 6)
  assert {s.data.shape for s in bank1.addressable_shards} == {(22, 6)}
  assert {s.data.shape for s in bank2.addressable_shards} == {(11, 6)}  # halved
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
  chex.assert_trees_all_close(grads2, grads1, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state2, state1, rtol=1e-5, atol=1e-6)
  # ... and equal to one device running the module unsharded on the whole batch.
  whole, _ = jax.jit(lambda v: module.apply(v, case.student, case.teacher,
                                            index=case.index, train=True,
                                            mutable=["memory"]))(variables)
  np.testing.assert_allclose(float(loss1), float(whole), rtol=1e-5)
  assert not np.allclose(bank1[case.index], variables["memory"]["student"][case.index])
  with pytest.raises(ValueError, match="divide nce_k"):
    jax.eval_shape(lambda: module.clone(memory_shards=5).init(
        jax.random.key(1), case.student, case.teacher, index=case.index))


# ---------------------------------------------------------------------------
# Integration: module methods inside the data-parallel train step.
# ---------------------------------------------------------------------------


def test_module_terms_train_in_the_sharded_step():
  input_shape, num_classes, num_train = (8, 8, 1), 10, 64
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  student = models.create("resnet8", num_classes)
  teacher = models.create("resnet14", num_classes)
  x = jnp.zeros((2, *input_shape))
  t_vars = teacher.init(jax.random.key(7), x[:1], train=False)
  # CRD's banks sharded over the 4 devices (memory_shards=4): 16 of 64 rows each.
  terms = [dict(method="crd", weight=0.8, feat_dim=16, nce_k=32, memory_shards=4),
           dict(method="vid", weight=1.0, student_tap="stage_2", teacher_tap="stage_2"),
           dict(method="review_kd", weight=1.0,
                student_tap="stage_1,stage_2,stage_3,embedding",
                teacher_tap="preact_stage_1,preact_stage_2,preact_stage_3,embedding"),
           dict(method="class_prior", weight=1.0)]
  objective = objective_lib.build({"ce_weight": 1.0, "terms": terms}, total_steps=4,
                                  steps_per_epoch=2, num_train=num_train)
  objective = objective_lib.resolve(
      objective, student.apply(student.init(jax.random.key(0), x), x)[1],
      teacher.apply(t_vars, x)[1], "resnet8", "resnet14")
  config = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9)
  optimizer = train.make_optimizer(config, train.learning_rate_schedule(config, 2, 4))
  state = jax.jit(lambda rng: train.init_state(  # one compilation instead of eager ops
      student, optimizer, input_shape, rng, objective, teacher, t_vars))(jax.random.key(0))
  memory0 = jax.device_get(state.term_state["memory"]["crd/embedding"]["method"])
  alpha0 = np.asarray(state.params["terms"]["vid/stage_2"]["method"]["alpha"])
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  state = parallel.replicate(state, mesh)
  t_vars = parallel.replicate(t_vars, mesh)
  rng = np.random.default_rng(0)
  seen = []
  for i in range(2):
    batch = {"image": rng.normal(size=(BATCH, *input_shape)).astype(np.float32),
             "label": rng.integers(0, num_classes, BATCH).astype(np.int32),
             "index": rng.permutation(num_train)[:BATCH].astype(np.int32)}
    seen.append(batch["index"])
    state, metrics = step_fn(state, t_vars, parallel.to_global(batch, mesh),
                             train.step_rng(0, i))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["crd/embedding"])
    for term in ("vid/stage_2", "review_kd", "class_prior"):
      assert np.isfinite(metrics[term])
  bank = state.term_state["memory"]["crd/embedding"]["method"]["teacher"]
  assert {shard.data.shape for shard in bank.addressable_shards} == {(16, 16)}
  state = parallel.to_host(state)
  memory = state.term_state["memory"]["crd/embedding"]["method"]
  seen = np.unique(np.concatenate(seen))
  unseen = np.setdiff1d(np.arange(num_train), seen)
  assert not np.allclose(memory["student"][seen], memory0["student"][seen])
  np.testing.assert_array_equal(memory["teacher"][unseen], memory0["teacher"][unseen])
  assert memory["z_student"] > 0 and memory["z_teacher"] > 0 and memory["draws"] == 2
  assert not np.allclose(state.params["terms"]["vid/stage_2"]["method"]["alpha"], alpha0)
  assert state.term_state["batch_stats"]["review_kd"]["method"]["abf_0"]["bn1"]["mean"].any()
  assert state.term_state["priors"]["class_prior"]["method"]["count"].sum() > 0
