"""The project as a built wheel: what a user gets from `pip install kd_jax`.

The wheel is built from a copy of the source tree, installed into a fresh virtual
environment (its dependencies are those of the test environment, reached through a
`.pth` file, so no network is needed), and its `kd-jax distill` runs the tiny digits
config from a folder that holds no source: the packaged `kd_jax/experiments/` serve
`--config=experiments/...` as they do in a checkout.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from kd_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist",
                                     "*.egg-info", "__pycache__", ".pytest_cache")


def _build_wheel(tmp_path) -> str:
  source = tmp_path / "source"
  shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", str(dist), str(source)], check=True)
  (wheel,) = dist.glob("kd_jax-*.whl")
  return str(wheel)


def _venv_with(wheel: str, tmp_path) -> str:
  """A fresh venv with `wheel` installed; the test environment's packages behind it."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], check=True, capture_output=True,
                           text=True).stdout.strip()
  # Plain path lines: the test environment's own .pth files (its editable kd_jax among
  # them) are not processed, so `import kd_jax` can only find the installed wheel.
  with open(os.path.join(purelib, "_test_environment.pth"), "w") as f:
    f.write("\n".join(sorted({sysconfig.get_paths()["purelib"],
                              sysconfig.get_paths()["platlib"]})) + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                  "--no-deps", "--no-index", wheel], check=True)
  return str(venv)


def test_wheel_ships_the_configs_and_its_kd_jax_distill_runs(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  packaged = {n.split("/")[-1] for n in names if n.startswith("kd_jax/experiments/")}
  assert packaged >= {f for f in os.listdir(configs.EXPERIMENTS_DIR) if f.endswith(".py")}
  # Pure Python: nothing to compile, no native library.
  assert not [n for n in names if n.endswith((".so", ".cc", ".c", ".cpp", ".pyd"))]

  venv = _venv_with(wheel, tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": ""}
  location = subprocess.run(
      [os.path.join(venv, "bin", "python"), "-c", "import kd_jax; print(kd_jax.__file__)"],
      cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.strip()
  assert location.startswith(venv), location
  workdir = tmp_path / "run"
  run = subprocess.run([os.path.join(venv, "bin", "kd-jax"), "distill",
                        "--config=experiments/digits.py:tiny", f"--workdir={workdir}"],
                       cwd=elsewhere, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert 0.1 < summary["distilled_accuracy"] <= 1.0
  assert os.path.getsize(summary["tflite"]["fp32"]["path"]) > 0
  with open(workdir / "config.json") as f:  # the packaged tiny variant, not another
    run_config = json.load(f)
  assert run_config["teacher"]["train"]["epochs"] == 1 and run_config["train"]["epochs"] == 3
