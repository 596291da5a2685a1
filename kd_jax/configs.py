"""Experiment configs: the embedded default, validation, and the copy saved with a run."""
from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections



def _experiments_dir() -> str:
  """`experiments/` of a source checkout, or its copy installed as kd_jax/experiments."""
  here = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(here, "experiments"),
                    os.path.join(os.path.dirname(here), "experiments")):
    if os.path.isfile(os.path.join(candidate, "digits.py")):
      return candidate
  raise FileNotFoundError("the experiments folder is missing from this installation; "
                          "reinstall kd_jax")


EXPERIMENTS_DIR = _experiments_dir()
DEFAULT_CONFIG = os.path.join(EXPERIMENTS_DIR, "digits.py")

# Keys every experiment config must have, and the type each must be.
REQUIRED = {
    "seed": int, "eval_batch_size": int, "data.name": str, "teacher.name": str,
    "student.name": str, "train.batch_size": int, "train.epochs": (int, float),
    "train.learning_rate": (int, float), "teacher.train.batch_size": int,
    "teacher.train.epochs": (int, float), "distill.ce_weight": (int, float),
}


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


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails before any work, in one line naming the key, on a missing or mistyped key."""
  for key, kind in REQUIRED.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise ValueError(f"config key {key} is missing; add it to the config file") from None
    if isinstance(value, bool) or not isinstance(value, kind):
      want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
      raise ValueError(f"config key {key} must be {want}, got {value!r}")
  from kd_jax import parallel
  for key in ("train.batch_size", "teacher.train.batch_size", "eval_batch_size"):
    if _get(config, key) <= 0:
      raise ValueError(f"config key {key} must be positive, got {_get(config, key)}")
    parallel.check_batch_size(_get(config, key), key)
  from kd_jax import models
  for key in ("teacher.name", "student.name"):
    if _get(config, key) not in models.available():
      raise ValueError(f"{key}={_get(config, key)!r} is not a known model; known models: "
                       f"{', '.join(models.available())}")


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
