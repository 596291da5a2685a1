"""Experiment configs: the default config, validation, and the copy saved with a run.

`default_config()` holds every key a run reads; each block's defaults (and its checks)
are defined by the module that reads the block, and only placed here. `validate` lays
a config over the defaults, checks every key, runs each owner's checks and returns the
completed config, locked: code reads its keys without fallback defaults.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

# The experiment configs ship inside the package (`kd_jax.experiments`), so editable,
# wheel and sdist installs find them alike.
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
DEFAULT_CONFIG = os.path.join(EXPERIMENTS_DIR, "digits.py")


def resolve_config_path(path: str) -> str:
  """A `--config` file path, with `experiments/NAME.py` meaning the packaged config.

  A path that exists (relative to the working directory, or absolute) is returned as it
  is, so a user's own `experiments/` folder wins; otherwise `experiments/NAME.py[:v]`
  (the form every command in the docs uses) names `kd_jax/experiments/NAME.py[:v]`.
  """
  file, colon, variant = path.partition(":")
  head, name = os.path.split(os.path.normpath(file))
  packaged = os.path.join(EXPERIMENTS_DIR, name)
  if (os.path.exists(file) or os.path.basename(head) != "experiments"
      or not os.path.isfile(packaged)):
    return path
  return packaged + colon + variant


def experiment_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """`get_config(variant)` of `experiments/<name>.py`: where a config extends another.

  e.g. `experiment_config("digits", variant)` starts experiments/digits_edge.py.
  """
  path = os.path.join(EXPERIMENTS_DIR, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"experiments/{name}.py not found; use one of "
                            f"{sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR) if f.endswith('.py'))}")
  return load_config_file(path, variant)


def choice_variant(variant: str, choices: Any, file: str) -> tuple[str, str]:
  """'NAME' or 'NAME:tiny' -> (NAME, '' or 'tiny') for a config file whose variants
  are `choices` (the first when `variant` is empty); one-line error naming them."""
  name, _, flavour = (variant or next(iter(choices))).partition(":")
  if name not in choices or flavour not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of {file}; use one of "
                     f"{', '.join(choices)}, optionally followed by :tiny")
  return name, flavour


def load_config_file(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """`get_config(variant)` of the config file at `path`."""
  import importlib.util
  import sys
  name = f"kd_jax_config_{os.path.splitext(os.path.basename(path))[0]}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses of a config file look their module up
  spec.loader.exec_module(module)
  return module.get_config(variant)

def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config's smoke-test flavour: offline kd_digits, one epoch, small batches.

  Models are left to the caller (each experiment knows its small stand-ins).
  """
  from kd_jax import data
  config.data = data.default_data_config()  # kd_digits, offline
  for recipe in (config.teacher.train, config.train):
    recipe.update(epochs=1, batch_size=32, checkpoint_every_steps=10)
  config.update(log_every_steps=5, eval_batch_size=128)
  config.export.update(num_calibration_images=32, latency_runs=5)
  return config


def config_name(config_filename: str) -> str:
  """experiments/digits.py:tiny -> digits_tiny (the default workdir's name)."""
  path, _, variant = config_filename.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}_{variant}" if variant else name


def explain_flag_error(error: Exception, argv: list[str]) -> str:
  """One line from absl's / ml_collections' flag errors, naming what to change."""
  text = " ".join(str(error).split())
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    return (f"config file {missing.group(1)} not found; pass --config=experiments/NAME.py "
            "(or leave --config out for the default)")
  if "Error whilst parsing config file" in text:
    last = str(error).strip().splitlines()[-1]
    return f"the config file failed: {last.split(': ', 1)[-1]}"
  if isinstance(error, (AttributeError, KeyError)):
    key = re.search(r"[A-Za-z_]\w*", text.replace("\\", " ")).group(0)
    given = [a for a in argv if a.startswith("--config.") and
             re.search(rf"[.]{re.escape(key)}(=|[.]|$)", a.split("=")[0])]
    where = f" in {given[0]}" if given else ""
    hint = re.search(r'Did you mean "(\w+)"', text)
    fix = f"did you mean {hint.group(1)!r}?" if hint else "check its spelling against the config file"
    return f"unknown config key {key!r}{where}; {fix}"
  return text


# The keys under these hold what their user writes (model kwargs, published figures):
# they are not checked key by key.
_FREE = ("published", "teacher.kwargs", "student.kwargs", "heads.tasks")
# A block of one of these names inside another block (`heads.train`, `edge.qat.train`,
# `domain.distill`) overrides some keys of the top-level block of that name.
_OVERRIDABLE = ("train", "distill")


