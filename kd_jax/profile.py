"""`kd-jax profile`: what each candidate teacher costs on this host, and which to pick.

Candidates (`config.candidates`, comma-separated) are zoo model names (random
weights), folders of a saved model (a `kd-jax train-teacher` / `kd-jax distill` workdir
or one of its phase folders), or `MODEL=FILE`: a PyTorch `.pth` / `.pt` or a
`.safetensors` checkpoint of zoo model MODEL with `num_classes` classes
(`kd_jax.pretrained.load_torch_checkpoint`, e.g. RepDistiller's
`resnet32x4=ckpt_epoch_240.pth`). For each, on input of the config's shape:

  params                  scalars of the `params` collection (BatchNorm statistics
                          excluded)
  MACs                    XLA's cost analysis of the compiled batch-1 forward pass,
                          flops / 2 (element-wise flops included, zero-padded
                          convolution taps not)
  peak activations        XLA's buffer assignment of the batch-1 forward pass: its
                          temporary buffers (packed by live range) plus its output
  JAX throughput          images/s of the jitted forward pass at `batch_size` on this
                          host's default JAX device, timed after warm-up
  TFLite latency, size    median single-image invoke in the LiteRT interpreter (one
                          thread) and flatbuffer size, per quantization of
                          `kd_jax.export`; int8 is calibrated on training images of
                          the config's dataset (`kd_jax.data.representative_images`),
                          on normal noise when the config has none
  TFLite energy           µJ per inference of each quantization (`kd_jax.energy`):
                          RAPL package counters where this host exposes them
                          ("measured"), else estimated from the graph's MACs and bytes
                          with 45 nm per-operation energies ("estimated"), labelled
  top-1                   labelled with its source: "measured" on the eval split of
                          the config's dataset (`config.data`, with
                          `kd_jax.evaluate.evaluate`) whenever the candidate's weights
                          are at hand (a file or a saved model); without a dataset,
                          the accuracy a saved model's `model.json` holds; for a zoo
                          name, the published top-1 of `config.published`, if any

`config.data` is a data block (`kd_jax.data.default_data_config`); `data.name` None
means no dataset: synthetic calibration, and file candidates get no top-1. With a
dataset, `input_shape` and `num_classes` must be the dataset's, and a saved model must
have been trained on it.

`run(config, workdir)` writes `<workdir>/profile.json`, `profile.md` (the table and the
recommendation) and `pareto.png` (top-1 against latency and against energy per
inference, Pareto fronts marked). The recommendation follows `config.recommend.rule`:

  best_accuracy_under_latency  the highest top-1 with `latency` ≤ `latency_budget_ms`
  fastest_above_accuracy       the lowest `latency` with top-1 ≥ `min_accuracy` (%)

`latency` names the TFLite variant that counts (`tflite_int8`, `tflite_fp32`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import energy
from kd_jax import evaluate as eval_lib
from kd_jax import export as export_lib
from kd_jax import machine
from kd_jax import models
from kd_jax import parallel
from kd_jax import pretrained
from kd_jax.edge import cost

RULES = ("best_accuracy_under_latency", "fastest_above_accuracy")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One teacher to profile: a model of the zoo, random or loaded from `checkpoint` (a
  saved-model folder or a PyTorch / safetensors file)."""
  label: str
  model_name: str
  checkpoint: str | None = None
  accuracy: float | None = None  # top-1 in percent
  accuracy_source: str | None = None


def _names(value: str | Sequence[str]) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return list(value)


def _saved_model_folder(path: str) -> str | None:
  """`path` or its `teacher/` subfolder, whichever holds a saved model; else None."""
  for folder in (path, os.path.join(path, "teacher")):
    if ckpt_lib.has_variables(folder):
      return folder
  return None


