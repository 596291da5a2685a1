"""Checkpoints of a training phase with orbax: the whole train state, saved every N steps.

The data iterator position and every RNG are functions of the saved `step`, so restoring
the state is enough to continue a run exactly where it stopped. Teacher variables are
saved once, separately (`save_variables`), and never enter a student's checkpoints.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from kd_jax.metric_writer import log

# Read errors worth retrying (storage hiccups), and how long to wait before each retry.
_TRANSIENT_ERRNOS = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE,
                     errno.ECONNRESET, errno.EINTR)
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION",
                 "INVALID_ARGUMENT")
RETRY_WAITS_S = (0.5, 2.0, 5.0)


class Damaged(Exception):
  """Evidence that a checkpoint's files are damaged (missing, truncated, unparsable)."""


class CheckpointMismatch(ValueError):
  """A readable checkpoint of another model or config than the one restoring it."""


def _reason(e: BaseException) -> str:
  return " ".join(str(e).split())[:200] or type(e).__name__


def _is_transient(e: BaseException) -> bool:
  if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
    return False
  if isinstance(e, OSError):
    return e.errno in _TRANSIENT_ERRNOS or e.errno is None
  return str(e).startswith(_TRANSIENT_CODES)


def _is_damage(e: BaseException) -> bool:
  if isinstance(e, (FileNotFoundError, NotADirectoryError, json.JSONDecodeError,
                    UnicodeDecodeError, EOFError)):
    return True
  return isinstance(e, ValueError) and str(e).startswith(_DAMAGE_CODES)


def _retrying(read: Callable[[], Any], what: str) -> Any:
  """`read()`, retried after transient errors; damage raises `Damaged`."""
  for wait in (*RETRY_WAITS_S, None):
    try:
      return read()
    except Exception as e:  # orbax and tensorstore raise many types
      if isinstance(e, CheckpointMismatch):
        raise
      if _is_damage(e):
        raise Damaged(_reason(e)) from None
      if not _is_transient(e) or wait is None:
        kind = "a read error" if _is_transient(e) else "an unexpected error"
        raise OSError(f"could not read {what} ({kind}: {_reason(e)}); it was left "
                      "where it is: check the storage and rerun") from None
      log(f"reading {what} failed ({_reason(e)}); retrying in {wait:g} s")
      time.sleep(wait)


def _check_metadata(saved: Any, like: Any, what: str) -> None:
  """`CheckpointMismatch` naming the first key or shape where `saved` (the checkpoint's
  tree metadata) and `like` differ."""
  tree = getattr(saved, "item_metadata", saved)
  tree = getattr(tree, "tree", tree)
  if tree is None:  # orbax could not read the arrays' metadata (logged it and went on)
    raise Damaged("its array metadata cannot be read")
  flat_saved = dict(_flat(tree))
  flat_like = dict(_flat(like))
  missing = [k for k in flat_like if k not in flat_saved]
  extra = [k for k in flat_saved if k not in flat_like]
  if missing or extra:
    parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
        [f"unexpected {', '.join(extra[:3])}"] if extra else [])
    raise CheckpointMismatch(f"{what} is of another model or config ({'; '.join(parts)}); "
                             "use the config that wrote it or a new --workdir")
  for key, leaf in flat_like.items():
    shape = tuple(getattr(flat_saved[key], "shape", ()) or ())
    want = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    if shape != want:
      raise CheckpointMismatch(f"{what} is of another model or config ({key}: shape "
                               f"{shape} there, {want} here); use the config that wrote "
                               "it or a new --workdir")


