"""`kd-jax report`: a Markdown report with plots, from the files a run leaves behind.

`write_report(config, workdir)` reads `metrics.jsonl`, `summary.json` and the saved
variables of every finished phase (teacher, vanilla, distilled), runs the finished models
once more over the eval split, and writes into the workdir:

  report.md              the phases and what is missing, the evaluation table (the
                         numbers of `metrics.jsonl`), the most confused class pairs and
                         the TFLite export table (energy labelled measured /
                         estimated; the deployment check's pick, if any)
  export_pareto.png      accuracy of every exported variant (export/export.json)
                         against latency and against energy per inference, Pareto
                         fronts marked
  training_curves.png    per phase: objective terms, accuracy, gradient norms, learning
                         rate and temperatures, as logged
  reliability.png        reliability diagrams (accuracy against confidence, 15 bins)
  confusion.png          the student's confusion matrix
  confused_examples.png  eval images of the most confused class pairs
  embeddings_pca.png     the penultimate embeddings of each model projected on their
                         first two principal components, coloured by class
  attention_maps.png     attention maps (channel mean of the squared activations of a
                         stage, as attention transfer compares them) of teacher and
                         students side by side on a few eval images

An interrupted run gets the plots of what exists and a list of what is missing.
Figures are drawn on matplotlib's Agg canvas, so no display is needed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from kd_jax import checkpoint as ckpt_lib
from kd_jax import files
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import export as export_lib
from kd_jax import metric_writer
from kd_jax import profile
from kd_jax import rundir

PHASES = (rundir.TEACHER, rundir.VANILLA, rundir.DISTILLED)
LABELS = {rundir.TEACHER: "teacher", rundir.VANILLA: "vanilla student",
          rundir.DISTILLED: "distilled student"}
NUM_CONFUSED_PAIRS = 5
EXAMPLES_PER_PAIR = 6
NUM_ATTENTION_IMAGES = 4
MAX_PCA_POINTS = 2000
EXPORT_PARETO = "export_pareto.png"


def write_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `<workdir>/report.md` and its PNG plots; returns the Markdown text."""
  records = metric_writer.read_records(workdir)
  summary = _read_json(os.path.join(workdir, "summary.json"))
  info = data_lib.get_info(config.data)
  finished = _finished_models(config, workdir, info)
  outputs, taps = {}, {}
  for phase, (model, variables) in finished.items():
    taps[phase] = attention_tap(_tap_shapes(model, variables, info.image_shape),
                                info.image_shape[0])
    outputs[phase] = eval_lib.predict(model, variables, _eval_batches(config),
                                      attention_tap=taps[phase])

  lines = [f"# kd-jax report: {config.teacher.name} → {config.student.name} on "
           f"{config.data.name}", "", "## Phases", ""]
  lines += _phase_lines(config, workdir, records, finished, summary)
  lines += ["", "## Evaluation", ""] + _evaluation_lines(config, workdir, records)
  lines += ["", "## Training curves", ""]
  if plot_training_curves(records, os.path.join(workdir, "training_curves.png")):
    lines.append("![training curves](training_curves.png)")
  else:
    lines.append("No training steps logged yet.")
  if outputs:
    lines += _model_output_sections(config, workdir, info, outputs, taps)
  lines += ["", "## Export (TFLite)", ""] + _export_lines(summary, workdir)
  text = "\n".join(lines) + "\n"
  files.write_atomic(os.path.join(workdir, "report.md"), text)
  print(text)
  return text


# --- What the run left behind ----------------------------------------------------------

def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _finished_models(config, workdir: str, info) -> dict[str, tuple[Any, Any]]:
  """{phase: (model, variables)} of every phase whose final variables were saved."""
  finished = {}
  if ckpt_lib.has_variables(rundir.teacher_source(config, workdir)):
    finished[rundir.TEACHER] = rundir.load_teacher(config, workdir, info)
  for phase in (rundir.VANILLA, rundir.DISTILLED):
    if ckpt_lib.has_variables(os.path.join(workdir, phase)):
      finished[phase] = rundir.load_phase(config, workdir, phase, info)
  return finished


