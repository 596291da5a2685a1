"""Decoupled heads on digits: one distilled resnet8 trunk, a digit head and task heads.

The wrn_16_2 teacher and the 20% labelled budget of experiments/digits.py; the tasks
are declared below over the ten digits (kd_jax/workflows/heads.py): `parity` (even /
odd) is trained with the trunk, `large` (digit >= 5) is added afterwards to the
frozen trunk and trained alone (both label maps); `loops` (closed loops in the
written digit: none, one or two, a map by class name) is declared for the tiny
variant, which adds it too. Phases: teacher, the single-head distilled student
(baseline), the trunk with the parity head (CE + KD + FitNet on stage_2 + grouped KD
of the head), the added head (grouped KD only, 30 epochs), and one fp32 TFLite model
of the trunk with the digit and large heads (`<workdir>/export/heads_digit+large_fp32.tflite`).
`summary.json` gives each model's accuracy on the three tasks.

Run (about 5 minutes on 2 CPU cores with a reused teacher: add
--config.teacher.checkpoint=DIR, DIR from `kd-jax train-teacher --workdir=DIR`):
  kd-jax distill --config=experiments/digits_heads.py --workdir=runs/digits_heads
Tiny variant for tests: --config=experiments/digits_heads.py:tiny
"""
from kd_jax import configs


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/digits_heads.py; "
                     "use '' or 'tiny'")
  c = configs.experiment_config("digits", variant)
  c.workflow = "heads"
  c.train_vanilla = False
  c.distill.terms = [
      dict(method="kd", weight=0.9, temperature=4.0),
      dict(method="fitnet", weight=10.0, student_tap="stage_2", teacher_tap="stage_2",
           adapter="conv1x1"),
  ]
  # The heads block's defaults (kd_jax/workflows/heads.py): heads on stage_3, `parity`
  # trained with the trunk, `large` added afterwards for 30 epochs, the digit and large
  # heads exported.
  c.heads.tasks = dict(
      parity=(0, 1, 0, 1, 0, 1, 0, 1, 0, 1), large=(0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
      # By class name: 'none' < 'one' < 'two' number the task classes 0, 1, 2.
      loops=dict(map={"0": "one", "1": "none", "2": "none", "3": "none", "4": "one",
                      "5": "none", "6": "one", "7": "none", "8": "two", "9": "one"}))
  c.heads.update(base="digit", tap="stage_3", joint=("parity",), added=("large",),
                 export=("digit", "large"))
  if variant == "tiny":
    c.heads.train.epochs = 2.0
    c.heads.added = ("large", "loops")
    c.heads.export = ("digit", "loops")
  return c
