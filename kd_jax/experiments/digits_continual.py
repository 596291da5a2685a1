"""Continual updates on digits: a student of digits 0-3 learns 4-5, 6-7 and 8-9 in turn.

The wrn_16_2 teacher knows all ten digits. The resnet8 student is distilled (CE + KD,
experiments/digits.py's objective and recipe, 20 epochs) on the training images of
digits 0-3 only: the deployed model. Three updates follow, each trained for 10 epochs
on the first half of the training images of two new digits (about 72 images), in eight
sequences (kd_jax/workflows/continual.py): plain fine-tuning, Learning without
Forgetting, KD to the teacher, a 60-image replay buffer and online EWC, all training
every parameter, and LwF training only the classifier, only BatchNorm (+ classifier)
or only the last stage (+ classifier). `summary.json` gives each sequence's accuracy
matrix, average accuracy, backward and forward transfer, and the bytes each update
trained and ships. Variant `:domain` is domain-incremental instead: clean digits
deployed, then motion blur and Gaussian noise (severity 3) over all ten digits, the
same sequences but replay (class-incremental only).

Run (about 10 minutes on 2 CPU cores with a reused teacher: add
--config.teacher.checkpoint=DIR, DIR from `kd-jax train-teacher --workdir=DIR`):
  kd-jax distill --config=experiments/digits_continual.py --workdir=runs/digits_continual
  kd-jax distill --config=experiments/digits_continual.py:domain \
      --workdir=runs/digits_continual_domain
Tiny variant for tests: --config=experiments/digits_continual.py:tiny
"""
from kd_jax import configs


def get_config(variant: str = ""):
  if variant not in ("", "tiny", "domain"):
    raise ValueError(f"unknown variant {variant!r} of experiments/digits_continual.py; "
                     "use '', 'tiny' or 'domain'")
  c = configs.experiment_config("digits", "tiny" if variant == "tiny" else "")
  c.workflow = "continual"
  c.train_vanilla = False
  # The continual block's defaults (kd_jax/workflows/continual.py): digits 0-3 known,
  # then 4-5, 6-7, 8-9, each from half of their training images, 10 epochs.
  c.continual.update(tasks=((0, 1, 2, 3), (4, 5), (6, 7), (8, 9)), new_percent=50)
  if variant == "tiny":
    c.continual.train.epochs = 1.0
    c.continual.runs = ("lwf:all", "replay:head", "ewc:last_stage", "teacher:batchnorm")
    c.continual.replay_size = 8
  else:  # 576 images of digits 0-3 for 20 epochs: about the steps of digits.py's run
    c.train.epochs = 20
  if variant == "domain":
    c.continual.mode = "domain"
    c.continual.runs = tuple(r for r in c.continual.runs if not r.startswith("replay"))
  return c
