"""Metrics to `<workdir>/metrics.jsonl` and TensorBoard event files, from process 0 only.

Each line of `metrics.jsonl` is one record: `phase` (teacher, vanilla, distilled),
`kind` (`train` every `log_every_steps`, `eval` at the end of a phase, `rollback`),
`step`, and the scalars, e.g. `loss`, `ce`, each term's value and `<term>_weighted`,
`grad_norm`, `grad_norm/student`, `grad_norm/<term>`, `learning_rate`,
`temperature/<term>` (train) or `accuracy`, `nll`, `ece`, `teacher_agreement`,
`cka/<pair>` (eval, and `validation` every `validation.every_steps` where the run holds
out a validation split; `best_eval`: the test-split metrics of the best-by-validation
model). TensorBoard gets every scalar as `<phase>/<kind>/<name>`, through `tf.summary`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` in order; [] when nothing was logged."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _plain(value: Any) -> Any:
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    return float(value)
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


class MetricWriter:
  """Appends one JSON object per record; mirrors scalars to TensorBoard under `<phase>/`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self._enabled = jax.process_index() == 0
    self._tb = None
    if self._enabled:
      import tensorflow as tf
      from tensorflow.core.framework import summary_pb2
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      # TensorBoard's scalar plugin reads summaries tagged with this metadata; written
      # with the core `tf.summary.write`, no tensorboard package is needed to log.
      self._scalar = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def drop_after(self, phase: str, step: int) -> None:
    """On resume: forget records of `phase` logged after the restored `step`."""
    if not self._enabled:
      return
    records = read_records(self.workdir)
    kept = [r for r in records if not (r.get("phase") == phase and r.get("step", 0) > step)]
    if len(kept) != len(records):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)

  def write(self, phase: str, step: int, metrics: Mapping[str, Any], kind: str = "train"):
    if not self._enabled:
      return
    record = {"phase": phase, "kind": kind, "step": int(step),
              **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    with self._tb.as_default():
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tf.summary.write(f"{phase}/{kind}/{k}", self._tf.constant(v, self._tf.float32),
                                 step=int(step), metadata=self._scalar)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def log(message: str) -> None:
  """One line of progress on process 0's standard output, prefixed `[kd-jax]`."""
  if jax.process_index() == 0:
    print(f"[kd-jax] {message}", flush=True)
