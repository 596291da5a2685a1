"""GFLOP/s of each convolution of the zoo's models: XLA against PyTorch and XLA's matmul.

`step_throughput.py` times whole steps; this script shows where their time goes on a
CPU. It traces each model's inference forward at CIFAR shape, collects its dense
(ungrouped) convolutions by shape, and times each shape alone, in alternating rounds:

- XLA's convolution (`lax.conv_general_dilated`, which the zoo's dense convolutions
  call on every path), forward and backward (input and kernel gradients in one
  program);
- PyTorch's `conv2d` on the same shape in channels-last, forward and backward
  (`convolution_backward`), where torch is importable;
- an XLA matmul with the convolution's FLOPs (the im2col product
  [B·H'·W', kh·kw·C] × [kh·kw·C, O]): what XLA's dense kernels reach on this machine
  when the convolution's data movement is left out.

GFLOP/s count a backward as twice the forward's FLOPs (the input and the kernel
gradients each cost one forward). Per model it then sums each kernel's time over the
model's convolutions and sets that beside the measured forward of the whole model (the
zoo's CPU path), so the share of the convolutions and what a faster kernel would give
can be read off.

  python benchmarks/conv_kernels.py                       # the step benchmark's six models
  python benchmarks/conv_kernels.py --models resnet32x4 --batch 128 --json
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import sys
import time

from kd_jax import runtime

runtime.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from kd_jax import machine  # noqa: E402
from kd_jax import models  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

MODELS = "resnet32x4,resnet8x4,wrn_40_2,wrn_16_2,vgg13,MobileNetV2"
IMAGE = (32, 32, 3)
NUM_CLASSES = 100
# One convolution shape: input NHWC, kernel HWIO, strides, (low, high) padding per axis.
Shape = collections.namedtuple("Shape", "lhs rhs strides padding")


def _subjaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield inner


def conv_shapes(jaxpr) -> collections.Counter:
  """Counts the dense 2-D convolutions of a jaxpr (nested ones included) by shape."""
  found = collections.Counter()
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "conv_general_dilated"
        and eqn.params["feature_group_count"] == 1
        and eqn.params["batch_group_count"] == 1):
      found[Shape(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                  tuple(eqn.params["window_strides"]),
                  tuple(map(tuple, eqn.params["padding"])))] += 1
    for inner in _subjaxprs(eqn.params):
      found.update(conv_shapes(inner))
  return found


def model_convs(name: str, batch: int):
  """(convolution shape counts, {"xla": the compiled forward}) of a model.

  The forward is the zoo's CPU path (`cpu_ops=True`) and takes no arguments.
  """
  model = models.create(name, NUM_CLASSES, cpu_ops=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *IMAGE)), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
  forward = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731
  counts = conv_shapes(jax.make_jaxpr(forward)(variables, x).jaxpr)
  compiled = {"xla": jax.jit(forward).lower(variables, x).compile()}
  return counts, {k: functools.partial(f, variables, x) for k, f in compiled.items()}


def flops(s: Shape) -> float:
  b, h, w, _ = s.lhs
  kh, kw, c, o = s.rhs
  oh = (h + sum(s.padding[0]) - kh) // s.strides[0] + 1
  ow = (w + sum(s.padding[1]) - kw) // s.strides[1] + 1
  return 2.0 * b * oh * ow * kh * kw * c * o


def kernel_flops(s: Shape, kernel: str) -> float:
  """A backward computes the input and the kernel gradients: twice the forward's FLOPs."""
  return flops(s) * (2 if kernel.endswith("backward") else 1)


