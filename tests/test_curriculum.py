"""Curriculum (difficulty, pacing, host-sharded sampling) and self-paced weighting."""
import copy
import importlib.util
import json
import math
import os
import shutil
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import array_record as array_record_source
from jax.sharding import Mesh

from kd_jax import cli, configs, data, losses, models, objective as objective_lib
from kd_jax import parallel, teacher_pass
from kd_jax.data import curriculum as curriculum_lib
from kd_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64
NUM_TRAIN = 1438
# A fixed ranking of the digits training split: example i has difficulty rank
# (i · 7) mod 1438 (7 is coprime with 1438, so this is a permutation).
DIFFICULTY = ((np.arange(NUM_TRAIN) * 7) % NUM_TRAIN / NUM_TRAIN).astype(np.float32)
RANK = np.argsort(np.argsort(DIFFICULTY))
CURRICULUM = curriculum_lib.Curriculum(DIFFICULTY, "linear", start_fraction=0.25,
                                       full_step=10)


# --- pacing ----------------------------------------------------------------------


def test_pacing_fraction_by_step():
  def fractions(kind):
    return curriculum_lib.pacing_fraction(kind, [0, 24, 25, 50, 99, 100, 150],
                                          start_fraction=0.25, full_step=100, stages=4)
  np.testing.assert_allclose(fractions("linear"),
                             [0.25, 0.43, 0.4375, 0.625, 0.9925, 1.0, 1.0])
  # root: sqrt(1/16 + 15/16 · p); p = 1/2 -> sqrt(17/32).
  np.testing.assert_allclose(fractions("root")[[0, 3, 5]], [0.25, math.sqrt(17 / 32), 1.0])
  # geometric: 0.25^(1 - p); p = 1/2 -> 1/2.
  np.testing.assert_allclose(fractions("geometric")[[0, 3, 5, 6]], [0.25, 0.5, 1.0, 1.0])
  # step: four increments of 0.1875 at p = 1/4, 1/2, 3/4, 1.
  np.testing.assert_allclose(fractions("step"),
                             [0.25, 0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0])
  with pytest.raises(ValueError, match="curriculum.pacing='cubic' is unknown"):
    curriculum_lib.pacing_fraction("cubic", 0, start_fraction=0.5, full_step=1)


def test_pool_size_is_a_ceiling_and_never_below_the_batch():
  c = curriculum_lib.Curriculum(np.zeros(10, np.float32), "linear", 0.25, full_step=4)
  # Fractions 0.25, 0.4375, 0.625, 0.8125, 1 of 10 examples.
  np.testing.assert_array_equal(c.pool_size(np.arange(6), 2), [3, 5, 7, 9, 10, 10])
  np.testing.assert_array_equal(c.pool_size(np.arange(6), 6), [6, 6, 7, 9, 10, 10])
  np.testing.assert_array_equal(c.order, np.arange(10))  # ties stay in file order


# --- difficulty --------------------------------------------------------------------


def test_difficulty_by_hand():
  # Probabilities (1/4, 1/2, 1/4); labels 1 and 0.
  logits = jnp.log(jnp.array([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]))
  labels = jnp.array([1, 0])
  np.testing.assert_allclose(teacher_pass.difficulty(logits, labels, "teacher_loss"),
                             [math.log(2), math.log(4)], rtol=1e-6)
  np.testing.assert_allclose(teacher_pass.difficulty(logits, labels, "margin"),
                             [0.25 - 0.5, 0.5 - 0.25], rtol=1e-6)
  entropy = 1.5 * math.log(2)  # -(2 · 1/4 · log 1/4 + 1/2 · log 1/2)
  np.testing.assert_allclose(teacher_pass.difficulty(logits, labels, "entropy"),
                             [entropy, entropy], rtol=1e-6)
  with pytest.raises(ValueError, match="scoring='loss' is unknown"):
    teacher_pass.difficulty(logits, labels, "loss")


class _Lookup(nn.Module):
  """Returns the logits stored in row `image[0, 0, 0]` of a fixed table."""
  table: tuple

  def __call__(self, x, train=False):
    logits = jnp.asarray(self.table, jnp.float32)[x[:, 0, 0, 0].astype(jnp.int32)]
    return logits, {"embedding": logits}


