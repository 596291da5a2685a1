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

from kd_jax import configs


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  # Every key starts at its default (`configs.default_config()`, each block defined by
  # the module that reads it); this experiment sets what it decides.
  c = configs.default_config()
  c.seed = 0
  c.log_every_steps = 20
  c.eval_batch_size = 128

  c.data.name = "kd_digits"  # scikit-learn's digits, offline
  # The last 10% of the teacher's training split is held out for validation (the
  # student validates on its own split, below): evaluated every
  # `validation.every_steps`, it picks each phase's best checkpoint; the test split
  # gives the final figures of the last and of the best model.
  c.data.validation_fraction = 0.1
  c.validation.update(every_steps=40, metric="accuracy")

  # SGD + momentum 0.9, weight decay 5e-4, cosine schedule (train.RECIPE_DEFAULTS).
  recipe = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                schedule="cosine", batch_size=64, epochs=30, checkpoint_every_steps=100)
  c.teacher.name = "wrn_16_2"
  c.teacher.train.update(recipe)
  # The student's labelled budget: a slice of the training split (TFDS split syntax);
  # unset, it trains on data.train_split like the teacher. Its checkpoints are
  # selected on 144 held-out labelled digits next to its budget rather than on a tenth
  # of its 288 training labels.
  c.student.name = "resnet8"
  c.student.train_split = "train[:20%]"
  c.student.validation_split = "train[20%:30%]"
  c.train.update(recipe)
  c.train.update(batch_size=32, epochs=60)
  c.train_vanilla = True

  # objective = ce_weight · CE + Σ weight · term. Other options of the block: label
  # smoothing, cached teacher logits (`cache_teacher_logits`, needs
  # data.augment='none'), self-paced weights (`self_paced.kind` none | hard | linear |
  # soft); the teacher-ranked curriculum is `curriculum.pacing` (none | linear | root |
  # geometric | step), e.g. --config.curriculum.pacing=root.
  c.distill.ce_weight = 0.1
  c.distill.terms = [dict(method="kd", weight=0.9, temperature=4.0)]

  # Compression after distillation (kd_jax/edge/phases.py: QAT, pruning, early exits),
  # each starting from the distilled student, guided by the same teacher and objective;
  # off here, experiments/digits_edge.py turns them on.
  c.export.update(variants=("fp32", "int8"), num_calibration_images=256, latency_runs=50)

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