def default_config() -> ml_collections.ConfigDict:
  """Every key a run reads, at its default. Each block comes from the module that reads
  it (`train.default_recipe`, `objective.default_config`, ...); this function only
  places them. Experiment configs start from it and change what they decide."""
  from kd_jax import data, export, objective, phase, train, workflows
  from kd_jax.data import curriculum
  from kd_jax.edge import phases as edge_phases
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workflow = workflows.DEFAULT  # kd_jax/workflows/__init__.py
  c.log_every_steps = 20
  c.eval_batch_size = 128
  c.mixed_precision = False  # True: bfloat16 compute, float32 params/optimizer/losses
  # Published figures an experiment reproduces (kd-jax reproduce, report): free-form.
  c.published = ml_collections.ConfigDict()
  c.data = data.default_data_config()
  c.validation = phase.default_validation_config()
  # The teacher: trained by the run, or `checkpoint` (a finished run's workdir, or its
  # teacher/ folder). `train_split` / `validation_split` replace data's splits for it.
  c.teacher = ml_collections.ConfigDict(dict(
      name=config_dict.placeholder(str), checkpoint=config_dict.placeholder(str),
      train_split=config_dict.placeholder(str),
      validation_split=config_dict.placeholder(str), kwargs=ml_collections.ConfigDict(),
      bf16_forward=False))  # True: the teacher's forward pass in bfloat16
  c.teacher.train = train.default_recipe()
  c.student = ml_collections.ConfigDict(dict(
      name=config_dict.placeholder(str), train_split=config_dict.placeholder(str),
      validation_split=config_dict.placeholder(str), kwargs=ml_collections.ConfigDict()))
  c.train = train.default_recipe()
  c.train_vanilla = True  # also train the student on labels alone (the baseline)
  c.distill = objective.default_config()
  c.curriculum = curriculum.default_config()
  c.edge = edge_phases.default_config()
  c.export = export.default_config()
  for _, workflow in workflows.WORKFLOWS.items():
    if workflow.block:
      c[workflow.block] = workflow.default_config()
  return c


