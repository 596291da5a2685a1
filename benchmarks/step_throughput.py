"""Images per second of the distillation step, against its limit and a PyTorch step.

For teacher → student pairs at CIFAR shape (32×32×3, 100 classes) and each batch size,
measures kd_jax's own KD train step (`train.make_train_step`, the step `kd-jax distill`
runs: CE 0.1 + Hinton KD 0.9 at T=4, SGD momentum 0.9, weight decay 5e-4), the
student-only step (CE) and the teacher forward (inference mode), in alternating rounds
so that a busy machine slows all of them alike, and reports medians. Also: first-step
compile time, KD step time over (teacher forward + student step) time (≤ 1 means the
KD step does no work beyond its two parts), achieved GFLOP/s (XLA's cost analysis of
the KD step), peak memory of the KD step (XLA's memory analysis), and the tf.data
training pipeline alone (CIFAR-shaped mock data, random crop with 4-pixel padding and
horizontal flips) against the KD step it feeds.

With --torch, and only where torch is importable, the same KD step of RepDistiller's
PyTorch definitions of the same models (eager, channels-last, which is PyTorch's faster
CPU layout) runs in the same rounds; the models' parameter counts are checked equal.
On a GPU backend PyTorch runs on CUDA too (cuDNN autotuning on, as in RepDistiller),
and each timed sample repeats a step for at least MIN_SAMPLE_SECONDS.

  python benchmarks/step_throughput.py                # three pairs, batch 64 and 128
  python benchmarks/step_throughput.py --pairs resnet32x4:resnet8x4 --batch 64 --json
  python benchmarks/step_throughput.py --torch --bf16_teacher
"""
from __future__ import annotations

import argparse
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

from kd_jax import models, objective, parallel, train  # noqa: E402
from kd_jax import machine  # noqa: E402

PAIRS = "resnet32x4:resnet8x4,wrn_40_2:wrn_16_2,vgg13:MobileNetV2"
IMAGE = (32, 32, 3)
NUM_CLASSES = 100
RECIPE = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
              schedule="step", decay_epochs=(150, 180, 210), decay_factor=0.1)
KD = {"ce_weight": 0.1, "terms": [dict(method="kd", weight=0.9, temperature=4.0)]}
CE = {"ce_weight": 1.0}


# A timed sample runs a step repeatedly for at least this long: on an accelerator one
# step takes milliseconds, and timing it alone would measure the dispatch and the wait.
MIN_SAMPLE_SECONDS = 0.2


def _time_once(fn, wait, times: list[float], repeats: int) -> None:
  """Appends the mean wall time of `repeats` calls of `fn`, waiting for the last."""
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  wait(out)
  times.append((time.perf_counter() - t0) / repeats)


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


