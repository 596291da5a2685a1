"""Workflows beyond one distillation run, each from an experiment config's `workflow` key.

  heads              decoupled task heads on a shared distilled trunk (`heads`)
  domain_adaptation  distillation on an unlabelled, corrupted target domain (`domain`)
  continual          a deployed student fine-tuned on new classes with a distillation
                     anchor against forgetting (`continual`)

Each is `run(config, workdir) -> summary` built from the phases of `kd_jax.experiment`
(so every phase checkpoints and resumes), and writes `<workdir>/summary.json`;
`kd-jax distill` dispatches to it when the config sets `workflow`.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from kd_jax.workflows import continual
from kd_jax.workflows import domain
from kd_jax.workflows import heads

WORKFLOWS = {"heads": heads.run, "domain_adaptation": domain.run,
             "continual": continual.run}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the workflow named by `config.workflow`; its summary."""
  name = config.workflow
  if name not in WORKFLOWS:
    raise ValueError(f"workflow={name!r} is unknown; set --config.workflow to one of "
                     f"{', '.join(WORKFLOWS)} (or '' for a plain distillation run)")
  return WORKFLOWS[name](config, workdir)
