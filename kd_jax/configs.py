"""Experiment configs: the embedded default, validation, and the copy saved with a run."""
from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections

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

# Keys every experiment config must have, and the type each must be.
REQUIRED = {
    "seed": int, "eval_batch_size": int, "data.name": str, "teacher.name": str,
    "student.name": str, "train.batch_size": int, "train.epochs": (int, float),
    "train.learning_rate": (int, float), "teacher.train.batch_size": int,
    "teacher.train.epochs": (int, float), "distill.ce_weight": (int, float),
}


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


def _get(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


# Keys a config may add to those of the default config, with their types (None: any).
OPTIONAL = {
    "published": None, "mixed_precision": bool, "teacher.kwargs": None,
    "student.kwargs": None,
    **{f"{p}train.{k}": t for p in ("", "teacher.") for k, t in (
        ("accumulation_steps", int), ("max_nonfinite_steps", int),
        ("rollback_lr_factor", float), ("max_rollbacks", int))},
    "curriculum.pacing": str, "curriculum.scoring": str,
    "curriculum.start_fraction": float, "curriculum.full_at_epoch": float,
    "curriculum.stages": int, "distill.self_paced.kind": str,
    **{f"distill.self_paced.{k}": float for k in (
        "start_threshold", "final_threshold", "full_at_epoch", "softness")},
    "teacher.bf16_forward": bool, "distill.cache_teacher_logits": bool,
    # kd_jax.workflows: the workflow a config runs, and its config block.
    "workflow": str, "heads.tap": str, "heads.hidden": int, "heads.joint": tuple,
    "heads.added": tuple, "heads.export": tuple, "heads.weight": float,
    "heads.temperature": float, "domain.corruption": str, "domain.severity": int,
    "domain.train_split": str, "domain.distill.ce_weight": float,
    "domain.distill.terms": None, "continual.old_classes": tuple,
    "continual.new_classes": tuple, "continual.new_percent": int,
    "continual.anchors": tuple, "continual.anchor_weight": float,
    "continual.temperature": float,
    **{f"{block}.train.{key}": kind for block in ("heads", "domain", "continual")
       for key, kind in (("epochs", float), ("learning_rate", float),
                         ("batch_size", int), ("checkpoint_every_steps", int))},
}
_FREE = ("published", "teacher.kwargs", "student.kwargs", "distill.terms", "data.cache")


def _schema() -> dict[str, Any]:
  """Every key of the default config with the type its value must have."""
  import importlib.util
  import sys
  name = "kd_jax_default_experiment"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  schema = {}

  def walk(cfg, prefix):
    for key in cfg.keys():
      ref = cfg.get_ref(key) if hasattr(cfg, "get_ref") else None
      value = cfg[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, prefix + key + ".")
      else:
        schema[prefix + key] = ref.get_type() if ref is not None else type(value)
  walk(sys.modules[name].get_config(), "")
  return {**schema, **OPTIONAL}


def _type_ok(value: Any, kind: Any) -> bool:
  if kind is None or kind is object:
    return True
  if value is None:
    return True  # unset placeholders take the dataset's / model's default
  if kind is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False
  if kind is float:
    return isinstance(value, (int, float))
  if kind in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in config.keys():
    value = config[key]
    dotted = prefix + str(key)
    if isinstance(value, (dict, ml_collections.ConfigDict)) and not any(
        dotted == f or dotted.startswith(f + ".") for f in _FREE):
      out.update(_flatten(value, dotted + "."))
    else:
      out[dotted] = value
  return out


def validate(config: ml_collections.ConfigDict, *, deep: bool = False) -> None:
  """Fails before any work, in one line naming the key and the fix.

  Checks every key against the default config's (unknown keys, wrong types, missing
  required keys), the objective's terms, batch sizes against the devices, model names,
  and — with `deep` — the dataset and every term's taps against the two models.
  """
  schema = _schema()
  flat = _flatten(config)
  for key, value in flat.items():
    if key not in schema:
      parent = key.rpartition(".")[0]
      siblings = sorted(k.rpartition(".")[2] for k in schema
                        if k.rpartition(".")[0] == parent)
      raise ValueError(f"unknown config key {key}; the keys of "
                       f"{parent or 'the config'} are {', '.join(siblings)}")
    kind = schema[key]
    if not _type_ok(value, kind):
      raise ValueError(f"config key {key} must be {getattr(kind, '__name__', kind)}, "
                       f"got {value!r}")
  for key, kind in REQUIRED.items():
    if key not in flat or flat[key] is None:
      raise ValueError(f"config key {key} is missing; add it to the config file")
  from kd_jax import parallel
  for key in ("train.batch_size", "teacher.train.batch_size", "eval_batch_size"):
    if flat[key] <= 0:
      raise ValueError(f"config key {key} must be positive, got {flat[key]}")
    parallel.check_batch_size(flat[key], key)
  for key in ("train.epochs", "teacher.train.epochs", "train.learning_rate",
              "teacher.train.learning_rate"):
    if flat.get(key) is not None and flat[key] < 0:
      raise ValueError(f"config key {key} must not be negative, got {flat[key]}")
  from kd_jax import models
  for key in ("teacher.name", "student.name"):
    if flat[key] not in models.available():
      raise ValueError(f"{key}={flat[key]!r} is not a known model; known models: "
                       f"{', '.join(models.available())}")
  from kd_jax import objective
  terms = config.distill.get("terms", ()) or ()
  if not isinstance(terms, (list, tuple)) or not all(
      isinstance(t, (dict, ml_collections.ConfigDict)) for t in terms):
    raise ValueError("config key distill.terms must be a list of dicts such as "
                     "dict(method='kd', weight=0.9)")
  obj = objective.build(config.distill, total_steps=1, steps_per_epoch=1)
  from kd_jax.data import augment, curriculum
  augment.parse(config.data.get("edge_augment"))
  curriculum.settings(config.get("curriculum"))
  if config.distill.get("cache_teacher_logits"):
    from kd_jax import teacher_cache
    teacher_cache.check_cacheable(config.data, obj)
  if deep:
    _check_taps(config, obj)


def _check_taps(config, obj) -> None:
  import jax
  import jax.numpy as jnp

  from kd_jax import data, models, objective
  if not any(t.method.inputs != objective.LOGITS for t in obj.terms):
    return
  info = data.get_info(config.data)
  x = jnp.zeros((2, *info.image_shape))

  def taps(name):
    model = models.create(name, info.num_classes)
    return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0][1])
  objective.resolve(obj, taps(config.student.name), taps(config.teacher.name),
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
    new = json.loads(text)
    if old != new:
      diff = sorted(_diff_keys(old, new))
      raise ValueError(f"--workdir={workdir} holds a run with a different config "
                       f"(differs at {', '.join(diff[:4])}); use a new --workdir or the "
                       "same config to resume")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(text)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = set()
    for k in set(a) | set(b):
      out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return set() if a == b else {prefix.rstrip(".")}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; --workdir must be the folder of a "
                            "`kd-jax distill` run")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
