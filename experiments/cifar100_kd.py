"""CIFAR-100, resnet32x4 → resnet8x4 with Hinton KD: the CRD benchmark recipe.

240 epochs, batch 64, SGD momentum 0.9, lr 0.05 decayed ×0.1 at epochs 150/180/210,
weight decay 5e-4, T=4, CE weight 0.1, KD weight 0.9 (RepDistiller's `-r 0.1 -a 0.9`).
Published top-1 (CRD paper, Table 1): teacher 79.42, vanilla student 72.50, KD 73.33.

Needs CIFAR-100 prepared for TFDS (`tfds build cifar100` on a machine with network, then
point --config.data.data_dir at it). Run on one GPU or TPU host:
  kd-jax distill --config=experiments/cifar100_kd.py --workdir=runs/cifar100_kd
About 2–3 GPU-hours in all (teacher, vanilla and distilled students). Reuse a trained
teacher with --config.teacher.checkpoint=DIR; skip the vanilla run with
--config.train_vanilla=False.
"""
import ml_collections
from ml_collections import config_dict

from kd_jax import data


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every_steps = 100
  c.eval_batch_size = 256

  c.data = data.default_data_config()
  c.data.name = "cifar100"  # RepDistiller's normalisation, pad 4 + crop + flip

  recipe = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="step", decay_epochs=(150, 180, 210),
                decay_factor=0.1, warmup_epochs=0, batch_size=64, epochs=240,
                checkpoint_every_steps=2000)
  c.teacher = ml_collections.ConfigDict(dict(
      name="resnet32x4", checkpoint=config_dict.placeholder(str),
                                             kwargs={}))
  c.teacher.train = ml_collections.ConfigDict(recipe)
  c.student = ml_collections.ConfigDict(dict(name="resnet8x4", kwargs={}))
  c.train = ml_collections.ConfigDict(recipe)
  c.train_vanilla = True
  c.distill = ml_collections.ConfigDict(dict(
      ce_weight=0.1, terms=[dict(method="kd", weight=0.9, temperature=4.0)]))
  c.export = ml_collections.ConfigDict(dict(
      variants=("fp32", "int8"), num_calibration_images=512, latency_runs=100))
  c.published = ml_collections.ConfigDict(dict(teacher=79.42, vanilla=72.50, kd=73.33))
  if variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/cifar100_kd.py")
  return c