def _eval_batches(config):
  return data_lib.host_eval_iterator(config.data, batch_size=config.eval_batch_size)


def logged_phases(records: Sequence[Mapping[str, Any]], kind: str) -> list[str]:
  """The phases with records of `kind`, teacher, vanilla and distilled first.

  Any other phase (a compression phase, say) follows in the order it first appears.
  """
  seen = list(dict.fromkeys(r["phase"] for r in records if r.get("kind") == kind))
  return [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]


def _label(phase: str) -> str:
  return LABELS.get(phase, phase)


def last_eval(records: Sequence[Mapping[str, Any]], phase: str) -> dict[str, Any] | None:
  """The last `eval` record of `phase` in `metrics.jsonl`, or None."""
  evals = [r for r in records if r.get("phase") == phase and r.get("kind") == "eval"]
  return evals[-1] if evals else None


def _phase_lines(config, workdir, records, finished, summary) -> list[str]:
  lines = ["| phase | model | state |", "|---|---|---|"]
  missing = []
  resume = f"rerun `kd-jax distill --workdir={workdir}` to resume"
  for phase in PHASES:
    model = config.teacher.name if phase == rundir.TEACHER else config.student.name
    steps = [r["step"] for r in records if r.get("phase") == phase and r["kind"] == "train"]
    if phase == rundir.VANILLA and not config.train_vanilla:
      state = "not part of this run (`train_vanilla=False`)"
    elif phase in finished:
      state = "finished"
      if phase == rundir.TEACHER and config.teacher.checkpoint:
        state = f"loaded from `{rundir.teacher_source(config, workdir)}`"
    elif steps:
      state = f"interrupted: last logged step {max(steps)}, no final model yet"
      missing.append(f"the {LABELS[phase]}'s final model ({resume})")
    else:
      state = "not started"
      missing.append(f"the {LABELS[phase]} ({resume})")
    lines.append(f"| {LABELS[phase]} | {model} | {state} |")
  if summary is None:
    missing.append("`summary.json` and the TFLite export (written when the run ends)")
  lines += ["", "Missing: " + "; ".join(missing) + "." if missing
            else "Every phase finished."]
  return lines


def _evaluation_lines(config, workdir, records) -> list[str]:
  """The last eval record of each phase, as logged in `metrics.jsonl`."""
  rows, notes = {}, []
  for phase in dict.fromkeys([rundir.TEACHER] + logged_phases(records, "eval")):
    record = last_eval(records, phase)
    if record is None and phase == rundir.TEACHER and config.teacher.checkpoint:
      meta = _read_json(os.path.join(rundir.teacher_source(config, workdir),
                                     "model.json"))
      record = (meta or {}).get("metrics")
      if record:
        notes.append("The teacher's row is the evaluation saved with its checkpoint "
                     "(`model.json`).")
    if record:
      rows[phase] = record
  if not rows:
    return ["No phase has been evaluated yet."]
  columns = [c for c in ("accuracy", "top5_accuracy", "nll", "ece", "teacher_agreement")
             if any(c in r for r in rows.values())]
  columns += sorted({c for r in rows.values() for c in r if c.startswith("cka/")})
  best = {r["phase"]: r for r in records if r.get("kind") == "best_eval"}
  extra = ["best-by-validation accuracy (step)"] if best else []
  lines = ["| model | " + " | ".join(columns + extra) + " |",
           "|---" * (len(columns) + len(extra) + 1) + "|"]
  for phase, record in rows.items():
    cells = [_number(record.get(c)) for c in columns]
    if best:
      cells.append(f"{_number(best[phase]['accuracy'])} ({best[phase]['step']})"
                   if phase in best else "—")
    lines.append(f"| {_label(phase)} | " + " | ".join(cells) + " |")
  lines += ["", f"On the {rows[next(iter(rows))].get('num_examples', '?')} examples of "
            "the eval split. `cka/<pair>`: minibatch linear CKA between student (after "
            "the term's adapter, if any) and teacher features."] + notes
  return lines


def _number(value: Any) -> str:
  return "—" if value is None else f"{value:.4f}"


