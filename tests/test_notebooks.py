"""The notebooks run top to bottom (in their small setting) and are committed without outputs."""
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")
NAMES = ["quickstart.ipynb", "custom_method.ipynb", "edge.ipynb", "bring_your_own.ipynb"]
KERNEL = "kd-jax-test"


def _read(name):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    return nbformat.read(f, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
  nb = _read(name)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.get("outputs"), f"{name} cell {i} has outputs; clear them"
      assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernelspec for this interpreter (so the kernel imports this kd_jax), and its env."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "kd_jax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  env = dict(os.environ)
  env.update(
      KD_JAX_NOTEBOOK_SMALL="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
      CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
      # one device: the examples run as on a laptop (the tests fake 4 elsewhere)
      XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, kernel_env):
  nb = _read(name)
  cwd = tmp_path / "cwd"  # not the repository: the notebooks must not depend on the cwd
  cwd.mkdir()
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute(env=kernel_env)  # raises CellExecutionError naming the failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
