"""The embedded default: distill on scikit-learn's bundled 8×8 digits, offline.

A wrn_16_2 teacher (0.70M parameters) is trained on the training split (1,438 images,
the last 10% of them held out for validation); then a resnet8 student (0.08M) gets a
small labelled budget — the first 20% of the training split (288 images, again with
its last 10% held out), the regime where an edge model is refined from few labelled
examples and a teacher's soft targets carry the most information. The student is
trained twice from the same initialisation, with cross-entropy alone (vanilla) and with
Hinton KD (CE weight 0.1 + KD weight 0.9, T=4); every phase keeps its best checkpoint
by validation accuracy; all are evaluated on the 359 test images, and the distilled
one is exported to TFLite fp32 and int8.

Run (about 2 minutes on 2 CPU cores):
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
  c.mixed_precision = False  # True: bfloat16 compute, float32 params/optimizer/losses

  c.data = data.default_data_config()  # kd_digits, with its own defaults
  # The last 10% of the teacher's training split is held out for validation (the
  # student validates on its own split, below): evaluated every
  # `validation.every_steps`, it picks each phase's best checkpoint; the test split
  # gives the final figures of the last and of the best model.
  c.data.validation_fraction = 0.1
  c.validation = ml_collections.ConfigDict(dict(every_steps=40, metric="accuracy"))

  recipe = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="cosine", decay_epochs=(), decay_factor=0.1,
                warmup_epochs=0, batch_size=64, epochs=30, checkpoint_every_steps=100)

  c.teacher = ml_collections.ConfigDict(dict(
      name="wrn_16_2", checkpoint=config_dict.placeholder(str),
      train_split=config_dict.placeholder(str),
      validation_split=config_dict.placeholder(str), kwargs={},
      bf16_forward=False))  # True: the teacher's forward pass in bfloat16
  c.teacher.train = ml_collections.ConfigDict(recipe)
  # The student's labelled budget: a slice of the training split (TFDS split syntax);
  # unset, it trains on data.train_split like the teacher.
  c.student = ml_collections.ConfigDict(dict(
      name="resnet8", kwargs={}, train_split=config_dict.placeholder(str),
      validation_split=config_dict.placeholder(str)))
  c.student.train_split = "train[:20%]"
  # The student's checkpoints are selected on 144 held-out labelled digits next to its
  # budget rather than on a tenth of its 288 training labels.
  c.student.validation_split = "train[20%:30%]"
  c.train = ml_collections.ConfigDict(recipe)
  c.train.update(batch_size=32, epochs=60)
  c.train_vanilla = True

  # objective = ce_weight · CE + Σ weight · term
  c.distill = ml_collections.ConfigDict(dict(
      ce_weight=0.1, terms=[dict(method="kd", weight=0.9, temperature=4.0)],
      # True: teacher logits computed once for the training split and reused
      # (needs data.augment='none'; kd_jax/teacher_cache.py).
      cache_teacher_logits=False))
  # Self-paced weights of the distilled student's CE and KD (kd_jax/objective.py):
  # kind none | hard | linear | soft, e.g. --config.distill.self_paced.kind=hard.
  c.distill.self_paced = ml_collections.ConfigDict(dict(
      kind="none", start_threshold=2.0, final_threshold=6.0, full_at_epoch=30.0,
      softness=0.25))
  # Teacher-ranked curriculum for the distilled student (kd_jax/data/curriculum.py):
  # pacing none | linear | root | geometric | step, e.g. --config.curriculum.pacing=root.
  c.curriculum = ml_collections.ConfigDict(dict(
      pacing="none", scoring="teacher_loss", start_fraction=0.3, full_at_epoch=30.0,
      stages=4))

  # Compression after distillation (kd_jax/edge/phases.py), each starting from the
  # distilled student, guided by the same teacher and objective; off here,
  # experiments/digits_edge.py turns them on. `train` overrides c.train's recipe.
  c.edge = ml_collections.ConfigDict(dict(
      qat=dict(enabled=False, bits=8, train=dict(epochs=15, learning_rate=0.01)),
      prune=dict(enabled=False, flops_ratio=0.5, criterion="bn_scale",
                 train=dict(epochs=30, learning_rate=0.02)),
      exits=dict(enabled=False, taps=("stage_1", "stage_2"), hidden=64, steps=600,
                 batch_size=32, learning_rate=0.01, temperature=4.0, ce_weight=0.1,
                 kd_weight=0.9, thresholds=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.01)),
  ))

  c.export = ml_collections.ConfigDict(dict(
      variants=("fp32", "int8"), num_calibration_images=256, latency_runs=50))

  if variant == "tiny":  # seconds, for tests and smoke runs
    c.teacher.name = "resnet8"
    c.teacher.train.update(epochs=1, batch_size=32, checkpoint_every_steps=10)
    c.train.update(epochs=3, batch_size=32, checkpoint_every_steps=10)
    c.log_every_steps = 5
    c.validation.every_steps = 10
    c.export.num_calibration_images = 32
    c.export.latency_runs = 5
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/digits.py; use '' or 'tiny'")
  return c
