"""RepVGG-A0: parameter counts, the fused form's equivalence, its TFLite export, QAT on
the fused form, and channel pruning's refusal."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import export, models
from kd_jax.edge import cost, prune, quantize
from kd_jax.models import repvgg
from test_mobile_students import SHAPE, _random_variables

# Parameters of RepVGG-A0, stage by stage (convs bias-free; BN = 2C; a deploy block is
# a 3x3 kernel plus a bias of C).
#   block C_in -> C   train: 9 C_in C + 2C (3x3, BN) + C_in C + 2C (1x1, BN)
#                            [+ 2C, identity BN]
#                     deploy: 9 C_in C + C
#   stage0  3 -> 48                        train     1_632   deploy     1_344
#   stage1  48 -> 48, 48 -> 48 (+id)       train    46_560   deploy    41_568
#   stage2  48 -> 96, 3 x 96 -> 96 (+id)   train   324_672   deploy   290_688
#   stage3  96 -> 192, 13 x 192 (+id)      train 4_992_384   deploy 4_481_664
#   stage4  192 -> 1280                    train 2_462_720   deploy 2_213_120
#   classifier 1280 x K + K: 1_281_000 at K = 1000, 128_100 at K = 100
# Totals at 1000 classes: train 9_108_968 (timm's repvgg_a0 and the authors' README:
# 9.11M), deploy 8_309_384 (the authors' README 8.31M; the paper's Table 8.30M).
# The CIFAR stem makes stage 1's first block stride 1, so it gains an identity BN (+96)
# in the training form only.
PARAMETER_COUNTS = {
    ("repvgg_a0", 1000): (9_108_968, 8_309_384),
    ("repvgg_a0", 100): (7_956_068, 7_156_484),
    ("repvgg_a0_cifar", 1000): (9_109_064, 8_309_384),
    ("repvgg_a0_cifar", 100): (7_956_164, 7_156_484),
}
# Fused logits equal the training form's up to float32 rounding of the re-associated
# sums: at most this fraction of the largest logit (measured: 4.9e-7 for the CIFAR form
# at 32x32, 7.7e-7 for the ImageNet form at 64x64).
FUSED_TOLERANCE = 1e-5


@pytest.mark.parametrize("name, num_classes", list(PARAMETER_COUNTS))
def test_parameter_counts_train_and_deploy(name, num_classes):
  model = models.create(name, num_classes, cpu_ops=False)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))
  deploy_variables = jax.eval_shape(lambda v: repvgg.reparameterize(model, v)[1],
                                    variables)
  assert set(deploy_variables) == {"params"}
  counts = cost.count_params(variables), cost.count_params(deploy_variables)
  assert counts == PARAMETER_COUNTS[(name, num_classes)]


def _apply(model, variables, images):
  return jax.jit(functools.partial(model.apply, train=False))(variables, images)


@pytest.mark.parametrize("name, size", [("repvgg_a0_cifar", 32), ("repvgg_a0", 64)])
def test_fused_form_computes_the_training_forms_logits_and_taps(name, size):
  rng = np.random.default_rng(0)
  model = models.create(name, 7, cpu_ops=False)
  variables = _random_variables(model, rng)
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  deploy, deploy_variables = repvgg.reparameterize(model, variables)
  assert deploy.deploy and deploy == models.export_form(model, variables)[0]
  logits, taps = _apply(model, variables, images)
  fused_logits, fused_taps = _apply(deploy, deploy_variables, images)
  scale = np.abs(logits).max()
  assert np.abs(fused_logits - logits).max() <= FUSED_TOLERANCE * scale
  assert set(fused_taps) == set(taps)
  for key in ("stage_1", "stage_4", "preact_stage_4", "embedding"):
    tap = np.asarray(taps[key])
    np.testing.assert_allclose(fused_taps[key], tap,
                               atol=FUSED_TOLERANCE * np.abs(tap).max())
  stride = 1 if name.endswith("_cifar") else 4
  chex.assert_shape(taps["stage_1"], (2, size // stride, size // stride, 48))
  # The deploy form is its own export form.
  assert models.export_form(deploy, deploy_variables) == (deploy, deploy_variables)


def test_export_ships_the_fused_form_builtins_only():
  rng = np.random.default_rng(1)
  model = models.create("repvgg_a0_cifar", 10, cpu_ops=False)
  variables = _random_variables(model, rng)
  images = rng.normal(size=(4, *SHAPE)).astype(np.float32)
  logits = np.asarray(_apply(model, variables, images)[0])
  builtins = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for quantization in ("fp32", "int8"):
    flatbuffer = export.to_tflite(model, variables, SHAPE, quantization,
                                  representative_images=images)
    ops = set(export.op_names(flatbuffer))
    assert ops <= builtins, ops
    # One convolution per block and no branch sums: the training form would add.
    assert "CONV_2D" in ops and "ADD" not in ops, ops
    if quantization == "fp32":
      got = export.TFLiteModel(flatbuffer)(images)
      assert np.abs(got - logits).max() <= 1e-4 * np.abs(logits).max()
    else:
      assert {"QUANTIZE", "DEQUANTIZE"} <= ops


def test_qat_applies_to_the_fused_form():
  rng = np.random.default_rng(2)
  model = models.create("repvgg_a0_cifar", 10, cpu_ops=False)
  deploy, deploy_variables = repvgg.reparameterize(model, _random_variables(model, rng))
  qat = quantize.quant_aware(deploy)
  variables = quantize.with_ranges(qat, deploy_variables, SHAPE)
  ranges = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  # Each block's ReLU output (22), the pooled map and the logits: 24 output ranges.
  assert len([path for path, _ in ranges if path[-1].key == "output_range"]) == 24
  images = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  (logits, _), updates = jax.jit(functools.partial(
      qat.apply, train=True, mutable=["batch_stats"]))(variables, images)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(updates)


def test_channel_pruning_refuses_repvgg():
  model = models.create("repvgg_a0_cifar", 10, cpu_ops=False)
  with pytest.raises(ValueError, match=r"^channel pruning supports ResNets of BasicBlocks "
                     r"and WideResNets .*; got RepVGG, choose one of those models$"):
    prune.channel_importance(model, {"params": {}})
