"""Domain adaptation on digits: from clean digits to unlabelled motion-blurred ones.

The wrn_16_2 teacher is trained on the clean source; the resnet8 student is distilled
on the clean 20% labelled budget (experiments/digits.py), then adapted to the same
images under motion blur at severity 3 (a 2.4-pixel trail at a random angle,
kd_jax/data/augment.py), their blurred twins unlabelled, by each method of
kd_jax/workflows/domain.py: kd (KD + FitNet on the target), pseudo_label, coral, mmd,
adabn (no training) and paired (teacher on the clean image, student on the blurred),
20 epochs each from the distilled student, CE on the clean labelled images kept.
`summary.json` gives every model's accuracy on the clean and the blurred test split
and each method's target gain.

Another target dataset of the same ten classes (a TFDS name or an image folder with
train/ and test/ class subfolders; its labels are used only to measure):
  kd-jax distill --config=experiments/digits_domain.py --workdir=runs/digits_domain \
    --config.domain.target=folder:/path/to/digits_rendered \
    --config.domain.methods="('kd', 'pseudo_label', 'coral', 'mmd', 'adabn')"

Run (about 8 minutes on 2 CPU cores with a reused teacher: add
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
  # The domain block's defaults (kd_jax/workflows/domain.py): every method, 20 epochs;
  # the target is the student's labelled budget under motion blur at severity 3.
  c.domain.update(corruption="motion_blur", severity=3, train_split=c.student.train_split)
  if variant == "tiny":
    c.domain.train.epochs = 1.0
  return c