def _file_candidate(name: str) -> Candidate:
  """`MODEL=FILE`: a PyTorch / safetensors checkpoint of zoo model MODEL."""
  model_name, _, path = name.partition("=")
  model_name, path = model_name.strip(), path.strip()
  if not pretrained.is_checkpoint_file(path):
    raise ValueError(f"candidate {name!r}: MODEL=FILE takes a file ending in "
                     f"{', '.join(pretrained.SUFFIXES)}")
  if model_name not in pretrained.importable():
    raise ValueError(f"candidate {name!r}: {model_name!r} is not a model with a PyTorch "
                     f"reference; use one of {', '.join(pretrained.importable())}")
  if not os.path.isfile(path):
    raise ValueError(f"candidate {name!r}: no file {path}")
  return Candidate(f"{model_name} ({os.path.basename(path)})", model_name, path)


def _folder_candidate(name: str, folder: str,
                      config: ml_collections.ConfigDict) -> Candidate:
  """A saved model, with the accuracy its `model.json` holds."""
  with open(os.path.join(folder, "model.json")) as f:
    meta = json.load(f)
  checks = [("num_classes", meta.get("num_classes"), config.num_classes)]
  if config.data.name:
    checks.append(("data.name", meta.get("dataset"), config.data.name))
  for key, found, wanted in checks:
    if found != wanted:
      raise ValueError(f"candidate {name!r} has {key}={found!r}, not the config's "
                       f"{key}={wanted!r}; set --config.{key} or drop it")
  accuracy = meta.get("metrics", {}).get("accuracy")
  return Candidate(
      f"{meta['model']} ({os.path.basename(os.path.normpath(name))})", meta["model"],
      folder, None if accuracy is None else 100.0 * accuracy,
      None if accuracy is None else f"checkpoint ({meta['dataset']} eval)")


def resolve_candidates(config: ml_collections.ConfigDict) -> list[Candidate]:
  """The config's candidates with the top-1 they come with and its source (a measured
  top-1 replaces it in `run`); one-line errors."""
  published = dict(config.published)
  candidates = []
  for name in _names(config.candidates):
    if "=" in name:
      candidates.append(_file_candidate(name))
      continue
    if pretrained.is_checkpoint_file(name):
      raise ValueError(f"candidate {name!r} is a checkpoint file; name its model: "
                       f"MODEL={name} (e.g. resnet32x4={name})")
    folder = _saved_model_folder(name) if os.path.isdir(name) else None
    if folder is not None:
      candidates.append(_folder_candidate(name, folder, config))
      continue
    if models.is_external(name):
      models.check_name(name, "candidates")
    elif name not in models.available():
      raise ValueError(f"candidate {name!r} is neither a model, a folder with a saved "
                       f"model (model.json + variables) nor MODEL=FILE.pth; known "
                       f"models: {', '.join(models.available())}")
    accuracy = published.get(name)
    candidates.append(Candidate(name, name, None, accuracy,
                                config.published_source if accuracy else None))
  if not candidates:
    raise ValueError("config.candidates is empty; list model names, checkpoint folders "
                     "or MODEL=FILE.pth, e.g. --config.candidates=resnet56,vgg13")
  return candidates


def dataset_info(config: ml_collections.ConfigDict) -> data_lib.DatasetInfo | None:
  """The config's dataset (None without one), checked against `input_shape` and
  `num_classes`."""
  if not config.data.name:
    return None
  info = data_lib.get_info(config.data)
  if tuple(info.image_shape) != tuple(config.input_shape):
    raise ValueError(f"data.name={config.data.name!r} has images of shape "
                     f"{tuple(info.image_shape)}; set --config.input_shape="
                     f"'{tuple(info.image_shape)}'")
  if info.num_classes != config.num_classes:
    raise ValueError(f"data.name={config.data.name!r} has {info.num_classes} classes; "
                     f"set --config.num_classes={info.num_classes}")
  return info


