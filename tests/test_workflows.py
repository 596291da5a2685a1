"""Tests for kd_jax.workflows: heads, domain adaptation, continual updates.

Unit tests check the new losses against hand-computed values, the derived labels and
the multi-head modules; the end-to-end tests run each workflow's tiny config through
`kd_jax.experiment.distill` with one shared tiny teacher.
"""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import configs, experiment, losses, workflows
from kd_jax.models import create
from kd_jax.workflows import continual, domain, heads

EXPERIMENTS = configs.EXPERIMENTS_DIR
IMAGE_SHAPE = (8, 8, 1)


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


def test_anchor_objectives():
  block = _config("continual").continual
  assert continual.anchor_objective("none", block) == {"ce_weight": 1.0, "terms": []}
  (term,) = continual.anchor_objective("student", block)["terms"]
  assert term == dict(method="lwf", weight=1.0, temperature=2.0, classes=(0, 1, 2, 3, 4))
  (term,) = continual.anchor_objective("teacher", block)["terms"]
  assert term["method"] == "kd"


# --- derived labels and heads -------------------------------------------------------


def test_task_labels_by_hand():
  digits = np.arange(10)
  np.testing.assert_array_equal(heads.task_labels(digits, "parity"),
                                [0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(heads.task_labels(digits, "large"),
                                [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(heads.task_labels(digits, "digit"), digits)


def test_task_predictions_sum_probabilities_per_group():
  # Probabilities (3, 1, 0, 1, 0, 1, 0, 1, 0, 0) / 7 (up to e^-30): digit 0 is the most
  # likely digit, yet odd digits together (4/7) beat even ones (3/7).
  logits = np.full((1, 10), -30.0)
  logits[0, [1, 3, 5, 7]] = 0.0
  logits[0, 0] = math.log(3.0)
  assert heads.task_predictions(logits, "digit")[0] == 0
  assert heads.task_predictions(logits, "parity")[0] == 1
  assert heads.task_predictions(logits, "large")[0] == 0  # 0, 1, 3: 5/7 below five


def test_multi_head_student_keeps_the_zoo_variables_and_outputs():
  trunk = create("resnet8", 10)
  variables = trunk.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  model = heads.MultiHeadStudent(trunk, (heads.HeadSpec("parity", "stage_3"),))
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
                                 (heads.HeadSpec("parity", "stage_3"),))
  trunk_vars = trunk.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  model = heads.HeadsOnFrozenTrunk(trunk, trunk_vars,
                                   (heads.HeadSpec("large", "stage_2", 4),))
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
  parts = heads.split_outputs(outputs, ("digit", "parity", "large"), 10)
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
  config = _config("domain")
  config.domain.distill.ce_weight = 0.1
  with pytest.raises(ValueError, match="domain.distill.ce_weight=0"):
    domain.check_config(config)
  config.domain.distill.ce_weight = 0.0
  config.domain.distill.terms = [dict(method="dkd", weight=1.0)]
  with pytest.raises(ValueError, match="no labels"):
    domain.check_config(config)
  config = _config("continual")
  config.continual.new_classes = (4, 5)
  with pytest.raises(ValueError, match="disjoint"):
    continual.check_config(config)
  config = _config("heads")
  config.heads.added = ("parity",)
  with pytest.raises(ValueError, match="each task once"):
    heads.check_config(config)


def test_class_splits_regroup_kd_digits():
  assert continual.class_split("train", (5, 6), 20) == "train_5[:20%]+train_6[:20%]"
  by_class = continual.by_class_data(_config("continual"))
  assert by_class.mean == (0.30553,) and by_class.augment == "cifar"
  builder = tfds.builder("kd_digits_by_class")
  digits = tfds.builder("kd_digits")
  for split in ("train", "test"):
    counts = np.bincount([int(e["label"]) for e in tfds.as_numpy(digits.as_dataset(split))],
                         minlength=10)
    for c in (0, 7):
      labels = [int(e["label"]) for e in tfds.as_numpy(builder.as_dataset(f"{split}_{c}"))]
      assert labels == [c] * counts[c]


# --- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny resnet8 teacher shared by the end-to-end runs."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  experiment.train_teacher(_config("heads"), workdir)
  return workdir


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
  tflite = summary["tflite"]
  assert tflite["outputs"] == ["digit", "large"]
  assert tflite["max_abs_logit_diff"] < 1e-4
  for task in ("digit", "large"):
    assert abs(tflite["accuracy"][task] - accuracy["added"][task]) <= 1 / 359


def test_domain_end_to_end_and_resume(teacher_dir, tmp_path):
  _, summary = _run("domain", teacher_dir, tmp_path)
  accuracy = summary["accuracy"]
  assert summary["target"] == "motion_blur@3"
  # Source accuracy two ways: the workflow's evaluation and each phase's own.
  distilled = _phase_metrics(tmp_path, "distilled")
  assert accuracy["distilled"]["source"] == distilled["accuracy"]
  assert accuracy["adapted"]["source"] == _phase_metrics(tmp_path, "adapted")["accuracy"]
  assert accuracy["adapted"]["target"] != accuracy["distilled"]["target"]
  # Rerun: every phase is found finished, the same numbers come back.
  _, again = _run("domain", teacher_dir, tmp_path)
  assert again["accuracy"] == accuracy


def test_continual_end_to_end(teacher_dir, tmp_path):
  _, summary = _run("continual", teacher_dir, tmp_path)
  accuracy = summary["accuracy"]
  n_old, n_new = 180, 179  # test images of digits 0-4 and of 5-9 in kd_digits
  for name, row in accuracy.items():
    np.testing.assert_allclose(row["all"], (n_old * row["old"] + n_new * row["new"])
                               / (n_old + n_new), rtol=1e-12, err_msg=name)
  assert accuracy["old"]["old"] == _phase_metrics(tmp_path, "old")["accuracy"]
  for anchor in ("none", "student"):  # the tiny config's anchors
    assert accuracy[f"new_{anchor}"]["new"] == _phase_metrics(
        tmp_path, f"new_{anchor}")["accuracy"]