def _energy(energy: Mapping[str, Any] | None) -> str:
  """'12.8 estimated' (µJ): every energy figure says whether it was measured."""
  return "—" if not energy else f"{energy['uj']:.3g} {energy['kind']}"


def _export_lines(summary, workdir: str) -> list[str]:
  if summary is None:
    return ["Not exported yet: the run has not finished."]
  if not summary.get("tflite"):
    return ["Export is off for this run (`export.variants` is empty)."]
  lines = ["| variant | bytes | accuracy | latency (ms, median) | energy (µJ per image) | "
           "max abs logit diff |", "|---|---|---|---|---|---|"]
  for variant, r in summary["tflite"].items():
    diff, energy = r.get("max_abs_logit_diff"), r.get("energy")
    lines.append(f"| {variant} | {r['bytes']} | {_number(r.get('accuracy'))} | "
                 f"{r['latency_ms']:.3f} | {_energy(energy)} | "
                 f"{'—' if diff is None else f'{diff:.2e}'} |")
  lines += ["", f"Latency: one image, 1 thread, {export_lib.machines_line(summary['tflite'])}."
            " Energy: one image at 1 thread, `measured` (RAPL) or `estimated` (from the "
            "graph, kd_jax/energy.py) as labelled."]
  rows = _read_json(os.path.join(workdir, "export", "export.json")) or summary["tflite"]
  if plot_export_pareto(rows, os.path.join(workdir, EXPORT_PARETO)):
    lines += ["", f"Every exported variant ({len(rows)}, `export/export.md`), the Pareto "
              "fronts joined:", "", f"![accuracy against latency and energy]({EXPORT_PARETO})"]
  deployment = summary.get("deployment")
  if deployment:
    verdict = (f"pick **{deployment['pick']}**, {deployment['reason']}"
               if deployment["pick"] else f"nothing fits: {deployment['reason']}")
    lines += ["", f"Deployment check (`export/deploy.md`, target "
              f"{deployment['target']['preset'] or 'custom'}): {verdict}."]
  lines += ["", f"Student fingerprint `{summary['student_fingerprint']}`; "
            f"wall time {summary['wall_seconds']:.1f} s."]
  return lines


# --- Sections that need the models' outputs ---------------------------------------------

def _tap_shapes(model, variables, image_shape) -> dict[str, tuple[int, ...]]:
  taps = jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, *image_shape)),
                                            train=False)[1])
  return {name: tuple(t.shape) for name, t in taps.items()}


def attention_tap(tap_shapes: Mapping[str, Sequence[int]], image_side: int) -> str | None:
  """The deepest `stage_k` map at least half the image's side (the first stage if none);
  None for a model without `stage_k` maps (a ViT's taps are token sequences)."""
  stages = sorted((int(name.split("_")[1]), name) for name, shape in tap_shapes.items()
                  if re.fullmatch(r"stage_\d+", name) and len(shape) == 4)
  if not stages:
    return None
  wide = [name for _, name in stages if 2 * tap_shapes[name][1] >= image_side]
  return wide[-1] if wide else stages[0][1]


