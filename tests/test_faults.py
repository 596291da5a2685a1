"""Bad input and faults against `kd-jax`: each ends in one line naming what to change,
exit status 2, no traceback, no earlier file changed and no workdir left locked."""
import errno
import hashlib
import json
import os
import shutil

import pytest

from kd_jax import cli
from kd_jax import files
from kd_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments/digits.py:tiny")


def _config_file(tmp, body: str) -> str:
  """A config file: the tiny config changed by `body` (lines acting on `c`)."""
  path = os.path.join(tmp, "cfg.py")
  lines = "".join(f"  {line}\n" for line in body.splitlines())
  with open(path, "w") as f:
    f.write("from kd_jax import configs\n\n\ndef get_config(variant=''):\n"
            "  c = configs.experiment_config('digits', 'tiny')\n" + lines + "  return c\n")
  return path


def _teacher_dir(tmp, meta: bytes | dict) -> str:
  """A teacher folder holding `meta` as model.json (and an empty variables folder)."""
  path = os.path.join(tmp, "teacher_ckpt")
  os.makedirs(os.path.join(path, "variables"), exist_ok=True)
  with open(os.path.join(path, "model.json"), "wb") as f:
    f.write(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
  return path


def _own_teacher(tmp, meta: dict) -> str:
  """A workdir whose teacher/ folder holds `meta` as model.json."""
  workdir = os.path.join(tmp, "w2")
  os.makedirs(workdir, exist_ok=True)
  os.rename(_teacher_dir(tmp, meta), os.path.join(workdir, "teacher"))
  return workdir


def _write(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return path


def _distill(*overrides):
  return lambda tmp, run: ["distill", f"--config={TINY}", f"--workdir={tmp}/w",
                           *overrides]


def _on_file(body, message_args=()):
  return lambda tmp, run: ["distill", f"--config={_config_file(tmp, body)}",
                           f"--workdir={tmp}/w", *message_args]


def _meta(model="resnet8", num_classes=10):
  return {"model": model, "num_classes": num_classes, "phase": "teacher"}


# (id, argv builder (tmp folder, copy of a finished run) -> argv, what the line says)
CASES = [
    # The config file and the flags.
    ("syntax_error", lambda t, r: ["distill", f"--config={_write(t + '/bad.py', 'def get_config(:' + chr(10))}",
                                   f"--workdir={t}/w"], "bad.py, line 1: invalid syntax"),
    ("get_config_raises", lambda t, r: ["distill", f"--config={_write(t + '/raise.py', 'def get_config(v=None):' + chr(10) + '  raise RuntimeError(' + repr('no such thing') + ')' + chr(10))}",
                                        f"--workdir={t}/w"],
     "raise.py, line 2: get_config raised RuntimeError: no such thing"),
    ("no_get_config", lambda t, r: ["distill", f"--config={_write(t + '/empty.py', 'x = 1' + chr(10))}",
                                    f"--workdir={t}/w"], "defines no get_config"),
    ("config_missing", lambda t, r: ["distill", f"--config={t}/nope.py", f"--workdir={t}/w"],
     "nope.py not found"),
    ("unknown_variant", lambda t, r: ["distill", f"--config={ROOT}/experiments/digits.py:huge",
                                      f"--workdir={t}/w"], "unknown variant 'huge'"),
    ("unknown_key", _distill("--config.nope=1"), "unknown config key 'nope'"),
    ("misspelled_key", _distill("--config.train.learnin_rate=0.1"), "did you mean 'learning_rate'"),
    ("wrong_type", _distill("--config.train.epochs=abc"), "--config.train.epochs=abc"),
    ("seed_list", _distill("--config.seed=0,1,2"), "--config.seed=0,1,2"),
    ("unknown_command", lambda t, r: ["distil", f"--workdir={t}/w"], "unknown command 'distil'"),
    ("unknown_flag", lambda t, r: ["distill", f"--config={TINY}", f"--workdri={t}/w"], "workdri"),
    ("peer_timeout", _distill("--peer_timeout_s=0"), "--peer_timeout_s must be at least 1"),
    # Numbers out of range, NaN and infinity.
    ("epochs_zero", _distill("--config.train.epochs=0"), "train.epochs must be a finite number > 0"),
    ("epochs_negative", _distill("--config.train.epochs=-1"), "train.epochs must be"),
    ("teacher_epochs_nan", _distill("--config.teacher.train.epochs=nan"), "teacher.train.epochs"),
    ("lr_nan", _distill("--config.train.learning_rate=nan"), "learning_rate is nan"),
    ("lr_inf", _distill("--config.train.learning_rate=inf"), "learning_rate is inf"),
    ("lr_negative", _distill("--config.train.learning_rate=-0.1"), "train.learning_rate must be"),
    ("batch_zero", _distill("--config.train.batch_size=0"), "train.batch_size must be at least 1"),
    ("batch_indivisible", _distill("--config.train.batch_size=30"), "not divisible by the 4 devices"),
    ("batch_too_big", _distill("--config.train.batch_size=100000"),
     "train.batch_size=100000 exceeds the 288 training examples"),
    ("teacher_batch_too_big", _distill("--config.teacher.train.batch_size=100000"),
     "teacher.train.batch_size=100000 exceeds the 1294 training examples"),
    ("checkpoint_every_negative", _distill("--config.train.checkpoint_every_steps=-5"),
     "train.checkpoint_every_steps must be at least 1"),
    ("momentum", _distill("--config.train.momentum=1.5"), "train.momentum must be in [0, 1)"),
    ("optimizer", _distill("--config.train.optimizer=adam"), "train.optimizer='adam' is unknown"),
    ("schedule", _distill("--config.train.schedule=linear"), "train.schedule='linear' is unknown"),
    ("ce_weight_negative", _distill("--config.distill.ce_weight=-1"), "distill.ce_weight must not be negative"),
    ("term_weight_negative", _on_file("c.distill.terms[0]['weight'] = -1.0"),
     "distill.terms[0]: weight must not be negative"),
    ("temperature_zero", _on_file("c.distill.terms[0]['temperature'] = 0.0"),
     "distill.terms[0]: temperature must be positive"),
    ("term_method", _on_file("c.distill.terms[0]['method'] = 'kdd'"), "distill.terms[0]"),
    ("term_tap", _on_file("c.distill.terms = [dict(method='fitnet', student_tap='stage_9', adapter='conv1x1')]"),
     "stage_9"),
    ("log_every_zero", _distill("--config.log_every_steps=0"), "log_every_steps must be at least 1"),
    ("eval_batch_zero", _distill("--config.eval_batch_size=0"), "eval_batch_size must be positive"),
    ("validation_every_zero", _distill("--config.validation.every_steps=0"),
     "validation.every_steps must be at least 1"),
    ("validation_metric", _distill("--config.validation.metric=f1"), "validation.metric='f1' is unknown"),
    ("validation_fraction", _distill("--config.data.validation_fraction=1.5"),
     "data.validation_fraction must be in [0, 1)"),
    ("mixed_precision_type", _distill("--config.mixed_precision=maybe"), "mixed_precision"),
    # Datasets and splits.
    ("dataset_unknown", _distill("--config.data.name=cifar11"), "unknown dataset 'cifar11'"),
    ("dataset_unprepared", lambda t, r: ["distill", f"--config={TINY}", f"--workdir={t}/w",
                                         "--config.data.name=cifar100",
                                         f"--config.data.data_dir={t}/tfds"],
     "dataset cifar100 is not prepared"),
    ("train_split", _distill("--config.data.train_split=trian"), "data.train_split='trian'"),
    ("student_split", _distill("--config.student.train_split=trian[:20%]"),
     "student.train_split='trian[:20%]'"),
    ("eval_split", _distill("--config.data.eval_split=tset"), "data.eval_split='tset'"),
    ("validation_split", _distill("--config.data.validation_split=nope",
                                  "--config.data.validation_fraction=0.0"), "Unknown split 'nope'"),
    ("augment", _distill("--config.data.augment=foo"), "foo"),
    ("edge_augment", _on_file("c.data.edge_augment = [dict(op='fog')]"), "fog"),
    ("views", _on_file("c.distill.terms[0]['student_view'] = 'strong'"), "data.views"),
    # Models, sections, workflows.
    ("student_name", _distill("--config.student.name=resnet9"), "student.name='resnet9' is not a known model"),
    ("teacher_name", _distill("--config.teacher.name=foo"), "teacher.name='foo' is not a known model"),
    ("export_variant", _distill("--config.export.variants=('fp32','int4')"),
     "export.variants names unknown quantizations ['int4']"),
    ("export_latency_runs", _distill("--config.export.latency_runs=0"), "export.latency_runs must be at least 1"),
    ("workflow", _distill("--config.workflow=distil"), "distil"),
    ("curriculum", _distill("--config.curriculum.pacing=fast"), "fast"),
    ("edge_bits", _distill("--config.edge.qat.bits=4"), "edge.qat.bits=4 is not supported"),
    ("prune_ratio", _distill("--config.edge.prune.flops_ratio=0"), "edge.prune.flops_ratio must be in (0, 1]"),
    # Workdirs.
    ("workdir_empty", lambda t, r: ["distill", f"--config={TINY}", "--workdir="], "--workdir is empty"),
    ("workdir_is_file", lambda t, r: ["distill", f"--config={TINY}",
                                      f"--workdir={_write(t + '/afile', 'x')}"], "is a file, not a folder"),
    ("workdir_under_file", lambda t, r: ["distill", f"--config={TINY}",
                                         f"--workdir={_write(t + '/bfile', 'x')}/run"], "which is a file"),
    ("workdir_other_config", lambda t, r: ["distill", f"--config={TINY}", f"--workdir={r}",
                                           "--config.seed=5"],
     "holds a run with a different config (differs at seed)"),
    # Teachers.
    ("teacher_missing", _distill("--config.teacher.checkpoint=missing_dir"),
     "teacher checkpoint 'missing_dir' not found"),
    ("teacher_other_model", lambda t, r: _distill(
        f"--config.teacher.checkpoint={_teacher_dir(t, _meta('wrn_16_2'))}")(t, r),
     "is a wrn_16_2, not teacher.name='resnet8'"),
    ("teacher_other_classes", lambda t, r: _distill(
        f"--config.teacher.checkpoint={_teacher_dir(t, _meta(num_classes=100))}")(t, r),
     "predicts 100 classes but dataset kd_digits has 10"),
    ("teacher_meta_garbage", lambda t, r: _distill(
        f"--config.teacher.checkpoint={_teacher_dir(t, b'{' + bytes([0x92]) + b'}')}")(t, r),
     "model.json is not a kd_jax model description"),
    ("own_teacher_other_model", lambda t, r: ["distill", f"--config={TINY}",
                                              f"--workdir={_own_teacher(t, _meta('vgg8'))}"],
     "is a vgg8, not teacher.name='resnet8'"),
    # Commands on a finished run.
    ("evaluate_no_workdir", lambda t, r: ["evaluate"], "kd-jax evaluate needs --workdir"),
    ("evaluate_missing_run", lambda t, r: ["evaluate", f"--workdir={t}/none"], "config.json not found"),
    ("evaluate_train_key", lambda t, r: ["evaluate", f"--workdir={r}", "--config.train.epochs=5"],
     "kd-jax evaluate cannot change 'train.epochs' of a finished run"),
    ("export_data_key", lambda t, r: ["export", f"--workdir={r}", "--config.data.name=cifar10"],
     "kd-jax export cannot change 'data.name'"),
    ("export_config_file", lambda t, r: ["export", f"--workdir={r}", f"--config={TINY}"],
     "uses the run's own config"),
    ("report_empty_dir", lambda t, r: ["report", f"--workdir={t}"], "config.json not found"),
    ("evaluate_bad_batch", lambda t, r: ["evaluate", f"--workdir={r}", "--config.eval_batch_size=0"],
     "eval_batch_size must be positive"),
    ("evaluate_batch_type", lambda t, r: ["evaluate", f"--workdir={r}", "--config.eval_batch_size=abc"],
     "eval_batch_size"),
    ("export_variant_int4", lambda t, r: ["export", f"--workdir={r}",
                                          "--config.export.variants=('int4',)"],
     "unknown quantizations ['int4']"),
]


def _snapshot(folder: str) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _locks(folder: str) -> list[str]:
  return [os.path.join(root, rundir.LOCK) for root, _, names in os.walk(folder)
          if rundir.LOCK in names]


def _run_case(argv, capfd, folders):
  before = {f: _snapshot(f) for f in folders}
  with pytest.raises(SystemExit) as e:
    cli.main(["kd-jax", *argv])
  out, err = capfd.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 2, (argv, err[-2000:])
  assert "Traceback" not in out + err, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("kd-jax: error: "), err[-3000:]
  for f in folders:
    assert _snapshot(f) == before[f], f"{argv}: files changed in {f}"
    assert not _locks(f), argv
  return lines[0]


@pytest.fixture(scope="module")
def run_copy(finished_run, tmp_path_factory):
  """A copy of the finished tiny run that the cases may try to change."""
  copy = str(tmp_path_factory.mktemp("copy") / "run")
  shutil.copytree(finished_run[0], copy)
  return copy


@pytest.mark.parametrize("name, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(name, build, message, tmp_path, run_copy, capfd):
  argv = build(str(tmp_path), run_copy)
  line = _run_case(argv, capfd, [str(tmp_path), run_copy])
  assert message in line, line


def test_the_table_covers_at_least_sixty_inputs():
  assert len(CASES) + len(FAULTS) >= 60


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


FAULTS = ["read_only_workdir", "disk_full_export", "disk_full_summary", "lock_held",
          "stale_lock"]


def test_a_read_only_workdir_is_refused_before_anything(tmp_path, monkeypatch, capfd):
  monkeypatch.setattr(os, "access", lambda *a, **k: False)
  line = _run_case(["distill", f"--config={TINY}", f"--workdir={tmp_path}/w"], capfd,
                   [str(tmp_path)])
  assert "cannot write into --workdir=" in line


def test_a_full_disk_during_export_keeps_the_earlier_files(run_copy, monkeypatch, capfd):
  monkeypatch.setattr(files.os, "fsync", _enospc)
  line = _run_case(["export", f"--workdir={run_copy}", "--config.export.variants=('fp32',)"],
                   capfd, [run_copy])
  assert "No space left on device" in line and "student_fp32.tflite" in line, line


def test_a_full_disk_writing_the_summary_keeps_the_old_one(run_copy, monkeypatch, capfd):
  from kd_jax import export
  real = os.replace

  def failing(src, dst):
    if str(dst).endswith("summary.json"):
      _enospc()
    real(src, dst)
  monkeypatch.setattr(files.os, "replace", failing)
  monkeypatch.setattr(export, "export_all", lambda *a, **k: {})
  line = _run_case(["export", f"--workdir={run_copy}", "--config.export.variants=('fp32',)"],
                   capfd, [run_copy])
  assert "summary.json" in line and "No space left" in line, line


def test_a_workdir_in_use_names_its_holder(tmp_path, capfd):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = {"host": __import__("socket").gethostname(), "pid": os.getppid(),
            "command": "distill"}
  (workdir / rundir.LOCK).write_text(json.dumps(holder))
  before = _snapshot(str(workdir))
  with pytest.raises(SystemExit) as e:
    cli.main(["kd-jax", "distill", f"--config={TINY}", f"--workdir={workdir}"])
  err = capfd.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert f"is in use by `kd-jax distill` (pid {os.getppid()} on" in err[0]
  assert _snapshot(str(workdir)) == before  # the holder's lock and nothing else


def test_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  # A pid that is not running: the largest pid number the kernel hands out, plus one.
  dead = int(open("/proc/sys/kernel/pid_max").read()) + 1 if os.path.exists(
      "/proc/sys/kernel/pid_max") else 2 ** 22 + 1
  (workdir / rundir.LOCK).write_text(json.dumps(
      {"host": __import__("socket").gethostname(), "pid": dead, "command": "distill"}))
  lock = rundir.WorkdirLock(str(workdir), "distill")
  lock.acquire()
  assert json.loads((workdir / rundir.LOCK).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (workdir / rundir.LOCK).exists()


def test_finished_run_commands_start_from_its_config(run_copy, capfd):
  """`evaluate` with an allowed override uses the run's config.json; `export` of one
  variant keeps the other variants in summary.json."""
  before = json.load(open(os.path.join(run_copy, "summary.json")))
  cli.main(["kd-jax", "evaluate", f"--workdir={run_copy}", "--config.eval_batch_size=64"])
  evaluation = json.load(open(os.path.join(run_copy, "evaluation.json")))
  assert evaluation["distilled"]["accuracy"] == pytest.approx(
      before["distilled_metrics"]["accuracy"], abs=1e-6)
  cli.main(["kd-jax", "export", f"--workdir={run_copy}", "--config.export.variants=('fp32',)"])
  after = json.load(open(os.path.join(run_copy, "summary.json")))
  assert set(after["tflite"]) == set(before["tflite"]) == {"fp32", "int8"}
  assert after["tflite"]["int8"] == before["tflite"]["int8"]
  assert not _locks(run_copy)
  capfd.readouterr()


def test_damaged_teacher_variables_are_restored_from_the_teacher_checkpoints(
    finished_run, tmp_path, capsys):
  import chex
  from kd_jax import configs, data, parallel
  from kd_jax.metric_writer import MetricWriter
  from kd_jax.workflows import distill as distill_workflow
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run[0], workdir)
  config = configs.validate(configs.load_run_config(workdir))
  info = data.get_info(config.data)
  mesh = parallel.data_mesh()
  writer = MetricWriter(workdir)
  intact = distill_workflow.teacher_phase(config, workdir, mesh, info, writer)
  for root, _, names in os.walk(os.path.join(workdir, "teacher", "variables")):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and os.path.basename(root) == "d":
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 3)
  capsys.readouterr()
  restored = distill_workflow.teacher_phase(config, workdir, mesh, info, writer)
  said = capsys.readouterr().out
  assert "teacher: the variables in" in said and "restoring the teacher from" in said, said
  chex.assert_trees_all_equal(restored.variables, intact.variables)
  writer.close()