def test_difficulty_scores_keep_order_and_drop_padding():
  rng = np.random.default_rng(0)
  n, classes = 13, 5
  table = rng.normal(size=(n, classes)) * 2
  labels = rng.integers(0, classes, n).astype(np.int32)
  images = np.zeros((16, 1, 1, 1), np.float32)
  images[:n, 0, 0, 0] = np.arange(n)
  padded = np.zeros(16, np.int32)
  padded[:n] = labels
  mask = (np.arange(16) < n).astype(np.float32)
  batches = [{"image": images[i:i + 8], "label": padded[i:i + 8], "mask": mask[i:i + 8]}
             for i in (0, 8)]
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  scores = teacher_pass.difficulty_scores(_Lookup(tuple(map(tuple, table))), {},
                                            batches, mesh, "teacher_loss")
  assert scores.shape == (n,) and scores.dtype == np.float32
  np.testing.assert_allclose(scores, losses.cross_entropy_per_example(table, labels),
                             rtol=1e-5)


@pytest.mark.parametrize("spec, message", [
    ({"pacing": "cubic"}, "curriculum.pacing='cubic' is unknown; use none or one of"),
    ({"scoring": "loss"}, "curriculum.scoring='loss' is unknown"),
    ({"start_fraction": 0.0}, "start_fraction must be in (0, 1]"),
    ({"full_at_epoch": -1}, "full_at_epoch must not be negative"),
    ({"pace": "linear"}, "curriculum has no key 'pace'; did you mean 'pacing'? its keys: pacing"),
])
def test_bad_curriculum_configs_are_one_line_errors(spec, message):
  with pytest.raises(ValueError) as error:
    curriculum_lib.settings(spec)
  assert message in str(error.value)


# --- sampling in tf.data ----------------------------------------------------------


def curriculum_batches(n, config=None, **kw):
  kw = {"global_batch_size": BATCH, "seed": 0, "process_index": 0, "process_count": 1,
        "curriculum": CURRICULUM, **kw}
  iterator = data.train_iterator(config or data.default_data_config(), **kw)
  return [next(iterator) for _ in range(n)]


def test_two_hosts_draw_disjoint_reproducible_slices_of_the_paced_pool():
  steps = 12  # the pool grows to the whole split at step 10
  single = curriculum_batches(steps)
  hosts = [curriculum_batches(steps, process_index=i, process_count=2) for i in range(2)]
  pools = CURRICULUM.pool_size(np.arange(steps), BATCH)
  assert pools[0] == math.ceil(0.25 * NUM_TRAIN) and pools[10] == NUM_TRAIN
  for step in range(steps):
    parts = [host[step] for host in hosts]
    first, second = (set(p["index"]) for p in parts)
    assert len(first) == len(second) == BATCH // 2 and not first & second
    for key in ("image", "label", "index", "difficulty"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    single[step][key])
    index = single[step]["index"]
    assert RANK[index].max() < pools[step]  # only the easiest pools[step] examples
    np.testing.assert_array_equal(single[step]["difficulty"], DIFFICULTY[index])
  assert RANK[single[-1]["index"]].max() >= pools[0]  # the hard examples come in
  # Reproducible, and a resumed host continues its own slice of the same curriculum.
  again = curriculum_batches(3, process_index=1, process_count=2)
  resumed = curriculum_batches(3, start_step=steps - 3, process_index=1, process_count=2)
  for got, want in ((again, hosts[1][:3]), (resumed, hosts[1][-3:])):
    for g, w in zip(got, want):
      for key in w:
        np.testing.assert_array_equal(g[key], w[key])
  other_seed = curriculum_batches(1, seed=1)
  assert set(other_seed[0]["index"]) != set(single[0]["index"])


def test_curriculum_batches_hold_the_drawn_training_examples():
  config = data.default_data_config()
  config.update(augment="none", mean=(0.0,), std=(1 / 255,))  # raw pixels
  (batch,) = curriculum_batches(1, config)
  split = list(tfds.as_numpy(tfds.builder("kd_digits").as_dataset(split="train")))
  for image, label, index in zip(batch["image"], batch["label"], batch["index"]):
    np.testing.assert_array_equal(np.round(image).astype(np.uint8), split[index]["image"])
    assert label == split[index]["label"]


