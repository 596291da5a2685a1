"""CIFAR-100, resnet32x4 → resnet8x4 with Hinton KD: the CRD benchmark recipe.

The `resnet32x4-resnet8x4:kd` variant of experiments/cifar100_crd.py (which holds the
whole benchmark): 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 decayed ×0.1 at
epochs 150/180/210, weight decay 5e-4, T=4, CE weight 0.1, KD weight 0.9
(RepDistiller's `-r 0.1 -a 0.9`). Published top-1 (CRD paper, Table 1): teacher 79.42,
vanilla student 72.50, KD 73.33 (`c.published`).

Needs CIFAR-100 prepared for TFDS (`tfds build cifar100` on a machine with network, then
point --config.data.data_dir at it). Run on one GPU or TPU host:
  kd-jax distill --config=experiments/cifar100_kd.py --workdir=runs/cifar100_kd
Unlike the benchmark's variants, it also trains the vanilla student, so one run
compares teacher, vanilla and distilled student: about 3 GPU-hours (an estimate). Reuse
a trained teacher with --config.teacher.checkpoint=DIR, or start from the published one
with --config.teacher.checkpoint=PATH.pth (RepDistiller's / mdistiller's
resnet32x4_vanilla/ckpt_epoch_240.pth; docs/training.md); skip the vanilla run with
--config.train_vanilla=False. `experiments/cifar100_kd.py:tiny` is the seconds-long
smoke version on the offline digits.
"""
import ml_collections

from kd_jax.experiments import cifar100_crd


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of experiments/cifar100_kd.py; "
                     "use '' or 'tiny'")
  c = cifar100_crd.get_config(":".join(filter(None, ("resnet32x4-resnet8x4:kd", variant))))
  c.train_vanilla = True
  return c
