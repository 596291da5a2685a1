"""Workflows: what `kd-jax distill` runs, chosen by the experiment config's `workflow`.

  distill            (the default, `workflow` unset) teacher, vanilla and distilled
                     student, edge phases, TFLite export (`distill`)
  heads              decoupled task heads on a shared distilled trunk (`heads`)
  domain_adaptation  adapting the student to an unlabelled target domain (`domain`)
  continual          a deployed student fine-tuned on new classes with a distillation
                     anchor against forgetting (`continual`)

Each is `run(config, workdir) -> summary`, composed of phases (`kd_jax.phase`, so every
phase checkpoints and resumes), and writes `<workdir>/summary.json`. A workflow with
settings of its own owns a config block (its `default_config` and `check_config`). A
new workflow is one module and one `WORKFLOWS.register` line here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from kd_jax.registry import Registry
from kd_jax.workflows import continual
from kd_jax.workflows import distill
from kd_jax.workflows import domain
from kd_jax.workflows import heads



@dataclasses.dataclass(frozen=True)
class Workflow:
  """A registered workflow: its `run`, and the config block it owns (if any) with the
  block's defaults and the check of a config that selects it."""
  run: Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
  block: Optional[str] = None
  default_config: Optional[Callable[[], ml_collections.ConfigDict]] = None
  check_config: Optional[Callable[[ml_collections.ConfigDict], None]] = None


DEFAULT = "distill"
WORKFLOWS: Registry[Workflow] = Registry("workflow", hint="set --config.workflow")
WORKFLOWS.register(DEFAULT, Workflow(distill.run))
WORKFLOWS.register("heads", Workflow(heads.run, "heads", heads.default_config,
                                     heads.check_config))
WORKFLOWS.register("domain_adaptation", Workflow(domain.run, "domain",
                                                 domain.default_config,
                                                 domain.check_config))
WORKFLOWS.register("continual", Workflow(continual.run, "continual",
                                         continual.default_config,
                                         continual.check_config))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the workflow named by `config.workflow`."""
  return WORKFLOWS.get(config.workflow).run(config, workdir)
