"""ImageNet, resnet34 → resnet18 with KD or DKD: mdistiller's ImageNet recipe.

Variants `kd`, `dkd` (the default is `kd`) and `teacher`, each with a `:tiny` flavour.
The student trains as in mdistiller's configs/imagenet/r34_r18/{kd,dkd}.yaml: 100
epochs, global batch 512, SGD momentum 0.9, lr 0.2 (torchvision's 0.1 per 256 images)
×0.1 at epochs 30/60/90, weight decay 1e-4, Inception crops + flips at 224 pixels
(`augment='imagenet'`), and the objective
  kd   CE 0.5 + KD 0.5, T=1
  dkd  CE 1 + DKD (alpha 1, beta 0.5, T=1), its weight warmed up linearly over 1 epoch.
Published top-1 (`c.published`): teacher 73.31 and student 69.76 (torchvision's
ResNet-34 / ResNet-18, the baselines of the CRD and DKD tables), KD 71.03 and DKD 71.70
(DKD paper, mdistiller's README).

The teacher is an input: no pretrained weights can be downloaded, so train it first
with `kd-jax train-teacher` (torchvision's recipe: 90 epochs, batch 256, lr 0.1 ×0.1 at
30/60, weight decay 1e-4). The distillation variants read it from
`teacher.checkpoint` (default `runs/imagenet_resnet34`) and stop with a one-line error
if it is missing. Needs imagenet2012 prepared for TFDS (--config.data.data_dir=DIR).

  kd-jax train-teacher --config=experiments/imagenet_kd.py:teacher --workdir=runs/imagenet_resnet34
  kd-jax distill --config=experiments/imagenet_kd.py:kd --workdir=runs/imagenet_kd
  kd-jax distill --config=experiments/imagenet_kd.py:dkd --workdir=runs/imagenet_dkd

Expected runtime (an estimate, not a measurement): roughly a day on 8 A100-class GPUs
for the teacher and again for each student. The `:tiny` flavours (e.g.
`imagenet_kd.py:kd:tiny`) run in about a minute on a CPU, on kd_digits with resnet8 models
and train their own teacher.
"""
import ml_collections

from kd_jax import configs

_SOURCE = ("Zhao et al., Decoupled Knowledge Distillation, CVPR 2022 (ImageNet results "
           "as listed in mdistiller's README); teacher and student: torchvision")
_PUBLISHED = dict(teacher=73.31, student=69.76, kd=71.03, dkd=71.70)  # top-1, %
TEACHER_CHECKPOINT = "runs/imagenet_resnet34"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  method, _, flavour = (variant or "kd").partition(":")
  if method not in ("kd", "dkd", "teacher") or flavour not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/imagenet_kd.py; use "
                     "kd, dkd or teacher, optionally followed by :tiny")
  c = configs.default_config()
  c.seed = 0
  c.log_every_steps = 200
  c.eval_batch_size = 256

  c.data.update(name="imagenet2012", augment="imagenet", image_size=224)

  c.teacher.name = "resnet34"
  if method != "teacher":
    c.teacher.checkpoint = TEACHER_CHECKPOINT
  c.teacher.train.update(dict(
      optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=False,
      weight_decay=1e-4, schedule="step", decay_epochs=(30, 60), decay_factor=0.1,
      warmup_epochs=0, batch_size=256, epochs=90, checkpoint_every_steps=5000))
  c.student.name = "resnet18"
  c.train.update(dict(
      optimizer="sgd", learning_rate=0.2, momentum=0.9, nesterov=False,
      weight_decay=1e-4, schedule="step", decay_epochs=(30, 60, 90), decay_factor=0.1,
      warmup_epochs=0, batch_size=512, epochs=100, checkpoint_every_steps=2500))
  c.train_vanilla = False
  if method == "dkd":
    c.distill.update(ce_weight=1.0, terms=[dict(
        method="dkd", weight=1.0, alpha=1.0, beta=0.5, temperature=1.0,
        schedule="linear_warmup", warmup_epochs=1)])
  else:  # kd; the teacher variant only trains the teacher
    c.distill.update(ce_weight=0.5, terms=[dict(method="kd", weight=0.5, temperature=1.0)])

  c.export.update(variants=("fp32", "int8"), num_calibration_images=512, latency_runs=100)
  c.published = ml_collections.ConfigDict(dict(  # the teacher variant's method: the teacher
      teacher=_PUBLISHED["teacher"], student=_PUBLISHED["student"],
      method=_PUBLISHED[method], source=_SOURCE))

  if flavour == "tiny":  # well under a minute on a CPU: for tests and smoke runs
    configs.shrink_to_tiny(c)
    c.teacher.name = c.student.name = "resnet8"
    c.teacher.checkpoint = None
  return c