def test_curriculum_holds_scores_and_reads_only_the_drawn_records(tmp_path,
                                                                  monkeypatch):
  # ArrayRecord, not cached: no tensor of the split's images is ever built, and every
  # read is exactly one step's draw of this host; the batches equal those of the
  # same split held in memory (the default TFRecord kd_digits, cached).
  config = data.default_data_config()
  config.update(data_dir=str(tmp_path), cache=False)
  tfds.builder("kd_digits", data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record")
  in_memory = curriculum_batches(16, process_index=1, process_count=2)

  def no_split_in_memory(source):
    raise AssertionError("the training split was materialised")

  monkeypatch.setattr(pipeline, "_in_memory_split", no_split_in_memory)
  source_class = array_record_source.ArrayRecordDataSource
  with mock.patch.object(source_class, "__getitems__", autospec=True,
                         side_effect=source_class.__getitems__) as reads:
    batches = curriculum_batches(4, config, process_index=1, process_count=2)
  draws = [b["index"].tolist() for b in in_memory]  # 16 steps cover any read-ahead.
  assert reads.call_count >= 4
  assert all(list(call.args[1]) in draws for call in reads.call_args_list)
  for got, want in zip(batches, in_memory):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_scores_of_another_split_are_refused():
  config = data.default_data_config()
  config.train_split = "train[:10%]"
  with pytest.raises(ValueError, match="scores 1438 examples but train\\[:10%\\] has 144"):
    curriculum_batches(1, config)


def test_for_run_scores_with_the_teacher_once(tmp_path, monkeypatch):
  config = ml_config(pacing="step", scoring="margin", full_at_epoch=2.0, stages=2)
  train_data = copy.deepcopy(config.data)
  train_data.train_split = "train[:10%]"
  teacher = models.create("resnet8", 10)
  t_vars = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  mesh = parallel.data_mesh()
  kw = dict(train_data=train_data, teacher=teacher, teacher_variables=t_vars, mesh=mesh)
  c = teacher_pass.curriculum_for_run(config, str(tmp_path), **kw)
  # The training examples only: 144 in train[:10%], less the last 14 held out for
  # validation (data.validation_fraction=0.1), in file order.
  assert train_data.validation_fraction == 0.1
  expected = teacher_pass.difficulty_scores(
      teacher, t_vars, data.eval_iterator(train_data, batch_size=128, split="train"), mesh,
      "margin")
  np.testing.assert_array_equal(c.difficulty, expected)
  assert c.difficulty.shape == (130,)
  assert (c.pacing, c.start_fraction, c.stages) == ("step", 0.3, 2)
  assert c.full_step == 2 * (130 // 32)  # epochs of train.batch_size batches
  saved = tmp_path / "curriculum" / "difficulty_margin.npy"
  np.testing.assert_array_equal(np.load(saved), expected)

  def no_second_pass(*args, **kwargs):
    raise AssertionError("the saved scores were not reused")

  monkeypatch.setattr(teacher_pass, "difficulty_scores", no_second_pass)
  np.testing.assert_array_equal(teacher_pass.curriculum_for_run(config, str(tmp_path), **kw)
                                .difficulty, expected)
  config.curriculum.pacing = "none"
  assert teacher_pass.curriculum_for_run(config, str(tmp_path), **kw) is None


def ml_config(**curriculum):
  """The tiny digits config with these curriculum settings."""
  spec = importlib.util.spec_from_file_location("digits_config", configs.DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.curriculum.update(curriculum)
  return config


# --- self-paced weighting ------------------------------------------------------------


def test_self_paced_weights_by_hand():
  per_example = jnp.array([0.5, 1.0, 2.0, 3.0])
  weights = lambda kind: objective_lib.self_paced_weights(per_example, 2.0, kind, 0.5)
  np.testing.assert_array_equal(weights("hard"), [1, 1, 0, 0])
  np.testing.assert_allclose(weights("linear"), [0.75, 0.5, 0, 0])
  sigmoid = lambda z: 1 / (1 + math.exp(-z))  # (2 - l) / 0.5
  np.testing.assert_allclose(weights("soft"), [sigmoid(3), sigmoid(2), 0.5, sigmoid(-2)],
                             rtol=1e-6)


def test_per_example_losses_average_to_the_losses():
  rng = np.random.default_rng(0)
  s, t = (jnp.asarray(rng.normal(size=(6, 10)) * 3, jnp.float32) for _ in range(2))
  labels = jnp.asarray(rng.integers(0, 10, 6))
  pairs = [(losses.kd, losses.kd_per_example, (s, t)),
           (losses.lskd, losses.lskd_per_example, (s, t)),
           (losses.dkd, losses.dkd_per_example, (s, t, labels)),
           (losses.cross_entropy, losses.cross_entropy_per_example, (s, labels))]
  for mean, per_example, args in pairs:
    values = per_example(*args)
    assert values.shape == (6,)
    np.testing.assert_allclose(jnp.mean(values), mean(*args), rtol=1e-6)
  # One example by hand: T = 1, KL((1/2, 1/2) || (1/4, 3/4)) = ½ log 2 + ½ log(2/3).
  kl = losses.kd_per_example(jnp.log(jnp.array([[1.0, 3.0]])), jnp.zeros((1, 2)), 1.0)
  np.testing.assert_allclose(kl, [0.5 * math.log(4 / 3)], rtol=1e-6)


def _self_paced_objective(kind):
  return objective_lib.build(
      {"ce_weight": 0.1, "terms": [dict(method="kd", weight=0.9, temperature=4.0)],
       "self_paced": dict(kind=kind, start_threshold=1.0, final_threshold=3.0,
                          full_at_epoch=2.0)},
      total_steps=100, steps_per_epoch=5)


def test_self_paced_objective_weighs_ce_and_kd():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.normal(size=(8, 10)) * 2, jnp.float32) for _ in range(2))
  labels = jnp.asarray(rng.integers(0, 10, 8))
  obj = _self_paced_objective("linear")
  ce = np.asarray(losses.cross_entropy_per_example(s, labels))
  kd = np.asarray(losses.kd_per_example(s, t, 4.0))
  for step, threshold in ((0, 1.0), (5, 2.0), (10, 3.0), (50, 3.0)):  # 1 -> 3 by step 10
    total, parts, _ = obj(jnp.int32(step), {}, s, {}, t, {}, labels, train=False)
    v = np.maximum(0, 1 - ce / threshold)
    np.testing.assert_allclose(parts["self_paced/threshold"], threshold, rtol=1e-6)
    np.testing.assert_allclose(parts["self_paced/admitted"], np.mean(ce < threshold))
    np.testing.assert_allclose(parts["self_paced/mean_weight"], v.mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], np.mean(v * ce), rtol=1e-5)
    np.testing.assert_allclose(parts["kd"], np.mean(v * kd), rtol=1e-5)
    np.testing.assert_allclose(total, 0.1 * np.mean(v * ce) + 0.9 * np.mean(v * kd),
                               rtol=1e-5)
  # The weights are constants: the gradient is that of the weighted sum with v fixed.
  v = jnp.asarray(np.maximum(0, 1 - ce / 2.0))
  grad = jax.grad(lambda z: obj(jnp.int32(5), {}, z, {}, t, {}, labels)[0])(s)
  fixed = jax.grad(lambda z: jnp.mean(v * (0.1 * losses.cross_entropy_per_example(
      z, labels) + 0.9 * losses.kd_per_example(z, t, 4.0))))(s)
  np.testing.assert_allclose(grad, fixed, rtol=1e-5, atol=1e-7)