def candidate_variables(candidate: Candidate, model, input_shape: Sequence[int],
                        num_classes: int) -> Any:
  """The variables of `candidate`: random, a saved model's, or a checkpoint file's."""
  like = _initial_variables(model, input_shape)
  if not candidate.checkpoint:
    return like
  if not pretrained.is_checkpoint_file(candidate.checkpoint):
    return ckpt_lib.load_variables(candidate.checkpoint, like)[0]
  variables = pretrained.load_torch_checkpoint(candidate.checkpoint, candidate.model_name,
                                               num_classes)
  if jax.tree.map(np.shape, variables) != jax.tree.map(np.shape, like):
    raise ValueError(f"{candidate.checkpoint} takes images with another number of "
                     f"channels than input_shape={tuple(input_shape)}; set "
                     f"--config.input_shape to its images' shape")
  return variables


def measured_accuracy(model, variables: Any, config: ml_collections.ConfigDict,
                      info: data_lib.DatasetInfo) -> tuple[float, str]:
  """(top-1 in percent, its source) of `model` on the eval split of `config.data`."""
  mesh = parallel.data_mesh()
  metrics = eval_lib.evaluate(
      model, parallel.replicate(variables, mesh),
      data_lib.eval_iterator(config.data, batch_size=config.eval_batch_size), mesh,
      num_classes=info.num_classes)
  return 100.0 * metrics["accuracy"], (
      f"measured ({config.data.name} {info.eval_split}, "
      f"{metrics['num_examples']} images)")


def calibration_images(config: ml_collections.ConfigDict,
                       info: data_lib.DatasetInfo | None) -> tuple[np.ndarray, str]:
  """(int8 calibration images, what they are): training images of the config's
  dataset, else normal noise."""
  n = config.num_calibration_images
  if info is None:
    return np.random.default_rng(1).normal(size=(n, *config.input_shape)).astype(
        np.float32), f"{n} synthetic (normal noise) images"
  images = data_lib.representative_images(config.data, n)
  return images, f"{len(images)} {config.data.name} {info.train_split} images"


def _check(config: ml_collections.ConfigDict) -> None:
  """One-line errors for the settings `run` relies on."""
  rule = config.recommend.rule
  if rule not in RULES:
    raise ValueError(f"recommend.rule={rule!r} is unknown; use one of {', '.join(RULES)}")
  unknown = [q for q in config.quantizations if q not in export_lib.QUANTIZATIONS]
  if unknown:
    raise ValueError(f"quantizations {unknown} are unknown; use some of "
                     f"{', '.join(export_lib.QUANTIZATIONS)}")
  variants = [f"tflite_{q}" for q in config.quantizations]
  if config.recommend.latency not in variants:
    raise ValueError(f"recommend.latency={config.recommend.latency!r} is not measured; "
                     f"use one of {', '.join(variants)} (set by quantizations)")


def _initial_variables(model, input_shape: Sequence[int]) -> Any:
  """Random variables of `model` (initialised under jit: fast for deep models)."""
  return jax.jit(lambda rng, images: model.init(rng, images, train=False))(
      jax.random.key(0), jnp.zeros((1, *input_shape)))


def _forward(model):
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False)[0])


def compiled_costs(model, variables: Any, input_shape: Sequence[int]) -> dict[str, float]:
  """MACs and peak activation bytes of the batch-1 forward pass.

  MACs are kd_jax's one count (`kd_jax.edge.cost.macs`: convolutions and matrix
  products, a depthwise convolution costed as one); the peak activation bytes come from
  XLA's memory analysis of the compiled forward.
  """
  compiled = _forward(models.portable(model)).lower(
      variables, jnp.zeros((1, *input_shape))).compile()
  memory = compiled.memory_analysis()
  return {"macs": cost.macs(model, variables, input_shape),
          "peak_activation_bytes": memory.temp_size_in_bytes + memory.output_size_in_bytes}


