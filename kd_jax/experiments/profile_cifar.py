"""Teacher selection on CIFAR-100: what the CRD benchmark's teachers cost, and a pick.

Profiles the five teachers of the CRD benchmark (resnet32x4, wrn_40_2, vgg13,
resnet56, resnet110) on synthetic 32×32×3 input with 100 classes: parameters, MACs,
peak activation memory, JAX throughput on this host, TFLite fp32 and int8 latency and
size (see kd_jax/profile.py). Top-1 is the published CIFAR-100 number of each teacher
(`c.published`, CRD Tables 1–2) unless a candidate is a checkpoint folder, whose saved
top-1 is used. The recommendation is the most accurate teacher whose int8 TFLite
latency fits `recommend.latency_budget_ms`.

Run (4–6 minutes on 2 busy CPU cores, most of it TFLite conversion and calibration):
  kd-jax profile --config=experiments/profile_cifar.py --workdir=runs/profile_cifar
Your own teachers (names or `kd-jax train-teacher` workdirs, comma-separated):
  kd-jax profile --config.candidates=resnet56,runs/teacher_r32x4 \
      --config.recommend.latency_budget_ms=5 --workdir=runs/profile_mine
The tests run `get_config('tiny')` (two small models on 8×8×1 digits-shaped input):
  kd-jax profile --config=experiments/profile_cifar.py:tiny --workdir=runs/profile_tiny
"""
import ml_collections

from kd_jax.experiments import cifar100_crd


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.candidates = "resnet32x4,wrn_40_2,vgg13,resnet56,resnet110"
  c.dataset = "cifar100"  # a checkpoint candidate must have been evaluated on it
  c.input_shape = (32, 32, 3)
  c.num_classes = 100
  c.batch_size = 64  # JAX throughput batch
  c.min_seconds = 2.0  # JAX throughput: timed for at least this long after warm-up
  c.quantizations = ("fp32", "int8")
  c.latency_runs = 50
  c.num_calibration_images = 8
  c.published = {pair.teacher: pair.baseline_top1[0]
                 for pair in cifar100_crd.PAIRS.values()}
  c.published_source = "published (CRD, ICLR 2020)"
  c.recommend = ml_collections.ConfigDict(dict(
      rule="best_accuracy_under_latency", latency="tflite_int8", latency_budget_ms=10.0,
      min_accuracy=75.0))

  if variant == "tiny":  # seconds, for tests and smoke runs
    c.candidates = "resnet8,wrn_16_1"
    c.dataset = "kd_digits"
    c.input_shape = (8, 8, 1)
    c.num_classes = 10
    c.batch_size = 8
    c.min_seconds = 0.1
    c.latency_runs = 5
    c.num_calibration_images = 2
    c.published = {}
    c.recommend.latency_budget_ms = 1000.0
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/profile_cifar.py; "
                     "use '' or 'tiny'")
  return c
