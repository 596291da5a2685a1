"""Robustness evaluation: accuracy under edge-condition corruptions at five severities.

The eval split is corrupted on the fly by the training-time edge ops
(`kd_jax.data.augment`): every op that changes an image of the dataset's channel count
(the colour ops are skipped on grayscale data), at severities 1..5, each example seeded
by its position so every model sees the same corrupted images. As in Hendrycks &
Dietterich (ImageNet-C, ICLR 2019) the summary is the mean over corruptions and
severities, here of the accuracy itself (mean corrupted accuracy), reported beside the
clean accuracy for the teacher and each student:

    mean_corrupted = 1 / (|C| · 5) · Σ_c Σ_s accuracy(c, s).

`kd-jax evaluate --robustness --workdir=DIR` writes `<workdir>/robustness.json` and
`<workdir>/robustness.md`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib

SEVERITIES = data_lib.augment.SEVERITIES


def evaluate(models: Mapping[str, tuple[Any, Any]], data_config, mesh, *,
             batch_size: int, num_classes: int,
             corruptions: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Clean and corrupted accuracy of each model on the eval split.

  Args:
    models: name -> (Flax module, variables), e.g. teacher, vanilla, distilled.
    data_config: the run's `data` config (its eval split is corrupted).
    mesh: the data mesh.
    batch_size: global eval batch size.
    num_classes: classes of the dataset.
    corruptions: op names; None -> `augment.corruptions` of the dataset's channels.

  Returns:
    `{'corruptions': [...], 'severities': [1..5], 'models': {name: {'clean': a,
    'accuracy': {op: [a at severity 1..5]}, 'mean': {op: mean over severities},
    'mean_corrupted': mean over ops and severities}}}`.
  """
  channels = data_lib.get_info(data_config).image_shape[-1]
  corruptions = tuple(corruptions or data_lib.augment.corruptions(channels))
  steps = {name: eval_lib.make_eval_step(model) for name, (model, _) in models.items()}
  variants = [None] + [(c, s) for c in corruptions for s in SEVERITIES]
  datasets = data_lib.eval_datasets(data_config, variants, batch_size=batch_size)

  def accuracies(dataset):
    batches = list(dataset.as_numpy_iterator())
    return {name: eval_lib.evaluate(model, variables, batches, mesh,
                                    num_classes=num_classes,
                                    eval_step=steps[name])["accuracy"]
            for name, (model, variables) in models.items()}

  clean, *corrupted = [accuracies(dataset) for dataset in datasets]
  by_corruption = {c: corrupted[i * len(SEVERITIES):(i + 1) * len(SEVERITIES)]
                   for i, c in enumerate(corruptions)}
  results = {}
  for name in models:
    accuracy = {c: [levels[name] for levels in by_corruption[c]] for c in corruptions}
    results[name] = {
        "clean": clean[name], "accuracy": accuracy,
        "mean": {c: float(np.mean(a)) for c, a in accuracy.items()},
        "mean_corrupted": float(np.mean(list(accuracy.values()))),
    }
  return {"corruptions": list(corruptions), "severities": list(SEVERITIES),
          "models": results}


def table(result: Mapping[str, Any]) -> str:
  """A Markdown table: one column per model, rows clean, each corruption, mean."""
  names = list(result["models"])
  models = result["models"]
  lines = ["| accuracy | " + " | ".join(names) + " |",
           "|---" * (len(names) + 1) + "|",
           "| clean | " + " | ".join(f"{models[n]['clean']:.4f}" for n in names) + " |"]
  for c in result["corruptions"]:
    lines.append(f"| {c} | " + " | ".join(f"{models[n]['mean'][c]:.4f}" for n in names)
                 + " |")
  lines.append("| **mean corrupted** | " + " | ".join(
      f"**{models[n]['mean_corrupted']:.4f}**" for n in names) + " |")
  return "\n".join(lines) + "\n"


def evaluate_run(config, workdir: str, models: Mapping[str, tuple[Any, Any]], mesh,
                 num_classes: int) -> dict[str, Any]:
  """`kd-jax evaluate --robustness`: evaluates, prints and saves the table of a run."""
  result = evaluate(models, config.data, mesh, batch_size=config.eval_batch_size,
                    num_classes=num_classes)
  text = ("Accuracy on the eval split, clean and under each corruption (mean over "
          f"severities {SEVERITIES[0]}..{SEVERITIES[-1]}).\n\n" + table(result))
  if jax.process_index() == 0:
    print(text, flush=True)
    with open(os.path.join(workdir, "robustness.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "robustness.md"), "w") as f:
      f.write(text)
  return result
