"""Tests for kd_jax.workflows: heads, domain adaptation, continual updates.

Unit tests check the new losses against hand-computed values, the derived labels and
the multi-head modules; the end-to-end tests run each workflow's tiny config through
`kd_jax.experiment.distill` with one shared tiny teacher.
"""
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import configs, experiment, losses, workflows
from kd_jax import data as data_lib
from kd_jax.models import create
from kd_jax.workflows import continual, heads
from tests import digit_folders

EXPERIMENTS = configs.EXPERIMENTS_DIR
IMAGE_SHAPE = (8, 8, 1)
PARITY, LARGE = (heads.Task.of_map(heads.TASKS[name]) for name in ("parity", "large"))


def _config(name, variant="tiny"):
  spec = importlib.util.spec_from_file_location(
      f"experiments_digits_{name}", os.path.join(EXPERIMENTS, f"digits_{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# --- losses -------------------------------------------------------------------------


def test_grouped_kd_hand_value():
  # Teacher probabilities (1, 1, 2, 1) / 5; groups (0, 1, 0, 1) sum them to (3/5, 2/5);
  # the student's (1/2, 1/2): KL = 0.6 ln 1.2 + 0.4 ln 0.8, times T² = 1.
  teacher = jnp.array([[0.0, 0.0, math.log(2.0), 0.0]])
  student = jnp.zeros((1, 2))
  expected = 0.6 * math.log(1.2) + 0.4 * math.log(0.8)
  value = heads.grouped_kd(student, teacher, (0, 1, 0, 1), temperature=1.0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  jitted = jax.jit(heads.grouped_kd, static_argnums=(2, 3))(student, teacher, (0, 1, 0, 1),
                                                              1.0)
  np.testing.assert_allclose(jitted, value, rtol=1e-6)


def test_grouped_kd_with_identity_groups_is_kd():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(heads.grouped_kd(student, teacher, (0, 1, 2, 3), 4.0),
                             losses.kd(student, teacher, 4.0), rtol=1e-5)


def test_lwf_hand_value():
  # Old classes (0, 1): teacher (1/4, 3/4), student (1/2, 1/2); class 2 is ignored.
  # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 − ln 2.
  teacher = jnp.array([[0.0, math.log(3.0), 99.0]])
  student = jnp.array([[0.0, 0.0, -5.0]])
  np.testing.assert_allclose(continual.lwf(student, teacher, (0, 1), temperature=1.0),
                             0.75 * math.log(3.0) - math.log(2.0), rtol=1e-5)
  # At T = 2 it is T² times the KL of the halved logits.
  np.testing.assert_allclose(
      continual.lwf(student, teacher, (0, 1), temperature=2.0),
      4.0 * continual.lwf(student / 2, teacher / 2, (0, 1), temperature=1.0), rtol=1e-5)


def test_update_objectives():
  block = _config("continual").continual
  seen = (0, 1, 2, 3)
  for strategy in ("none", "replay", "ewc"):
    assert continual.update_objective(strategy, block, seen) == {"ce_weight": 1.0,
                                                                  "terms": []}
  (term,) = continual.update_objective("lwf", block, seen)["terms"]
  assert term == dict(method="lwf", weight=1.0, temperature=2.0, classes=seen)
  (term,) = continual.update_objective("teacher", block, seen)["terms"]
  assert term["method"] == "kd"


def _variables(name):
  model = create(name, 10)
  return jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))


def _count(tree, mask):
  return sum(int(np.size(x)) for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
             if m)


def test_trainable_subsets_of_zoo_models():
  for name, last_stage in [("resnet8", {"stage3_block0", "classifier"}),
                           ("wrn_16_2", {"stage3_block0", "stage3_block1", "final_bn",
                                         "classifier"}),
                           ("MobileNetV2", {"group6_block0", "head_conv", "classifier"})]:
    variables = _variables(name)
    params = variables["params"]
    size = lambda names: sum(int(np.size(x)) for n in names
                             for x in jax.tree.leaves(params[n]))
    masks = {s: continual.trainable_masks(variables, s) for s in continual.TRAINABLE}
    assert _count(params, masks["all"]["params"]) == size(params)
    assert _count(params, masks["head"]["params"]) == size(["classifier"])
    assert _count(params, masks["last_stage"]["params"]) == size(last_stage), name
    # BatchNorm: every scale and bias of a layer with statistics, and the classifier.
    stats = variables["batch_stats"]
    bn = sum(int(np.size(x)) for x in jax.tree.leaves(stats))  # (mean, var) ~ (scale, bias)
    assert _count(params, masks["batchnorm"]["params"]) == bn + size(["classifier"])
    assert all(jax.tree.leaves(masks["batchnorm"]["batch_stats"]))
    assert not any(jax.tree.leaves(masks["head"]["batch_stats"]))


def test_masked_optimizer_leaves_frozen_parameters_exactly():
  import optax
  params = {"student": {"a": jnp.ones(3), "b": jnp.ones(2)}, "terms": {"w": jnp.ones(1)}}
  grads = jax.tree.map(jnp.ones_like, params)
  wrap = continual.masked_optimizer({"a": True, "b": False})
  optimizer = wrap(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, 0.9)))
  state = optimizer.init(params)
  for _ in range(2):
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["student"]["b"], np.ones(2))
  # SGD with momentum 0.9 and decay 0.1: steps -0.55 and -0.55·0.9 - 0.5·1.0725.
  first = 1 - 0.5 * 1.1
  np.testing.assert_allclose(params["student"]["a"],
                             first - 0.5 * (0.9 * 1.1 + 1 + 0.1 * first), rtol=1e-6)
  assert params["terms"]["w"][0] != 1.0


