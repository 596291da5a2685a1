"""Every digits experiment config loads, validates, and its objective fits its models."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from kd_jax import configs, models, objective

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def _load(name, variant=""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _taps(name, shape):
  model = models.create(name, 10)
  x = jnp.zeros((2, *shape))
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0][1])


@pytest.mark.parametrize("name, variant, expected_terms", [
    ("digits", "", ["kd"]),
    ("digits", "tiny", ["kd"]),
    ("digits_features", "", ["kd", "fitnet/stage_2", "attention_transfer/stage_3"]),
    ("digits_features", "tiny", ["kd", "fitnet/stage_2", "attention_transfer/stage_3"]),
])
def test_digits_configs_build_their_objective(name, variant, expected_terms):
  c = _load(name, variant)
  configs.validate(c)
  obj = objective.build(c.distill, total_steps=100, steps_per_epoch=10)
  assert [t.name_ for t in obj.terms] == expected_terms
  obj = objective.resolve(obj, _taps(c.student.name, (8, 8, 1)),
                          _taps(c.teacher.name, (8, 8, 1)), c.student.name, c.teacher.name)
  for term in obj.terms:
    if term.adapter:  # sized to the teacher tap's channels
      assert term.teacher_features == _taps(c.teacher.name, (8, 8, 1))[term.teacher_tap].shape[-1]


def test_default_config_is_the_digits_file():
  assert os.path.samefile(configs.DEFAULT_CONFIG, os.path.join(EXPERIMENTS, "digits.py"))
  assert configs.config_name("experiments/digits.py:tiny") == "digits_tiny"
