"""Performance options of the KD step: bf16 teacher, cached teacher logits, no extra work."""
import os
import platform
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import configs, data, models, objective as objective_lib, parallel, train
from kd_jax import runtime, teacher_cache
from kd_jax.experiments import digits

INPUT = (8, 8, 1)
NUM_CLASSES = 10
RECIPE = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
              schedule="constant")
KD = {"ce_weight": 0.1, "terms": [dict(method="kd", weight=0.9, temperature=4.0)]}


def _unaugmented_digits(split="train[:96]"):
  config = data.default_data_config()
  config.train_split, config.augment = split, "none"
  return config


def _setup(distill=KD):
  mesh = parallel.data_mesh()
  student = models.create("resnet8", NUM_CLASSES)
  teacher = models.create("resnet8", NUM_CLASSES)  # initialised apart from the student
  t_vars = teacher.init(jax.random.key(7), jnp.zeros((1, *INPUT)), train=False)
  objective = objective_lib.build(distill, total_steps=10, steps_per_epoch=5)
  optimizer = train.make_optimizer(RECIPE, train.learning_rate_schedule(RECIPE, 5, 10))
  # On the host: each test replicates it afresh, and steps donate what they get.
  state = jax.device_get(train.init_state(student, optimizer, INPUT, jax.random.key(0)))
  return mesh, student, teacher, t_vars, objective, optimizer, state


def _images(seed, n=16):
  return np.random.default_rng(seed).normal(size=(n, *INPUT)).astype(np.float32)


def test_bf16_teacher_forward_is_close_to_float32():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup()
  x = _images(0)
  fp32 = jax.jit(teacher.apply)(t_vars, x)[0]
  bf16 = jax.jit(teacher.clone(dtype=jnp.bfloat16).apply)(t_vars, x)[0]
  assert bf16.dtype == jnp.float32  # logits leave the model in float32
  # bfloat16 keeps 8 significant bits: ~0.4% per op, a few % after 8 layers.
  scale = float(jnp.max(jnp.abs(fp32)))
  assert 0 < float(jnp.max(jnp.abs(bf16 - fp32))) < 0.05 * scale

  batch = parallel.to_global({"image": x, "label": np.arange(16) % NUM_CLASSES}, mesh)
  t_vars = parallel.replicate(t_vars, mesh)
  metrics = {}
  for bf16_teacher in (False, True):
    step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh,
                                    teacher_bf16=bf16_teacher)
    _, metrics[bf16_teacher] = step_fn(parallel.replicate(state, mesh), t_vars, batch,
                                       train.step_rng(0, 0))
  assert metrics[True]["kd"] != metrics[False]["kd"]  # the option is in effect
  np.testing.assert_allclose(metrics[True]["kd"], metrics[False]["kd"], rtol=0.05)
  np.testing.assert_array_equal(metrics[True]["ce"], metrics[False]["ce"])


