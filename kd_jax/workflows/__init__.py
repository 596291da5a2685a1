"""Workflows: what `kd-jax distill` runs, chosen by the experiment config's `workflow`.

  distill            (the default, `workflow` unset) teacher, vanilla and distilled
                     student, edge phases, TFLite export (`distill`)
  heads              decoupled task heads on a shared distilled trunk (`heads`)
  domain_adaptation  distillation on an unlabelled, corrupted target domain (`domain`)
  continual          a deployed student fine-tuned on new classes with a distillation
                     anchor against forgetting (`continual`)

Each is `run(config, workdir) -> summary`, composed of phases (`kd_jax.phase`, so every
phase checkpoints and resumes), and writes `<workdir>/summary.json`. A new workflow is
one module with a `run` and one `WORKFLOWS.register` line here.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from kd_jax.registry import Registry
from kd_jax.workflows import continual
from kd_jax.workflows import distill
from kd_jax.workflows import domain
from kd_jax.workflows import heads

DEFAULT = "distill"
WORKFLOWS = Registry("workflow", hint="set --config.workflow")
WORKFLOWS.register(DEFAULT, distill.run)
WORKFLOWS.register("heads", heads.run)
WORKFLOWS.register("domain_adaptation", domain.run)
WORKFLOWS.register("continual", continual.run)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the workflow named by `config.workflow` (the default one when unset)."""
  return WORKFLOWS.get(config.get("workflow") or DEFAULT)(config, workdir)
