"""The `kd-jax` command line: thin flag parsing over importable functions.

  kd-jax distill       [--config=experiments/x.py[:variant]] [--workdir=DIR] [--config.a.b=v]
  kd-jax train-teacher [--config=...] [--workdir=DIR]
  kd-jax evaluate      --workdir=DIR [--robustness]
  kd-jax export        --workdir=DIR [--target=mcu|phone|sbc] [--config.export.target.KEY=V]
                       also checks the variants against a deployment budget
                       (kd_jax/deploy.py): export/deploy.md, exit status 3 when none
                       fits and export.target.strict is set
  kd-jax report        --workdir=DIR
  kd-jax reproduce     --workdir=DIR [--pairs=P,...] [--methods=M,...] [--tiny] [--seeds=N]
                       [--data_dir=DIR] [--export]
  kd-jax profile       [--config=experiments/profile_cifar.py[:tiny]] [--workdir=DIR]
                       [--config.candidates=NAME|DIR|MODEL=FILE.pth,...]
                       [--config.data.name=DATASET]  measures top-1 on it
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
          "[--workdir=DIR] [--config.KEY=VALUE ...] [--verbose]")
# Commands on a finished run start from its config.json; these are the keys each lets
# the command line change (a prefix ending in '.' allows a whole block).
RUN_COMMAND_OVERRIDES = {
    "evaluate": ("eval_batch_size", "data.data_dir"),
    "export": ("export.", "eval_batch_size", "data.data_dir"),
    "report": ("data.data_dir",),
}
# Commands that write into a workdir hold its lock (kd_jax.rundir.WorkdirLock).
_LOCKING = ("distill", "train-teacher", "export")
# The errors that mean "bad input" or a condition the user can fix: one line, exit 2.
_USER_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OSError,
                FloatingPointError)


def _prepare_environment() -> None:
  """Process-wide settings that must precede JAX's and TF's initialisation."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from kd_jax import runtime
  runtime.configure()
  _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its native start-up notices (written to the process's
  standard error before its logging is set up) held back; anything else it prints
  is passed on."""
  if "tensorflow" in sys.modules:
    return
  import tempfile
  try:
    saved = os.dup(2)
  except OSError:
    import tensorflow  # noqa: F401
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      import tensorflow  # noqa: F401
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      noise = ("All log messages before absl::InitializeLog()", "oneDNN custom operations")
      for line in held.read().decode(errors="replace").splitlines(keepends=True):
        if not any(n in line for n in noise):
          sys.stderr.write(line)


class UsageError(Exception):
  """Bad input from the user; printed as one line."""


def _fail(message: str, status: int = 2) -> NoReturn:
  print(f"kd-jax: error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(status)


def _quiet_libraries() -> None:
  """After a handled error the process is ending: what libraries log or print while
  they shut down (orbax's and asyncio's complaints about closed event loops, threads
  stopped mid-way) would only bury the one line that matters."""
  import logging
  import threading
  logging.disable(logging.CRITICAL)
  sys.unraisablehook = lambda *_: None
  threading.excepthook = lambda *_: None


def main(argv: list[str] | None = None) -> None:
  in_process = argv is not None
  argv = list(sys.argv if argv is None else argv)
  verbose = "--verbose" in argv or bool(os.environ.get("KD_JAX_TRACEBACK"))
  argv = [a for a in argv if a != "--verbose"]
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
      print(__doc__)
      return
    got = f"unknown command {argv[1]!r}; " if len(argv) >= 2 else ""
    _fail(f"{got}{_USAGE}")
  command = argv[1]
  _prepare_environment()
  from kd_jax import deploy as deploy_lib
  from kd_jax import preemption
  try:
    if command == "reproduce":
      _run_reproduce([argv[0]] + argv[2:])
    elif command == "import-teacher":
      _run_import_teacher([argv[0]] + argv[2:])
    else:
      _run(command, [argv[0]] + argv[2:])
  except preemption.Preempted as e:
    if not in_process:
      _quiet_libraries()
    print(f"kd-jax: {e}", file=sys.stderr, flush=True)
    raise SystemExit(preemption.EXIT_STATUS[e.signum]) from None
  except KeyboardInterrupt:  # several processes: Ctrl-C stops this host at once
    if not in_process:
      _quiet_libraries()
    _fail("interrupted; rerun the same command to resume from the last checkpoint", 130)
  except deploy_lib.NothingFits as e:  # everything is written; the status says so
    _fail(_one_line(e), 3)
  except (UsageError, *_USER_ERRORS) as e:
    if verbose:
      raise
    if not in_process:
      _quiet_libraries()
    _fail(_one_line(e))
  finally:
    preemption.uninstall()


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = " ".join(str(e.args[0]).split())
  if isinstance(e, OSError) and e.filename and e.strerror and not text.startswith("could"):
    text = f"{e.filename}: {e.strerror}"
  return text or type(e).__name__


def _config_path(argv: list[str], command: str) -> str:
  from kd_jax import configs
  given = [a[len("--config="):] for a in argv if a.startswith("--config=")]
  if given:
    return given[-1].partition(":")[0]
  return (os.path.join(configs.EXPERIMENTS_DIR, "profile_cifar.py")
          if command == "profile" else configs.DEFAULT_CONFIG)


def _explain_config_failure(error: BaseException, path: str, argv: list[str]) -> str:
  """One line for a config file that does not load, naming its file and line."""
  import traceback
  from kd_jax import configs
  if isinstance(error, SyntaxError):
    return (f"config file {error.filename or path}, line {error.lineno}: "
            f"{error.msg}; fix the file")
  target = os.path.abspath(path)
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == target]
  if frames:
    return (f"config file {path}, line {frames[-1].lineno}: get_config raised "
            f"{type(error).__name__}: {_one_line(error)}")
  if os.path.isfile(path) and "get_config" not in open(path, errors="replace").read():
    return f"config file {path} defines no get_config(variant); add one"
  return configs.explain_flag_error(error, argv)


def _check_workdir(workdir: str | None, command: str) -> None:
  """One line for a --workdir that cannot hold a run: empty, a file, not writable."""
  if workdir is None:
    return
  if not workdir.strip():
    raise UsageError("--workdir is empty; give a folder, e.g. --workdir=runs/NAME")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir={workdir} is a file, not a folder; choose another "
                     "--workdir")
  if command in ("evaluate", "export", "report"):
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f"--workdir={workdir} lies under {existing}, which is a file; choose "
                     "another --workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    reason = ("read-only file system" if _read_only(existing) else "permission denied")
    raise UsageError(f"cannot write into --workdir={workdir} ({existing}: {reason}); "
                     "choose a writable folder")


def _read_only(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except (OSError, AttributeError):
    return False


def _run_overrides(command: str, argv: list[str]) -> list[str]:
  """The --config.KEY=VALUE arguments of a command on a finished run; others refused."""
  allowed = RUN_COMMAND_OVERRIDES[command]
  out = []
  for a in argv:
    if a.startswith("--config="):
      raise UsageError(f"kd-jax {command} uses the run's own config (<workdir>/config.json); "
                       "drop --config=FILE")
    if a.startswith("--config."):
      key = a[len("--config."):].partition("=")[0]
      if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in allowed):
        raise UsageError(f"kd-jax {command} cannot change {key!r} of a finished run; it "
                         f"takes {', '.join(k + '*' if k.endswith('.') else k for k in allowed)}"
                         " (rerun `kd-jax distill` in a new --workdir for the rest)")
      out.append(a)
  return out


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
  flags.DEFINE_integer("peer_timeout_s", 100, "multi-host: a process that has not been "
                       "heard from for this long is declared dead and the others stop "
                       "with an error", flag_values=fv)
  flags.DEFINE_string("target", None, "export: check the variants against this "
                      "deployment budget preset (kd_jax/deploy.py PRESETS)", flag_values=fv)
  flags.DEFINE_bool("robustness", False, "evaluate: also accuracy under every edge "
                    "corruption at 5 severities", flag_values=fv)
  argv = [f"--config={configs.resolve_config_path(a[len('--config='):])}"
          if a.startswith("--config=") else a for a in argv]
  on_finished_run = command in RUN_COMMAND_OVERRIDES
  overrides = _run_overrides(command, argv) if on_finished_run else []
  path = _config_path(argv, command)
  try:
    if on_finished_run:
      fv([a for a in argv if not a.startswith("--config")])
      config = None
    else:
      # Defining the flag reads argv to register the --config.* overrides.
      config_flag = config_flags.DEFINE_config_file(
          "config", default=path, help_string="experiment config file",
          flag_values=fv, sys_argv=argv)
      fv(argv)
      config = config_flag.value
      config.keys()  # the file and its overrides load lazily: force both here
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    raise UsageError(_explain_config_failure(e, path, argv)) from None
  except Exception as e:  # whatever a config file's get_config raises
    raise UsageError(_explain_config_failure(e, path, argv)) from None
  if fv.target is not None and command != "export":
    raise UsageError(f"--target is for kd-jax export; for {command} set "
                     "--config.export.target.preset")
  if fv.peer_timeout_s < 1:
    raise UsageError(f"--peer_timeout_s must be at least 1, got {fv.peer_timeout_s}")
  workdir = fv.workdir
  _check_workdir(workdir, command)

  from kd_jax import parallel
  from kd_jax import preemption
  parallel.maybe_initialize_distributed(fv.coordinator_address, fv.num_processes,
                                        fv.process_id, peer_timeout_s=fv.peer_timeout_s)
  import jax
  if jax.process_count() == 1:
    preemption.install()
  if command == "profile":  # not an experiment config: kd_jax.profile checks its own
    from kd_jax import profile
    profile.run(config, workdir or os.path.join(
        "runs", configs.config_name(fv["config"].config_filename)))
    return
  if on_finished_run:
    if not workdir:
      raise UsageError(f"kd-jax {command} needs --workdir=DIR of a finished run")
    config = configs.load_run_config(workdir)
    config = _apply_overrides(command, config, overrides)
    if fv.target is not None:
      config.export.target.preset = fv.target
  else:
    workdir = workdir or os.path.join("runs", configs.config_name(fv["config"].config_filename))
    _check_workdir(workdir, command)

  from kd_jax import experiment
  from kd_jax import rundir
  lock = rundir.WorkdirLock(workdir, command) if command in _LOCKING else None
  try:
    if command == "distill":
      experiment.distill(config, workdir, lock=lock)
    elif command == "train-teacher":
      experiment.train_teacher(config, workdir, lock=lock)
    elif command == "evaluate":
      experiment.evaluate_run(config, workdir, robustness=fv.robustness)
    elif command == "export":
      experiment.export_run(config, workdir, lock=lock)
    elif command == "report":
      experiment.report_run(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _apply_overrides(command: str, config, overrides: list[str]):
  """The run's config with the command line's --config.KEY=VALUE on top; `kd-jax
  export` writes every TFLite variant unless --config.export.variants says which."""
  from absl import flags
  from ml_collections import config_flags

  from kd_jax import configs
  from kd_jax import export
  config = configs.complete(config).unlock()
  if command == "export" and not any(o.startswith("--config.export.variants=")
                                     for o in overrides):
    config.export.variants = tuple(export.QUANTIZATIONS)
  if not overrides:
    return config
  fv = flags.FlagValues()
  try:
    flag = config_flags.DEFINE_config_dict("config", config, flag_values=fv,
                                           sys_argv=["kd-jax", *overrides])
    fv(["kd-jax", *overrides])
    return flag.value
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise UsageError(configs.explain_flag_error(e, overrides)) from None


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
