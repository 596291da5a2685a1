"""Checkpoint cost and time to resume, as a share of the distillation step.

For a teacher → student pair, measures on this host: the KD train step, one orbax save
of the whole train state, one restore, re-creating the data iterator at a late step,
and the first (compiling) step after a restart. Prints a table, or JSON with --json.

  python benchmarks/checkpoint_overhead.py                      # digits default pair
  python benchmarks/checkpoint_overhead.py --pairs resnet32x4:resnet8x4 --image 32,32,3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from kd_jax import runtime

runtime.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kd_jax import checkpoint, data, machine, models, objective, parallel, train  # noqa: E402

RECIPE = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
              schedule="cosine")


def _time(fn, repeats=5):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure(teacher_name, student_name, image, batch, save_every):
  mesh = parallel.data_mesh()
  teacher, student = models.create(teacher_name, 10), models.create(student_name, 10)
  t_vars = parallel.replicate(teacher.init(jax.random.key(1), jnp.zeros((1, *image))), mesh)
  obj = objective.build({"ce_weight": 0.1, "terms": [dict(method="kd", weight=0.9)]},
                        total_steps=1000, steps_per_epoch=100)
  opt = train.make_optimizer(RECIPE, train.learning_rate_schedule(RECIPE, 100, 1000))
  fresh = lambda: parallel.replicate(train.init_state(student, opt, image,
                                                      jax.random.key(0)), mesh)
  state = fresh()
  rng = np.random.default_rng(0)
  b = parallel.to_global({"image": rng.normal(size=(batch, *image)).astype(np.float32),
                          "label": rng.integers(0, 10, batch).astype(np.int32)}, mesh)
  t0 = time.perf_counter()
  step_fn = train.make_train_step(student, teacher, obj, opt, mesh)
  state, _ = step_fn(state, t_vars, b, train.step_rng(0, 0))
  jax.block_until_ready(state)
  first_step = time.perf_counter() - t0

  def one_step():
    nonlocal state
    state, _ = step_fn(state, t_vars, b, train.step_rng(0, 1))
    jax.block_until_ready(state)
  one_step()
  step_s = _time(one_step, 20)
  with tempfile.TemporaryDirectory() as d:
    ckpt = checkpoint.Checkpointer(os.path.join(d, "c"), keep=2)
    counter = iter(range(1, 10_000))
    save_s = _time(lambda: ckpt.save(next(counter), state))
    restore_s = _time(lambda: ckpt.restore(fresh()))
    ckpt.close()
  cfg = data.default_data_config()
  iterator_s = _time(lambda: next(data.train_iterator(
      cfg, global_batch_size=32, seed=0, start_step=1000, process_index=0,
      process_count=1)), 3)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"teacher": teacher_name, "student": student_name, "batch": batch,
          "student_params": int(n_params), "step_ms": 1e3 * step_s,
          "save_ms": 1e3 * save_s, "save_every_steps": save_every,
          "checkpoint_overhead": save_s / (save_every * step_s),
          "restore_ms": 1e3 * restore_s, "iterator_resume_ms": 1e3 * iterator_s,
          "first_step_s": first_step,
          "resume_s": restore_s + iterator_s + first_step}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", default="wrn_16_2:resnet8")
  p.add_argument("--image", default="8,8,1")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--save_every", type=int, default=100)
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                 help="folder for checkpoint_overhead.{json,md} ('' to write nothing)")
  args = p.parse_args(argv)
  image = tuple(int(v) for v in args.image.split(","))
  rows = [measure(*pair.split(":"), image, args.batch, args.save_every)
          for pair in args.pairs.split(",")]
  lines = ["| teacher → student | params | step ms | save ms | overhead | restore ms | "
           "iterator resume ms | first step s | resume s |", "|---" * 9 + "|"]
  lines += [f"| {r['teacher']} → {r['student']} | {r['student_params']} | "
            f"{r['step_ms']:.2f} | {r['save_ms']:.1f} | {100 * r['checkpoint_overhead']:.2f}% | "
            f"{r['restore_ms']:.1f} | {r['iterator_resume_ms']:.1f} | "
            f"{r['first_step_s']:.2f} | {r['resume_s']:.2f} |" for r in rows]
  lines.append(f"\n(overhead = one save / {args.save_every} steps; device: "
               f"{jax.devices()[0]}; host: {machine.describe()})")
  table = "\n".join(lines)
  if args.results:
    machine.write_results(args.results, "checkpoint_overhead", rows, table)
  print(json.dumps(rows, indent=2) if args.json else table)


if __name__ == "__main__":
  sys.exit(main())