_INITIAL = {}  # (teacher, student) -> (teacher variables, student train state) on host
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _step_flops(make_step, mesh, args) -> float:
  """FLOPs of one step: the per-device program before backend passes, times devices.

  `make_step(mesh)` builds the step of the `models.portable` models (the `lax` ops, so
  that a depthwise convolution counts as one). Some GPU builds give no analysis before
  compilation; the count does not depend on the backend, so the step is then lowered
  for the host CPU.
  """
  cost = make_step(mesh).lower(*args).cost_analysis()
  if not cost or "flops" not in cost:
    cpus = jax.devices("cpu")
    if len(cpus) < mesh.size:
      return float("nan")
    cpu_mesh = jax.sharding.Mesh(np.array(cpus[:mesh.size]).reshape(mesh.devices.shape),
                                 mesh.axis_names)
    def on_cpu(a):
      spec = getattr(a.sharding, "spec", jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(a.shape, a.dtype,
                                  sharding=jax.sharding.NamedSharding(cpu_mesh, spec))
    cost = make_step(cpu_mesh).lower(*jax.tree.map(on_cpu, args)).cost_analysis() or {}
  return cost.get("flops", float("nan")) * mesh.size


class JaxPair:
  """Compiled teacher forward, student step and KD step of one pair and batch size."""

  def __init__(self, teacher_name: str, student_name: str, batch: int,
               bf16_teacher: bool):
    mesh = parallel.data_mesh()
    teacher = models.create(teacher_name, NUM_CLASSES)
    student = models.create(student_name, NUM_CLASSES)
    start = time.perf_counter()
    opt = train.make_optimizer(RECIPE, train.learning_rate_schedule(RECIPE, 781, 187_440))
    if (teacher_name, student_name) not in _INITIAL:  # the same for every batch size
      # Run once: compiled without backend optimisations, which halves its compile time.
      once = functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
      _INITIAL[teacher_name, student_name] = jax.device_get((
          once(lambda key: teacher.init(key, jnp.zeros((1, *IMAGE)), train=False))(
              jax.random.key(1)),
          once(lambda key: train.init_state(student, opt, IMAGE, key))(
              jax.random.key(0))))
    t_vars, state = _INITIAL[teacher_name, student_name]
    self.t_vars = parallel.replicate(t_vars, mesh)
    rng = np.random.default_rng(0)
    self.batch = parallel.to_global(
        {"image": rng.normal(size=(batch, *IMAGE)).astype(np.float32),
         "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}, mesh)
    self.rng = train.step_rng(0, 0)
    init_seconds = time.perf_counter() - start
    forward_teacher = teacher.clone(dtype=jnp.bfloat16) if bf16_teacher else teacher
    self.teacher_forward = jax.jit(
        lambda v, x: forward_teacher.apply(v, x, train=False)[0]).lower(
            self.t_vars, self.batch["image"]).compile()
    self.steps, self.states = {}, {}
    for name, config in (("student", CE), ("kd", KD)):
      obj = objective.build(config, total_steps=187_440, steps_per_epoch=781)
      make_step = functools.partial(train.make_train_step, student, teacher, obj, opt,
                                    teacher_bf16=bf16_teacher)
      step = make_step(mesh)
      # Each step donates its own copy of the state.
      self.states[name] = parallel.replicate(jax.tree.map(np.array, state), mesh)
      t0 = time.perf_counter()
      lowered = step.lower(self.states[name], self.t_vars, self.batch, self.rng)
      self.steps[name] = lowered.compile()
      if name == "student":
        student_seconds = time.perf_counter() - t0
      else:
        self.compile_seconds = time.perf_counter() - t0
        self.flops = _step_flops(functools.partial(
            train.make_train_step, models.portable(student), models.portable(teacher),
            obj, opt, teacher_bf16=bf16_teacher), mesh, (
                self.states[name], self.t_vars, self.batch, self.rng))
    _progress(f"{teacher_name} -> {student_name}, batch {batch}: initialised and "
              f"compiled in {time.perf_counter() - start:.0f} s (init "
              f"{init_seconds:.0f} s, student step {student_seconds:.0f} s, "
              f"KD step {self.compile_seconds:.0f} s)")
    memory = self.steps["kd"].memory_analysis()
    self.peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    self.student_params = sum(x.size for x in jax.tree.leaves(self.states["kd"].params))
    self.teacher_params = sum(x.size for x in jax.tree.leaves(self.t_vars["params"]))

  def run(self, name: str):
    if name == "teacher":
      return self.teacher_forward(self.t_vars, self.batch["image"])
    self.states[name], metrics = self.steps[name](self.states[name], self.t_vars,
                                                  self.batch, self.rng)
    return metrics


def _torch_models():
  """RepDistiller's CIFAR models (models/resnet.py, wrn.py, vgg.py, mobilenetv2.py)."""
  import torch.nn.functional as F
  from torch import nn

  def conv_bn(cin, cout, k=3, stride=1, groups=1, bias=False, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)

  class Head(nn.Module):
    def __init__(self, body, width, num_classes):
      super().__init__()
      self.body, self.fc = body, nn.Linear(width, num_classes)

    def forward(self, x):
      return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.body = nn.Sequential(conv_bn(cin, cout, 3, stride),
                                conv_bn(cout, cout, 3, relu=False))
      self.shortcut = (conv_bn(cin, cout, 1, stride, relu=False)
                       if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return F.relu(self.body(x) + self.shortcut(x))

  class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x):
      act = F.relu(self.bn1(x))
      out = self.conv2(F.relu(self.bn2(self.conv1(act))))
      return out + (x if self.shortcut is None else self.shortcut(act))

  class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
      super().__init__()
      hidden = cin * expansion
      self.body = nn.Sequential(conv_bn(cin, hidden, 1),
                                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                conv_bn(hidden, cout, 1, relu=False))
      self.residual = stride == 1 and cin == cout

    def forward(self, x):
      return x + self.body(x) if self.residual else self.body(x)

  def resnet(depth, widths, num_classes):
    layers, cin = [conv_bn(3, widths[0])], widths[0]
    for i, width in enumerate(widths[1:]):
      for j in range((depth - 2) // 6):
        layers.append(BasicBlock(cin, width, 2 if i and not j else 1))
        cin = width
    return Head(nn.Sequential(*layers), cin, num_classes)

  def wrn(depth, k, num_classes):
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
    for i in range(3):
      for j in range((depth - 4) // 6):
        layers.append(PreActBlock(cin, (16 << i) * k, 2 if i and not j else 1))
        cin = (16 << i) * k
    return Head(nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU()), cin, num_classes)

  def vgg(blocks, num_classes):
    layers, cin = [], 3
    for k, widths in enumerate(blocks):
      if k in (1, 2, 3):
        layers.append(nn.MaxPool2d(2))
      for width in widths:
        layers.append(conv_bn(cin, width, bias=True))
        cin = width
    return Head(nn.Sequential(*layers), cin, num_classes)

  def mobilenetv2(num_classes, expansion=6, width=0.5):
    layers, cin = [conv_bn(3, int(32 * width), 3, 2)], int(32 * width)
    for t, channels, blocks, stride in models.mobilenetv2.SETTINGS:
      for j in range(blocks):
        layers.append(InvertedResidual(cin, int(channels * width), stride if j == 0 else 1,
                                       t or expansion))
        cin = int(channels * width)
    return Head(nn.Sequential(*layers, conv_bn(cin, 1280, 1)), 1280, num_classes)

  return {"resnet8x4": lambda c: resnet(8, (32, 64, 128, 256), c),
          "resnet32x4": lambda c: resnet(32, (32, 64, 128, 256), c),
          **{f"wrn_{d}_{k}": (lambda c, d=d, k=k: wrn(d, k, c))
             for d in (16, 40) for k in (1, 2)},
          **{f"vgg{d}": (lambda c, b=b: vgg(b, c)) for d, b in models.vgg.CONFIGS.items()},
          "MobileNetV2": mobilenetv2}


class TorchPair:
  """The same KD step in PyTorch eager: teacher under no_grad, student, SGD."""

  def __init__(self, teacher_name: str, student_name: str, batch: int,
               expected_params: tuple[int, int], device: str):
    import torch
    import torch.nn.functional as F
    if device == "cuda":
      torch.backends.cudnn.benchmark = True  # as RepDistiller's training scripts set
    zoo = _torch_models()
    if teacher_name not in zoo or student_name not in zoo:
      raise ValueError(f"--torch knows {', '.join(zoo)}; drop --torch for this pair")
    self.teacher = zoo[teacher_name](NUM_CLASSES).eval()
    self.student = zoo[student_name](NUM_CLASSES).train()
    counts = tuple(sum(p.numel() for p in m.parameters())
                   for m in (self.teacher, self.student))
    if counts != expected_params:
      raise AssertionError(f"PyTorch parameter counts {counts} != kd_jax's {expected_params}")
    for m in (self.teacher, self.student):
      m.to(device=device, memory_format=torch.channels_last)
    self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9,
                               weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    self.x = torch.randn(batch, 3, *IMAGE[:2], generator=gen).contiguous(
        memory_format=torch.channels_last).to(device)
    self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    self.torch, self.F, self.device = torch, F, device

  def run(self):
    F = self.F
    with self.torch.no_grad():
      t_logits = self.teacher(self.x)
    s_logits = self.student(self.x)
    kd = F.kl_div(F.log_softmax(s_logits / 4, 1), F.softmax(t_logits / 4, 1),
                  reduction="batchmean") * 16
    loss = 0.1 * F.cross_entropy(s_logits, self.y) + 0.9 * kd
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def wait(self, _):
    if self.device == "cuda":
      self.torch.cuda.synchronize()


def pipeline_images_per_second(batch: int, steps: int = 100) -> float | None:
  """The training tf.data pipeline alone on mock CIFAR-100 with standard augmentation.

  None where tensorflow-datasets is not installed (an accelerator image without it).
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return None

  from kd_jax import data
  config = data.default_data_config()
  config.name = "cifar100"  # defaults: 'cifar' augmentation, pad 4, flips
  with tfds.testing.mock_data(num_examples=max(50 * batch, 5000)):
    batches = data.train_iterator(config, global_batch_size=batch, seed=0,
                                  process_index=0, process_count=1)
    for _ in range(steps // 4):  # fills the cache and the prefetch buffer
      next(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(batches)
    return steps * batch / (time.perf_counter() - t0)


def measure(teacher_name: str, student_name: str, batch: int, rounds: int,
            with_torch: bool, bf16_teacher: bool) -> dict:
  pair = JaxPair(teacher_name, student_name, batch, bf16_teacher)
  kinds = ["teacher", "student", "kd"]
  runners = {k: (lambda k=k: pair.run(k), jax.block_until_ready) for k in kinds}
  if with_torch:
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    torch_pair = TorchPair(teacher_name, student_name, batch,
                           (pair.teacher_params, pair.student_params), device)
    runners["torch"] = (torch_pair.run, torch_pair.wait)
  repeats, times, start = {}, {k: [] for k in runners}, time.perf_counter()
  for kind, (fn, wait) in runners.items():  # warm-up, then as many calls as fill a sample
    wait(fn())
    _time_once(fn, wait, times[kind], 1)
    repeats[kind] = max(1, math.ceil(MIN_SAMPLE_SECONDS / times[kind][0]))
    if repeats[kind] > 1:  # a fast step: the single call was too short to count
      times[kind].clear()
  for _ in range(rounds):
    for kind, (fn, wait) in runners.items():
      if len(times[kind]) < rounds:
        _time_once(fn, wait, times[kind], repeats[kind])
  seconds = {k: float(np.median(v)) for k, v in times.items()}
  _progress(f"  warmed up and timed in {time.perf_counter() - start:.0f} s; img/s: " +
            ", ".join(f"{k} {batch / t:.1f}" for k, t in seconds.items()))
  row = {"teacher": teacher_name, "student": student_name, "batch": batch,
         "kd_images_per_s": batch / seconds["kd"],
         "student_images_per_s": batch / seconds["student"],
         "teacher_images_per_s": batch / seconds["teacher"],
         "compile_seconds": pair.compile_seconds,
         "kd_over_limit": seconds["kd"] / (seconds["teacher"] + seconds["student"]),
         "gflop_per_s": pair.flops / seconds["kd"] / 1e9,
         "peak_memory_mib": pair.peak_bytes / 2**20}
  if with_torch:
    row["torch_images_per_s"] = batch / seconds["torch"]
    row["kd_over_torch_speed"] = seconds["torch"] / seconds["kd"]
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", default=PAIRS, help="teacher:student,...")
  p.add_argument("--batch", default="64,128", help="batch sizes, comma-separated")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds (medians)")
  p.add_argument("--torch", action="store_true", help="also time PyTorch eager")
  p.add_argument("--bf16_teacher", action="store_true",
                 help="teacher forward in bfloat16 (train.make_train_step(teacher_bf16))")
  p.add_argument("--json", action="store_true")
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(
      __file__)), "results"), help="folder for step_throughput.{json,md} ('' to write "
                 "nothing)")
  args = p.parse_args(argv)
  if args.torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      print("--torch: torch is not importable here; measuring kd_jax only", file=sys.stderr)
      args.torch = False
  batches = [int(b) for b in args.batch.split(",")]
  pipeline = {b: pipeline_images_per_second(b) for b in batches}
  rows = []
  for pair in args.pairs.split(","):
    for batch in batches:
      row = measure(*pair.split(":"), batch, args.rounds, args.torch, args.bf16_teacher)
      row["pipeline_images_per_s"] = pipeline[batch]
      row["pipeline_margin"] = (None if pipeline[batch] is None
                                else pipeline[batch] / row["kd_images_per_s"])
      rows.append(row)
  torch_cols = " torch img/s | KD / torch |" if args.torch else ""
  lines = ["| teacher → student | batch | KD img/s | student img/s | teacher img/s | "
           "compile s | KD / limit | GFLOP/s | peak MiB |" + torch_cols,
           "|---" * (9 + 2 * args.torch) + "|"]
  for r in rows:
    extra = (f" {r['torch_images_per_s']:.1f} | {r['kd_over_torch_speed']:.2f}× |"
             if args.torch else "")
    lines.append(
        f"| {r['teacher']} → {r['student']} | {r['batch']} | {r['kd_images_per_s']:.1f} | "
        f"{r['student_images_per_s']:.1f} | {r['teacher_images_per_s']:.1f} | "
        f"{r['compile_seconds']:.1f} | {r['kd_over_limit']:.2f} | "
        f"{r['gflop_per_s']:.0f} | {r['peak_memory_mib']:.0f} |" + extra)
  for b in batches:
    fastest = max(r["kd_images_per_s"] for r in rows if r["batch"] == b)
    if pipeline[b] is None:
      lines.append(f"tf.data pipeline alone, batch {b}: not measured (tensorflow-datasets "
                   "is not installed)")
      continue
    lines.append(f"tf.data pipeline alone, batch {b}: {pipeline[b]:.0f} img/s "
                 f"({pipeline[b] / fastest:.0f}× what the fastest KD step consumes)")
  teacher_dtype = "bfloat16" if args.bf16_teacher else "float32"
  if args.torch:
    lines.append(f"(PyTorch {sys.modules['torch'].__version__}, JAX {jax.__version__})")
  lines.append(f"(device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s); "
               f"host: {machine.describe()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
               f"teacher forward in {teacher_dtype})")
  table = "\n".join(lines)
  if args.results:
    machine.write_results(args.results, "step_throughput", rows, table)
  print(json.dumps({**machine.stamp(), "rows": rows}, indent=2) if args.json else table)


if __name__ == "__main__":
  sys.exit(main())
