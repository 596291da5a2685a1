"""What the pure-JAX CPU rewrites of `kd_jax.models.cpu_ops` give, model by model.

For each model at CIFAR shape (32×32×3, 100 classes) it times the training step's
arithmetic (forward in train mode, cross-entropy, gradients of every parameter) and the
inference forward, built with ``cpu_ops=True`` and with ``cpu_ops=False`` (the ``lax``
ops), in alternating rounds so that a busy machine slows both alike, and reports the
medians and their ratio. MobileNetV2 and ShuffleV2 exercise the depthwise rewrite,
ShuffleV1 the grouped 1×1 one as well: its extra row keeps the depthwise rewrite alone,
so the two gains can be told apart. resnet8x4 and vgg13 have no grouped convolution:
their two programs are the same, and their ratio shows the noise of the machine.

  python benchmarks/cpu_ops.py                         # five models, batch 64
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 python benchmarks/cpu_ops.py   # as on an AVX2 CPU
  python benchmarks/cpu_ops.py --models MobileNetV2 --batch 32 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from unittest import mock

from kd_jax import runtime

runtime.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from kd_jax import machine, models  # noqa: E402
from kd_jax.models import cpu_ops  # noqa: E402

MODELS = "MobileNetV2,ShuffleV1,ShuffleV2,vgg13,resnet8x4"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Rewrites a model's "cpu_ops" program keeps: all of them, or (for ShuffleV1's second
# row) the depthwise one alone, with grouped 1x1 convolutions left to `lax`.
ALL, DEPTHWISE_ONLY = "all", "depthwise only"


_ALL_REWRITES = cpu_ops.conv_general_dilated


def _depthwise_only(lhs, rhs, *args, **kwargs):
  rewrite = _ALL_REWRITES if rhs.shape[2] == 1 else lax.conv_general_dilated
  return rewrite(lhs, rhs, *args, **kwargs)
IMAGE = (32, 32, 3)
NUM_CLASSES = 100


def compiled_programs(name: str, use_cpu_ops: bool, batch: int, rewrites: str = ALL):
  """(train step arithmetic, inference forward) of one model, compiled, with arguments."""
  if rewrites == DEPTHWISE_ONLY:
    with mock.patch.object(cpu_ops, "conv_general_dilated", _depthwise_only):
      return compiled_programs(name, use_cpu_ops, batch)
  model = models.create(name, NUM_CLASSES, cpu_ops=use_cpu_ops)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, *IMAGE)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
  variables = jax.jit(lambda k: model.init(k, images[:1]))(jax.random.key(0))

  def loss(params, batch_stats):
    (logits, _), updates = model.apply({"params": params, "batch_stats": batch_stats},
                                       images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  forward = jax.jit(lambda v, x: model.apply(v, x)[0])
  args = (variables["params"], variables["batch_stats"])
  return ((grad.lower(*args).compile(), args),
          (forward.lower(variables, images).compile(), (variables, images)))


def measure(name: str, batch: int, rounds: int, rewrites: str = ALL) -> dict:
  """Images per second of the train step and the forward, with and without cpu_ops."""
  programs = {ops: compiled_programs(name, ops, batch, rewrites) for ops in (True, False)}
  times = {(ops, kind): [] for ops in programs for kind in ("step", "forward")}
  for _ in range(rounds + 1):  # the first round warms up and is dropped
    for ops, ((step, step_args), (forward, forward_args)) in programs.items():
      for kind, fn, args in (("step", step, step_args), ("forward", forward, forward_args)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[ops, kind].append(time.perf_counter() - t0)
  rate = {key: batch / statistics.median(t[1:]) for key, t in times.items()}
  return {"model": name, "rewrites": rewrites, "batch": batch,
          "step_cpu_ops": rate[True, "step"], "step_lax": rate[False, "step"],
          "step_gain": rate[True, "step"] / rate[False, "step"],
          "forward_cpu_ops": rate[True, "forward"], "forward_lax": rate[False, "forward"],
          "forward_gain": rate[True, "forward"] / rate[False, "forward"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=MODELS, help="comma-separated zoo names")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=RESULTS,
                 help="folder for cpu_ops.{json,md} ('' to write nothing)")
  args = p.parse_args(argv)
  rows = []
  for name in args.models.split(","):
    for rewrites in (ALL, DEPTHWISE_ONLY) if name == "ShuffleV1" else (ALL,):
      rows.append(measure(name, args.batch, args.rounds, rewrites))
      print(f"  {name} ({rewrites}): step gain {rows[-1]['step_gain']:.2f}×",
            file=sys.stderr, flush=True)
  host = machine.describe()
  lines = [f"Images/s with `cpu_ops=True` against the `lax` ops, batch {args.batch}, "
           f"median of {args.rounds} rounds", "",
           "| model | rewrites | train step, cpu_ops | train step, lax | gain | "
           "forward, cpu_ops | forward, lax | gain |", "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['rewrites']} | {r['step_cpu_ops']:.0f} | "
            f"{r['step_lax']:.0f} | {r['step_gain']:.2f}× | {r['forward_cpu_ops']:.0f} | "
            f"{r['forward_lax']:.0f} | {r['forward_gain']:.2f}× |" for r in rows]
  table = "\n".join(lines) + f"\n\n(host: {host}; JAX {jax.__version__})"
  if args.results:
    machine.write_results(args.results, "cpu_ops", rows, table)
  print(json.dumps({**machine.stamp(), "rows": rows}, indent=1) if args.json else table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
