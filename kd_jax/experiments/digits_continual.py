"""Continual update on digits: a student of digits 0-4 learns 5-9 from a small budget.

The wrn_16_2 teacher knows all ten digits. The resnet8 student is distilled (CE + KD,
experiments/digits.py's objective and recipe, 20 epochs) on the 720 training images of
digits 0-4 only: the deployed model. It is then fine-tuned for 10 epochs on 20% of the
training images of each of digits 5-9 (145 images), three ways: plain cross-entropy,
CE + an anchor to the deployed student (Learning without Forgetting on the logits of
0-4), and CE + KD to the teacher (kd_jax/workflows/continual.py). `summary.json` gives every
model's accuracy on the old digits' test images, the new ones' and all.

Run (about 5 minutes on 2 CPU cores with a reused teacher: add
--config.teacher.checkpoint=DIR, DIR from `kd-jax train-teacher --workdir=DIR`):
  kd-jax distill --config=experiments/digits_continual.py --workdir=runs/digits_continual
Tiny variant for tests: --config=experiments/digits_continual.py:tiny
"""
from kd_jax import configs


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/digits_continual.py; "
                     "use '' or 'tiny'")
  c = configs.experiment_config("digits", variant)
  c.workflow = "continual"
  c.train_vanilla = False
  # The continual block's defaults (kd_jax/workflows/continual.py): digits 0-4 known,
  # 5-9 learnt from 20% of their images, 10 epochs, three anchors.
  c.continual.update(old_classes=(0, 1, 2, 3, 4), new_classes=(5, 6, 7, 8, 9),
                     new_percent=20)
  if variant == "tiny":
    c.continual.train.epochs = 1.0
    c.continual.anchors = ("none", "student")
  else:  # 720 images of digits 0-4 for 20 epochs: about the steps of digits.py's run
    c.train.epochs = 20
  return c