class XlaConv:
  """XLA's convolution of one shape (NHWC, HWIO), forward and backward, and its matmul."""

  def __init__(self, s: Shape):
    rng = np.random.default_rng(0)
    self.x = jnp.asarray(rng.normal(size=s.lhs), jnp.float32)
    self.w = jnp.asarray(rng.normal(size=s.rhs) / np.sqrt(np.prod(s.rhs[:3])), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, s.strides, s.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    self.y = conv(self.x, self.w)
    self.g = jnp.asarray(rng.normal(size=self.y.shape), jnp.float32)
    self.forward = jax.jit(conv).lower(self.x, self.w).compile()
    self.backward = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)).lower(
        self.x, self.w, self.g).compile()
    rows, depth = int(np.prod(self.y.shape[:3])), int(np.prod(s.rhs[:3]))
    self.a = jnp.asarray(rng.normal(size=(rows, depth)), jnp.float32)
    self.b = jnp.asarray(rng.normal(size=(depth, s.rhs[3])), jnp.float32)
    self.matmul = jax.jit(jnp.matmul).lower(self.a, self.b).compile()

  def runners(self):
    wait = jax.block_until_ready
    return {"xla_forward": (lambda: self.forward(self.x, self.w), wait),
            "xla_backward": (lambda: self.backward(self.x, self.w, self.g), wait),
            "xla_matmul": (lambda: self.matmul(self.a, self.b), wait)}


class TorchConv:
  """PyTorch's conv2d of the same shape, channels-last, forward and backward."""

  def __init__(self, s: Shape, xla: XlaConv):
    import torch
    self.torch = torch
    nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)  # noqa: E731
    self.x, self.g = nchw(xla.x), nchw(xla.g)  # NHWC memory is channels-last NCHW
    self.w = torch.from_numpy(np.asarray(xla.w).transpose(3, 2, 0, 1).copy()).contiguous(
        memory_format=torch.channels_last)
    self.strides = list(s.strides)
    if any(low != high for low, high in s.padding):
      raise ValueError(f"PyTorch's conv2d pads symmetrically; got {s.padding}")
    self.padding = [low for low, _ in s.padding]
    with torch.no_grad():
      y = self.forward()
    y = y.permute(0, 2, 3, 1).numpy()
    error = np.max(np.abs(y - np.asarray(xla.y))) / np.max(np.abs(np.asarray(xla.y)))
    if error > 1e-4:
      raise AssertionError(f"PyTorch and XLA convolutions of {s} differ by {error:.1e}")

  def forward(self):
    return self.torch.nn.functional.conv2d(self.x, self.w, None, self.strides, self.padding)

  def backward(self):
    return self.torch.ops.aten.convolution_backward(
        self.g, self.x, self.w, None, self.strides, self.padding, [1, 1], False, [0, 0], 1,
        [True, True, False])

  def runners(self):
    def run(fn):
      with self.torch.no_grad():
        return fn()
    done = lambda _: None  # noqa: E731  (PyTorch's CPU kernels return when finished)
    return {"torch_forward": (lambda: run(self.forward), done),
            "torch_backward": (lambda: run(self.backward), done)}


# A timed sample repeats a kernel for at least this long and waits for the last call
# only, so that dispatch and the wait do not count against a millisecond kernel.
MIN_SAMPLE_SECONDS = 0.05


def _sample(fn, wait, repeats: int) -> float:
  t0 = time.perf_counter()
  for _ in range(repeats - 1):
    fn()
  wait(fn())
  return (time.perf_counter() - t0) / repeats


def time_kernels(runners: dict, rounds: int) -> dict:
  """Median seconds per call of each `(fn, wait)`, timed in alternating rounds."""
  repeats = {}
  for name, (fn, wait) in runners.items():
    _sample(fn, wait, 2)  # warm-up: the first calls also grow the heap
    repeats[name] = max(1, math.ceil(MIN_SAMPLE_SECONDS / _sample(fn, wait, 1)))
  times = {k: [] for k in runners}
  for _ in range(rounds):
    for name, (fn, wait) in runners.items():
      times[name].append(_sample(fn, wait, repeats[name]))
  return {k: float(np.median(v)) for k, v in times.items()}


def time_shape(s: Shape, rounds: int, with_torch: bool) -> dict:
  """Median seconds of each kernel on one shape."""
  xla = XlaConv(s)
  runners = xla.runners()
  if with_torch:
    runners.update(TorchConv(s, xla).runners())
  return time_kernels(runners, rounds)


