"""Two views of each digit: the teacher and the student need not see the same image.

Variants (each also as `VARIANT:tiny`):
  clean_teacher      the student trains on corrupted digits (motion blur, Gaussian
                     noise; each p = 0.5, severity 1–5), the teacher sees the same
                     crop without the corruption (`data.views` 'clean', `same_crop`):
                     KD toward corruption robustness from the clean image's soft labels
  mlkd               MLKD's two-view step (Jin et al., CVPR 2023): a weak view (the
                     default crop) and a strong one (crop + JPEG, cutout, noise, low
                     light: this pipeline's stand-in for RandAugment); CE on both,
                     `mlkd` on the weak view, KD at T = 4, 3, 5 on the strong view and at
                     T = 2, 6 on the weak one, as the authors' training step adds them
  function_matching  teacher and student see one aggressively augmented view, mixed
                     with the batch rolled by one (mixup, λ ~ Beta(1, 1) per step, as
                     the authors' big_vision configs), and the student matches the
                     teacher's function (KL at T = 1, no labels, long schedule)
                     (Beyer et al., CVPR 2022)

Run (a reused teacher: add --config.teacher.checkpoint=DIR):
  kd-jax distill --config=experiments/digits_views.py:clean_teacher --workdir=runs/digits_clean_teacher
"""
import ml_collections

from kd_jax import configs

_CORRUPT = ({"op": "motion_blur", "prob": 0.5, "severity": (1, 5)},
            {"op": "gaussian_noise", "prob": 0.5, "severity": (1, 5)})
_STRONG = ({"op": "jpeg", "prob": 0.5, "severity": (1, 5)},
           {"op": "cutout", "prob": 0.5, "severity": (1, 5)},
           {"op": "gaussian_noise", "prob": 0.5, "severity": (1, 5)},
           {"op": "low_light", "prob": 0.5, "severity": (1, 5)})
VARIANTS = ("clean_teacher", "mlkd", "function_matching")


def get_config(variant: str = "clean_teacher") -> ml_collections.ConfigDict:
  name, flavour = configs.choice_variant(variant, VARIANTS, "experiments/digits_views.py")
  c = configs.experiment_config("digits", flavour)
  if name == "clean_teacher":
    c.data.edge_augment = _CORRUPT
    c.data.views = ({"name": "clean", "same_crop": True},)
    c.distill.teacher_view = "clean"
  elif name == "mlkd":
    c.data.views = ({"name": "strong", "edge_augment": _STRONG},)
    c.distill.update(ce_weight=0.1, ce_views=("image", "strong"), terms=[
        dict(method="mlkd", weight=0.9),
        *[dict(method="kd", name=f"kd_strong_T{t:g}", weight=0.9, temperature=t,
               student_view="strong") for t in (4.0, 3.0, 5.0)],
        *[dict(method="kd", name=f"kd_T{t:g}", weight=0.9, temperature=t)
          for t in (2.0, 6.0)]])
  else:  # function matching: one aggressive view for both, no labels, a long schedule
    c.data.edge_augment = _STRONG
    c.distill.update(ce_weight=0.0, mixup_alpha=1.0,
                     terms=[dict(method="kd", weight=1.0, temperature=1.0)])
    if not flavour:
      c.train.epochs = 4 * c.train.epochs
  return c