def throughput(model, variables: Any, input_shape: Sequence[int], batch_size: int, *,
               min_seconds: float = 2.0, warmup: int = 2) -> float:
  """Images per second of the jitted forward pass, timed after `warmup` calls."""
  forward = _forward(model)
  variables = jax.device_put(variables)
  images = jax.device_put(np.random.default_rng(0).normal(
      size=(batch_size, *input_shape)).astype(np.float32))
  for _ in range(warmup):
    forward(variables, images).block_until_ready()
  calls, start = 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < min_seconds:
    forward(variables, images).block_until_ready()
    calls += 1
  return calls * batch_size / (time.perf_counter() - start)


def profile_model(model, variables: Any, input_shape: Sequence[int], *, batch_size: int,
                  calibration: np.ndarray, quantizations: Sequence[str] = ("fp32", "int8"),
                  latency_runs: int = 50, min_seconds: float = 2.0) -> dict[str, Any]:
  """Every measured cost of one model (see the module docstring), as a flat dict.

  `calibration`: the images int8 is calibrated on (the first also times the energy).
  """
  input_shape = tuple(input_shape)
  row = {"params": cost.count_params(variables),
         **compiled_costs(model, variables, input_shape),
         "throughput_images_per_s": throughput(model, variables, input_shape, batch_size,
                                               min_seconds=min_seconds)}
  for quantization in quantizations:
    flatbuffer = export_lib.to_tflite(model, variables, input_shape, quantization,
                                      representative_images=calibration)
    latency = export_lib.latency_ms(flatbuffer, input_shape, runs=latency_runs)
    row[f"tflite_{quantization}_ms"] = latency["median_ms"]
    row[f"tflite_{quantization}_bytes"] = len(flatbuffer)
    interpreter, image = export_lib.TFLiteModel(flatbuffer), calibration[:1]
    spent = energy.per_inference(flatbuffer, lambda: interpreter(image))
    row[f"tflite_{quantization}_uj"] = spent["uj"]
    row[f"tflite_{quantization}_energy"] = spent["kind"]
  return row


def pareto_front(rows: Sequence[Mapping[str, Any]], cost: str) -> list[bool]:
  """Whether each row is Pareto-optimal in (`accuracy` ↑, `cost` ↓).

  `cost` is the row key of the cost: `tflite_int8_ms` (latency), `tflite_int8_uj`
  (energy), ... Only rows with both an accuracy and that cost compete; the others are
  never on the front.
  """
  def known(r):
    return r.get("accuracy") is not None and r.get(cost) is not None
  rivals = [r for r in rows if known(r)]
  return [known(r) and not any(
      o["accuracy"] >= r["accuracy"] and o[cost] <= r[cost]
      and (o["accuracy"] > r["accuracy"] or o[cost] < r[cost]) for o in rivals)
      for r in rows]


