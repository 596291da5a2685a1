"""Teacher selection on CIFAR-100: what the CRD benchmark's teachers cost, and a pick.

Profiles the five teachers of the CRD benchmark (resnet32x4, wrn_40_2, vgg13,
resnet56, resnet110) on 32×32×3 input with 100 classes: parameters, MACs, peak
activation memory, JAX throughput on this host, TFLite fp32 and int8 latency and size
(see kd_jax/profile.py). Top-1 is the published CIFAR-100 number of each teacher
(`c.published`, CRD Tables 1–2). With no dataset (`c.data.name` None) int8 is
calibrated on noise and a checkpoint folder's saved top-1 is used; with
`--config.data.name=cifar100` (prepared in `data.data_dir`) int8 is calibrated on
CIFAR-100 training images and every candidate whose weights are at hand (a checkpoint
folder, or MODEL=FILE.pth) is measured on the test split. The recommendation is the
most accurate teacher whose int8 TFLite latency fits `recommend.latency_budget_ms`.

Run (4–6 minutes on 2 busy CPU cores, most of it TFLite conversion and calibration):
  kd-jax profile --config=experiments/profile_cifar.py --workdir=runs/profile_cifar
Your own teachers (names or `kd-jax train-teacher` workdirs, comma-separated):
  kd-jax profile --config.candidates=resnet56,runs/teacher_r32x4 \
      --config.recommend.latency_budget_ms=5 --workdir=runs/profile_mine
Published PyTorch checkpoints (RepDistiller's), measured on the CIFAR-100 test split:
  kd-jax profile --config.data.name=cifar100 --config.data.data_dir=DIR \
      --config.candidates=resnet32x4=ckpt/resnet32x4_vanilla/ckpt_epoch_240.pth,resnet56 \
      --workdir=runs/profile_published
The tests run `get_config('tiny')` (two small models on the bundled 8×8×1 digits, whose
test split measures checkpoint candidates and whose training images calibrate int8):
  kd-jax profile --config=experiments/profile_cifar.py:tiny --workdir=runs/profile_tiny
"""
import ml_collections
from ml_collections import config_dict

from kd_jax import data
from kd_jax.experiments import cifar100_crd


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.candidates = "resnet32x4,wrn_40_2,vgg13,resnet56,resnet110"
  # The dataset that measures candidates and calibrates int8; None: noise, saved top-1s.
  c.data = data.default_data_config()
  c.data.name = config_dict.placeholder(str)
  c.eval_batch_size = 256
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
    c.data.name = "kd_digits"
    c.eval_batch_size = 128
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