def _field_type(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config[key]
  if isinstance(value, ml_collections.ConfigDict):
    return ml_collections.ConfigDict
  try:
    return config.get_ref(key).get_type()
  except ValueError:  # a plain None (not a typed placeholder): any type
    return None


def _type_ok(value: Any, kind: Any) -> bool:
  if kind is None or kind is object or value is None:
    return True  # unset placeholders take the dataset's / model's default
  if kind is type(None):
    return True
  if kind is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False
  if kind is float:
    return isinstance(value, (int, float))
  if kind in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _unknown_key(dotted: str, known: Any) -> ValueError:
  parent, _, key = dotted.rpartition(".")
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  guess = f"did you mean {close[0]!r}? " if close else ""
  return ValueError(f"unknown config key {dotted}; {guess}the keys of "
                    f"{parent or 'the config'} are {', '.join(known)}")


def _overlay(out: ml_collections.ConfigDict, given: Any, prefix: str,
             schema: ml_collections.ConfigDict, root: ml_collections.ConfigDict) -> None:
  """Sets `given`'s keys into `out`, each checked against `schema` (name and type);
  `root` is the whole default config, whose top-level blocks override blocks follow."""
  for key in given.keys():
    dotted = prefix + str(key)
    value = given[key]
    if key not in schema:
      raise _unknown_key(dotted, schema.keys())
    kind = _field_type(schema, key)
    if dotted in _FREE:
      out[key] = value
    elif kind is ml_collections.ConfigDict:
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"config key {dotted} is a block of keys "
                         f"({', '.join(schema[key].keys())}), got {value!r}")
      if key not in out:  # a block an override block leaves out
        out[key] = ml_collections.ConfigDict()
      if key in _OVERRIDABLE and prefix:  # keys of the top-level block, not filled
        _overlay(out[key], value, dotted + ".", root[key], root)
      else:
        _overlay(out[key], value, dotted + ".", schema[key], root)
    else:
      if value is None and schema[key] is not None:
        raise ValueError(f"config key {dotted} must be {getattr(kind, '__name__', kind)}, "
                         "got None")
      if not _type_ok(value, kind):
        raise ValueError(f"config key {dotted} must be {getattr(kind, '__name__', kind)}, "
                         f"got {value!r}")
      out[key] = value


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` on top of `default_config()`, as a new locked ConfigDict.

  Every key the run reads is present afterwards (code reads keys without fallbacks);
  an unknown key or a value of the wrong type fails in one line naming the key and,
  for a misspelt key, the closest known one.
  """
  out, schema = default_config(), default_config()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  _overlay(out, given, "", schema, schema)
  out.lock()
  return out


def validate(config: ml_collections.ConfigDict, *, deep: bool = False
             ) -> ml_collections.ConfigDict:
  """The completed config (see `complete`), checked before any work; one-line errors.

  Each block is checked by the module that owns it (ranges and choices), then what
  crosses blocks: model names, batch sizes against the devices, the objective's terms,
  the selected workflow's block and — with `deep` — the dataset and every term's taps
  against the two models.
  """
  config = complete(config)
  _check_finite(config)
  from kd_jax import data, export, models, objective, parallel, phase, train, workflows
  from kd_jax.data import augment, curriculum
  from kd_jax.edge import phases as edge_phases
  for which in ("teacher", "student"):
    models.check_name(config[which].name, f"{which}.name", config[which].kwargs)
  train.check_recipe(config.train, "train")
  train.check_recipe(config.teacher.train, "teacher.train")
  for where, overrides in override_blocks(config, "train"):
    train.check_recipe(phase.student_recipe(config, overrides), where)
  for key in ("train.batch_size", "teacher.train.batch_size", "eval_batch_size"):
    value = _get(config, key)
    if value < 1:
      raise ValueError(f"config key {key} must be positive, got {value}")
    parallel.check_batch_size(value, key)
  if config.log_every_steps < 1:
    raise ValueError(f"config key log_every_steps must be at least 1, got "
                     f"{config.log_every_steps}")
  phase.validation_settings(config.validation)
  if config.distill.ce_weight < 0:
    raise ValueError(f"distill.ce_weight must not be negative, got {config.distill.ce_weight}")
  obj = objective.build(config.distill, total_steps=1, steps_per_epoch=1)
  augment.parse(config.data.edge_augment)
  views = data.view_names(config.data)
  for view in (*obj.student_views, *obj.teacher_views):
    if view not in views:
      raise ValueError(f"the objective uses view {view!r} but data.views has "
                       f"{list(views[1:]) or 'none'}; add {{'name': {view!r}}} to "
                       "data.views")
  for spec in config.data.views:
    if "edge_augment" in spec:
      augment.parse(spec["edge_augment"])
  curriculum.settings(config.curriculum)
  if config.distill.cache_teacher_logits:
    from kd_jax import teacher_cache
    teacher_cache.check_cacheable(config.data, obj)
  edge_phases.check_config(config.edge)
  export.check_config(config.export)
  workflow = workflows.WORKFLOWS.get(config.workflow)
  if deep:
    if workflow.check_config:
      workflow.check_config(config)
    _check_taps(config, obj)
  return config


def _check_finite(config: Any, prefix: str = "") -> None:
  """No NaN or infinity anywhere in a config (a number that cannot mean anything)."""
  items = config.items() if hasattr(config, "items") else enumerate(config)
  for key, value in items:
    where = f"{prefix}{key}"
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"config key {where} is {value}; give a finite number")
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      _check_finite(value, where + ".")
    elif isinstance(value, (list, tuple)):
      _check_finite(value, where + ".")


def _get(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def override_blocks(config: Any, name: str, prefix: str = ""):
  """(dotted path, dict) of every block called `name` below the top level."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      if key == name and prefix:
        yield prefix + key, value.to_dict()
      elif str(prefix + key) not in _FREE:
        yield from override_blocks(value, name, prefix + key + ".")


def _check_taps(config, obj) -> None:
  import jax
  import jax.numpy as jnp

  from kd_jax import data, models, objective
  if not any(t.method.inputs != objective.LOGITS for t in obj.terms):
    return
  info = data.get_info(config.data)
  x = jnp.zeros((2, *info.image_shape))

  def taps(which):
    model = models.create(config[which].name, info.num_classes,
                          **dict(config[which].kwargs))
    return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0][1])
  objective.resolve(obj, taps("student"), taps("teacher"),
                    config.student.name, config.teacher.name)


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `<workdir>/config.json`; refuses a workdir that holds a different run."""
  import jax
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    # Compared completed with the defaults, so that a run saved before keys were added
    # (or a partial config, as a shared teacher's) is still the same run.
    old, new = _comparable(old), _comparable(json.loads(text))
    if old != new:
      diff = sorted(diff_keys(old, new))
      raise ValueError(f"--workdir={workdir} holds a run with a different config "
                       f"(differs at {', '.join(diff[:4])}); use a new --workdir or the "
                       "same config to resume")
  if jax.process_index() == 0:
    from kd_jax import files
    files.write_atomic(path, text)


def _comparable(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config laid over the defaults, as JSON values; as saved if it cannot be."""
  try:
    return json.loads(complete(ml_collections.ConfigDict(saved)).to_json(sort_keys=True))
  except (ValueError, TypeError, KeyError, AttributeError):
    return saved


def diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
  """The dotted keys where two JSON-like dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = set()
    for k in set(a) | set(b):
      out |= diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return set() if a == b else {prefix.rstrip(".")}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; --workdir must be the folder of a "
                            "`kd-jax distill` run")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
