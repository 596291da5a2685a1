"""The digits default trained with edge-condition augmentation: a camera's defects.

The default digits run (experiments/digits.py) with every edge op that changes a
grayscale image applied to the training images, each with probability 0.2 at a
severity drawn from 1..5: low light, motion blur, Gaussian and shot noise, JPEG, cutout.
Teacher and student see the same corrupted image in a distillation step (and a teacher
trained by this run learns on them too). Evaluate the result under the same
corruptions with `kd-jax evaluate --robustness`.

Run (about 3 minutes on 2 CPU cores, then about a minute for the robustness table):
  kd-jax distill --config=experiments/digits_robust.py --workdir=runs/digits_robust
  kd-jax evaluate --workdir=runs/digits_robust --robustness
With the teacher-ranked curriculum as well: add --config.curriculum.pacing=root.
Tiny variant for smoke runs: --config=experiments/digits_robust.py:tiny
"""
from kd_jax import configs


EDGE_OPS = ("low_light", "motion_blur", "gaussian_noise", "shot_noise", "jpeg", "cutout")


def get_config(variant: str = ""):
  c = configs.experiment_config("digits", variant)
  c.data.edge_augment = tuple(dict(op=op, prob=0.2, severity=(1, 5)) for op in EDGE_OPS)
  return c