def _model_output_sections(config, workdir, info, outputs, taps) -> list[str]:
  labels = next(iter(outputs.values()))["label"]
  student = next(p for p in reversed(PHASES) if p in outputs)
  predictions = outputs[student]["logits"].argmax(-1)
  confusion = confusion_matrix(labels, predictions, info.num_classes)
  pairs = top_confused_pairs(confusion, NUM_CONFUSED_PAIRS)
  example_ids = {pair: np.flatnonzero((labels == pair[0]) & (predictions == pair[1]))
                 [:EXAMPLES_PER_PAIR] for pair in pairs}
  attention_ids = first_of_each_class(labels, NUM_ATTENTION_IMAGES)
  images = _eval_images(config, sorted({int(i) for ids in example_ids.values() for i in ids}
                                       | set(attention_ids.tolist())))

  plot_reliability(outputs, os.path.join(workdir, "reliability.png"))
  plot_confusion(confusion, LABELS[student], os.path.join(workdir, "confusion.png"))
  plot_embeddings(outputs, os.path.join(workdir, "embeddings_pca.png"))
  mapped = {p: o for p, o in outputs.items() if taps[p]}
  if mapped:
    plot_attention_maps(mapped, attention_ids, images, taps,
                        os.path.join(workdir, "attention_maps.png"))
  errors = int(np.sum(confusion) - np.trace(confusion))
  lines = ["", "## Calibration", "", "![reliability diagrams](reliability.png)", "",
           "## Misclassification hotspots", "",
           f"The {LABELS[student]} misclassifies {errors} of {len(labels)} eval examples.",
           "", "![confusion matrix](confusion.png)", ""]
  if pairs:
    lines += ["| true class | predicted class | count | share of the errors |",
              "|---|---|---|---|"]
    lines += [f"| {t} | {p} | {confusion[t, p]} | {confusion[t, p] / errors:.1%} |"
              for t, p in pairs]
    plot_confused_examples(example_ids, images, confusion,
                           os.path.join(workdir, "confused_examples.png"))
    lines += ["", "![examples of the most confused pairs](confused_examples.png)"]
  lines += ["", "## Embeddings", "", "![PCA of the embeddings](embeddings_pca.png)", "",
            "## Attention maps", ""]
  if mapped:
    lines += ["Taps: " + ", ".join(f"{LABELS[p]} `{taps[p]}`" for p in mapped) + ".", "",
              "![attention maps](attention_maps.png)"]
  unmapped = [LABELS[p] for p in outputs if not taps[p]]
  if unmapped:
    lines += ["", f"No attention map for the {', '.join(unmapped)}: no `stage_k` feature "
              "maps among its taps."]
  return lines


def _eval_images(config, indices: Sequence[int]) -> dict[int, np.ndarray]:
  """{index: image} of the eval examples at `indices` (eval order, padding skipped)."""
  wanted, images, offset = set(indices), {}, 0
  for batch in _eval_batches(config):
    real = np.flatnonzero(np.asarray(batch["mask"]) > 0)
    for row, index in enumerate(range(offset, offset + len(real))):
      if index in wanted:
        images[index] = np.asarray(batch["image"][real[row]])
    offset += len(real)
  return images


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def top_confused_pairs(confusion: np.ndarray, k: int) -> list[tuple[int, int]]:
  """The `k` most frequent (true, predicted) errors, most first (ties: lower classes)."""
  off = confusion * (1 - np.eye(len(confusion), dtype=confusion.dtype))
  order = np.lexsort((np.arange(off.size), -off.ravel()))[:k]
  return [tuple(int(i) for i in np.unravel_index(o, off.shape)) for o in order
          if off.ravel()[o] > 0]


def first_of_each_class(labels: np.ndarray, k: int) -> np.ndarray:
  """Indices of the first example of each of the first `k` classes met in eval order."""
  _, first = np.unique(labels, return_index=True)
  return np.sort(first)[:k]


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`x` [N, D] projected on its first two principal components, and their variance share."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(0)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  variance = s**2
  return x @ vt[:2].T, variance[:2] / variance.sum()


# --- Plots ------------------------------------------------------------------------------

