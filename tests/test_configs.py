"""Every digits experiment config loads, validates, and its objective fits its models."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import configs, models, objective

EXPERIMENTS = configs.EXPERIMENTS_DIR


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
    ("digits_features", "", ["kd", "fitnet/stage_2", "correlation_congruence/embedding",
                             "attention_transfer/stage_3"]),
    ("digits_features", "tiny", ["kd", "fitnet/stage_2", "correlation_congruence/embedding",
                                 "attention_transfer/stage_3"]),
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


def test_digits_features_runs_with_two_adapters(tmp_path):
  import json
  from kd_jax import experiment
  c = _load("digits_features", "tiny")
  c.export.variants = ()
  summary = experiment.distill(c, str(tmp_path))
  assert 0.1 < summary["distilled_accuracy"] <= 1.0
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  last = [r for r in logged if r["phase"] == "distilled" and r["kind"] == "train"][-1]
  for name in ("kd", "fitnet/stage_2", "correlation_congruence/embedding",
               "attention_transfer/stage_3"):
    assert np.isfinite(last[name]) and np.isfinite(last[name + "_weighted"])
  # Exported students carry no adapter: the saved variables are the student's alone.
  with open(tmp_path / "distilled" / "model.json") as f:
    assert json.load(f)["model"] == "resnet8"


def test_default_config_is_the_digits_file():
  assert os.path.samefile(configs.DEFAULT_CONFIG, os.path.join(EXPERIMENTS, "digits.py"))
  assert configs.config_name("experiments/digits.py:tiny") == "digits_tiny"


# --- Malformed configs: only one-line messages naming a key, never a traceback. -----

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
import ml_collections  # noqa: E402

_TINY = _load("digits", "tiny").to_dict()


def _leaf_paths(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


_PATHS = sorted(_leaf_paths(_TINY))
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(-1, 1e3),
                    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3),
                    st.just({"method": "kdd"}), st.just([{"method": "kd", "alpha": 2}]),
                    st.just([{"method": "attention_transfer", "student_tap": "stage_9"}]),
                    st.just([{"method": "fitnet", "student_tap": "stage_2"}]))


def _mutate(config, path, action, value, new_key):
  node = config
  for k in path[:-1]:
    node = node[k]
  if action == "set":
    node[path[-1]] = value
  elif action == "delete":
    del node[path[-1]]
  else:
    node[new_key] = value


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(_PATHS), action=st.sampled_from(["set", "delete", "add"]),
       value=_VALUES, new_key=st.from_regex(r"[a-z]{3,8}", fullmatch=True))
def test_malformed_configs_get_one_line_errors(path, action, value, new_key):
  import copy
  raw = copy.deepcopy(_TINY)
  _mutate(raw, path, action, value, new_key)
  config = ml_collections.ConfigDict(raw)
  try:
    configs.validate(config, deep=True)
  except (ValueError, FileNotFoundError) as e:
    message = str(e)
    assert message and "\n" not in message, message
    assert "Traceback" not in message
  # Passing is fine: the mutation left a valid config (e.g. an int for a float).