def recommend(rows: Sequence[Mapping[str, Any]], recommend_config: Mapping[str, Any]
              ) -> tuple[int | None, str]:
  """(index of the recommended row or None, a sentence saying why)."""
  rule, latency = recommend_config["rule"], recommend_config["latency"]
  key, what = f"{latency}_ms", latency.replace("tflite_", "TFLite ")
  known = [(i, r) for i, r in enumerate(rows) if r.get("accuracy") is not None]
  if rule == "best_accuracy_under_latency":
    budget = float(recommend_config["latency_budget_ms"])
    fits = [(i, r) for i, r in known if r[key] <= budget]
    if not fits:
      return None, f"no candidate with a top-1 has {what} latency ≤ {budget:g} ms"
    i, r = max(fits, key=lambda ir: (ir[1]["accuracy"], -ir[1][key]))
    return i, (f"{r['label']}: the highest top-1 ({r['accuracy']:.2f}%) of the "
               f"{len(fits)} candidates with {what} latency ≤ {budget:g} ms "
               f"({r[key]:.2f} ms)")
  if rule == "fastest_above_accuracy":
    floor = float(recommend_config["min_accuracy"])
    fits = [(i, r) for i, r in known if r["accuracy"] >= floor]
    if not fits:
      return None, f"no candidate reaches top-1 ≥ {floor:g}%"
    i, r = min(fits, key=lambda ir: (ir[1][key], -ir[1]["accuracy"]))
    return i, (f"{r['label']}: the lowest {what} latency ({r[key]:.2f} ms) of the "
               f"{len(fits)} candidates with top-1 ≥ {floor:g}% ({r['accuracy']:.2f}%)")
  raise ValueError(f"recommend.rule={rule!r} is unknown; use one of {', '.join(RULES)}")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """`kd-jax profile`: profiles every candidate; writes profile.json/.md and pareto.png."""
  _check(config)
  candidates = resolve_candidates(config)
  info = dataset_info(config)
  input_shape = tuple(config.input_shape)
  calibration, calibrated_on = calibration_images(config, info)
  rows = []
  for candidate in candidates:
    model = models.create(candidate.model_name, config.num_classes)
    variables = candidate_variables(candidate, model, input_shape, config.num_classes)
    if candidate.checkpoint and info is not None:
      accuracy, source = measured_accuracy(model, variables, config, info)
      candidate = dataclasses.replace(candidate, accuracy=accuracy,
                                      accuracy_source=source)
    print(f"[kd-jax] profiling {candidate.label}", flush=True)
    rows.append({**dataclasses.asdict(candidate), **profile_model(
        model, variables, input_shape, batch_size=config.batch_size,
        calibration=calibration, quantizations=tuple(config.quantizations),
        latency_runs=config.latency_runs, min_seconds=config.min_seconds)})
  front = pareto_front(rows, f"{config.recommend.latency}_ms")
  chosen, reason = recommend(rows, config.recommend)
  for i, row in enumerate(rows):
    row.update(pareto=front[i], recommended=i == chosen)
  host = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "input_shape": list(input_shape),
          "batch_size": config.batch_size, "calibration": calibrated_on,
          "machine": machine.cpu(threads=1)}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "profile.json"), "w") as f:
    json.dump({"host": host, "recommendation": reason, "rows": rows}, f, indent=2)
  plotted = plot_pareto(rows, config.recommend, os.path.join(workdir, "pareto.png"))
  text = markdown(rows, host, config, reason, plotted)
  with open(os.path.join(workdir, "profile.md"), "w") as f:
    f.write(text)
  print(text)
  return rows


