"""`kd-jax report` on a tiny digits run with adapters; the monitors; interrupted runs."""
import json
import os
import shutil

import numpy as np
import pytest

from kd_jax import cli, configs, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny digits run with a composite objective: KD with an annealed temperature, FitNet
# through a conv1x1 adapter, CC through a linear adapter and attention transfer.
TINY = os.path.join(ROOT, "kd_jax", "experiments", "digits_features.py:tiny")
PLOTS = ("training_curves.png", "reliability.png", "confusion.png", "confused_examples.png",
         "embeddings_pca.png", "attention_maps.png")
ROWS = {"teacher": "teacher", "vanilla student": "vanilla", "distilled student": "distilled"}


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _table(text, first_header):
  """The Markdown table whose header starts with `first_header`: {row label: {column: cell}}."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = dict(zip(header[1:], cells[1:]))
  return rows


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("features"))
  cli.main(["kd-jax", "distill", f"--config={TINY}", f"--workdir={workdir}"])
  cli.main(["kd-jax", "report", f"--workdir={workdir}"])
  with open(os.path.join(workdir, "report.md")) as f:
    return workdir, f.read()


def test_report_has_every_plot_and_the_numbers_of_metrics_jsonl(reported_run):
  workdir, text = reported_run
  for name in PLOTS:
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in text, name
  records = _records(workdir)
  table = _table(text, "model")
  assert set(table) == set(ROWS)
  best = {r["phase"]: r for r in records if r["kind"] == "best_eval"}
  for label, phase in ROWS.items():
    logged = [r for r in records if r["phase"] == phase and r["kind"] == "eval"][-1]
    logged["best-by-validation accuracy (step)"] = (
        f"{best[phase]['accuracy']:.4f} ({best[phase]['step']})")
    for column, cell in table[label].items():
      expected = logged[column] if column in logged else "—"
      assert cell == (f"{expected:.4f}" if isinstance(expected, float) else expected), (
          label, column)
  assert {"cka/embedding", "cka/fitnet/stage_2", "cka/correlation_congruence/embedding",
          "cka/stage_3"} <= set(table["distilled student"])
  # The report's own pass over the eval split finds the logged number of errors.
  distilled = [r for r in records if r["phase"] == "distilled" and r["kind"] == "eval"][-1]
  errors = round((1 - distilled["accuracy"]) * distilled["num_examples"])
  assert (f"The distilled student misclassifies {errors} of "
          f"{distilled['num_examples']} eval examples.") in text
  with open(os.path.join(workdir, "summary.json")) as f:
    tflite = json.load(f)["tflite"]
  exported = _table(text, "variant")
  for variant in ("fp32", "int8"):
    assert exported[variant]["bytes"] == str(tflite[variant]["bytes"])
    assert exported[variant]["accuracy"] == f"{tflite[variant]['accuracy']:.4f}"
    energy = tflite[variant]["energy"]
    assert exported[variant]["energy (µJ per image)"] == f"{energy['uj']:.3g} {energy['kind']}"
  assert "![accuracy against latency and energy](export_pareto.png)" in text
  assert os.path.getsize(os.path.join(workdir, report.EXPORT_PARETO)) > 0
  assert "Every phase finished." in text


def test_export_pareto_plot_of_hand_built_rows(tmp_path):
  energy = dict(uj=10.0, kind="estimated", basis="test")
  rows = {"fp32": dict(accuracy=0.97, latency_ms=2.0, energy=dict(energy, uj=50.0)),
          "int8": dict(accuracy=0.96, latency_ms=1.0, energy=energy),
          "cascade": dict(accuracy=None, latency_ms=0.5, energy=energy)}
  path = str(tmp_path / "pareto.png")
  assert report.plot_export_pareto(rows, path) and os.path.getsize(path) > 0
  # No variant with an accuracy: nothing to plot.
  assert not report.plot_export_pareto({"cascade": rows["cascade"]}, str(tmp_path / "x.png"))
  assert not os.path.exists(tmp_path / "x.png")


def test_train_records_carry_the_monitors(reported_run):
  workdir, _ = reported_run
  train = [r for r in _records(workdir) if r["phase"] == "distilled" and r["kind"] == "train"]
  adapters = ("correlation_congruence/embedding", "fitnet/stage_2")
  total_steps = 27  # 3 epochs of 288 // 32 = 9 steps
  for r in train:
    assert sorted(k for k in r if k.startswith("grad_norm/")) == [
        f"grad_norm/{name}" for name in adapters + ("student",)]
    # The global norm splits exactly into the student's and each adapter's.
    np.testing.assert_allclose(
        r["grad_norm"] ** 2, sum(r[f"grad_norm/{n}"] ** 2 for n in adapters + ("student",)),
        rtol=1e-5)
    # KD's temperature runs linearly from 6 to 4; step s logs the value used in step s.
    np.testing.assert_allclose(r["temperature/kd"],
                               6.0 - 2.0 * (r["step"] - 1) / total_steps, rtol=1e-6)
    assert r["learning_rate"] > 0
  teacher = [r for r in _records(workdir) if r["phase"] == "teacher" and r["kind"] == "train"]
  assert all(r["grad_norm/student"] == r["grad_norm"] for r in teacher)  # nothing else trains


def test_report_of_an_interrupted_run_plots_what_exists(reported_run, tmp_path):
  workdir, _ = reported_run
  partial = str(tmp_path / "partial")
  os.makedirs(partial)
  shutil.copytree(os.path.join(workdir, "vanilla"), os.path.join(partial, "vanilla"))
  # The teacher comes from a checkpoint (the finished run's), so its metrics are in its
  # model.json, not in this run's metrics.jsonl.
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["teacher"]["checkpoint"] = workdir
  with open(os.path.join(partial, "config.json"), "w") as f:
    json.dump(config, f)
  # Killed in the distilled phase after its second logged step.
  kept = [r for r in _records(workdir) if r["phase"] == "vanilla"
          or (r["phase"] == "distilled" and r["kind"] == "train" and r["step"] <= 10)]
  with open(os.path.join(partial, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  cli.main(["kd-jax", "report", f"--workdir={partial}"])
  text = open(os.path.join(partial, "report.md")).read()
  teacher_dir = os.path.join(workdir, "teacher")
  assert f"| teacher | resnet8 | loaded from `{teacher_dir}` |" in text
  assert "| distilled student | resnet8 | interrupted: last logged step 10, no final " \
         "model yet |" in text
  assert "Missing: the distilled student's final model" in text
  assert "`summary.json` and the TFLite export" in text
  assert "Not exported yet" in text
  table = _table(text, "model")
  assert set(table) == {"teacher", "vanilla student"}
  with open(os.path.join(teacher_dir, "model.json")) as f:
    saved = json.load(f)["metrics"]
  assert table["teacher"]["accuracy"] == f"{saved['accuracy']:.4f}"
  assert "The teacher's row is the evaluation saved with its checkpoint" in text
  assert "The vanilla student misclassifies" in text
  for name in PLOTS:
    assert os.path.exists(os.path.join(partial, name)), name


def test_report_of_a_run_that_has_not_started(reported_run, tmp_path):
  workdir, _ = reported_run
  shutil.copy(os.path.join(workdir, "config.json"), tmp_path)
  text = report.write_report(configs.load_run_config(str(tmp_path)), str(tmp_path))
  assert "No phase has been evaluated yet." in text
  assert "No training steps logged yet." in text
  assert not any(os.path.exists(tmp_path / name) for name in PLOTS)


def test_confused_pairs_pca_and_attention_tap_by_hand():
  labels = np.asarray([0, 0, 0, 1, 1, 2, 2, 2])
  predictions = np.asarray([0, 1, 1, 1, 2, 0, 1, 1])
  confusion = report.confusion_matrix(labels, predictions, 3)
  np.testing.assert_array_equal(confusion, [[1, 2, 0], [0, 1, 1], [1, 2, 0]])
  # 0→1 and 2→1 both twice (lower true class first), then 1→2 and 2→0 once.
  assert report.top_confused_pairs(confusion, 3) == [(0, 1), (2, 1), (1, 2)]
  assert report.top_confused_pairs(np.eye(3, dtype=int), 3) == []  # no errors, no pairs
  np.testing.assert_array_equal(report.first_of_each_class(labels[::-1], 2), [0, 3])
  # Points on the line y = 2x (plus a constant): one component holds all the variance.
  x = np.stack([np.arange(5.0), 2 * np.arange(5.0) + 7, np.zeros(5)], 1)
  points, share = report.pca_2d(x)
  np.testing.assert_allclose(share, [1.0, 0.0], atol=1e-12)
  np.testing.assert_allclose(np.abs(points[:, 0]), np.sqrt(5) * np.abs(np.arange(5) - 2))
  shapes = {"stem": (1, 8, 8, 16), "stage_1": (1, 8, 8, 16), "stage_2": (1, 4, 4, 32),
            "stage_3": (1, 2, 2, 64), "embedding": (1, 64)}
  assert report.attention_tap(shapes, 8) == "stage_2"
  assert report.attention_tap(shapes, 32) == "stage_1"  # none is 16 wide: the first
  assert report.attention_tap({"block_1": (1, 66, 16), "embedding": (1, 16)}, 8) is None