def _phase_order(keys) -> list[str]:
  return [p for p in PHASES if p in keys]


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str) -> bool:
  """Per phase: objective terms, accuracy, gradient norms, learning rate, temperatures.

  Returns False (and draws nothing) when no training step was logged.
  """
  phases = logged_phases(records, "train")
  if not phases:
    return False
  train = {p: [r for r in records if r["phase"] == p and r["kind"] == "train"]
           for p in phases}
  fig = Figure(figsize=(16, 3.2 * len(phases)), layout="constrained")
  axes = np.asarray(fig.subplots(len(phases), 4, squeeze=False))
  for row, phase in zip(axes, phases):
    rs = train[phase]
    steps = np.asarray([r["step"] for r in rs])
    keys = sorted({k for r in rs for k in r})

    def series(key):
      return np.asarray([r.get(key, np.nan) for r in rs], np.float64)

    terms = ["loss", "ce"] + [k for k in keys if k.endswith("_weighted")]
    for key in terms:
      row[0].plot(steps, series(key), label=key.removesuffix("_weighted"))
    row[0].set_title(f"{_label(phase)}: objective (terms weighted)")
    for key in ("accuracy", "teacher_agreement"):
      if key in keys:
        row[1].plot(steps, series(key), label=f"train {key}")
    held_out = [r for r in records if r.get("phase") == phase
                and r.get("kind") == "validation"]
    if held_out:
      row[1].plot([r["step"] for r in held_out], [r["accuracy"] for r in held_out], "o-",
                  label="validation accuracy")
    final = last_eval(records, phase)
    if final:
      row[1].plot([final["step"]], [final["accuracy"]], "k*", markersize=10,
                  label="eval accuracy")
    row[1].set_title("accuracy")
    for key in ["grad_norm"] + [k for k in keys if k.startswith("grad_norm/")]:
      row[2].plot(steps, series(key), label=key)
    row[2].set_yscale("log")
    row[2].set_title("gradient global norm")
    row[3].plot(steps, series("learning_rate"), label="learning rate")
    row[3].set_title("learning rate, temperatures")
    temperatures = [k for k in keys if k.startswith("temperature/")]
    if temperatures:
      twin = row[3].twinx()
      for key in temperatures:
        twin.plot(steps, series(key), "--", label=key)
      twin.legend(fontsize=7, loc="lower left")
    for ax in row:
      ax.set_xlabel("step")
      ax.legend(fontsize=7)
  fig.savefig(path, dpi=80)
  return True


