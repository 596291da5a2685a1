"""Digits with a composite objective: logit KD plus two feature terms through adapters.

The default digits run (experiments/digits.py) with
  objective = 0.1·CE + 0.9·KD(T annealed 6 → 4)
            + 100·FitNet(student stage_2 → 1×1 conv + BN adapter → teacher stage_2)
            + 0.02·CC(student embedding → linear adapter → teacher embedding)
            + 1000·AT(student stage_3, teacher stage_3)  (linear warm-up over 5 epochs)
The adapters' parameters train with the student and are not exported.

Run (about 3 minutes on 2 CPU cores):
  kd-jax distill --config=experiments/digits_features.py --workdir=runs/digits_features
Tiny variant for tests: --config=experiments/digits_features.py:tiny
"""
from kd_jax import configs


def get_config(variant: str = ""):
  c = configs.experiment_config("digits", variant)
  c.distill.terms = [
      dict(method="kd", weight=0.9, temperature=6.0, temperature_schedule="linear",
           final_temperature=4.0),
      dict(method="fitnet", weight=100.0, student_tap="stage_2", teacher_tap="stage_2",
           adapter="conv1x1"),
      dict(method="correlation_congruence", weight=0.02, adapter="linear"),
      dict(method="attention_transfer", weight=1000.0, student_tap="stage_3",
           teacher_tap="stage_3", schedule="linear_warmup", warmup_epochs=5),
  ]
  return c
