"""Domain adaptation on digits: from clean digits to unlabelled motion-blurred ones.

The wrn_16_2 teacher is trained on the clean source; the resnet8 student is distilled
on the clean 20% labelled budget (experiments/digits.py), then adapted on all 1,438
training images under motion blur at severity 3 (a 2.4-pixel trail at a random
angle, kd_jax/data/augment.py) without their labels: 0 · CE + KD (T=4) + FitNet on
stage_2 through a 1x1 conv adapter, 20 epochs from the source student. `summary.json`
gives teacher, source student and adapted student accuracy on the clean and on the
blurred test split (kd_jax/workflows/domain.py).

Run (about 5 minutes on 2 CPU cores with a reused teacher: add
--config.teacher.checkpoint=DIR, DIR from `kd-jax train-teacher --workdir=DIR`):
  kd-jax distill --config=experiments/digits_domain.py --workdir=runs/digits_domain
Tiny variant for tests: --config=experiments/digits_domain.py:tiny
"""
from kd_jax import configs


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/digits_domain.py; "
                     "use '' or 'tiny'")
  c = configs.experiment_config("digits", variant)
  c.workflow = "domain_adaptation"
  c.train_vanilla = False
  # The domain block's defaults (kd_jax/workflows/domain.py): motion blur at severity
  # 3 on the whole training split, 0 · CE + KD + FitNet, 20 epochs.
  c.domain.update(corruption="motion_blur", severity=3, train_split="train")
  if variant == "tiny":
    c.domain.train.epochs = 1.0
  return c
