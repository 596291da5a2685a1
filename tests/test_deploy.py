"""The deployment check (kd_jax.deploy) on hand-built export rows: exact verdicts and
picks (ties, rows missing a measurement, nothing fitting, presets), its config errors,
and `kd-jax export --target` on a run whose export is faked."""
import json
import os

import pytest

from kd_jax import cli, configs, deploy, rundir


def _row(accuracy, bytes_, latency, energy=None, memory=None, all_threads=None):
  row = dict(accuracy=accuracy, bytes=bytes_, latency_ms=latency,
             latency_all_threads_ms=all_threads)
  if energy is not None:
    row["energy"] = dict(uj=energy[0], kind=energy[1], basis="test")
  if memory is not None:  # host peak memory and, in these rows, the same planned arena
    row["peak_memory_bytes"], row["memory_kind"] = memory, "measured"
    row["arena_bytes"] = memory
  return row


ROWS = {
    "fp32": _row(0.97, 400_000, 2.0, (50.0, "estimated"), 900_000, 1.0),
    "int8": _row(0.96, 100_000, 1.0, (12.0, "measured"), 300_000, 0.5),
    "dynamic": _row(0.96, 90_000, 3.0, (20.0, "estimated"), 250_000),  # no all threads
    "qat int8": _row(0.96, 100_000, 1.0, (11.0, "estimated")),  # memory not measured
    "cascade": _row(None, 10_000, 0.1, (1.0, "estimated"), 10_000),  # no accuracy
}


def _target(**kw):
  target = dict(deploy.default_target())
  target.update(kw)
  return target


def test_each_limit_by_hand_and_the_pick():
  result = deploy.check(ROWS, _target(bytes=200_000, energy_uj=30.0))
  assert {k: r["fits"] for k, r in result["rows"].items()} == {
      "fp32": False, "int8": True, "dynamic": True, "qat int8": True, "cascade": True}
  assert result["rows"]["fp32"]["checks"] == [
      dict(budget="bytes", measured=400_000, limit=200_000, kind=None, status="fails"),
      dict(budget="energy_uj", measured=50.0, limit=30.0, kind="estimated",
           status="fails")]
  # int8, dynamic and qat int8 tie on accuracy: the fewest bytes (dynamic) wins; a row
  # without an accuracy ranks last.
  assert result["pick"] == "dynamic"
  # int8 and qat int8 tie on accuracy and bytes: the first listed.
  assert deploy.check(ROWS, _target(bytes=100_000, latency_ms=2.0))["pick"] == "int8"


def test_missing_measurements_cannot_fit_and_latency_threads_picks_the_column():
  result = deploy.check(ROWS, _target(memory_bytes=1_000_000))
  assert not result["rows"]["qat int8"]["fits"]
  assert result["rows"]["qat int8"]["checks"][0]["status"] == "not measured"
  assert result["pick"] == "fp32"
  result = deploy.check(ROWS, _target(latency_ms=0.8, latency_threads="all"))
  assert [k for k, r in result["rows"].items() if r["fits"]] == ["int8"]
  assert result["rows"]["dynamic"]["checks"][0]["status"] == "not measured"
  assert result["rows"]["fp32"]["checks"][0]["measured"] == 1.0  # the all-threads column


def test_nothing_fits_says_what_each_row_misses():
  result = deploy.check(ROWS, _target(min_accuracy=0.99, memory_bytes=20_000))
  assert result["pick"] is None
  assert result["reason"].startswith(
      "no exported variant meets every limit: fp32 (peak memory 900,000 B measured > "
      "20,000 B, accuracy 0.9700 < 0.9900); ")
  assert "qat int8 (peak memory not measured, accuracy 0.9600 < 0.9900)" in result["reason"]
  assert "cascade (accuracy not measured)" in result["reason"]
  text = deploy.markdown(result)
  assert text.startswith("# Deployment check: target custom\n\nBudget: peak memory ≤ "
                         "20,000 B, accuracy ≥ 0.9900.")
  assert "| fp32 | no | ✗ 900,000 B measured > 20,000 B | ✗ 0.9700 < 0.9900 |" in text
  assert "| cascade | no | ✓ 10,000 B measured ≤ 20,000 B | ? not measured |" in text
  assert "**Nothing fits.** No exported variant meets every limit: fp32 (" in text


def test_presets_and_overrides():
  assert deploy.budget(_target(preset="phone")) == dict(
      preset="phone", latency_threads="1", latency_ms=16.0, bytes=20_000_000,
      memory_bytes=67_108_864, energy_uj=5_000.0)
  # A key beside the preset overrides it; 0 lifts a limit.
  assert deploy.budget(_target(preset="mcu", bytes=0, energy_uj=10.0)) == dict(
      preset="mcu", latency_threads="1", arena_bytes=262_144, energy_uj=10.0)
  result = deploy.check(ROWS, _target(preset="mcu"))
  assert [k for k, r in result["rows"].items() if r["fits"]] == ["dynamic", "cascade"]
  assert result["pick"] == "dynamic"
  text = deploy.markdown(result)
  assert ("Budget: bytes ≤ 524,288 B, activation arena ≤ 262,144 B, energy ≤ 1,000 µJ."
          in text)
  assert ("| int8 | no | ✓ 100,000 B ≤ 524,288 B | ✗ 300,000 B planned > 262,144 B | "
          "✓ 12 µJ measured ≤ 1,000 µJ |") in text
  assert "Pick: **dynamic**, the most accurate of the 2 variants" in text
  # No preset and no limit: no check at all.
  assert deploy.check(ROWS, _target()) is None


