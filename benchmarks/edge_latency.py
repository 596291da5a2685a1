"""Edge latency: what a deployer gets from each TFLite variant of the mobile students.

For resnet8x4, MobileNetV2, mobilenetv3_small_cifar and efficientnet_lite0_cifar at
32×32×3 (100 classes) and mobilenetv3_small and efficientnet_lite0 at 224×224×3 (1000
classes), randomly initialised with the BatchNorm statistics of synthetic images
(`random_student`), the fp32 / fp16 / dynamic-range / int8 variants are converted
(`kd_jax.export`) and measured in the LiteRT interpreter with XNNPACK
(`export.measure`): bytes, start-up (`init_ms`), single-image latency median / p90 / p99
at 1 thread and at all threads, peak memory, energy per image (labelled measured or
estimated), and for fp32 and int8 a per-op profile (`kd_jax.op_profile`). The int8/fp32
latency ratio at 1 thread comes from a separate timing with fp32 and int8 alternated in
rounds, so both see the same machine load.

Run:
  python benchmarks/edge_latency.py            # all six models, ~10 minutes on 2 cores
  python benchmarks/edge_latency.py --quick    # resnet8x4 fp32 + int8, ~1 minute
Writes benchmarks/results/edge_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODELS = (("resnet8x4", 32, 100), ("MobileNetV2", 32, 100),
          ("mobilenetv3_small_cifar", 32, 100), ("efficientnet_lite0_cifar", 32, 100),
          ("mobilenetv3_small", 224, 1000), ("efficientnet_lite0", 224, 1000))


def random_student(name, size, num_classes, num_images):
  """A zoo model at random init whose BatchNorm statistics are those of `num_images`
  normal images; returns (model, variables, images).

  One train-mode pass moves the running statistics only by 1 - momentum towards the
  batch's (10% for the CIFAR zoo, 1% for MobileNetV3), which leaves deep activations
  tiny (MobileNetV3's at ~1e-3): int8 then meets requantisation scales XNNPACK
  refuses, an artefact no trained model has. Train mode normalises with the batch's
  own statistics, so a second pass from the updated statistics sees the same batch
  statistics b: with o, n1, n2 the statistics before and after each pass,
  n1 - o = (1 - m)(b - o) and n2 - n1 = m (n1 - o), which give the momentum m (a
  least-squares fit per leaf) and b.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kd_jax import models
  shape = (size, size, 3)
  model = models.create(name, num_classes)
  images = np.random.default_rng(0).normal(size=(num_images, *shape)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  step = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"])[1])
  first = step(variables)
  second = step({**variables, **first})

  def batch_statistic(o, n1, n2):
    d1, d2 = np.asarray(n1) - np.asarray(o), np.asarray(n2) - np.asarray(n1)
    m = float(np.sum(d1 * d2) / max(float(np.sum(d1 * d1)), 1e-30))
    return np.asarray(o) + d1 / (1 - m)

  stats = jax.tree_util.tree_map(batch_statistic, variables["batch_stats"],
                                 first["batch_stats"], second["batch_stats"])
  return model, {**variables, "batch_stats": stats}, images


def alternated_ratio(fp32, int8, shape, rounds, runs):
  """1-thread median latencies of fp32 and int8 timed alternately for `rounds`
  rounds of `runs` invokes; returns dict(fp32_ms, int8_ms, ratio) (medians of the
  rounds' medians)."""
  import numpy as np

  from kd_jax import export
  models = {"fp32": export.TFLiteModel(fp32), "int8": export.TFLiteModel(int8)}
  times = {k: [] for k in models}
  for _ in range(rounds):
    for k, m in models.items():
      times[k].append(export.latency_ms(m, shape, runs=runs)["median_ms"])
  fp32_ms, int8_ms = (float(np.median(times[k])) for k in ("fp32", "int8"))
  return dict(fp32_ms=fp32_ms, int8_ms=int8_ms, ratio=int8_ms / fp32_ms)


def run(model_specs, variants, latency_runs, rounds):
  """Rows {'<model> <size> <variant>': measure(...)} and ratios {'<model> <size>':
  alternated_ratio(...)}."""
  from kd_jax import export
  rows, ratios = {}, {}
  for name, size, num_classes in model_specs:
    shape = (size, size, 3)
    model, variables, images = random_student(name, size, num_classes,
                                              64 if size <= 64 else 16)
    calibration, parity = images[:16], images[-8:]
    fn = export.logits_function(model, variables)
    reference = export.jax_logits(fn, parity)
    flatbuffers = {}
    for q in variants:
      flatbuffers[q] = export.function_to_tflite(fn, shape, q, calibration)
      row = export.measure(flatbuffers[q], shape, parity_images=parity,
                           reference_logits=reference, latency_runs=latency_runs,
                           per_op=q in ("fp32", "int8"))
      rows[f"{name} {size} {q}"] = row
      print(f"{name} {size} {q}: {row['latency_ms']:.3f} ms", file=sys.stderr, flush=True)
    if "fp32" in flatbuffers and "int8" in flatbuffers:
      ratios[f"{name} {size}"] = alternated_ratio(flatbuffers["fp32"], flatbuffers["int8"],
                                                  shape, rounds, latency_runs)
  return rows, ratios


def _mb(value):
  return "–" if value is None else f"{value / 2**20:.1f}"


def markdown(rows, ratios, top):
  """The tables: every variant, the int8/fp32 ratios, the per-op profiles."""
  from kd_jax import export
  threads = next(iter(rows.values()))["threads"]
  out = ["## Every variant", "",
         "| model | bytes | init ms | 1 thread ms (median / p90 / p99) | "
         f"{threads} threads ms (median / p90 / p99) | peak MB | energy | max abs logit diff |",
         "|---|---|---|---|---|---|---|---|"]
  for label, r in rows.items():
    out.append(
        f"| {label} | {r['bytes']:,} | {r['init_ms']:.2f} | {r['latency_ms']:.3f} / "
        f"{r['latency_p90_ms']:.3f} / {r['latency_p99_ms']:.3f} | "
        f"{r['latency_all_threads_ms']:.3f} / {r['latency_all_threads_p90_ms']:.3f} / "
        f"{r['latency_all_threads_p99_ms']:.3f} | {_mb(r['peak_memory_bytes'])} | "
        f"{r['energy']['uj']:.3g} µJ {r['energy']['kind']} | "
        f"{r['max_abs_logit_diff']:.1e} |")
  kinds = sorted({r["memory_kind"] for r in rows.values()})
  out += ["", f"Latency {export.machines_line(rows)}; init: interpreter + XNNPACK + "
          f"allocate_tensors, median of 5; peak memory: {'; '.join(kinds)}.", "",
          "## int8 / fp32 at 1 thread (timed alternately)", "",
          "| model | fp32 ms | int8 ms | int8 / fp32 |", "|---|---|---|---|"]
  for label, r in ratios.items():
    out.append(f"| {label} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['ratio']:.2f} |")
  out += ["", "## Per-op profiles (1 thread, XNNPACK)", "",
          "Each op cut out as a one-op model and timed alone on the tensors it sees in the "
          "whole model (`kd_jax.op_profile`); share is of the per-op sum. 'whole' is the "
          "whole model timed the same way (back-to-back invokes, the empty-graph invoke "
          "cost subtracted).", ""]
  for label, r in rows.items():
    p = r.get("per_op")
    if not p:
      continue
    g = r["graph"]
    quant = ("" if not g["quantize_ops"] else
             f"; QUANTIZE at ops {[q['index'] for q in g['quantize_ops']]}, DEQUANTIZE at "
             f"{[q['index'] for q in g['dequantize_ops']]} of {len(p['ops'])}; weights "
             f"{g['weights']}; float ops {g['float_ops'] or 'none'}")
    out += [f"**{label}**: per-op sum {p['sum_ms']:.3f} ms, whole {p['whole_ms']:.3f} ms; "
            f"{p['partitions']} XNNPACK partition(s), not delegated: "
            f"{', '.join(p['not_delegated']) or 'none'}; I/O "
            f"{'/'.join(g['input_types'])} → {'/'.join(g['output_types'])}{quant}.", "",
            "| by op type | count | ms | share |", "|---|---|---|---|"]
    for name, e in list(p["by_op"].items())[:top]:
      out.append(f"| {name} | {e['count']} | {e['ms']:.4f} | {e['share']:.0%} |")
    out += ["", "| slowest ops | # | ms | share | out |", "|---|---|---|---|---|"]
    for o in p["slowest"][:top]:
      out.append(f"| {o['op']} | {o['index']} | {o['ms']:.4f} | {o['share']:.0%} | "
                 f"{o['out_type']} |")
    out.append("")
  return "\n".join(out) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="resnet8x4 fp32 + int8 only, fewer runs (a smoke test)")
  parser.add_argument("--latency_runs", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=5,
                      help="alternated fp32/int8 timing rounds for the ratio")
  parser.add_argument("--top", type=int, default=5, help="per-op rows per table")
  parser.add_argument("--results", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"),
                      help="folder for edge_latency.{json,md} ('' to write nothing)")
  args = parser.parse_args(argv)
  from kd_jax import export, machine, runtime
  runtime.configure()
  specs, variants = MODELS, export.QUANTIZATIONS
  if args.quick:
    specs, variants = MODELS[:1], ("fp32", "int8")
    args.latency_runs, args.rounds = min(args.latency_runs, 30), min(args.rounds, 3)
  rows, ratios = run(specs, variants, args.latency_runs, args.rounds)
  text = "# Edge latency\n\n" + markdown(rows, ratios, args.top)
  if args.results:
    machine.write_results(args.results, "edge_latency",
                          json.loads(json.dumps(dict(rows=rows, ratios=ratios),
                                                default=str)), text)
  print(text)


if __name__ == "__main__":
  sys.exit(main())