def test_self_paced_off_is_the_plain_objective():
  assert _self_paced_objective("none").self_paced is None
  with pytest.raises(ValueError, match="self_paced.kind='easy' is unknown"):
    _self_paced_objective("easy")
  with pytest.raises(ValueError, match="0 < start_threshold <= final_threshold"):
    objective_lib.build({"self_paced": dict(kind="hard", start_threshold=3.0,
                                            final_threshold=1.0)},
                        total_steps=1, steps_per_epoch=1)
  with pytest.raises(ValueError, match="self_paced has no key 'threshold'"):
    objective_lib.build({"self_paced": dict(kind="hard", threshold=3.0)},
                        total_steps=1, steps_per_epoch=1)


# --- end to end: flags on the tiny digits config ----------------------------------

FLAGS = ("--config.curriculum.pacing=linear", "--config.curriculum.start_fraction=0.5",
         "--config.curriculum.full_at_epoch=2", "--config.distill.self_paced.kind=linear",
         "--config.distill.self_paced.full_at_epoch=1",
         "--config.data.edge_augment=({'op': 'motion_blur', 'prob': 0.5, "
         "'severity': (1, 5)}, {'op': 'shot_noise', 'prob': 0.5})",
         "--config.train_vanilla=False", "--config.export.variants=()")