def _shape_text(s: Shape) -> str:
  b, h, w, c = s.lhs
  kh, kw, _, o = s.rhs
  stride = f"/{s.strides[0]}" if s.strides != (1, 1) else ""
  return f"{h}×{w}×{c} → {o}, {kh}×{kw}{stride}"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=MODELS, help="comma-separated zoo names")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=RESULTS,
                 help="folder for conv_kernels.{json,md} ('' to write nothing)")
  args = p.parse_args()
  names = args.models.split(",")
  unknown = [n for n in names if n not in models.available()]
  if unknown:
    p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models.available())}")
  try:
    import torch
    with_torch = True
    versions = f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; "
  except ImportError:
    with_torch = False
    versions = "PyTorch not importable: XLA only; "
  print(f"{versions}JAX {jax.__version__} on {jax.devices()[0].platform}", file=sys.stderr)

  per_model, timed = {}, {}
  for name in names:
    counts, forwards = model_convs(name, args.batch)
    for s in counts:
      if s not in timed:
        timed[s] = time_shape(s, args.rounds, with_torch)
        print(f"  {name}: {_shape_text(s)}: " + ", ".join(
            f"{k} {kernel_flops(s, k) / v / 1e9:.0f}" for k, v in timed[s].items())
            + " GFLOP/s", file=sys.stderr)
    per_model[name] = (counts, time_kernels(
        {k: (f, jax.block_until_ready) for k, f in forwards.items()}, args.rounds))

  rows = []
  for name, (counts, forward_seconds) in per_model.items():
    for s, count in counts.items():
      row = {"model": name, "shape": _shape_text(s), "count": count,
             "gflop": flops(s) / 1e9}
      row.update({f"{k}_gflop_per_s": kernel_flops(s, k) / v / 1e9
                  for k, v in timed[s].items()})
      rows.append(row)
    kernels = timed[next(iter(counts))]
    total = {k: sum(c * timed[s][k] for s, c in counts.items()) for k in kernels}
    rows.append({"model": name, "shape": "all convolutions", "count": sum(counts.values()),
                 "gflop": sum(c * flops(s) for s, c in counts.items()) / 1e9,
                 **{f"{k}_seconds": v for k, v in total.items()},
                 **{f"{k}_model_forward_seconds": v for k, v in forward_seconds.items()}})
  kernels = list(next(iter(timed.values())))
  lines = [f"GFLOP/s per convolution shape, batch {args.batch} (NHWC input → output "
           "channels, kernel/stride; GFLOP is the forward's, a backward does twice as "
           "many)", "",
           "| model | convolution | count | GFLOP | " + " | ".join(kernels) + " |",
           "|---|---|---|---|" + "---|" * len(kernels)]
  for r in rows:
    if r["shape"] != "all convolutions":
      lines.append(f"| {r['model']} | {r['shape']} | {r['count']} | {r['gflop']:.2f} | "
                   + " | ".join(f"{r[k + '_gflop_per_s']:.0f}" for k in kernels) + " |")
  forwards = ["xla"]
  lines += ["", f"Milliseconds summed over each model's convolutions, batch {args.batch}",
            "", "| model | convolutions | GFLOP | " + " | ".join(kernels)
            + " | model forward |", "|---|---|---|" + "---|" * (len(kernels) + len(forwards))]
  for r in rows:
    if r["shape"] == "all convolutions":
      lines.append(f"| {r['model']} | {r['count']} | {r['gflop']:.1f} | " + " | ".join(
          f"{r[k + '_seconds'] * 1e3:.0f}" for k in kernels) + " | " + " | ".join(
          f"{r[k + '_model_forward_seconds'] * 1e3:.0f}" for k in forwards) + " |")
  table = "\n".join(lines) + f"\n\n({versions}host: {machine.describe()})"
  if args.results:
    machine.write_results(args.results, "conv_kernels", rows, table)
  print(json.dumps({**machine.stamp(), "rows": rows}, indent=1) if args.json else table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
