"""Test-session setup: fake CPU devices and fast compiles, before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from kd_jax import runtime  # noqa: E402

runtime.configure_xla_flags()  # the XLA flags the kd-jax command runs with
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_disable_most_optimizations", True)


import json  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/digits.py:tiny"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  """(workdir, summary) of one `kd-jax distill` of the tiny config, shared by the test
  files of a worker; tests that change files work on a copy."""
  from kd_jax import cli
  workdir = str(tmp_path_factory.mktemp("tiny"))
  cli.main(["kd-jax", "distill", f"--config={os.path.join(ROOT, TINY)}",
            f"--workdir={workdir}"])
  with open(os.path.join(workdir, "summary.json")) as f:
    return workdir, json.load(f)


@pytest.fixture(scope="session")
def tiny_teacher(finished_run):
  """A tiny resnet8 teacher (the shared run's workdir) for `teacher.checkpoint`."""
  return finished_run[0]
