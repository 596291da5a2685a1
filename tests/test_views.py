"""Several views of each training example: the pipeline, the objective and the step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import configs, data, experiment, losses, models, objective, parallel, train


def _batch(variant, batch_size=16):
  c = configs.validate(configs.experiment_config("digits_views", variant + ":tiny"))
  return c, next(data.train_iterator(c.data, global_batch_size=batch_size, seed=0,
                                     process_index=0, process_count=1))


def test_paired_clean_view_is_the_image_without_its_corruption():
  c, batch = _batch("clean_teacher")
  plain = c.data.copy_and_resolve_references()
  plain.edge_augment, plain.views = (), ()
  reference = next(data.train_iterator(plain, global_batch_size=16, seed=0,
                                       process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["view/clean"], reference["image"])  # same crop
  assert not np.array_equal(batch["image"], reference["image"])  # corrupted
  np.testing.assert_array_equal(batch["label"], reference["label"])


def test_views_are_deterministic_and_resume_by_step():
  c, _ = _batch("mlkd")
  stream = data.train_iterator(c.data, global_batch_size=16, seed=0, process_index=0,
                               process_count=1)
  batches = [next(stream) for _ in range(3)]
  resumed = next(data.train_iterator(c.data, global_batch_size=16, seed=0, start_step=2,
                                     process_index=0, process_count=1))
  for key in ("image", "view/strong"):
    np.testing.assert_array_equal(resumed[key], batches[2][key])
  assert not np.array_equal(batches[0]["image"], batches[0]["view/strong"])


class _Probe(nn.Module):
  """A 'teacher' whose logits are the mean of its input image times (0..K-1)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.param("unused", nn.initializers.zeros, (1,))
    mean = jnp.mean(x, axis=(1, 2, 3))
    return mean[:, None] * jnp.arange(self.num_classes, dtype=x.dtype), {}


