"""Tests for domain adaptation: its losses by hand, AdaBN's statistics, the workflow."""
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import experiment, losses
from kd_jax import objective as objective_lib
from kd_jax.workflows import domain
from tests import digit_folders

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "kd_jax", "experiments", "digits_domain.py")


def _config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("experiments_digits_domain", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# --- losses -------------------------------------------------------------------------


def test_coral_hand_values():
  # 1-D: unbiased variances 2 (source 0, 2) and 8 (target 0, 4): (2 - 8)² / 4 = 9.
  np.testing.assert_allclose(losses.coral(jnp.array([[0.0], [2.0]]),
                                          jnp.array([[0.0], [4.0]])), 9.0, rtol=1e-6)
  # 2-D: covariances diag(2, 0) and diag(0, 2): (4 + 4) / (4 · 2²) = 0.5.
  source = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  target = jnp.array([[0.0, 1.0], [0.0, -1.0]])
  np.testing.assert_allclose(losses.coral(source, target), 0.5, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.coral)(source, target), 0.5, rtol=1e-6)
  # Both domains receive gradients (no stop-gradient on either side).
  grads = jax.grad(losses.coral, argnums=(0, 1))(source, target)
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


def test_mmd_hand_values():
  # One sample each at 0 and 1: the bandwidth is the mean squared distance 1, so
  # MMD² = Σ_m (1 + 1 − 2 exp(−1/m)).
  source, target = jnp.array([[0.0]]), jnp.array([[1.0]])
  np.testing.assert_allclose(losses.mmd(source, target, kernel_scales=(1.0,)),
                             2.0 - 2.0 / math.e, rtol=1e-6)
  expected = sum(2.0 - 2.0 * math.exp(-1.0 / m) for m in (0.25, 0.5, 1.0, 2.0, 4.0))
  np.testing.assert_allclose(jax.jit(losses.mmd)(source, target), expected, rtol=1e-6)
  same = jax.random.normal(jax.random.key(0), (6, 3))
  np.testing.assert_allclose(losses.mmd(same, same), 0.0, atol=1e-6)