def _flat(tree: Any) -> list[tuple[str, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return [("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path), leaf) for path, leaf in leaves]


def _agreed(steps: list[int]) -> list[int]:
  """`steps` (newest first) as every process sees them: with several processes, only
  the steps all of them list, so that all restore the same one."""
  if jax.process_count() == 1 or not steps:
    return steps
  from jax.experimental import multihost_utils
  newest = int(np.min(multihost_utils.process_allgather(np.int64(max(steps)))))
  return [s for s in steps if s <= newest]


def _remove_partial(directory: str, step: int) -> None:
  """Removes what a failed save of `step` left behind (orbax writes to a temporary
  folder and renames it when complete)."""
  if jax.process_index() != 0:
    return
  for path in glob.glob(os.path.join(directory, f"{step}.orbax-checkpoint-tmp*")):
    shutil.rmtree(path, ignore_errors=True)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores one phase's `TrainState` under `<directory>`; keeps the last `keep`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, like: Any, *, before: int | None = None) -> tuple[int, Any] | None:
    """The newest readable state (at a step < `before`, if given), shaped like `like`.

    Only evidence of damage (missing or truncated files, unparsable metadata) moves a
    checkpoint aside, said in one line, and the previous one is used; a checkpoint of
    another structure raises `CheckpointMismatch` and stays where it is; a transient
    read error is retried, then raised. Returns None when no checkpoint is left.
    """
    abstract = _abstract(like)
    steps = [s for s in sorted(self._manager.all_steps(), reverse=True)
             if before is None or s < before]
    for step in _agreed(steps):
      state = self._read(step, abstract, like)
      if state is not None:
        return step, state
    if steps:
      log(f"no readable checkpoint left in {self.directory}: starting from step 0")
    return None

  def _read(self, step: int, abstract: Any, like: Any) -> Any:
    """The state of `step`, or None (moved aside) if its files are damaged."""
    def metadata():
      return self._manager.item_metadata(step)

    def state():
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    try:
      saved = _retrying(metadata, f"checkpoint {step} in {self.directory}")
      _check_metadata(saved, like, f"checkpoint {step} in {self.directory}")
      restored = _retrying(state, f"checkpoint {step} in {self.directory}")
      _check_structure(restored, like)
      return restored
    except Damaged as e:
      aside = self._move_aside(step)
      log(f"checkpoint {step} in {self.directory} is damaged ({e}); moved it to {aside} "
          "and falling back to the previous one")
      return None

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of the manager's way, keeping its files."""
    aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()
    return aside

  def save(self, step: int, state: Any) -> bool:
    """Saves `step`; a failed write (disk full, ...) leaves the earlier steps intact and
    raises one `OSError` naming what to do."""
    try:
      return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except OSError as e:
      _remove_partial(self.directory, step)
      raise OSError(f"could not write checkpoint {step} in {self.directory} "
                    f"({_reason(e)}); the earlier checkpoints are intact: free space "
                    "and rerun the same command") from None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpointer:
  """Keeps the one train state of a phase that scored best on validation.

  Orbax's `CheckpointManager` ranks the saved steps by `metric` (`best_fn`, `best_mode`)
  and keeps only the best (`max_to_keep=1`); a step is saved with its validation
  metrics. Lives beside the latest checkpoints, in `<phase>/best/<step>`.
  """

  def __init__(self, directory: str, metric: str, mode: str):
    self.directory, self.metric = os.path.abspath(directory), metric
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: float(metrics[metric]), best_mode=mode,
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=False,
            create=True))

  def drop_after(self, step: int) -> None:
    """Forgets steps after `step` (a resumed phase reaches them again)."""
    for saved in self._manager.all_steps():
      if saved > step:
        self._manager.delete(saved)

  def save(self, step: int, state: Any, metrics: dict[str, float]) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state),
                       metrics={self.metric: float(metrics[self.metric])}, force=True)

  def restore(self, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the best step, or None before any validation."""
    step = self._manager.best_step()
    if step is None:
      return None
    return step, self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(like)))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_structure(state: Any, like: Any) -> None:
  if jax.tree.structure(state) != jax.tree.structure(like):
    raise CheckpointMismatch("checkpoint structure differs from the train state; use the "
                             "config that wrote it or a new --workdir")


def save_variables(directory: str, variables: Any, meta: dict[str, Any]) -> None:
  """Writes model variables (params, batch_stats) and a JSON description beside them."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "variables"), variables, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict[str, Any]:
  """The `model.json` that `save_variables` wrote in `directory`; one-line errors."""
  path = os.path.join(os.path.abspath(directory), "model.json")
  try:
    with open(path, "rb") as f:
      meta = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a kd_jax model description ({_reason(e)}); restore "
                     "it or point at another checkpoint") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{path} is not a kd_jax model description (a JSON object); restore "
                     "it or point at another checkpoint")
  return meta


def load_variables(directory: str, like: Any) -> tuple[Any, dict[str, Any]]:
  """Reads what `save_variables` wrote; `like` gives the expected structure.

  Raises `CheckpointMismatch` for variables of another architecture or class count and
  `Damaged` for missing or truncated files.
  """
  directory = os.path.abspath(directory)
  meta = read_meta(directory)
  path = os.path.join(directory, "variables")
  what = f"the variables in {path}"
  checkpointer = ocp.StandardCheckpointer()
  saved = _retrying(lambda: checkpointer.metadata(path), what)
  _check_metadata(saved, like, what)
  variables = _retrying(lambda: checkpointer.restore(path, _abstract(like)), what)
  return variables, meta


def has_variables(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, "model.json"))
          and os.path.isdir(os.path.join(directory, "variables")))
