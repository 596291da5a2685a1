"""Step time of multi-view distillation against the single-view KD step.

For one teacher → student pair at CIFAR shape (32×32×3, 100 classes), times
`train.make_train_step` with the objectives of experiments/digits_views.py on random
batches, in alternating rounds (medians):

  kd             one view: CE 0.1 + KD 0.9 (T=4), teacher and student on `image`
  clean_teacher  the teacher on a second view (`view/clean`), the student on `image`
  two_views      MLKD's step: the student and the teacher each on two views, CE on
                 both, `mlkd` + KD at five temperatures

  python benchmarks/views.py
  python benchmarks/views.py --pair wrn_40_2:wrn_16_2 --batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from kd_jax import runtime

runtime.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kd_jax import machine, models, objective, parallel, train  # noqa: E402

IMAGE = (32, 32, 3)
NUM_CLASSES = 100
RECIPE = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
              schedule="cosine")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OBJECTIVES = {
    "kd": dict(ce_weight=0.1, terms=[dict(method="kd", weight=0.9, temperature=4.0)]),
    "clean_teacher": dict(ce_weight=0.1, teacher_view="clean",
                          terms=[dict(method="kd", weight=0.9, temperature=4.0)]),
    "two_views": dict(ce_weight=0.1, ce_views=("image", "strong"), terms=[
        dict(method="mlkd", weight=0.9),
        *[dict(method="kd", name=f"kd_strong_T{t:g}", weight=0.9, temperature=t,
               student_view="strong") for t in (4.0, 3.0, 5.0)],
        *[dict(method="kd", name=f"kd_T{t:g}", weight=0.9, temperature=t)
          for t in (2.0, 6.0)]]),
}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pair", default="resnet32x4:resnet8x4", help="teacher:student")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps per timed sample")
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=RESULTS,
                 help="folder for views.{json,md} ('' to write nothing)")
  args = p.parse_args()
  teacher_name, student_name = args.pair.split(":")
  mesh = parallel.data_mesh()
  teacher = models.create(teacher_name, NUM_CLASSES)
  student = models.create(student_name, NUM_CLASSES)
  t_vars = parallel.replicate(
      teacher.init(jax.random.key(1), jnp.zeros((1, *IMAGE)), train=False), mesh)
  opt = train.make_optimizer(RECIPE, train.learning_rate_schedule(RECIPE, 100, 10_000))
  rng = np.random.default_rng(0)
  images = lambda: rng.normal(size=(args.batch, *IMAGE)).astype(np.float32)
  batch = parallel.to_global({
      "image": images(), "view/clean": images(), "view/strong": images(),
      "label": rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)}, mesh)
  steps, states = {}, {}
  for name, spec in OBJECTIVES.items():
    obj = objective.build(spec, total_steps=10_000, steps_per_epoch=100)
    state = train.init_state(student, opt, IMAGE, jax.random.key(0), obj, teacher,
                             t_vars, batch_size=args.batch // jax.device_count())
    states[name] = parallel.replicate(state, mesh)
    steps[name] = train.make_train_step(student, teacher, obj, opt, mesh).lower(
        states[name], t_vars, batch, train.step_rng(0, 0)).compile()
    print(f"  compiled {name}", file=sys.stderr)
  times = {name: [] for name in OBJECTIVES}
  for _ in range(args.rounds):
    for name in OBJECTIVES:
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], metrics = steps[name](states[name], t_vars, batch,
                                            train.step_rng(0, 0))
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / args.steps)
  base = statistics.median(times["kd"])
  rows = [{"objective": name, "step_ms": statistics.median(t) * 1e3,
           "images_per_second": args.batch / statistics.median(t),
           "relative_to_kd": statistics.median(t) / base} for name, t in times.items()]
  lines = [f"{teacher_name} → {student_name}, batch {args.batch}, "
           f"{jax.device_count()} {jax.default_backend()} device(s); median of "
           f"{args.rounds} rounds × {args.steps} steps", "",
           "| objective | step (ms) | images/s | × one-view KD |", "|---|---|---|---|"]
  lines += [f"| {r['objective']} | {r['step_ms']:.1f} | {r['images_per_second']:.0f} | "
            f"{r['relative_to_kd']:.2f}× |" for r in rows]
  table = "\n".join(lines) + f"\n\n(host: {machine.describe()}; JAX {jax.__version__})"
  if args.results:
    machine.write_results(args.results, "views", rows, table)
  print(json.dumps({**machine.stamp(), "rows": rows}, indent=1) if args.json else table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
