"""The data-parallel train step: 4 devices == 1 device, one compilation, exact KD metrics."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from kd_jax import losses, models, objective as objective_lib, parallel, train

INPUT = (8, 8, 1)
NUM_CLASSES = 10
CONFIG = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
              schedule="step", decay_epochs=(1,), decay_factor=0.1)


def _batch(seed, n=16):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, *INPUT)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)}


KD = ({"method": "kd", "weight": 0.9, "temperature": 4.0},)
FITNET = KD + ({"method": "fitnet", "weight": 100.0, "student_tap": "stage_2",
                "teacher_tap": "stage_2", "adapter": "conv1x1"},)


def _setup(n_devices, terms=KD, teacher_name="resnet14"):
  mesh = Mesh(np.asarray(jax.devices()[:n_devices]), (parallel.DATA_AXIS,))
  student = models.create("resnet8", NUM_CLASSES)
  teacher = models.create(teacher_name, NUM_CLASSES)
  t_vars = teacher.init(jax.random.key(7), jnp.zeros((1, *INPUT)), train=False)
  objective = objective_lib.build({"ce_weight": 0.1, "terms": list(terms)},
                                  total_steps=4, steps_per_epoch=2)
  x = jnp.zeros((2, *INPUT))
  objective = objective_lib.resolve(
      objective, student.apply(student.init(jax.random.key(0), x), x)[1],
      teacher.apply(t_vars, x)[1], "resnet8", teacher_name)
  schedule = train.learning_rate_schedule(CONFIG, steps_per_epoch=2, total_steps=4)
  optimizer = train.make_optimizer(CONFIG, schedule)
  state = train.init_state(student, optimizer, INPUT, jax.random.key(0), objective,
                           teacher, t_vars)
  return mesh, student, teacher, t_vars, objective, optimizer, state


def _run(n_devices, steps=3, **kw):
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup(n_devices, **kw)
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  state = parallel.replicate(state, mesh)
  t_vars = parallel.replicate(t_vars, mesh)
  history = []
  for i in range(steps):
    state, metrics = step_fn(state, t_vars, parallel.to_global(_batch(i), mesh),
                             train.step_rng(0, i))
    history.append(jax.device_get(metrics))
  return parallel.to_host(state), history, step_fn


@pytest.mark.parametrize("kw", [{}, {"terms": FITNET, "teacher_name": "wrn_16_2"}],
                         ids=["kd", "kd+fitnet_adapter"])
def test_four_devices_match_one_device(kw):
  assert jax.device_count() >= 4
  state1, hist1, _ = _run(1, **kw)
  state4, hist4, _ = _run(4, **kw)
  # Cross-device BatchNorm statistics and pmean'd gradients make the sharded step
  # the same computation as the single-device one, up to float reassociation.
  chex.assert_trees_all_close(state4.params, state1.params, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(state4.batch_stats, state1.batch_stats, atol=2e-5, rtol=2e-5)
  for m1, m4 in zip(hist1, hist4):
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  assert int(state4.step) == 3
  if "terms" in kw:  # the adapter (1x1 conv 32->64 channels + BN) trains with the student
    adapter = state4.params["terms"]["fitnet/stage_2"]["adapter"]
    assert adapter["Conv_0"]["kernel"].shape == (1, 1, 32, 64)
    chex.assert_trees_all_close(state4.term_state, state1.term_state, atol=2e-5, rtol=2e-5)
    assert np.any(state4.term_state["batch_stats"]["fitnet/stage_2"]["adapter"]
                  ["BatchNorm_0"]["mean"] != 0)


def test_step_compiles_once():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup(4)
  traced = chex.assert_max_traces(n=1)(lambda *a, **kw: objective(*a, **kw))

  class Counting(objective_lib.Objective):
    def __call__(self, *args, **kwargs):
      return traced(*args, **kwargs)

  counting = Counting(objective.ce_weight, objective.terms)
  step_fn = train.make_train_step(student, teacher, counting, optimizer, mesh)
  state = parallel.replicate(state, mesh)
  t_vars = parallel.replicate(t_vars, mesh)
  for i in range(4):  # crosses the learning-rate boundary at step 2: still one trace
    state, _ = step_fn(state, t_vars, parallel.to_global(_batch(i), mesh),
                       train.step_rng(0, i))
  assert step_fn._cache_size() == 1


def test_metrics_are_the_objective_terms():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup(1)
  batch = _batch(0)
  s_logits, _ = student.apply({"params": state.params["student"],
                               "batch_stats": state.batch_stats["student"]},
                              batch["image"], train=True, mutable=["batch_stats"])[0]
  t_logits, _ = teacher.apply(t_vars, batch["image"], train=False)
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  _, metrics = step_fn(parallel.replicate(state, mesh), parallel.replicate(t_vars, mesh),
                       parallel.to_global(batch, mesh), train.step_rng(0, 0))
  kd = losses.kd(s_logits, t_logits, temperature=4.0)
  ce = losses.cross_entropy(s_logits, batch["label"])
  # KD is a small difference of large terms: τ² Σ p_t (log p_t − log p_s) ≈ 0.08 from
  # log-probabilities of order log K ≈ 2.3 (÷ τ² = 16: a KL of 0.005). The jitted step
  # and this eager apply round the logits differently (~1e-7 relative, CPU-dependent:
  # 1.2e-5 of KD measured on an AVX-512 Xeon), so KD's relative tolerance is that
  # cancellation (2.3 / 0.005 ≈ 460) times float32's epsilon, rounded up to 1e-4.
  np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(metrics["kd_weighted"], 0.9 * kd, rtol=1e-4)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], 0.1 * ce + 0.9 * kd, rtol=1e-5)


def test_teacher_is_not_updated_or_donated():
  mesh, student, teacher, t_vars, objective, optimizer, state = _setup(4)
  t_vars = parallel.replicate(t_vars, mesh)
  before = parallel.to_host(t_vars)
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  state, _ = step_fn(parallel.replicate(state, mesh), t_vars,
                     parallel.to_global(_batch(0), mesh), train.step_rng(0, 0))
  chex.assert_trees_all_equal(parallel.to_host(t_vars), before)


def test_learning_rate_step_decay_and_sgd_update():
  # CRD recipe shape: lr 0.05, ×0.1 at epochs 150/180/210.
  cfg = dict(learning_rate=0.05, schedule="step", decay_epochs=(150, 180, 210),
             decay_factor=0.1)
  s = train.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=2400)
  np.testing.assert_allclose([s(0), s(1499), s(1500), s(1800), s(2100)],
                             [0.05, 0.05, 0.005, 0.0005, 0.00005], rtol=1e-5)
  # PyTorch SGD: d = g + wd·p; buf = m·buf + d; p -= lr·buf. Two steps by hand:
  opt = train.make_optimizer(dict(optimizer="sgd", momentum=0.9, weight_decay=0.1),
                             optax.constant_schedule(0.5))
  p = jnp.array([1.0])
  st = opt.init(p)
  g = jnp.array([2.0])
  u, st = opt.update(g, st, p)
  p = p + u          # d = 2 + 0.1 = 2.1; buf = 2.1; p = 1 - 0.5·2.1 = -0.05
  np.testing.assert_allclose(p, [-0.05], rtol=1e-6)
  u, st = opt.update(g, st, p)
  p = p + u          # d = 2 - 0.005 = 1.995; buf = 0.9·2.1 + 1.995 = 3.885; p = -0.05 - 1.9425
  np.testing.assert_allclose(p, [-1.9925], rtol=1e-6)


def test_objective_errors_name_the_fix():
  with pytest.raises(ValueError, match="unknown distillation method 'kdd'; did you mean 'kd'\\?"):
    objective_lib.build({"terms": [{"method": "kdd"}]}, total_steps=1, steps_per_epoch=1)
  with pytest.raises(ValueError, match="kd takes no alpha"):
    objective_lib.build({"terms": [{"method": "kd", "alpha": 1}]}, total_steps=1,
                        steps_per_epoch=1)
  obj = objective_lib.build({"terms": [{"method": "attention_transfer",
                                        "student_tap": "stage_9"}]},
                            total_steps=1, steps_per_epoch=1)
  taps = {"stage_1": jnp.zeros((2, 8, 8, 16))}
  with pytest.raises(ValueError, match="resnet8 has no tap 'stage_9'; its taps: stage_1"):
    objective_lib.resolve(obj, taps, taps, "resnet8", "resnet14")
  fit = objective_lib.build({"terms": [{"method": "fitnet", "student_tap": "stage_1"}]},
                            total_steps=1, steps_per_epoch=1)
  wide = {"stage_1": jnp.zeros((2, 8, 8, 64))}
  with pytest.raises(ValueError, match="has shape .* add adapter='conv1x1' to the term"):
    objective_lib.resolve(fit, taps, wide, "resnet8", "resnet8x4")


def test_weight_schedules():
  warm = objective_lib.weight_schedule(8.0, "linear_warmup", total_steps=100,
                                       steps_per_epoch=10, warmup_epochs=2)
  np.testing.assert_allclose([warm(jnp.int32(0)), warm(jnp.int32(10)), warm(jnp.int32(50))],
                             [0.0, 4.0, 8.0])
  cos = objective_lib.weight_schedule(2.0, "cosine", total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([cos(jnp.int32(0)), cos(jnp.int32(50)), cos(jnp.int32(100))],
                             [2.0, 1.0, 0.0], atol=1e-6)


def test_fingerprint_is_byte_exact():
  a = {"w": np.arange(3, dtype=np.float32)}
  b = {"w": np.arange(3, dtype=np.float32) + np.float32(1e-7) * np.array([0, 0, 1])}
  assert train.fingerprint(a) == train.fingerprint(jax.tree.map(np.copy, a))
  assert train.fingerprint(a) != train.fingerprint(b)


def test_temperature_schedule_feeds_the_loss():
  obj = objective_lib.build(
      {"ce_weight": 0.0, "terms": [dict(method="kd", weight=1.0, temperature=8.0,
                                        temperature_schedule="linear",
                                        final_temperature=2.0)]},
      total_steps=10, steps_per_epoch=5)
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)
  for step, temp in ((0, 8.0), (5, 5.0), (10, 2.0), (20, 2.0)):  # 8 → 2 over 10 steps
    total, parts, _ = obj(jnp.int32(step), {}, s, {}, t, {}, labels, train=False)
    np.testing.assert_allclose(parts["kd"], losses.kd(s, t, temperature=temp), rtol=1e-6)
  with pytest.raises(ValueError, match="needs final_temperature"):
    objective_lib.build({"terms": [dict(method="kd", temperature_schedule="linear")]},
                        total_steps=1, steps_per_epoch=1)


def test_dot_two_momenta_match_the_authors_optimizer():
  # Two steps of the authors' DOT (mdistiller engine/dot.py, torch, float64) on a toy
  # parameter: w = [1, -2], lr 0.1, momentum 0.9, delta 0.075, weight decay 5e-4.
  opt = optax.chain(train.dot(0.9, 0.075, 5e-4), optax.scale_by_learning_rate(0.1))
  w = jnp.array([1.0, -2.0])
  state = opt.init(w)
  for g_ce, g_kd, expected in (([0.1, 0.2], [-0.05, 0.4], [0.99495, -2.0599]),
                               ([0.3, -0.1], [0.2, 0.0], [0.9414840025, -2.105214505])):
    updates, state = opt.update({"task": jnp.array(g_ce), "distill": jnp.array(g_kd)},
                                state, w)
    w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
  # delta 0: SGD with momentum and coupled weight decay on the summed gradient.
  sgd = train.make_optimizer(dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4),
                             optax.constant_schedule(0.1))
  dot0 = optax.chain(train.dot(0.9, 0.0, 5e-4), optax.scale_by_learning_rate(0.1))
  a, b = jnp.array([1.0, -2.0]), jnp.array([1.0, -2.0])
  sa, sb = sgd.init(a), dot0.init(b)
  for g_ce, g_kd in (([0.1, 0.2], [-0.05, 0.4]), ([0.3, -0.1], [0.2, 0.0])):
    u, sa = sgd.update(jnp.array(g_ce) + jnp.array(g_kd), sa, a)
    a = optax.apply_updates(a, u)
    u, sb = dot0.update({"task": jnp.array(g_ce), "distill": jnp.array(g_kd)}, sb, b)
    b = optax.apply_updates(b, u)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_dot_step_splits_the_task_and_distillation_gradients():
  # With delta 0 the DOT step must equal the plain SGD step on the same batch.
  mesh = parallel.data_mesh()
  student = models.create("resnet8", 10)
  teacher = models.create("resnet8", 10)
  t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  obj = objective_lib.build(dict(ce_weight=0.1, terms=[dict(method="kd", weight=0.9)]),
                            total_steps=10, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = parallel.to_global({"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
                              "label": rng.integers(0, 10, 8).astype(np.int32)}, mesh)
  results = []
  for name in ("sgd", "dot"):
    recipe = dict(optimizer=name, dot_delta=0.0, learning_rate=0.1, schedule="constant")
    opt = train.make_optimizer(recipe, train.learning_rate_schedule(recipe, 10, 10))
    state = parallel.replicate(train.init_state(
        student, opt, (8, 8, 1), jax.random.key(0), obj, teacher, t_vars,
        batch_size=8 // jax.device_count()), mesh)
    step = train.make_train_step(student, teacher, obj, opt, mesh,
                                 split_gradients=name == "dot")
    for i in range(2):
      state, metrics = step(state, parallel.replicate(t_vars, mesh), batch,
                            train.step_rng(0, i))
    results.append(jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="cannot accumulate"):
    train.check_recipe(dict(optimizer="dot", accumulation_steps=2))