@pytest.mark.parametrize("override, message", [
    (dict(preset="watch"), "export.target.preset='watch' is unknown (from --target or "
     "--config.export.target.preset); use one of mcu, phone, sbc"),
    (dict(latency_ms=-1.0), "export.target.latency_ms must be a non-negative number (0: "
     "no limit), got -1.0"),
    (dict(latency_threads="4"), "export.target.latency_threads must be '1' or 'all', "
     "got '4'"),
    (dict(min_accuracy=95.0), "export.target.min_accuracy is a fraction (0.95 for 95%), "
     "got 95.0"),
    (dict(latency_budget=3.0), "unknown config key export.target.latency_budget"),
])
def test_config_errors_name_the_key(override, message):
  with pytest.raises(ValueError) as error:
    deploy.check_target(_target(**override))
  assert str(error.value).startswith(message)


def test_the_config_block_is_validated_with_the_run():
  config = configs.experiment_config("digits", "tiny")
  config.export.target.bytes = -5
  with pytest.raises(ValueError, match="export.target.bytes must be a non-negative"):
    configs.validate(config)
  config = configs.default_config().to_dict()
  config["export"]["target"]["latencyms"] = 3.0
  with pytest.raises(ValueError, match="unknown config key export.target.latencyms; did "
                     "you mean 'latency_ms'"):
    configs.complete(config)


def test_check_deployment_writes_its_files(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(tmp_path / "export")
  rows = {k: dict(v, machine=dict(cpu="Test CPU", isa="AVX2")) for k, v in ROWS.items()}
  with open(tmp_path / "export" / "export.json", "w") as f:
    json.dump(rows, f)
  config = configs.default_config()
  assert rundir.check_deployment(config, workdir) == (None, "")
  config.export.target.preset = "phone"
  result, text = rundir.check_deployment(config, workdir)
  with open(tmp_path / "export" / "deploy.json") as f:
    assert json.load(f) == result
  assert open(tmp_path / "export" / "deploy.md").read() == text
  assert result["pick"] == "fp32"
  assert not result["rows"]["qat int8"]["fits"]  # the phone limits memory: not measured
  assert "Latency is the host's (measured on Test CPU (AVX2))" in text


def test_target_is_an_export_flag(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["kd-jax", "distill", f"--workdir={tmp_path}", "--target=phone"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip() == (
      "kd-jax: error: --target is for kd-jax export; for distill set "
      "--config.export.target.preset")


@pytest.fixture
def faked_run(tmp_path, monkeypatch):
  """A workdir with the tiny digits config, whose `kd-jax export` writes `ROWS` instead
  of converting a trained student (that path is `test_cli.py`'s)."""
  from kd_jax import export, files
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  configs.save_run_config(configs.experiment_config("digits", "tiny"), workdir)
  files.write_json(os.path.join(workdir, "summary.json"), {"tflite": {}})
  monkeypatch.setattr(rundir, "load_phase", lambda *a: (None, {}))
  monkeypatch.setattr(rundir, "export_student", lambda *a: {
      k: dict(v, path=k) for k, v in ROWS.items() if k in ("fp32", "int8")})
  monkeypatch.setattr(rundir, "write_export_table", lambda workdir, *a: export.write_table(
      ROWS, os.path.join(workdir, "export")))
  return workdir


def test_export_command_checks_the_target(faked_run, capsys):
  cli.main(["kd-jax", "export", f"--workdir={faked_run}", "--target=mcu",
            "--config.export.target.energy_uj=15"])
  printed = capsys.readouterr().out
  text = open(os.path.join(faked_run, "export", "deploy.md")).read()
  assert text in printed
  assert "Budget: bytes ≤ 524,288 B, activation arena ≤ 262,144 B, energy ≤ 15 µJ." in text
  with open(os.path.join(faked_run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["deployment"]["pick"] == "cascade"  # the only row meeting all three
  assert set(summary["tflite"]) == {"fp32", "int8"}
  # Nothing fits: exit status 0 by default, 3 with export.target.strict.
  cli.main(["kd-jax", "export", f"--workdir={faked_run}", "--target=mcu",
            "--config.export.target.bytes=1000"])
  assert "**Nothing fits.** No exported variant meets every limit" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_:
    cli.main(["kd-jax", "export", f"--workdir={faked_run}", "--target=mcu",
              "--config.export.target.bytes=1000", "--config.export.target.strict=true"])
  assert exit_.value.code == 3
  assert capsys.readouterr().err.strip().startswith(
      "kd-jax: error: no exported variant fits export.target (export.target.strict is "
      "set); see ")


@pytest.mark.parametrize("args, message", [
    (["--target=watch"], "export.target.preset='watch' is unknown"),
    (["--config.export.target.latency_ms=-2"], "export.target.latency_ms must be a "
     "non-negative number"),
    (["--config.export.target.latency=2"], "unknown config key 'latency'"),
])
def test_export_command_refuses_a_bad_target_in_one_line(faked_run, capsys, args,
                                                          message):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["kd-jax", "export", f"--workdir={faked_run}", *args])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"kd-jax: error: {message}") and "\n" not in err