def markdown(rows: Sequence[Mapping[str, Any]], host: Mapping[str, Any],
             config: ml_collections.ConfigDict, reason: str, plotted: bool) -> str:
  """profile.md: the host, the table, the recommendation and the plot."""
  quantizations = tuple(config.quantizations)
  header = ["model", "top-1 (%)", "top-1 source", "params (M)", "MACs (M)",
            "peak activations (MiB)", f"JAX img/s (batch {host['batch_size']})"]
  header += [f"TFLite {q} {unit}" for q in quantizations for unit in ("(ms)", "(MB)", "(µJ)")]
  dataset = config.data.name or "no dataset"
  lines = [f"# Teacher profile: {len(rows)} candidates, input "
           f"{tuple(host['input_shape'])}, {config.num_classes} classes ({dataset})",
           "", f"JAX on {host['backend']} ({host['device']}), {host['cpu_count']} CPU "
           "cores; MACs and peak activations from XLA's compiled batch-1 forward pass "
           "(flops / 2; temporary buffers + output); TFLite: median of "
           f"{config.latency_runs} single-image invokes, one thread, on "
           f"{host['machine']['cpu']} ({host['machine']['isa']}); int8 calibrated on "
           f"{host['calibration']}.", "",
           "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for r in rows:
    cells = [r["label"] + (" **★**" if r["recommended"] else ""),
             "—" if r["accuracy"] is None else f"{r['accuracy']:.2f}",
             r["accuracy_source"] or "—", f"{r['params'] / 1e6:.2f}",
             f"{r['macs'] / 1e6:.1f}", f"{r['peak_activation_bytes'] / 2**20:.2f}",
             f"{r['throughput_images_per_s']:.0f}"]
    cells += [f"{r[f'tflite_{q}_ms']:.2f}" if unit == "ms" else
              f"{r[f'tflite_{q}_bytes'] / 1e6:.2f}" if unit == "MB" else
              f"{r[f'tflite_{q}_uj']:.1f} ({r[f'tflite_{q}_energy']})"
              for q in quantizations for unit in ("ms", "MB", "uJ")]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Recommendation ({config.recommend.rule}): {reason}."]
  if plotted:
    lines += ["", "![top-1 against latency and energy](pareto.png)"]
  else:
    lines += ["", "No candidate has a top-1, so there is no Pareto plot."]
  return "\n".join(lines) + "\n"


def pareto_panel(ax, rows: Sequence[Mapping[str, Any]], cost: str, *, xlabel: str,
                 ylabel: str, title: str) -> None:
  """One accuracy-against-cost panel: every row with both, labelled, and their Pareto
  front (`pareto_front`) joined as a staircase; the cost axis is logarithmic where the
  costs span more than a factor of 10."""
  known = [r for r in rows if r.get("accuracy") is not None and r.get(cost) is not None]
  ax.scatter([r[cost] for r in known], [r["accuracy"] for r in known], color="tab:blue")
  for r in known:
    ax.annotate(r["label"], (r[cost], r["accuracy"]), textcoords="offset points",
                xytext=(5, 4), fontsize=8)
  front = sorted((r[cost], r["accuracy"])
                 for r, on in zip(known, pareto_front(known, cost)) if on)
  if front:
    ax.step(*zip(*front), where="post", color="tab:orange", marker="o", markersize=11,
            markerfacecolor="none", label="Pareto front")
  costs = [r[cost] for r in known]
  if costs and min(costs) > 0 and max(costs) > 10 * min(costs):
    ax.set_xscale("log")
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if front:
    ax.legend(fontsize=8)


def energy_label(kinds: Sequence[str]) -> str:
  """'µJ per inference, estimated' (or 'measured', or both): an energy axis's label."""
  kinds = sorted(set(kinds))
  return f"energy (µJ per inference, {' and '.join(kinds) or 'not measured'})"


def plot_pareto(rows: Sequence[Mapping[str, Any]], recommend_config: Mapping[str, Any],
                path: str) -> bool:
  """Top-1 against latency and against energy per inference, of the TFLite variant
  `recommend.latency` names; the Pareto fronts joined, the pick starred.

  Returns False (and draws nothing) when no row has a top-1.
  """
  latency = recommend_config["latency"]
  known = [r for r in rows if r.get("accuracy") is not None]
  if not known:
    return False
  what = latency.replace("tflite_", "TFLite ")
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  by_latency, by_energy = fig.subplots(1, 2)
  pareto_panel(by_latency, known, f"{latency}_ms", xlabel=f"{what} latency (ms, one "
               "thread)", ylabel="top-1 (%)", title="Candidate teachers: top-1 against "
               "latency")
  kinds = [r[f"{latency}_energy"] for r in known if r.get(f"{latency}_energy")]
  pareto_panel(by_energy, known, f"{latency}_uj", xlabel=f"{what} {energy_label(kinds)}",
               ylabel="top-1 (%)", title="Candidate teachers: top-1 against energy")
  for r in known:
    if r.get("recommended"):
      for ax, key in ((by_latency, f"{latency}_ms"), (by_energy, f"{latency}_uj")):
        ax.scatter([r[key]], [r["accuracy"]], s=250, marker="*", color="tab:red",
                   label="recommended", zorder=3)
  if recommend_config["rule"] == "best_accuracy_under_latency":
    by_latency.axvline(float(recommend_config["latency_budget_ms"]), color="gray",
                       linestyle="--", label="latency budget")
  for ax in (by_latency, by_energy):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  return True
