"""Edge table: accuracy, bytes and latency of every compressed student, in TFLite.

Two tables:

1. The digits default with every edge phase (experiments/digits_edge.py): the distilled
   resnet8 student as fp32 / fp16 / dynamic-range / int8 PTQ, the QAT int8 student, the
   student pruned to 50% of its MACs (after recovery), and its early exits — accuracy
   in the LiteRT interpreter on the 359 test digits, the JAX model's accuracy, bytes,
   latency at 1 and all threads, MACs, params — then the exit cascade's accuracy vs
   average MACs per confidence threshold, and pruning's accuracy before / after.
   It reads `<workdir>/summary.json`; with no finished run there it runs the experiment
   first (about 5 minutes on 2 CPU cores; rerunning resumes).
2. A CIFAR-shaped student (resnet8x4, 32×32×3, 100 classes) on synthetic inputs, for
   latency only: the same variants converted from a randomly initialised model.

Run:
  python benchmarks/edge_table.py --workdir=runs/digits_edge
  python benchmarks/edge_table.py --cifar_only          # table 2 alone, ~1 minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def _fmt(value, spec):
  return "–" if value is None else format(value, spec)


def digits_tables(workdir: str) -> str:
  from kd_jax import cli, configs
  from kd_jax.edge import phases
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    cli.main(["kd-jax", "distill", f"--workdir={workdir}",
              f"--config={os.path.join(configs.EXPERIMENTS_DIR, 'digits_edge.py')}"])
  with open(summary_path) as f:
    s = json.load(f)
  with open(os.path.join(workdir, "export", "export.md")) as f:
    table = f.read()
  edge = s["edge"]
  out = [f"## Digits: {s['teacher']} → {s['student']} ({s['teacher_accuracy']:.4f} teacher, "
         f"{s['distilled_accuracy']:.4f} distilled)", "", table]
  if phases.PRUNED in edge:
    p = edge[phases.PRUNED]
    out += ["### Pruning to {:.0%} of the MACs".format(p["flops_ratio"]), "",
            "| | params | MACs | accuracy |", "|---|---|---|---|",
            f"| distilled student | {p['params_before']:,} | {p['macs_before']:,} | "
            f"{p['accuracy_before_pruning']:.4f} |",
            f"| pruned, before recovery | {p['params_after']:,} | {p['macs_after']:,} | "
            f"{p['accuracy_after_pruning']:.4f} |",
            f"| pruned, after recovery | {p['params_after']:,} | {p['macs_after']:,} | "
            f"{p['accuracy_after_recovery']:.4f} |", ""]
  if phases.EXITS in edge:
    out += ["### Early-exit cascade", "",
            phases.threshold_markdown(edge[phases.EXITS]["thresholds"],
                                      edge[phases.EXITS]["taps"])]
  return "\n".join(out)


def cifar_table(latency_runs: int) -> tuple[str, dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kd_jax import export, models
  from kd_jax.edge import cost, early_exit, prune, quantize

  shape, num_classes = (32, 32, 3), 100
  model = models.create("resnet8x4", num_classes)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, *shape)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  _, stats = model.apply(variables, images, train=True, mutable=["batch_stats"])
  variables = {**variables, **stats}
  calibration, parity = images[:32], images[32:40]
  rows = {}

  def add(label, m, v, quantization, macs=None):
    flatbuffer = export.to_tflite(m, v, shape, quantization, calibration)
    reference = export.jax_logits(lambda x: m.apply(v, x)[0], parity)
    rows[label] = dict(export.measure(flatbuffer, shape, parity_images=parity,
                                      reference_logits=reference, latency_runs=latency_runs),
                       macs=macs or cost.macs(m, v, shape), params=cost.count_params(v))

  for q in export.QUANTIZATIONS:
    add(f"resnet8x4 {q}", model, variables, q)
  add("resnet8x4 qat int8 (materialised)", model, quantize.materialize(variables), "int8")
  pruned = prune.prune(model, variables, shape, 0.5, criterion="l1")  # random init: BN scales tie
  for q in ("fp32", "int8"):
    add(f"resnet8x4 pruned 50% {q}", pruned.model, pruned.variables, q)
  # The exit cascade as chained segments (random heads: thresholds 0 and 1.01 make
  # every image leave at the first exit / reach the final classifier).
  heads = early_exit.ExitHeads(num_classes, taps=("stage_1", "stage_2"), hidden=64)
  head_vars = early_exit.init_exit_heads(heads, model, variables, shape)
  with tempfile.TemporaryDirectory() as out_dir:
    cascade = early_exit.export_cascade(model, variables, heads, head_vars, shape,
                                        out_dir, parity_images=parity)
    full = export.to_tflite(model, variables, shape)
    for threshold, where in ((0.0, "all leave at stage_1"), (1.01, "all reach final")):
      measured = early_exit.measure_cascade(
          cascade["paths"], full, cascade["segments"], images[:32], np.zeros(32),
          threshold, cost.macs(model, variables, shape))
      rows[f"resnet8x4 exit cascade fp32, {where}"] = dict(
          measured, bytes=cascade["bytes"], accuracy=None,
          max_abs_logit_diff=cascade["max_abs_logit_diff"])
  lines = ["## CIFAR-shaped student: resnet8x4, 32×32×3, synthetic inputs", "",
           "| model | bytes | max abs logit diff | latency ms (1 thread, median / p90) | "
           f"latency ms ({export.all_threads()} threads, median / p90) | MACs | params |",
           "|---|---|---|---|---|---|---|"]
  for label, r in rows.items():
    lines.append(
        f"| {label} | {r['bytes']:,} | {r['max_abs_logit_diff']:.1e} | "
        f"{r['latency_ms']:.3f} / {r['latency_p90_ms']:.3f} | "
        f"{_fmt(r.get('latency_all_threads_ms'), '.3f')} / "
        f"{_fmt(r.get('latency_all_threads_p90_ms'), '.3f')} | "
        f"{r['macs']:,.0f} | {_fmt(r.get('params'), ',')} |")
  full = [r for r in rows.values() if "full_latency_ms" in r]
  lines += ["", "Exit cascade rows: mean per image over 32 images of the chained segments "
            "(each stage computed once); the full model timed alternately: "
            + "; ".join(f"{r['full_latency_ms']:.3f} ms" for r in full)
            + f", {full[0]['full_macs']:,} MACs.", "", f"Latency {export.machines_line(rows)}."]
  return "\n".join(lines) + "\n", rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/digits_edge",
                      help="a digits_edge run (run first if it has no summary.json)")
  parser.add_argument("--cifar_only", action="store_true", help="skip the digits tables")
  parser.add_argument("--latency_runs", type=int, default=100)
  parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                      help="folder for edge_table.{json,md} ('' to write nothing)")
  args = parser.parse_args(argv)
  from kd_jax import runtime
  runtime.configure()
  digits = None if args.cifar_only else digits_tables(args.workdir)
  text, rows = cifar_table(args.latency_runs)
  from kd_jax import machine
  table = "\n\n".join(t for t in (digits, text) if t)
  if args.results:
    machine.write_results(args.results, "edge_table", rows, table)
  print(json.dumps(rows, indent=2) if args.json else table)


if __name__ == "__main__":
  sys.exit(main())