def test_the_teacher_sees_the_clean_view_and_the_student_the_corrupted_one():
  c, batch = _batch("clean_teacher")
  obj = objective.build(c.distill, total_steps=10, steps_per_epoch=10)
  assert obj.teacher_views == ("clean",) and obj.student_views == ("image",)
  mesh = parallel.data_mesh()
  student = models.create("resnet8", 10)
  opt = train.make_optimizer(c.train, train.learning_rate_schedule(c.train, 10, 10))
  teacher = _Probe()
  t_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  state = train.init_state(student, opt, (8, 8, 1), jax.random.key(0), obj, teacher, t_vars,
                           batch_size=16 // jax.device_count())
  variables = jax.device_get(state.student_variables)
  step = train.make_train_step(student, teacher, obj, opt, mesh)
  _, metrics = step(parallel.replicate(state, mesh), parallel.replicate(t_vars, mesh),
                    parallel.to_global(batch, mesh), train.step_rng(0, 0))
  # The KD term by hand: BatchNorm statistics are synced over the devices, so the
  # student's logits are those of the whole batch.
  (s_logits, _), _ = student.apply(variables, batch["image"], train=True,
                                   mutable=["batch_stats"])
  expected = {view: float(losses.kd(s_logits, teacher.apply(t_vars, batch[key])[0], 4.0))
              for view, key in (("clean", "view/clean"), ("image", "image"))}
  assert abs(expected["clean"] - expected["image"]) > 1e-3  # the views are distinguishable
  np.testing.assert_allclose(float(metrics["kd"]), expected["clean"], rtol=2e-5)


def test_mixup_mixes_each_view_with_the_rolled_batch_by_hand():
  x = jnp.arange(6.0).reshape(3, 2, 1, 1)
  batch = {"image": x, "view/strong": 10 * x, "label": jnp.array([0, 1, 2])}
  rng = jax.random.key(3)
  lam = float(jax.random.beta(rng, 0.5, 0.5))
  out = train.mixup(batch, rng, 0.5)
  # Example 0 is mixed with example 2 (the batch rolled by one), 1 with 0, 2 with 1.
  expected = np.array([[lam * 0 + (1 - lam) * 4, lam * 1 + (1 - lam) * 5],
                       [lam * 2 + (1 - lam) * 0, lam * 3 + (1 - lam) * 1],
                       [lam * 4 + (1 - lam) * 2, lam * 5 + (1 - lam) * 3]])
  np.testing.assert_allclose(out["image"][..., 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out["view/strong"][..., 0, 0], 10 * expected, rtol=1e-6)
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_mixup_refuses_labels():
  terms = [dict(method="kd", weight=1.0)]
  with pytest.raises(ValueError, match="set distill.ce_weight=0"):
    objective.build(dict(ce_weight=0.1, mixup_alpha=1.0, terms=terms), total_steps=1,
                    steps_per_epoch=1)
  with pytest.raises(ValueError, match=r"label-using term \(dkd\)"):
    objective.build(dict(ce_weight=0.0, mixup_alpha=1.0, terms=[dict(method="dkd")]),
                    total_steps=1, steps_per_epoch=1)


def test_function_matching_teacher_and_student_see_the_same_mixed_images():
  c, batch = _batch("function_matching")
  obj = objective.build(c.distill, total_steps=10, steps_per_epoch=10)
  assert obj.mixup_alpha == 1.0 and obj.ce_weight == 0.0
  mesh = parallel.data_mesh()
  student = models.create("resnet8", 10)
  opt = train.make_optimizer(c.train, train.learning_rate_schedule(c.train, 10, 10))
  teacher = _Probe()
  t_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  devices = jax.device_count()
  state = train.init_state(student, opt, (8, 8, 1), jax.random.key(0), obj, teacher, t_vars,
                           batch_size=16 // devices)
  variables = jax.device_get(state.student_variables)
  step = train.make_train_step(student, teacher, obj, opt, mesh)
  _, metrics = step(parallel.replicate(state, mesh), parallel.replicate(t_vars, mesh),
                    parallel.to_global(batch, mesh), train.step_rng(0, 0))
  # By hand: each device mixes its own shard with its step key (folded with the
  # device index, then mixup's salt); the student sees the whole mixed batch (BatchNorm
  # synced), the teacher the same images.
  shards = []
  for d, shard in enumerate(np.split(np.asarray(batch["image"]), devices)):
    key = jax.random.fold_in(jax.random.fold_in(train.step_rng(0, 0), d), train.MIXUP_SALT)
    shards.append(train.mixup({"image": jnp.asarray(shard)}, key, 1.0)["image"])
  mixed = jnp.concatenate(shards)
  (s_logits, _), _ = student.apply(variables, mixed, train=True, mutable=["batch_stats"])
  expected = float(losses.kd(s_logits, teacher.apply(t_vars, mixed)[0], 1.0))
  (plain_logits, _), _ = student.apply(variables, batch["image"], train=True,
                                       mutable=["batch_stats"])
  unmixed = float(losses.kd(plain_logits, teacher.apply(t_vars, batch["image"])[0], 1.0))
  assert abs(expected - unmixed) > 1e-4 * abs(unmixed)
  np.testing.assert_allclose(float(metrics["kd"]), expected, rtol=2e-5)


@pytest.mark.parametrize("variant", ["clean_teacher", "mlkd", "function_matching"])
def test_view_configs_run_end_to_end(variant, tmp_path):
  c = configs.experiment_config("digits_views", variant + ":tiny")
  c.export.variants = ()
  c.train_vanilla = False
  summary = experiment.distill(c, str(tmp_path))
  assert 0.1 < summary["distilled_accuracy"] <= 1.0


def test_self_paced_weights_follow_the_mean_ce_over_views():
  spec = dict(ce_views=("image", "strong"), self_paced=dict(kind="hard", start_threshold=1.0,
                                                            final_threshold=1.0))
  obj = objective.build(spec, total_steps=10, steps_per_epoch=10)
  labels = jnp.array([0, 0])
  # Per view CE: example 0 ≈ 0.9 nats on both views (mean < 1: admitted), example 1
  # ≈ 0.3 and 1.5 (sum 1.8 > 1 but mean 0.9 < 1: admitted too).
  logits = {"image": jnp.log(jnp.array([[0.41, 0.59], [0.74, 0.26]])),
            "strong": jnp.log(jnp.array([[0.41, 0.59], [0.22, 0.78]]))}
  views = objective.Views(logits)
  total, parts, _ = obj(0, {}, views, objective.Views(), None, None, labels)
  each = -jnp.log(jnp.array([0.41, 0.74])) - jnp.log(jnp.array([0.41, 0.22]))
  np.testing.assert_allclose(parts["self_paced/mean_weight"], 1.0)
  np.testing.assert_allclose(total, jnp.mean(each), rtol=1e-6)