def plot_reliability(outputs: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
  """Accuracy against confidence per bin (the bins of `evaluate.batch_sums`)."""
  phases = _phase_order(outputs)
  fig = Figure(figsize=(4 * len(phases), 4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(phases)))
  edges = np.linspace(0, 1, eval_lib.NUM_BINS + 1)
  for ax, phase in zip(axes, phases):
    out = outputs[phase]
    sums = jax.device_get(eval_lib.batch_sums(
        jnp.asarray(out["logits"]), jnp.asarray(out["label"]), jnp.ones(len(out["label"]))))
    metrics = eval_lib.finalize(sums, out["logits"].shape[-1])
    count = np.maximum(sums["bin_count"], 1)
    accuracy, confidence = sums["bin_correct"] / count, sums["bin_confidence"] / count
    ax.bar(edges[:-1], accuracy, width=1 / eval_lib.NUM_BINS, align="edge",
           edgecolor="k", label="accuracy")
    ax.bar(edges[:-1], np.abs(confidence - accuracy), bottom=np.minimum(accuracy, confidence),
           width=1 / eval_lib.NUM_BINS, align="edge", color="r", alpha=0.3,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{LABELS[phase]} (ECE {metrics['ece']:.4f})")
    ax.legend(fontsize=7, loc="upper left")
  fig.savefig(path, dpi=80)


def plot_confusion(confusion: np.ndarray, who: str, path: str) -> None:
  k = len(confusion)
  fig = Figure(figsize=(max(5, k * 0.12), max(4.5, k * 0.11)), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(confusion, cmap="Blues")
  fig.colorbar(image, ax=ax)
  if k <= 20:
    for (t, p), count in np.ndenumerate(confusion):
      if count:
        ax.text(p, t, str(count), ha="center", va="center", fontsize=7,
                color="w" if count > confusion.max() / 2 else "k")
  ax.set(xlabel="predicted class", ylabel="true class", title=f"{who}: confusion matrix")
  fig.savefig(path, dpi=80)


def _show_image(ax, image: np.ndarray) -> None:
  """An eval image (normalised) rescaled to [0, 1] for display."""
  image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray")
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def plot_confused_examples(example_ids: Mapping[tuple[int, int], np.ndarray],
                           images: Mapping[int, np.ndarray], confusion: np.ndarray,
                           path: str) -> None:
  fig = Figure(figsize=(1.6 * EXAMPLES_PER_PAIR, 1.8 * len(example_ids)),
               layout="constrained")
  axes = np.asarray(fig.subplots(len(example_ids), EXAMPLES_PER_PAIR, squeeze=False))
  for row, ((true, predicted), ids) in zip(axes, example_ids.items()):
    for col, ax in enumerate(row):
      if col < len(ids):
        _show_image(ax, images[int(ids[col])])
      else:
        ax.axis("off")
    row[0].set_title(f"true {true} → predicted {predicted} ({confusion[true, predicted]}×)",
                     fontsize=8, loc="left")
  fig.savefig(path, dpi=80)


def plot_embeddings(outputs: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
  """Each model's embeddings on their first two principal components, by class."""
  phases = _phase_order(outputs)
  fig = Figure(figsize=(4.5 * len(phases), 4.2), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(phases)))
  for ax, phase in zip(axes, phases):
    out = outputs[phase]
    points, share = pca_2d(out["embedding"][:MAX_PCA_POINTS])
    labels = out["label"][:MAX_PCA_POINTS]
    num_classes = out["logits"].shape[-1]
    cmap = "tab10" if num_classes <= 10 else "nipy_spectral"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=6,
                         vmin=0, vmax=max(num_classes - 1, 1))
    if num_classes <= 10:
      ax.legend(*scatter.legend_elements(), fontsize=6, title="class",
                title_fontsize=7, loc="best")
    ax.set(title=f"{LABELS[phase]} (PC1+PC2: {share.sum():.0%} of variance)",
           xlabel="PC1", ylabel="PC2")
  fig.savefig(path, dpi=80)


def plot_attention_maps(outputs, ids: np.ndarray, images: Mapping[int, np.ndarray],
                        taps: Mapping[str, str], path: str) -> None:
  """Rows: eval images; columns: the image, then each model's map laid over it."""
  phases = _phase_order(outputs)
  fig = Figure(figsize=(2.2 * (len(phases) + 1), 2.2 * len(ids)), layout="constrained")
  axes = np.asarray(fig.subplots(len(ids), len(phases) + 1, squeeze=False))
  for row, index in zip(axes, ids):
    image = images[int(index)]
    height, width = image.shape[:2]
    _show_image(row[0], image)
    row[0].set_title(f"class {outputs[phases[0]]['label'][index]}", fontsize=8)
    for ax, phase in zip(row[1:], phases):
      _show_image(ax, image)
      ax.imshow(outputs[phase]["attention"][index], cmap="jet", alpha=0.5,
                interpolation="bilinear", extent=(-0.5, width - 0.5, height - 0.5, -0.5))
      ax.set_title(f"{LABELS[phase]}\n{taps[phase]}", fontsize=8)
  fig.savefig(path, dpi=80)


def plot_export_pareto(rows: Mapping[str, Mapping[str, Any]], path: str) -> bool:
  """Accuracy of every exported variant against its latency (1 thread) and against its
  energy per inference (labelled measured / estimated), each with its Pareto front
  (`profile.pareto_panel`).

  Returns False (and draws nothing) when no variant has an accuracy.
  """
  points = [dict(label=label, accuracy=r.get("accuracy"), latency_ms=r.get("latency_ms"),
                 energy_uj=(r.get("energy") or {}).get("uj"))
            for label, r in rows.items()]
  if not any(p["accuracy"] is not None for p in points):
    return False
  kinds = [r["energy"]["kind"] for r in rows.values() if r.get("energy")]
  if len(set(kinds)) > 1:  # measured and estimated side by side: each point says which
    energy_points = [dict(p, label=f"{p['label']} ({r['energy']['kind']})")
                     if r.get("energy") else p for p, r in zip(points, rows.values())]
  else:
    energy_points = points
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  by_latency, by_energy = fig.subplots(1, 2)
  profile.pareto_panel(by_latency, points, "latency_ms", xlabel="latency (ms, one "
                       "image, one thread)", ylabel="accuracy",
                       title="Exported variants: accuracy against latency")
  profile.pareto_panel(by_energy, energy_points, "energy_uj",
                       xlabel=profile.energy_label(kinds), ylabel="accuracy",
                       title="Exported variants: accuracy against energy")
  fig.savefig(path, dpi=80)
  return True