def _kd_jax(*args):
  cli.main(["kd-jax", *args])


def _distill(workdir):
  _kd_jax("distill", f"--config={os.path.join(ROOT, 'kd_jax/experiments/digits.py:tiny')}",
          f"--workdir={workdir}", *FLAGS)
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("curriculum"))
  return workdir, _distill(workdir)


def test_curriculum_and_self_paced_run_logs_their_schedules(finished_run):
  workdir, _ = finished_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  logged = [r for r in records if r["phase"] == "distilled" and r["kind"] == "train"]
  assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 27]  # 3 epochs of 288 // 32
  scores = np.load(os.path.join(workdir, "curriculum", "difficulty_teacher_loss.npy"))
  # The student's budget, train[:20%] (it validates on student.validation_split).
  assert scores.shape == (288,)
  for r in logged:
    step = r["step"] - 1  # the record's batch; 9 steps per epoch
    fraction = 0.5 + 0.5 * min(step / 18, 1.0)  # linear from 0.5, whole split at step 18
    assert r["curriculum_fraction"] == math.ceil(fraction * 288 - 1e-9) / 288
    assert 0 <= r["curriculum_difficulty"] <= scores.max()
    threshold = 2.0 + 4.0 * min(step / 9, 1.0)  # 2 -> 6 over the first epoch
    np.testing.assert_allclose(r["self_paced/threshold"], threshold, rtol=1e-6)
    assert 0 <= r["self_paced/mean_weight"] <= r["self_paced/admitted"] <= 1


def test_interrupted_curriculum_run_resumes_bit_identical(finished_run, tmp_path):
  workdir, summary = finished_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  # As if the run had stopped after its step-20 checkpoint of 27.
  os.remove(os.path.join(resumed, "summary.json"))
  shutil.rmtree(os.path.join(resumed, "distilled"))
  shutil.copytree(os.path.join(workdir, "distilled", "checkpoints", "20"),
                  os.path.join(resumed, "distilled", "checkpoints", "20"))
  saved = os.path.join(resumed, "curriculum", "difficulty_teacher_loss.npy")
  written = os.path.getmtime(saved)
  again = _distill(resumed)
  assert os.path.getmtime(saved) == written  # the scores were reused
  assert again["student_fingerprint"] == summary["student_fingerprint"]


def test_evaluate_robustness_from_the_command_line(finished_run, monkeypatch):
  workdir, summary = finished_run
  # Two of the six corruptions of grayscale digits keep the test short.
  monkeypatch.setattr(data.augment, "corruptions", lambda channels: ("jpeg", "cutout"))
  _kd_jax("evaluate", f"--workdir={workdir}", "--robustness")
  with open(os.path.join(workdir, "robustness.json")) as f:
    result = json.load(f)
  assert result["corruptions"] == ["jpeg", "cutout"]
  assert set(result["models"]) == {"teacher", "distilled"}
  distilled = result["models"]["distilled"]
  assert distilled["clean"] == summary["distilled_accuracy"]
  assert result["models"]["teacher"]["clean"] == summary["teacher_accuracy"]
  levels = np.array([distilled["accuracy"][c] for c in result["corruptions"]])
  assert levels.shape == (2, 5)
  assert distilled["mean_corrupted"] == pytest.approx(levels.mean(), abs=1e-12)
  text = open(os.path.join(workdir, "robustness.md")).read()
  assert f"**{distilled['mean_corrupted']:.4f}**" in text
  with open(os.path.join(workdir, "evaluation.json")) as f:
    assert json.load(f)["robustness"] == result