def test_cached_logits_step_equals_teacher_step():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup()
  data_config = _unaugmented_digits()
  batch_size = 32
  logits = teacher_cache.training_set_logits(teacher, t_vars, data_config, mesh,
                                             batch_size)
  assert logits.shape == (96, NUM_CLASSES) and logits.dtype == np.float32

  def run(cached):
    step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
    batches = data.train_iterator(data_config, global_batch_size=batch_size, seed=0)
    if cached:
      batches = teacher_cache.attach(batches, logits)
    st, history = parallel.replicate(state, mesh), []
    for i, batch in zip(range(4), parallel.prefetch_to_device(batches, mesh)):
      st, metrics = step_fn(st, {} if cached else parallel.replicate(t_vars, mesh), batch,
                            train.step_rng(0, i))
      history.append(jax.device_get(metrics))
    assert step_fn._cache_size() == 1  # one compilation for the whole run
    return parallel.to_host(st), history

  cached_state, cached_history = run(cached=True)
  teacher_state, teacher_history = run(cached=False)
  # The cached logits come from a separately compiled teacher forward, so they may
  # differ from the step's own teacher forward in the last bit (XLA may fuse and vector-
  # ize the two programs differently, e.g. with or without AVX-512); four SGD steps
  # carry such float32 rounding (~1e-7 relative) forward without growing it past 1e-5.
  chex.assert_trees_all_close(cached_state.params, teacher_state.params,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(cached_state.batch_stats, teacher_state.batch_stats,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(cached_history, teacher_history, rtol=1e-5, atol=1e-6)
  # Not the same run by accident: the teacher matters (logits of another teacher
  # change the result far beyond that tolerance).
  other = teacher_cache.attach(data.train_iterator(data_config, global_batch_size=32,
                                                   seed=0), logits * 0.5)
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  st = parallel.replicate(state, mesh)
  for i, batch in zip(range(4), parallel.prefetch_to_device(other, mesh)):
    st, _ = step_fn(st, {}, batch, train.step_rng(0, i))
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       parallel.to_host(st).params, cached_state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_cache_refuses_augmented_data_and_feature_terms():
  objective = objective_lib.build(KD, total_steps=1, steps_per_epoch=1)
  augmented = data.default_data_config()  # kd_digits' default: 'cifar' crops
  with pytest.raises(ValueError, match="set --config.data.augment=none"):
    teacher_cache.check_cacheable(augmented, objective)
  edge = _unaugmented_digits()
  edge.edge_augment = ({"op": "jpeg", "prob": 0.3, "severity": 3},)
  with pytest.raises(ValueError, match="no data.edge_augment"):
    teacher_cache.check_cacheable(edge, objective)
  features = objective_lib.build(
      {"terms": [dict(method="attention_transfer", student_tap="stage_2")]},
      total_steps=1, steps_per_epoch=1)
  with pytest.raises(ValueError, match="'attention_transfer/stage_2' compares the "
                     "teacher's features"):
    teacher_cache.check_cacheable(_unaugmented_digits(), features)
  teacher_cache.check_cacheable(_unaugmented_digits(), objective)  # accepted

  config = digits.get_config("tiny")
  config.distill.cache_teacher_logits = True
  with pytest.raises(ValueError, match="needs a fixed, unaugmented training set"):
    configs.validate(config)
  config.data.augment = "none"
  configs.validate(config)


def test_cache_is_reused_only_for_the_same_teacher_and_data(tmp_path):
  mesh, student, teacher, t_vars, objective, *_ = _setup()
  data_config = _unaugmented_digits("train[:32]")
  path = str(tmp_path / "teacher_logits.npy")
  first = teacher_cache.load_or_compute(path, teacher, t_vars, data_config, objective,
                                        mesh, batch_size=32)
  np.save(path, np.zeros_like(first))  # a reused file is read back, not recomputed
  np.testing.assert_array_equal(teacher_cache.load_or_compute(
      path, teacher, t_vars, data_config, objective, mesh, batch_size=32), 0.0)
  other = jax.tree.map(lambda v: v * 1.5, t_vars)
  np.testing.assert_array_equal(teacher_cache.load_or_compute(
      path, teacher, other, data_config, objective, mesh, batch_size=32),
      teacher_cache.training_set_logits(teacher, other, data_config, mesh, 32))


def test_kd_step_does_no_work_beyond_teacher_forward_and_student_step():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup()
  state, t_vars = parallel.replicate(state, mesh), parallel.replicate(t_vars, mesh)
  batch = parallel.to_global({"image": _images(0, 32),
                              "label": np.arange(32, dtype=np.int32) % NUM_CLASSES}, mesh)
  rng = train.step_rng(0, 0)

  def flops(fn, *args):
    return fn.lower(*args).compile().cost_analysis()["flops"]

  ce_only = objective_lib.build({"ce_weight": 1.0}, total_steps=10, steps_per_epoch=5)
  kd = flops(train.make_train_step(student, teacher, objective, optimizer, mesh),
             state, t_vars, batch, rng)
  student_step = flops(train.make_train_step(student, teacher, ce_only, optimizer, mesh),
                       state, t_vars, batch, rng)
  teacher_forward = flops(jax.jit(lambda v, x: teacher.apply(v, x, train=False)[0]),
                          t_vars, batch["image"])
  cached = flops(train.make_train_step(student, teacher, objective, optimizer, mesh),
                 state, {}, {**batch, "teacher_logits": jnp.zeros((32, NUM_CLASSES))}, rng)
  # The KD loss itself (softmaxes of [32, 10]) is the only extra: well under 1%.
  assert teacher_forward + student_step < kd < 1.01 * (teacher_forward + student_step)
  assert student_step < cached < 1.01 * student_step


def test_default_cpu_flags_are_set_before_jax_and_user_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  runtime.configure_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=4"
  assert flags[1:] == list(runtime.CPU_XLA_FLAGS)
  name = runtime.CPU_XLA_FLAGS[0].split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"{name}=mine")
  runtime.configure_xla_flags()
  assert os.environ["XLA_FLAGS"].split() == [f"{name}=mine", *runtime.CPU_XLA_FLAGS[1:]]


_IMPORT_EVERYTHING = """
import os, pkgutil, importlib
from kd_jax import runtime
def refuse(*args, **kwargs):
  raise AssertionError("runtime.configure* called on import")
runtime.configure = runtime.configure_xla_flags = runtime.configure_allocator = refuse
import kd_jax
names = [m.name for m in pkgutil.walk_packages(kd_jax.__path__, "kd_jax.")
         if m.name not in ("kd_jax.cli",) and ".experiments." not in m.name]
for name in names:
  importlib.import_module(name)
import kd_jax.cli  # the command sets them only when it runs
print(len(names), os.environ.get("XLA_FLAGS"))
"""


def test_importing_kd_jax_leaves_the_process_settings_alone():
  # Only the kd-jax command and the benchmarks set XLA flags and the allocator.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING], env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  count, flags = out.stdout.split()
  assert int(count) > 30 and flags == "None"


_REUSE_SCRIPT = """
import ctypes, resource, sys
from kd_jax import runtime
changed = runtime.configure_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for _ in range(3):  # a step's temporary buffer: allocated, written, freed
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(96 << 20)
  ctypes.memset(buffer, 1, 96 << 20)
  libc.free(buffer)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(changed, faults[-1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_allocator_reuses_freed_buffers_unless_the_user_set_malloc_options():
  def run(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])

  changed, faults = run()
  assert changed and faults < 100  # 96 MiB written again without touching new pages
  changed, faults = run(MALLOC_ARENA_MAX="8")  # the user's setting: left alone
  assert not changed and faults > 20_000  # glibc maps 96 MiB afresh: 24,576 pages


def _benchmark(name):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conv_kernel_benchmark_finds_every_dense_convolution_of_a_model():
  bench = _benchmark("conv_kernels")
  counts, *_ = bench.model_convs("resnet8", 2)
  s, pad1, pad0 = bench.Shape, ((1, 1), (1, 1)), ((0, 0), (0, 0))
  # resnet8, widths 16/16/32/64: stem, one block per stage, 1x1 shortcuts where the
  # width changes (stride 2; PyTorch's padding, so a 3x3/2 pads one pixel each side).
  assert counts == {
      s((2, 32, 32, 3), (3, 3, 3, 16), (1, 1), pad1): 1,
      s((2, 32, 32, 16), (3, 3, 16, 16), (1, 1), pad1): 2,
      s((2, 32, 32, 16), (3, 3, 16, 32), (2, 2), pad1): 1,
      s((2, 16, 16, 32), (3, 3, 32, 32), (1, 1), pad1): 1,
      s((2, 32, 32, 16), (1, 1, 16, 32), (2, 2), pad0): 1,
      s((2, 16, 16, 32), (3, 3, 32, 64), (2, 2), pad1): 1,
      s((2, 8, 8, 64), (3, 3, 64, 64), (1, 1), pad1): 1,
      s((2, 16, 16, 32), (1, 1, 32, 64), (2, 2), pad0): 1,
  }
  # 2 images x 16x16 outputs x (3*3*16) taps x 32 channels, a multiply and an add each.
  expected = 2 * 2 * 16 * 16 * 144 * 32
  assert bench.flops(s((2, 32, 32, 16), (3, 3, 16, 32), (2, 2), pad1)) == expected
  # MobileNetV2: the stem, two 1x1s in each of its 17 blocks and the last 1x1; the
  # blocks' depthwise convolutions are grouped, so they are left out.
  mobile, *_ = bench.model_convs("MobileNetV2", 1)
  assert sum(mobile.values()) == 1 + 2 * 17 + 1
  assert all(shape.rhs[2] == shape.lhs[3] for shape in mobile)
