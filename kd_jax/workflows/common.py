"""What the workflows share: the run's context, derived configs, evaluation, the summary."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import jax
import ml_collections

from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax import rundir
from kd_jax.metric_writer import MetricWriter, log
from kd_jax.workflows import distill


@dataclasses.dataclass
class Context:
  """One workflow run: its mesh, dataset info, metric writer and teacher.

  `teacher` is the teacher phase's result (its variables on the host);
  `teacher_variables` the same variables replicated over `mesh`, for steps.
  """
  workdir: str
  mesh: Any
  info: data_lib.DatasetInfo
  writer: MetricWriter
  start: float
  teacher: phase_lib.PhaseResult
  teacher_variables: Any

  @property
  def phase_args(self) -> dict[str, Any]:
    """The keyword arguments `kd_jax.phase.train_phase` takes from the run."""
    return dict(workdir=self.workdir, mesh=self.mesh, info=self.info, writer=self.writer)


def start(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Creates `workdir`, the run's mesh, dataset info and metric writer; runs the
  teacher phase (loads `teacher.checkpoint`, or trains and saves the teacher)."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  info = data_lib.get_info(config.data)
  log(f"workflow {config.workflow}: {jax.device_count()} {jax.default_backend()} "
      f"device(s); dataset {config.data.name}")
  mesh, writer = parallel.data_mesh(), MetricWriter(workdir)
  teacher = distill.teacher_phase(config, workdir, mesh, info, writer)
  return Context(workdir, mesh, info, writer, t0, teacher,
                 parallel.replicate(teacher.variables, mesh))


def finish(context: Context, summary: dict[str, Any]) -> dict[str, Any]:
  """Adds `wall_seconds`, writes `<workdir>/summary.json` and closes the writer."""
  summary["wall_seconds"] = time.perf_counter() - context.start
  context.writer.close()
  if jax.process_index() == 0:
    rundir.write_summary(context.workdir, summary)
  return summary


def derived(config: ml_collections.ConfigDict,
            updates: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, e.g. {'student.train_split': 'train'}."""
  copy = config.copy_and_resolve_references()
  for dotted, value in updates.items():
    *parents, key = dotted.split(".")
    node = copy
    for parent in parents:
      node = node[parent]
    node[key] = value
  return copy


def accuracy_fn(model, context: Context, eval_batch_size: int):
  """`accuracy(variables, data_config, corruption=None)`: top-1 of `model` on eval splits.

  One compiled evaluation step serves every call (variables of the same shapes, any
  eval split, optionally under a `kd_jax.data.augment` corruption `(op, severity)`).
  """
  eval_step = eval_lib.make_eval_step(model)

  def accuracy(variables, data_config: ml_collections.ConfigDict,
               corruption: tuple[str, int] | None = None) -> float:
    batches = data_lib.eval_iterator(data_config, batch_size=eval_batch_size,
                                     corruption=corruption)
    return eval_lib.evaluate(
        model, parallel.replicate(variables, context.mesh), batches, context.mesh,
        num_classes=context.info.num_classes, eval_step=eval_step)["accuracy"]
  return accuracy
