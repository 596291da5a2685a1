"""The embedded default: distill on scikit-learn's bundled 8×8 digits, offline.

A resnet32x4 teacher is trained (or reused), then a resnet8 student is trained twice
from the same initialisation — with cross-entropy alone (vanilla) and with Hinton KD
(CE weight 0.1 + KD weight 0.9, T=4) — evaluated, and exported to TFLite fp32 and int8.

Run (about 3 minutes on 2 CPU cores):
  kd-jax distill --workdir=runs/digits
which is the same as `kd-jax distill` (this config is the default). The tests run
`get_config('tiny')`: `kd-jax distill --config=experiments/digits.py:tiny`.
"""
import ml_collections
from ml_collections import config_dict

from kd_jax import data


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every_steps = 20
  c.eval_batch_size = 128

  c.data = data.default_data_config()  # kd_digits, with its own defaults

  recipe = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="cosine", decay_epochs=(), decay_factor=0.1,
                warmup_epochs=0, batch_size=64, epochs=30, checkpoint_every_steps=100)

  c.teacher = ml_collections.ConfigDict(dict(
      name="resnet32x4", checkpoint=config_dict.placeholder(str),
      train_split=config_dict.placeholder(str), kwargs={}))
  c.teacher.train = ml_collections.ConfigDict(recipe)
  # The student's labelled budget: a slice of the training split (TFDS split syntax);
  # unset, it trains on data.train_split like the teacher.
  c.student = ml_collections.ConfigDict(dict(
      name="resnet8", kwargs={}, train_split=config_dict.placeholder(str)))
  c.train = ml_collections.ConfigDict(recipe)
  c.train_vanilla = True

  # objective = ce_weight · CE + Σ weight · term
  c.distill = ml_collections.ConfigDict(dict(
      ce_weight=0.1, terms=[dict(method="kd", weight=0.9, temperature=4.0)]))

  c.export = ml_collections.ConfigDict(dict(
      variants=("fp32", "int8"), num_calibration_images=256, latency_runs=50))

  if variant == "tiny":  # seconds, for tests and smoke runs
    c.teacher.name = "resnet8"
    for r in (c.teacher.train, c.train):
      r.epochs = 1
      r.batch_size = 32
      r.checkpoint_every_steps = 10
    c.log_every_steps = 5
    c.export.num_calibration_images = 32
    c.export.latency_runs = 5
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/digits.py; use '' or 'tiny'")
  return c
