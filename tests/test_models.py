"""Tests of the model zoo: parameter counts, taps, small inputs, BatchNorm behaviour."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kd_jax import models

IMAGENET = ("resnet18", "resnet34", "resnet50", "mobilenetv3_small",
            "mobilenetv3_small_cifar", "mobilenetv3_large", "mobilenetv3_large_cifar",
            "efficientnet_lite0", "efficientnet_lite0_cifar", "repvgg_a0",
            "repvgg_a0_cifar", "deit_tiny", "deit_tiny_cifar")
NO_BATCHNORM = ("deit_tiny", "deit_tiny_cifar")

# sum(p.numel() for p in model.parameters()) of the PyTorch reference definitions
# (RepDistiller's models/ for CIFAR with num_classes=100, torchvision and timm for
# ImageNet with num_classes=1000; a CIFAR stem changes strides only, not the count).
REFERENCE_PARAMETER_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    # resnet20: 3 stages of 3 BasicBlocks, widths 16/32/64; convs bias-free, BN = 2C.
    #   stem   3x3x3x16 + BN16                                              =     464
    #   stage1 3 x [2 x (3x3x16x16 + 32)]                     = 3 x 4_672     =  14_016
    #   stage2 (3x3x16x32 + 64) + (3x3x32x32 + 64) + (1x1x16x32 + 64)
    #          + 2 x [2 x (3x3x32x32 + 64)]            = 14_528 + 37_120    =  51_648
    #   stage3 (3x3x32x64 + 128) + (3x3x64x64 + 128) + (1x1x32x64 + 128)
    #          + 2 x [2 x (3x3x64x64 + 128)]           = 57_728 + 147_968   = 205_696
    #   fc     64 x 100 + 100                                               =   6_500
    #   total                                                               = 278_324
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    # resnet8x4: one BasicBlock per stage, stem 32, widths 64/128/256; every stage
    # changes the width, so every block has a 1x1 conv-BN projection.
    #   stem   3x3x3x32 + 64                                                =       928
    #   stage1 (3x3x32x64 + 128) + (3x3x64x64 + 128) + (32x64 + 128)        =    57_728
    #   stage2 (3x3x64x128 + 256) + (3x3x128x128 + 256) + (64x128 + 256)    =   230_144
    #   stage3 (3x3x128x256 + 512) + (3x3x256x256 + 512) + (128x256 + 512)  =   919_040
    #   fc     256 x 100 + 100                                              =    25_700
    #   total                                                               = 1_233_540
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    # wrn_16_2: (16 - 4) / 6 = 2 pre-activation blocks per stage, widths 32/64/128;
    # a block is BN(in) conv3x3 BN(out) conv3x3 [+ 1x1 shortcut conv when in != out].
    #   stem   3x3x3x16 (no BN)                                             =     432
    #   stage1 (32 + 3x3x16x32 + 64 + 3x3x32x32 + 16x32)
    #          + (64 + 3x3x32x32 + 64 + 3x3x32x32)         = 14_432 + 18_560  =  32_992
    #   stage2 (64 + 3x3x32x64 + 128 + 3x3x64x64 + 32x64)
    #          + (128 + 2 x 3x3x64x64 + 128)               = 57_536 + 73_984  = 131_520
    #   stage3 (128 + 3x3x64x128 + 256 + 3x3x128x128 + 64x128)
    #          + (256 + 2 x 3x3x128x128 + 256)             = 229_760 + 295_424 = 525_184
    #   final BN 2 x 128                                                    =     256
    #   fc     128 x 100 + 100                                              =  12_900
    #   total                                                               = 703_284
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    # torchvision's mobilenet_v3_small (its weights' meta["num_params"]: 2,542,856);
    # BN = 2C, SE 1x1 convs with biases, squeeze width make_divisible(expanded / 4, 8).
    #   stem       3x3x3x16 + 32                                          =       464
    #   11 blocks  e.g. block0: dw 3x3x16 + 32, SE 16x8 + 8 + 8x16 + 16,
    #              project 16x16 + 32 = 176 + 280 + 288 = 744; all eleven =   870_096
    #   last conv  96x576 + 1_152                                         =    56_448
    #   hidden     576x1024 + 1024                                        =   590_848
    #   classifier 1024x1000 + 1000                                       = 1_025_000
    #   total                                                             = 2_542_856
    "mobilenetv3_small": 2_542_856,
    "mobilenetv3_small_cifar": 2_542_856,
    # torchvision's mobilenet_v3_large (meta["num_params"]: 5,483,032):
    #   stem 464 + 15 blocks 2_815_968 + last conv 160x960 + 1_920 = 155_520
    #   + hidden 960x1280 + 1280 = 1_230_080 + classifier 1280x1000 + 1000 = 1_281_000
    "mobilenetv3_large": 5_483_032,
    "mobilenetv3_large_cifar": 5_483_032,
    # timm's efficientnet_lite0 (sum of its parameters' numel: 4,652,008):
    #   stem 3x3x3x32 + 64 = 928; depthwise-separable block dw 3x3x32 + 64, project
    #   32x16 + 32 = 896; 16 inverted residuals 2_957_024; head conv 320x1280 + 2_560
    #   = 412_160; classifier 1280x1000 + 1000 = 1_281_000
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite0_cifar": 4_652_008,
    # RepVGG-A0's training form (timm's repvgg_a0: 9.11M); derivation, the CIFAR form's
    # extra identity BatchNorm and the deploy form's counts in tests/test_repvgg.py.
    "repvgg_a0": 9_108_968,
    "repvgg_a0_cifar": 9_109_064,
    # timm's deit_tiny_distilled_patch16_224 (sum of its parameters' numel: 5,910,800);
    # D = 192, 12 blocks, MLP 768, 14x14 = 196 patches; LayerNorm = 2D.
    #   patch embed  16x16x3x192 + 192                                    =   147_648
    #   tokens       class 192 + distillation 192 + position (196 + 2)x192 =    38_400
    #   one block    LN 384 + qkv 192x576 + 576 + proj 192x192 + 192
    #                + LN 384 + fc1 192x768 + 768 + fc2 768x192 + 192     =   444_864
    #   12 blocks                                                         = 5_338_368
    #   final LN 384; two heads 2 x (192x1000 + 1000) = 386_000           =   386_384
    #   total                                                             = 5_910_800
    "deit_tiny": 5_910_800,
    # No reference CIFAR definition: 4x4 patches at 32x32 (64 patches) change the patch
    # embedding to 4x4x3x192 + 192 = 9_408 and the position embedding to 66x192 =
    # 12_672: 5_910_800 - 147_648 - 38_016 + 9_408 + 12_672.
    "deit_tiny_cifar": 5_747_216,
}


def _num_classes(name):
  return 1000 if name in IMAGENET else 100


def _abstract_variables(model, shape):
  """Variable shapes from `init`, traced without compiling."""
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _abstract_apply(model, shape, **kw):
  variables = _abstract_variables(model, shape)
  return jax.eval_shape(functools.partial(model.apply, **kw), variables,
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def test_available_lists_the_design_zoo():
  assert models.available() == list(REFERENCE_PARAMETER_COUNTS)


@pytest.mark.parametrize("name", list(REFERENCE_PARAMETER_COUNTS))
def test_parameter_count_matches_reference(name):
  model = models.create(name, _num_classes(name))
  size = 224 if name in IMAGENET and not name.endswith("_cifar") else 32
  variables = _abstract_variables(model, (1, size, size, 3))
  collections = {"params"} if name in NO_BATCHNORM else {"params", "batch_stats"}
  assert set(variables) == collections
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == REFERENCE_PARAMETER_COUNTS[name]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError) as info:
    models.create("nope", 10)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("unknown model 'nope'; set teacher.name / student.name to "
                            "one of resnet8, resnet14,")
  assert "did you mean 'MobileNetV2'?" in str(
      pytest.raises(ValueError, models.create, "MobileNetV3", 10).value)
  assert all(name in message for name in models.available())


def test_resnet8_taps():
  logits, taps = _abstract_apply(models.create("resnet8", 100), (2, 32, 32, 3))
  chex.assert_shape(logits, (2, 100))
  assert logits.dtype == jnp.float32
  expected = {
      "stem": (2, 32, 32, 16),
      "stage_1": (2, 32, 32, 16), "preact_stage_1": (2, 32, 32, 16),
      "stage_2": (2, 16, 16, 32), "preact_stage_2": (2, 16, 16, 32),
      "stage_3": (2, 8, 8, 64), "preact_stage_3": (2, 8, 8, 64),
      "embedding": (2, 64),
  }
  assert {k: v.shape for k, v in taps.items()} == expected


@pytest.mark.parametrize("name, stage_shapes, embedding", [
    ("wrn_40_2", [(32, 32, 32), (16, 16, 64), (8, 8, 128)], 128),
    ("vgg13", [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512),
    ("MobileNetV2", [(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], 1280),
    ("ShuffleV1", [(16, 16, 240), (8, 8, 480), (4, 4, 960)], 960),
    ("ShuffleV2", [(16, 16, 116), (8, 8, 232), (4, 4, 464)], 1024),
    ("resnet32x4", [(32, 32, 64), (16, 16, 128), (8, 8, 256)], 256),
    ("mobilenetv3_small_cifar", [(32, 32, 16), (16, 16, 24), (8, 8, 48), (4, 4, 96)],
     1024),
    ("mobilenetv3_large_cifar", [(32, 32, 24), (16, 16, 40), (8, 8, 112), (4, 4, 160)],
     1280),
    ("efficientnet_lite0_cifar", [(32, 32, 24), (16, 16, 40), (8, 8, 112), (4, 4, 320)],
     1280),
])
def test_cifar_taps(name, stage_shapes, embedding):
  _, taps = _abstract_apply(models.create(name, 100), (2, 32, 32, 3))
  chex.assert_shape(taps["embedding"], (2, embedding))
  assert "stem" in taps
  for k, shape in enumerate(stage_shapes, start=1):
    chex.assert_shape(taps[f"stage_{k}"], (2, *shape))
    chex.assert_shape(taps[f"preact_stage_{k}"], (2, *shape))
  assert f"stage_{len(stage_shapes) + 1}" not in taps


def test_imagenet_resnet50_taps():
  logits, taps = _abstract_apply(models.create("resnet50", 1000), (1, 224, 224, 3))
  chex.assert_shape(logits, (1, 1000))
  chex.assert_shape(taps["stem"], (1, 112, 112, 64))
  for k, (size, width) in enumerate([(56, 256), (28, 512), (14, 1024), (7, 2048)], 1):
    chex.assert_shape([taps[f"stage_{k}"], taps[f"preact_stage_{k}"]],
                      (1, size, size, width))
  chex.assert_shape(taps["embedding"], (1, 2048))


@pytest.mark.parametrize("name, widths, embedding", [
    ("mobilenetv3_small", (16, 24, 48, 96), 1024),
    ("mobilenetv3_large", (24, 40, 112, 160), 1280),
    ("efficientnet_lite0", (24, 40, 112, 320), 1280),
])
def test_mobile_students_stage_at_strides_4_to_32(name, widths, embedding):
  logits, taps = _abstract_apply(models.create(name, 1000), (1, 224, 224, 3))
  chex.assert_shape(logits, (1, 1000))
  for k, (size, width) in enumerate(zip((56, 28, 14, 7), widths), start=1):
    chex.assert_shape([taps[f"stage_{k}"], taps[f"preact_stage_{k}"]],
                      (1, size, size, width))
  chex.assert_shape(taps["embedding"], (1, embedding))


def test_mobile_student_dropout_needs_a_rng_only_to_apply():
  model = models.create("mobilenetv3_small_cifar", 10)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  dense = variables["params"]["classifier"]
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  (logits, taps), _ = apply(variables, x)
  np.testing.assert_allclose(logits, taps["embedding"] @ dense["kernel"] + dense["bias"],
                             rtol=1e-5, atol=1e-6)
  (dropped, taps), _ = apply(variables, x, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(dropped, taps["embedding"] @ dense["kernel"] + dense["bias"])


@pytest.mark.parametrize("name", ["wrn_16_1", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                  "vgg8", "resnet8x4"])
def test_small_single_channel_input_shapes(name):
  logits, taps = _abstract_apply(models.create(name, 10), (2, 8, 8, 1))
  chex.assert_shape(logits, (2, 10))
  assert taps["embedding"].ndim == 2


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_forward_on_8x8_digits(name):
  model = models.create(name, 10)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  logits, taps = model.apply(variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_shape(taps["stage_3"], (2, 2, 2, 64))
  chex.assert_tree_all_finite((logits, taps))
  # The embedding is the classifier's input.
  dense = variables["params"]["classifier"]
  np.testing.assert_allclose(logits, taps["embedding"] @ dense["kernel"] + dense["bias"],
                             rtol=1e-5, atol=1e-5)


def test_train_mode_updates_batch_stats_only_when_training():
  model = models.create("resnet8", 10)
  x = 3.0 + jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_shape(logits, (4, 10))
  before, after = variables["batch_stats"], updates["batch_stats"]
  chex.assert_trees_all_equal_shapes(before, after)
  # momentum 0.9 (PyTorch's 0.1): the running mean moves a tenth of the way.
  for leaf_before, leaf_after in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert not np.allclose(leaf_before, leaf_after)
  # The stem's input is the image itself, so its running mean is easy to predict:
  # momentum 0.9 (PyTorch's 0.1) moves it a tenth of the way to the batch mean.
  kernel = variables["params"]["stem"]["conv"]["kernel"]
  conv_out = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(after["stem"]["bn"]["mean"],
                             0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  _, inference_updates = model.apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_equal(inference_updates["batch_stats"], before)


def test_bn_axis_name_gives_cross_device_statistics():
  devices = jax.devices()
  assert len(devices) == 4  # tests/conftest.py fakes 4 CPU devices
  mesh = Mesh(np.array(devices), ("data",))
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) * jnp.arange(1.0, 9.0)[:, None,
                                                                                None, None]
  plain = models.create("resnet8", 10)
  variables = plain.init(jax.random.key(0), x)
  _, expected = plain.apply(variables, x, train=True, mutable=["batch_stats"])

  synced = models.create("resnet8", 10, bn_axis_name="data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  def sharded_stats(variables, x):
    _, updates = synced.apply(variables, x, train=True, mutable=["batch_stats"])
    return updates

  got = sharded_stats(variables, x)
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_computation_keeps_float32_params_and_logits():
  model = models.create("resnet8", 10, dtype=jnp.bfloat16)
  variables = _abstract_variables(model, (2, 8, 8, 1))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  logits, taps = _abstract_apply(model, (2, 8, 8, 1))
  assert logits.dtype == jnp.float32
  assert taps["stage_1"].dtype == jnp.bfloat16