def test_ewc_gradient_adds_the_penalty_gradient():
  fisher = {"w": jnp.array([2.0, 0.5])}
  anchor = {"w": jnp.array([1.0, -1.0])}
  params = {"student": {"w": jnp.array([3.0, 1.0])}, "terms": {}}
  grads = {"student": {"w": jnp.array([0.1, 0.2])}, "terms": {}}
  transform = continual.ewc_gradient(fisher, anchor, strength=10.0)
  out, _ = transform.update(grads, transform.init(params), params)
  # g + λ F (θ − θ*) = (0.1 + 10·2·2, 0.2 + 10·0.5·2)
  np.testing.assert_allclose(out["student"]["w"], [40.1, 10.2], rtol=1e-6)


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x.reshape((x.shape[0], -1))), {}


def test_fisher_diagonal_of_a_linear_model_by_hand():
  model = _Linear()
  x = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]], np.float32)
  variables = jax.device_get(model.init(jax.random.key(1), x[:1]))
  w, b = (np.asarray(variables["params"]["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
  # log p_y = z_y − logsumexp z, z = x W + b: ∂/∂W[:, k] = x (δ_yk − p_k), ∂/∂b_k = δ_yk − p_k.
  fw, fb = np.zeros_like(w), np.zeros_like(b)
  for xi in x[:2].astype(np.float64):  # the third example is masked out
    z = xi @ w + b
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for y in range(3):
      d = np.eye(3)[y] - p
      fw += p[y] * np.outer(xi, d) ** 2
      fb += p[y] * d ** 2
  batches = [{"image": x[:2], "mask": np.ones(2, np.float32)},
             {"image": x[2:], "mask": np.zeros(1, np.float32)}]
  fisher = continual.fisher_diagonal(model, variables, batches)
  np.testing.assert_allclose(fisher["Dense_0"]["kernel"], fw / 2, rtol=1e-5)
  np.testing.assert_allclose(fisher["Dense_0"]["bias"], fb / 2, rtol=1e-5)


def test_reservoir_is_uniform_and_seeded():
  stream = list(range(20))
  assert continual.reservoir(stream[:3], 5, seed=0) == [0, 1, 2]
  assert continual.reservoir(stream, 5, seed=7) == continual.reservoir(stream, 5, seed=7)
  counts = np.zeros(20)
  for seed in range(4000):
    buffer = continual.reservoir(stream, 5, seed=seed)
    assert len(set(buffer)) == 5
    counts[buffer] += 1
  # Each item is kept with probability 5/20: 1000 of 4000 draws, binomial sd ≈ 27.
  assert np.all(np.abs(counts - 1000) < 5 * 27.4), counts


def test_first_percent_takes_each_class_in_file_order():
  labels = np.array([3, 1, 3, 3, 1, 0, 3])
  # Class 3 at 0, 2, 3, 6: half is 0, 2; class 1 at 1, 4: half is 1.
  assert continual.first_percent(labels, (3, 1), 50) == [0, 1, 2]
  assert continual.first_percent(labels, (0,), 10) == [5]  # at least one


def test_transfer_metrics_by_hand():
  matrix = [[0.9, 0.0, 0.0], [0.7, 0.8, 0.1], [0.6, 0.5, 0.9]]
  out = continual.transfer(matrix, baseline=[0.1, 0.05, 0.0])
  assert out["average_accuracy"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
  assert out["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
  assert out["forward_transfer"] == pytest.approx(((0.0 - 0.05) + (0.1 - 0.0)) / 2)


# --- derived labels and heads -------------------------------------------------------


def test_task_labels_by_hand():
  digits = np.arange(10)
  np.testing.assert_array_equal(heads.task_labels(digits, heads.TASKS["parity"]),
                                [0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(heads.task_labels(digits, heads.TASKS["large"]),
                                [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(heads.task_labels(digits, None), digits)


def test_task_predictions_sum_probabilities_per_group():
  # Probabilities (3, 1, 0, 1, 0, 1, 0, 1, 0, 0) / 7 (up to e^-30): digit 0 is the most
  # likely digit, yet odd digits together (4/7) beat even ones (3/7).
  logits = np.full((1, 10), -30.0)
  logits[0, [1, 3, 5, 7]] = 0.0
  logits[0, 0] = math.log(3.0)
  assert heads.task_predictions(logits, None)[0] == 0
  assert heads.task_predictions(logits, heads.TASKS["parity"])[0] == 1
  # 0, 1, 3: 5/7 below five
  assert heads.task_predictions(logits, heads.TASKS["large"])[0] == 0


def test_name_map_numbers_task_classes_in_sorted_order():
  # Classes cat, dog, owl -> mammal, mammal, bird; bird < mammal: task classes 1, 1, 0.
  mapping = {"owl": "bird", "cat": "mammal", "dog": "mammal"}
  assert heads.name_map(mapping, ("cat", "dog", "owl"), "animal") == (1, 1, 0)
  with pytest.raises(ValueError, match=r"heads.tasks.animal.map names unknown classes "
                     r"\['cow'\]; the classes are cat, dog, owl$"):
    heads.name_map({**mapping, "cow": "mammal"}, ("cat", "dog", "owl"), "animal")
  with pytest.raises(ValueError, match=r"leaves out classes \['owl'\]"):
    heads.name_map({"cat": "mammal", "dog": "mammal"}, ("cat", "dog", "owl"), "animal")


def test_feature_tasks_get_a_map_only_where_the_feature_follows_the_class():
  labels = np.array([0, 1, 2, 1, 0])
  assert heads.groups_of(labels, np.array([1, 0, 1, 0, 1]), 3) == (1, 0, 1)
  assert heads.groups_of(labels, np.array([1, 0, 1, 1, 1]), 3) is None  # class 1: 0 and 1
  assert heads.groups_of(labels, np.array([1, 0, 1, 0, 1]), 4) is None  # class 3 unseen
  coarse = heads.Task(3, feature="coarse_label")
  batch = {"label": labels, "labels/coarse_label": np.array([2, 0, 1, 0, 2])}
  np.testing.assert_array_equal(coarse.labels(batch), [2, 0, 1, 0, 2])
  np.testing.assert_array_equal(PARITY.labels(batch), [0, 1, 0, 1, 0])
  terms = heads.head_terms([heads.HeadSpec("coarse", coarse, "stage_3")], 1.0, 4.0, 0.5)
  assert [(t["method"], t.get("labels")) for t in terms] == [
      ("task_ce", "labels/coarse_label")]
  terms = heads.head_terms([heads.HeadSpec("coarse", coarse._replace(groups=(0, 1, 2)),
                                           "stage_3")], 1.0, 4.0, 0.5)
  assert [t["method"] for t in terms] == ["grouped_kd", "task_ce"]


def test_multi_head_student_keeps_the_zoo_variables_and_outputs():
  trunk = create("resnet8", 10)
  variables = trunk.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  model = heads.MultiHeadStudent(trunk, (heads.HeadSpec("parity", PARITY, "stage_3"),))
  full = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  assert set(full["params"]) == set(variables["params"]) | {"head_parity"}
  full = heads.merge_variables(variables, {"params": {"head_parity":
                                                      full["params"]["head_parity"]}})
  images = jax.random.normal(jax.random.key(1), (3, *IMAGE_SHAPE))
  logits, taps = model.apply(full, images)
  np.testing.assert_array_equal(logits, trunk.apply(variables, images)[0])
  assert taps["head/parity"].shape == (3, 2)


def test_frozen_trunk_gets_no_gradient():
  trunk = heads.MultiHeadStudent(create("resnet8", 10),
                                 (heads.HeadSpec("parity", PARITY, "stage_3"),))
  trunk_vars = trunk.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  model = heads.HeadsOnFrozenTrunk(trunk, trunk_vars,
                                   (heads.HeadSpec("large", LARGE, "stage_2", 4),))
  variables = model.init(jax.random.key(1), jnp.zeros((1, *IMAGE_SHAPE)))
  assert set(variables["params"]) == {"head_large"}  # the trunk is not a variable
  images = jax.random.normal(jax.random.key(2), (4, *IMAGE_SHAPE))
  logits, taps = model.apply(variables, images)
  trunk_logits, trunk_taps = trunk.apply(trunk_vars, images)
  np.testing.assert_array_equal(logits, trunk_logits)
  np.testing.assert_array_equal(taps["head/parity"], trunk_taps["head/parity"])
  assert taps["head/large"].shape == (4, 2)


def test_export_output_layout():
  outputs = np.arange(14.0)[None]
  parts = heads.split_outputs(outputs, ("digit", "parity", "large"),
                              {"digit": heads.Task(10), "parity": PARITY, "large": LARGE})
  np.testing.assert_array_equal(parts["digit"], outputs[:, :10])
  np.testing.assert_array_equal(parts["large"], outputs[:, 12:])


# --- configs and errors -------------------------------------------------------------


@pytest.mark.parametrize("name", ["heads", "domain", "continual"])
def test_configs_validate(name):
  configs.validate(_config(name, ""))
  configs.validate(_config(name))


def test_bad_workflow_configs_fail_in_one_line():
  config = _config("heads")
  config.workflow = "nope"
  with pytest.raises(ValueError, match="unknown workflow 'nope'; .*--config.workflow"):
    workflows.run(config, "unused")
  config = _config("continual")
  config.continual.tasks = ((0, 1, 2, 3, 4), (4, 5))
  with pytest.raises(ValueError, match="disjoint"):
    continual.check_config(config)
  config = _config("continual")
  config.continual.runs = ("lwf:all", "rehearsal:head")
  with pytest.raises(ValueError, match="'rehearsal:head' is not STRATEGY:TRAINABLE"):
    continual.check_config(config)
  config = _config("heads")
  config.heads.added = ("parity",)
  with pytest.raises(ValueError, match="each task once"):
    heads.check_config(config)
  config = _config("heads")
  config.heads.added = ()
  with pytest.raises(ValueError, match="heads.added names no task"):
    heads.check_config(config)
  config = _config("heads")
  config.heads.added = ("shape",)
  with pytest.raises(ValueError, match=r"unknown tasks \['shape'\]; declare them in "
                     "heads.tasks"):
    heads.check_config(config)
  config = _config("heads")
  config.heads.tasks = dict(parity=(0, 1) * 5, large=(0, 0, 0, 0, 0, 1, 1, 1, 1),
                            loops=heads.TASKS["parity"])
  with pytest.raises(ValueError, match="heads.tasks.large must map each of the 10 "
                     "classes of kd_digits"):
    heads.check_config(config)
  config = _config("heads")
  config.heads.tasks.loops = dict(feature="coarse_label")
  with pytest.raises(ValueError, match="kd_digits has no label feature coarse_label "
                     r"\(its ClassLabel features beside 'label': none\); change "
                     "heads.tasks.loops.feature$"):
    heads.check_config(config)
  config.heads.tasks.loops = dict(map={"0": "one"}, feature="label")
  with pytest.raises(ValueError, match="heads.tasks.loops must be a label map"):
    heads.check_config(config)


# --- end to end ---------------------------------------------------------------------


@pytest.fixture
def teacher_dir(tiny_teacher):
  return tiny_teacher


def _run(name, teacher_dir, workdir):
  config = _config(name)
  config.teacher.checkpoint = teacher_dir
  summary = experiment.distill(config, str(workdir))
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["accuracy"] == summary["accuracy"]
  return config, summary


def _phase_metrics(workdir, phase):
  with open(os.path.join(workdir, phase, "model.json")) as f:
    return json.load(f)["metrics"]


def test_heads_end_to_end(teacher_dir, tmp_path):
  config, summary = _run("heads", teacher_dir, tmp_path)
  accuracy = summary["accuracy"]
  # The added head leaves the frozen trunk's digit and parity answers unchanged.
  assert accuracy["added"]["digit"] == accuracy["trunk"]["digit"]
  assert accuracy["added"]["parity"] == accuracy["trunk"]["parity"]
  assert accuracy["trunk"]["digit"] == _phase_metrics(tmp_path, "trunk")["accuracy"]
  # A task declared only in the config (closed loops of the digit: 0, 1 or 2).
  assert summary["tasks"]["loops"] == [1, 0, 0, 0, 1, 0, 1, 0, 2, 1]
  assert summary["added_heads"] == ["large", "loops"]
  # Bit for bit: the trunk's logits and its parity head's, before and after adding.
  assert summary["trunk_max_abs_diff"] == 0.0
  tflite = summary["tflite"]
  assert tflite["outputs"] == ["digit", "loops"]
  assert tflite["max_abs_logit_diff"] < 1e-4
  for task in ("digit", "loops"):
    assert abs(tflite["accuracy"][task] - accuracy["added"][task]) <= 1 / 359
    single = tflite["per_task"][task]  # the per-head model answers as the multi-output one
    assert single["outputs"] == [task] and single["max_abs_logit_diff"] < 1e-4
    assert abs(single["accuracy"][task] - tflite["accuracy"][task]) <= 1 / 359
    assert os.path.exists(single["path"])


def test_heads_feature_task_end_to_end(tmp_path):
  # Mock CIFAR-100: a head on its coarse_label (random here, so no map: trained from
  # its labels alone) with the trunk, a head by class name added on the frozen trunk.
  config = _config("heads")
  config.data.update(name="cifar100", image_size=8)  # small images: a quick run
  config.student.update(train_split="train[:50%]", validation_split="train[50%:75%]")
  config.teacher.train.batch_size = config.train.batch_size = 8
  config.heads.tasks = dict(coarse=dict(feature="coarse_label"),
                            high=dict(map={str(c): str(c >= 50) for c in range(100)}))
  config.heads.update(base="fine", joint=("coarse",), added=("high",), export=("coarse",))
  with tfds.testing.mock_data(num_examples=32):
    summary = experiment.distill(config, str(tmp_path))
  assert summary["features"] == {"coarse": "coarse_label"}
  assert summary["tasks"]["coarse"] is None
  assert summary["tasks"]["high"] == [0] * 50 + [1] * 50
  accuracy = summary["accuracy"]
  assert accuracy["teacher"]["coarse"] is None  # no head and no map: no answer
  assert accuracy["added"]["coarse"] == accuracy["trunk"]["coarse"] is not None
  assert summary["trunk_max_abs_diff"] == 0.0
  tflite = summary["tflite"]
  assert tflite["outputs"] == ["coarse"] and tflite["max_abs_logit_diff"] < 1e-4
  assert abs(tflite["accuracy"]["coarse"] - accuracy["added"]["coarse"]) <= 1 / 32


def test_continual_end_to_end(teacher_dir, tmp_path):
  config = _config("continual")
  config.teacher.checkpoint = teacher_dir
  config.continual.tasks = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))  # two updates per run
  summary = experiment.distill(config, str(tmp_path))
  tasks = [tuple(t) for t in config.continual.tasks]
  tests = [sum(1 for e in tfds.as_numpy(tfds.builder("kd_digits").as_dataset("test"))
               if int(e["label"]) in t) for t in tasks]
  # Each update trained on its own classes' images: the first half of each, in file
  # order (+ replay).
  labels = data_lib.train_labels(config.data)
  first = summary["runs"]["lwf:all"]["updates"][0]
  assert first["train_images"] == sum((labels == c).sum() // 2 for c in tasks[1])
  assert set(summary["runs"]) == {"lwf:all", "replay:head", "ewc:last_stage",
                                  "teacher:batchnorm"}
  assert summary["run"] == "lwf:all"
  assert summary["accuracy_matrix"] == summary["runs"]["lwf:all"]["accuracy_matrix"]
  base = _phase_metrics(tmp_path, "base")["accuracy"]
  for name, run in summary["runs"].items():
    strategy, subset = name.split(":")
    matrix = np.asarray(run["accuracy_matrix"])
    assert matrix.shape == (3, 3)
    assert matrix[0, 0] == base  # row 0: the deployed model
    assert run["average_accuracy"] == pytest.approx(matrix[2].mean())
    assert run["backward_transfer"] == pytest.approx(
        np.mean([matrix[2, j] - matrix[j, j] for j in range(2)]))
    for i in range(1, 3):
      phase = f"update{i}_{strategy}_{subset}"
      # The phase's own evaluation (all classes seen so far) is the matrix row's
      # test-image-weighted mean.
      seen = np.asarray(tests[:i + 1])
      assert _phase_metrics(tmp_path, phase)["accuracy"] == pytest.approx(
          (matrix[i, :i + 1] * seen).sum() / seen.sum(), abs=1e-9)
    assert len(run["delta_bytes"]) == 2
  # A head-only update ships the classifier alone; the trunk, statistics included, is
  # the deployed one bit for bit.
  delta = np.load(os.path.join(tmp_path, "update1_replay_head", "delta.npz"))
  assert sorted(delta.files) == ["params/classifier/bias", "params/classifier/kernel"]
  head = summary["runs"]["replay:head"]["updates"][0]
  assert head["trained_parameters"] == 64 * 10 + 10  # resnet8's 64-wide embedding
  assert head["delta_bytes"] == os.path.getsize(
      os.path.join(tmp_path, "update1_replay_head", "delta.npz"))
  with open(os.path.join(tmp_path, "update1_replay_head", "replay.json")) as f:
    replay = json.load(f)
  assert len(replay["examples"]) == head["replay_images"] == config.continual.replay_size
  labels = data_lib.train_labels(config.data)
  assert set(labels[replay["examples"]]) <= set(tasks[0])
  # Every update of a last-stage run leaves the stem and the first stages unchanged.
  delta = np.load(os.path.join(tmp_path, "update2_ewc_last_stage", "delta.npz"))
  assert delta.files and all(k.split("/")[1] in ("stage3_block0", "classifier")
                             for k in delta.files)
  # Rerun: every phase is found finished and the same figures come back.
  again = experiment.distill(config, str(tmp_path))
  assert again["runs"] == summary["runs"]


def _tiny_continual(teacher_dir, **block):
  config = _config("continual")
  config.teacher.checkpoint = teacher_dir
  config.continual.update(block)
  return config


def test_class_incremental_on_an_image_folder(teacher_dir, tmp_path):
  root = digit_folders.write_digits(tmp_path / "digits", counts=(("train", 200),
                                                                 ("test", 60)))
  tasks = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
  config = _tiny_continual(teacher_dir, tasks=tasks, runs=("replay:all",), replay_size=8)
  config.data.update(name=f"folder:{root}", channels=1, flip=False)
  labels = data_lib.train_labels(config.data)
  # An earlier attempt's buffer of update 1 is read back, not drawn again.
  written = [int(p) for p in np.flatnonzero(np.isin(labels, tasks[0]))[:5]]
  os.makedirs(tmp_path / "run" / "update1_replay_all")
  with open(tmp_path / "run" / "update1_replay_all" / "replay.json", "w") as f:
    json.dump({"capacity": 8, "seen": 0, "examples": written}, f)
  summary = experiment.distill(config, str(tmp_path / "run"))
  assert summary["tasks"] == [list(t) for t in tasks] and summary["mode"] == "class"
  assert np.asarray(summary["accuracy_matrix"]).shape == (3, 3)
  updates = summary["updates"]
  # Update i trained on the first half of each of its classes' images (+ replay).
  for update, t in zip(updates, tasks[1:]):
    assert update["train_images"] == sum((labels == c).sum() // 2 for c in t)
  assert updates[0]["replay_images"] == 5
  with open(tmp_path / "run" / "update2_replay_all" / "replay.json") as f:
    replay = json.load(f)["examples"]
  assert updates[1]["replay_images"] == len(replay) == 8
  assert set(labels[replay]) <= set(tasks[0] + tasks[1])
  # The deployed model's test accuracy on task 0 counts the folder's test images of it.
  test = tfds.builder("kd_digits").as_dataset("test").take(60)
  tests = sum(1 for e in tfds.as_numpy(test) if int(e["label"]) in tasks[0])
  r00 = summary["accuracy_matrix"][0][0]
  assert round(r00 * tests, 6) == round(r00 * tests)


def test_domain_incremental_over_corruptions(teacher_dir, tmp_path):
  domains = ("none", "motion_blur@3", "gaussian_noise@3")
  config = _tiny_continual(teacher_dir, mode="domain", domains=domains,
                           runs=("lwf:adapters",))
  summary = experiment.distill(config, str(tmp_path))
  assert summary["mode"] == "domain" and summary["tasks"] == list(domains)
  matrix = np.asarray(summary["accuracy_matrix"])
  assert matrix.shape == (3, 3)
  assert matrix[0, 0] == _phase_metrics(tmp_path, "base")["accuracy"]  # clean test
  assert summary["backward_transfer"] == pytest.approx(
      np.mean([matrix[2, j] - matrix[j, j] for j in range(2)]))
  # Every domain has all classes: an update trains on half of each class's images.
  labels = data_lib.train_labels(config.data)
  assert summary["updates"][0]["train_images"] == sum(
      (labels == c).sum() // 2 for c in range(10))
  # Each column is its domain's test split under the corruption.
  assert len(set(matrix[0])) == 3
  # An adapter update ships the adapters and the classifier; resnet8's three adapters
  # hold 16² + 32² + 64² weights.
  delta = np.load(os.path.join(tmp_path, "update1_lwf_adapters", "delta.npz"))
  names = {k.split("/")[1] for k in delta.files}
  assert names == {"adapter_stage1_block0", "adapter_stage2_block0",
                   "adapter_stage3_block0", "classifier"}
  assert summary["updates"][0]["trained_parameters"] == 5376 + 64 * 10 + 10


def test_bad_continual_blocks_fail_in_one_line():
  for block, message in [
      (dict(mode="task"), "continual.mode must be one of class, domain"),
      (dict(mode="domain", domains=("none", "blur@3")), "'blur@3' is not OP@SEVERITY"),
      (dict(mode="domain", domains=("none",)), "at least two domains"),
      (dict(mode="domain", runs=("replay:all",)), "replay needs continual.mode='class'")]:
    config = _config("continual")
    config.continual.update(block)
    with pytest.raises(ValueError, match=message) as error:
      continual.check_config(config)
    assert "\n" not in str(error.value)
