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


# --- Defaults written once, by the module that reads each block. ---------------------

def test_each_block_of_the_default_config_is_its_owners():
  from kd_jax import export, train
  from kd_jax.data import curriculum
  from kd_jax.edge import phases as edge_phases
  from kd_jax.workflows import heads
  c = configs.default_config()
  assert c.train.to_dict() == train.RECIPE_DEFAULTS
  assert c.teacher.train.to_dict() == c.train.to_dict()
  assert c.curriculum.to_dict() == curriculum.DEFAULTS
  assert c.export.variants == export.DEFAULTS["variants"]
  assert c.edge.exits.steps == edge_phases.DEFAULTS["exits"]["steps"]
  assert c.heads.tap == heads.DEFAULTS["tap"]
  assert c.distill.ce_weight == 1.0 and list(c.distill.terms) == []


def test_validate_completes_checks_and_locks():
  c = ml_collections.ConfigDict(dict(teacher=dict(name="resnet8"),
                                     student=dict(name="resnet8"),
                                     train=dict(epochs=2)))
  done = configs.validate(c)
  assert done.train.epochs == 2.0 and done.train.batch_size == 64  # the recipe default
  assert done.log_every_steps == 20 and done.edge.qat.enabled is False
  with pytest.raises(AttributeError):
    done.train.new_key = 1  # locked
  assert configs.validate(done).to_dict() == done.to_dict()  # idempotent


@pytest.mark.parametrize("override, message", [
    (("train", "learnig_rate", 0.1), "unknown config key train.learnig_rate; did you mean "
                                     "'learning_rate'?"),
    (("heads", "train", {"epocs": 1}), "unknown config key heads.train.epocs; did you mean "
                                       "'epochs'?"),
    (("train", "epochs", 0), "train.epochs must be a finite number > 0, got 0"),
    (("train", "checkpoint_every_steps", -5), "train.checkpoint_every_steps must be at least 1"),
    (("train", "learning_rate", float("nan")), "config key train.learning_rate is nan; give a finite number"),
    (("distill", "ce_weight", -1.0), "distill.ce_weight must not be negative"),
    (("export", "variants", ("fp32", "int4")), "export.variants names unknown quantizations"),
    (("edge", "prune", {"criterion": "l3"}), "edge.prune.criterion='l3' is unknown"),
    (("validation", "metric", "f1"), "validation.metric='f1' is unknown"),
])
def test_bad_values_name_the_key(override, message):
  c = _load("digits", "tiny")
  *path, key, value = override
  node = c
  for part in path:
    node = node[part]
  if isinstance(value, dict):
    node[key] = ml_collections.ConfigDict(value) if key not in node else node[key]
    for k, v in value.items():
      with node[key].unlocked():
        node[key][k] = v
  else:
    with node.unlocked():
      node[key] = value
  with pytest.raises(ValueError) as e:
    configs.validate(c)
  assert message in str(e.value)


def test_a_value_of_the_wrong_type_names_the_key():
  c = ml_collections.ConfigDict(dict(teacher=dict(name="resnet8"),
                                     student=dict(name="resnet8"), train=dict(batch_size=1.5)))
  with pytest.raises(ValueError, match="config key train.batch_size must be int, got 1.5"):
    configs.validate(c)


def test_a_phase_train_block_may_set_any_recipe_key():
  c = _load("digits_heads", "tiny")
  c.heads.train.batch_size = 16  # not among heads.train's defaults, but a recipe key
  assert configs.validate(c).heads.train.batch_size == 16


def test_a_run_saved_before_new_keys_existed_still_resumes(tmp_path):
  import json
  c = configs.validate(_load("digits", "tiny"))
  configs.save_run_config(c, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    old = json.load(f)
  del old["distill"]["ce_views"], old["heads"]  # as written before those keys existed
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  configs.save_run_config(c, str(tmp_path))  # the same run: accepted
  c2 = _load("digits", "tiny")
  c2.train.epochs = 4
  with pytest.raises(ValueError, match="differs at train.epochs"):
    configs.save_run_config(configs.validate(c2), str(tmp_path))


def test_override_blocks_take_sub_blocks_and_defaults_are_not_shared():
  c = _load("digits_domain", "tiny")
  c.domain.distill.self_paced = ml_collections.ConfigDict(dict(kind="hard"))
  assert configs.validate(c).domain.distill.self_paced.kind == "hard"
  a, b = configs.default_config(), configs.default_config()
  a.distill.terms.append(dict(method="kd"))
  assert list(b.distill.terms) == [] and list(configs.default_config().distill.terms) == []
