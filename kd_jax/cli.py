"""The `kd-jax` command line: thin flag parsing over importable functions.

  kd-jax distill       [--config=experiments/x.py[:variant]] [--workdir=DIR] [--config.a.b=v]
  kd-jax train-teacher [--config=...] [--workdir=DIR]
  kd-jax evaluate      --workdir=DIR [--robustness]
  kd-jax export        --workdir=DIR
  kd-jax report        --workdir=DIR
  kd-jax reproduce     --workdir=DIR [--pairs=P,...] [--methods=M,...] [--tiny] [--seeds=N]
                       [--data_dir=DIR] [--export]
  kd-jax profile       [--config=experiments/profile_cifar.py[:tiny]] [--workdir=DIR]
                       [--config.candidates=NAME_OR_DIR,...]
  kd-jax import-teacher --checkpoint=FILE.pth --model=NAME --num_classes=N --workdir=DIR
                       [--config=...]   a PyTorch teacher as DIR/teacher (reuse it with
                       --config.teacher.checkpoint=DIR, or pass the file itself there)

With no --config, the embedded default (experiments/digits.py, offline digits) runs.
Bad input ends in one line naming what to change, with exit status 2.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

COMMANDS = ("distill", "train-teacher", "evaluate", "export", "report", "reproduce",
            "profile", "import-teacher")
_USAGE = ("usage: kd-jax {" + ",".join(COMMANDS) + "} [--config=FILE[:variant]] "
          "[--workdir=DIR] [--config.KEY=VALUE ...]")


def _prepare_environment() -> None:
  """Process-wide settings that must precede JAX's and TF's initialisation."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from kd_jax import runtime
  runtime.configure()


class UsageError(Exception):
  """Bad input from the user; printed as one line."""


def _fail(message: str) -> NoReturn:
  print(f"kd-jax: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
      print(__doc__)
      return
    got = f"unknown command {argv[1]!r}; " if len(argv) >= 2 else ""
    _fail(f"{got}{_USAGE}")
  command = argv[1]
  _prepare_environment()
  try:
    if command == "reproduce":
      _run_reproduce([argv[0]] + argv[2:])
    elif command == "import-teacher":
      _run_import_teacher([argv[0]] + argv[2:])
    else:
      _run(command, [argv[0]] + argv[2:])
  except (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError,
          UsageError) as e:
    if os.environ.get("KD_JAX_TRACEBACK"):
      raise
    _fail(" ".join(str(e).split()) or type(e).__name__)


def _run(command: str, argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  from kd_jax import configs

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "where the run writes everything", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None,
                      "multi-host: host:port of process 0", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "multi-host: this process's index",
                       flag_values=fv)
  flags.DEFINE_bool("robustness", False, "evaluate: also accuracy under every edge "
                    "corruption at 5 severities", flag_values=fv)
  argv = [f"--config={configs.resolve_config_path(a[len('--config='):])}"
          if a.startswith("--config=") else a for a in argv]
  try:
    # Defining the flag reads argv to register the --config.* overrides.
    default = (os.path.join(configs.EXPERIMENTS_DIR, "profile_cifar.py")
               if command == "profile" else configs.DEFAULT_CONFIG)
    config_flag = config_flags.DEFINE_config_file(
        "config", default=default, help_string="experiment config file",
        flag_values=fv, sys_argv=argv)
    fv(argv)
    config = config_flag.value
    config.keys()  # the file and its overrides load lazily: force both here
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    raise UsageError(configs.explain_flag_error(e, argv)) from None

  from kd_jax import parallel
  parallel.maybe_initialize_distributed(fv.coordinator_address, fv.num_processes,
                                        fv.process_id)
  workdir = fv.workdir
  if command == "profile":  # not an experiment config: kd_jax.profile checks its own
    from kd_jax import profile
    profile.run(config, workdir or os.path.join(
        "runs", configs.config_name(fv["config"].config_filename)))
    return
  if command in ("evaluate", "export", "report"):
    if not workdir:
      raise UsageError(f"kd-jax {command} needs --workdir=DIR of a finished run")
    if not any(a.startswith("--config") for a in argv):
      config = configs.load_run_config(workdir)
  else:
    workdir = workdir or os.path.join("runs", configs.config_name(fv["config"].config_filename))
  config = configs.validate(config, deep=True)

  from kd_jax import experiment
  if command == "distill":
    configs.save_run_config(config, workdir)
    experiment.distill(config, workdir)
  elif command == "train-teacher":
    configs.save_run_config(config, workdir)
    experiment.train_teacher(config, workdir)
  elif command == "evaluate":
    experiment.evaluate_run(config, workdir, robustness=fv.robustness)
  elif command == "export":
    experiment.export_run(config, workdir)
  elif command == "report":
    experiment.report_run(config, workdir)


# --- kd-jax reproduce: the CIFAR-100 benchmark tables (kd_jax/reproduce.py) ---------

def _run_reproduce(argv: list[str]) -> None:
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "where the runs and the tables go", flag_values=fv)
  flags.DEFINE_list("pairs", None, "teacher-student pairs (default: all)", flag_values=fv)
  flags.DEFINE_list("methods", None, "methods (default: all)", flag_values=fv)
  flags.DEFINE_bool("tiny", False, "the seconds-long :tiny flavour of every config",
                    flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data directory holding cifar100",
                      flag_values=fv)
  flags.DEFINE_bool("export", False, "also export every student to TFLite", flag_values=fv)
  flags.DEFINE_integer("seeds", 1, "student runs per pair and method (seeds 0..N-1); "
                       "the table gives mean ± std", flag_values=fv)
  try:
    fv(argv)
  except flags.Error as e:
    raise UsageError(" ".join(str(e).split())) from None
  if not fv.workdir:
    raise UsageError("kd-jax reproduce needs --workdir=DIR")
  from kd_jax import reproduce
  reproduce.run(fv.pairs, fv.methods, fv.workdir, tiny=fv.tiny, data_dir=fv.data_dir,
                export=fv.export, seeds=fv.seeds)


# --- kd-jax import-teacher: a PyTorch checkpoint as a teacher (kd_jax/pretrained.py) --

def _run_import_teacher(argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  from kd_jax import configs

  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, ".pth / .pt / .safetensors file", flag_values=fv)
  flags.DEFINE_string("model", None, "zoo name of its architecture", flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "its class count", flag_values=fv)
  flags.DEFINE_string("workdir", None, "where teacher/ is written", flag_values=fv)
  argv = [f"--config={configs.resolve_config_path(a[len('--config='):])}"
          if a.startswith("--config=") else a for a in argv]
  try:
    config_flag = config_flags.DEFINE_config_file(
        "config", default=configs.DEFAULT_CONFIG, help_string="experiment config file "
        "(its data block gives the eval split)", flag_values=fv, sys_argv=argv)
    fv(argv)
    config = config_flag.value
    config.keys()
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    raise UsageError(configs.explain_flag_error(e, argv)) from None
  missing = [f"--{name}" for name in ("checkpoint", "model", "num_classes", "workdir")
             if fv[name].value is None]
  if missing:
    raise UsageError(f"kd-jax import-teacher needs {' '.join(missing)}")
  from kd_jax import pretrained
  accuracy = pretrained.import_teacher(fv.checkpoint, fv.model, fv.num_classes, fv.workdir,
                                       configs.validate(config, deep=True))
  print(f"teacher accuracy {accuracy:.6f}")


if __name__ == "__main__":
  main()
