"""Checkpoints of a training phase with orbax: the whole train state, saved every N steps.

The data iterator position and every RNG are functions of the saved `step`, so restoring
the state is enough to continue a run exactly where it stopped. Teacher variables are
saved once, separately (`save_variables`), and never enter a student's checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores one phase's `TrainState` under `<directory>`; keeps the last `keep`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, like: Any, *, before: int | None = None) -> tuple[int, Any] | None:
    """The newest readable state (at a step < `before`, if given), shaped like `like`.

    A damaged checkpoint (truncated or corrupted files) is skipped with a warning and
    the previous one is used; returns None when no checkpoint can be read.
    """
    abstract = _abstract(like)
    for step in sorted(self._manager.all_steps(), reverse=True):
      if before is not None and step >= before:
        continue
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        _check_structure(state, like)
        return step, state
      except Exception as e:  # orbax raises many types for damaged files
        aside = self._move_aside(step)
        warnings.warn(f"checkpoint {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"using the previous one (kept the damaged one in {aside})")
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
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

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
    raise ValueError("checkpoint structure differs from the train state")


def save_variables(directory: str, variables: Any, meta: dict[str, Any]) -> None:
  """Writes model variables (params, batch_stats) and a JSON description beside them."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "variables"), variables, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump(meta, f, indent=2)


def load_variables(directory: str, like: Any) -> tuple[Any, dict[str, Any]]:
  """Reads what `save_variables` wrote; `like` gives the expected structure."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, "model.json")) as f:
    meta = json.load(f)
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(directory, "variables"), _abstract(like))
  return variables, meta


def has_variables(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, "model.json"))
          and os.path.isdir(os.path.join(directory, "variables")))