def test_pseudo_label_hand_value():
  # The teacher is 95% sure of class 0 for the first image (used) and 50/50 on the
  # second (dropped); the student is uniform: mean over both of (ln 2, 0).
  teacher = jnp.array([[math.log(19.0), 0.0], [0.0, 0.0]])
  student = jnp.zeros((2, 2))
  np.testing.assert_allclose(losses.pseudo_label(student, teacher, threshold=0.9),
                             math.log(2.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.pseudo_label(student, teacher, threshold=0.4),
                             math.log(2.0), rtol=1e-6)


def test_alignment_terms_compare_the_student_on_its_two_views():
  obj = objective_lib.build(dict(ce_weight=0.0, terms=[
      dict(method="coral", weight=2.0, target_view="target")]),
      total_steps=1, steps_per_epoch=1)
  assert obj.student_views == ("image", "target") and obj.teacher_views == ()
  assert not obj.needs_teacher
  source = jax.random.normal(jax.random.key(0), (5, 4))
  target = jax.random.normal(jax.random.key(1), (5, 4)) * 2.0
  logits = objective_lib.Views(image=jnp.zeros((5, 3)), target=jnp.zeros((5, 3)))
  taps = objective_lib.Views(image={"embedding": source}, target={"embedding": target})
  total, parts, _ = obj(0, {}, logits, taps, None, None, jnp.zeros(5, jnp.int32))
  np.testing.assert_allclose(parts["coral/embedding"], losses.coral(source, target),
                             rtol=1e-6)
  np.testing.assert_allclose(total, 2.0 * losses.coral(source, target), rtol=1e-6)
  with pytest.raises(ValueError, match="set target_view"):
    objective_lib.build(dict(terms=[dict(method="mmd")]), total_steps=1,
                        steps_per_epoch=1)
  with pytest.raises(ValueError, match="remove target_view"):
    objective_lib.build(dict(terms=[dict(method="kd", target_view="target")]),
                        total_steps=1, steps_per_epoch=1)


# --- AdaBN --------------------------------------------------------------------------


class _Norm(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train, momentum=0.7)(x), {}


def test_batch_statistics_are_the_batch_mean_and_variance():
  model = _Norm()
  x = jax.random.normal(jax.random.key(0), (16, 3)) * jnp.array([1.0, 2.0, 3.0]) + 5.0
  variables = model.init(jax.random.key(1), x)
  variables = {**variables, "batch_stats": jax.tree.map(
      lambda s: s + 0.3, variables["batch_stats"])}  # whatever was there before
  stats = domain.batch_statistics(model, variables, x)["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], np.mean(x, axis=0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], np.var(x, axis=0), rtol=1e-4)


# --- configs and errors -------------------------------------------------------------


def test_domain_configs_fail_in_one_line():
  config = _config()
  config.domain.methods = ("kd", "tent")
  with pytest.raises(ValueError, match="domain.methods must name each of"):
    domain.check_config(config)
  config = _config()
  config.domain.target = "folder:/elsewhere"
  with pytest.raises(ValueError, match="'paired' needs the target to be the source"):
    domain.check_config(config)
  config = _config()
  config.domain.distill.terms = [dict(method="dkd", weight=1.0)]
  with pytest.raises(ValueError, match="no labels"):
    domain.check_config(config)
  config = _config()
  config.domain.distill.ce_weight = 0.5
  with pytest.raises(ValueError, match="domain.distill.ce_weight=0"):
    domain.check_config(config)


# --- end to end ---------------------------------------------------------------------


@pytest.fixture
def teacher_dir(tiny_teacher):
  return tiny_teacher


def test_corruption_target_end_to_end_and_resume(teacher_dir, tmp_path):
  config = _config()
  config.teacher.checkpoint = teacher_dir
  config.domain.methods = ("paired", "adabn")
  summary = experiment.distill(config, str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["accuracy"] == summary["accuracy"]
  accuracy = summary["accuracy"]
  assert summary["target"] == "motion_blur@3"
  assert set(accuracy) == {"teacher", "teacher_adabn", "distilled", "paired", "adabn"}
  with open(tmp_path / "distilled" / "model.json") as f:
    assert accuracy["distilled"]["source"] == json.load(f)["metrics"]["accuracy"]
  for method in ("paired", "adabn"):
    assert summary["target_gain"][method] == (accuracy[method]["target"]
                                              - accuracy["distilled"]["target"])
  # AdaBN changes only the statistics: the target accuracy moves.
  assert accuracy["adabn"]["target"] != accuracy["distilled"]["target"]
  # Rerun: every phase is found finished, the same numbers come back.
  again = experiment.distill(config, str(tmp_path))
  assert again["accuracy"] == accuracy


def test_folder_target_end_to_end(teacher_dir, tmp_path):
  # The same ten classes rendered differently: dark strokes on white, one pixel right.
  target = digit_folders.write_digits(tmp_path / "rendered", inverted=True, shift=1)
  config = _config()
  config.teacher.checkpoint = teacher_dir
  config.domain.target = f"folder:{target}"
  config.domain.methods = ("pseudo_label", "mmd", "adabn")
  summary = experiment.distill(config, str(tmp_path / "run"))
  accuracy = summary["accuracy"]
  assert summary["target"] == f"folder:{target}"
  assert set(accuracy) == {"teacher", "teacher_adabn", "distilled", "pseudo_label",
                           "mmd", "adabn"}
  # The target's accuracy is measured on its own 120 test images.
  for model in accuracy.values():
    assert round(model["target"] * 120, 6) == round(model["target"] * 120)
  # Every method trained on the target stream: its phase saw the target view.
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  mmd_steps = [r for r in records if r.get("phase") == "adapted_mmd" and "mmd/embedding" in r]
  assert mmd_steps and all(np.isfinite(r["mmd/embedding"]) for r in mmd_steps)
  assert accuracy["adabn"]["target"] != accuracy["distilled"]["target"]
