"""Tests of the model zoo: parameter counts, taps, small inputs, BatchNorm behaviour."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kd_jax import models
from kd_jax.models import layers

IMAGENET = ("resnet18", "resnet34", "resnet50")

# sum(p.numel() for p in model.parameters()) of the PyTorch reference definitions
# (RepDistiller's models/ for CIFAR with num_classes=100, torchvision for ImageNet with
# num_classes=1000).
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
  size = 224 if name in IMAGENET else 32
  variables = _abstract_variables(model, (1, size, size, 3))
  assert set(variables) == {"params", "batch_stats"}
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == REFERENCE_PARAMETER_COUNTS[name]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError) as info:
    models.create("nope", 10)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("unknown model 'nope'; known models: resnet8, resnet14,")
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


def _lax_conv(strides, padding, groups):
  return lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def _assert_matches_with_gradients(conv, reference, x, kernel, key):
  """`conv` equals `reference` at (x, kernel), and so do their gradients."""
  expected = reference(x, kernel)
  np.testing.assert_allclose(conv(x, kernel), expected, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(key, expected.shape)
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * weights), argnums=(0, 1))(
      x, kernel) for f in (reference, conv)]
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, kernel_size, strides, padding", [
    ((2, 9, 7, 5), 3, (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 6), 3, (2, 2), ((1, 1), (1, 1))),
    ((1, 6, 7, 3), 3, (2, 1), ((0, 1), (2, 0))),
    ((2, 8, 8, 4), 5, (1, 2), ((2, 2), (2, 2))),
])
def test_depthwise_taps_match_xla_convolution_and_its_gradients(shape, kernel_size,
                                                                strides, padding):
  channels = shape[-1]
  kx, kk, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 1, channels))
  _assert_matches_with_gradients(
      lambda x, k: layers.depthwise_conv_taps(x, k, strides, padding),
      _lax_conv(strides, padding, channels), x, kernel, kr)


@pytest.mark.parametrize("batch, chunk_examples, strides, chunks", [
    (6, 2, (1, 1), 3), (6, 4, (2, 2), 2), (5, 2, (1, 2), 5), (4, 9, (1, 1), 1)])
def test_depthwise_kernel_gradient_in_batch_chunks(monkeypatch, batch, chunk_examples,
                                                   strides, chunks):
  # The kernel gradient is reduced over chunks of the largest divisor of the batch
  # that fits the byte budget: 2, 3 and 1 examples, or the whole batch of 4 at once.
  shape, channels = (batch, 8, 6, 5), 5
  out_bytes = (8 // strides[0]) * (6 // strides[1]) * channels * 4
  monkeypatch.setattr(layers, "_KERNEL_GRAD_CHUNK_BYTES", chunk_examples * out_bytes)
  kx, kk, kr = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, 3, 1, channels))
  padding = ((1, 1), (1, 1))
  weights = jax.random.normal(kr, (batch, 8 // strides[0], 6 // strides[1], channels))

  def loss(f):
    return lambda x, k: jnp.sum(f(x, k) * weights)

  xla = loss(_lax_conv(strides, padding, channels))
  taps = loss(lambda x, k: layers.depthwise_conv_taps(x, k, strides, padding))
  expected = jax.grad(xla, argnums=(0, 1))(x, kernel)
  loop = [eqn for eqn in jax.make_jaxpr(jax.grad(taps, argnums=1))(x, kernel).eqns
          if eqn.primitive.name in ("while", "scan")]
  assert [eqn.params.get("length") for eqn in loop] == ([] if chunks == 1 else [chunks])
  chex.assert_trees_all_close(jax.jit(jax.grad(taps, argnums=(0, 1)))(x, kernel),
                              expected, rtol=1e-5, atol=1e-5)
  # A bfloat16 layer gets a bfloat16 kernel gradient, accumulated in float32.
  low = jax.grad(taps, argnums=1)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), expected[1], rtol=0.05, atol=0.3)


def test_depthwise_taps_by_hand():
  # One channel, a 3x3 image 1..9, kernel with 1 at the centre and 10 at the
  # bottom-right, zero padding 1: out[i, j] = x[i, j] + 10 * x[i + 1, j + 1].
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0).at[2, 2].set(10.0)
  out = layers.depthwise_conv_taps(x, kernel, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(out[0, :, :, 0], [[51, 62, 3], [84, 95, 6], [7, 8, 9]])
  strided = layers.depthwise_conv_taps(x, kernel, (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(strided[0, :, :, 0], [[51, 3], [7, 9]])


@pytest.mark.parametrize("groups, strides", [(3, (1, 1)), (2, (2, 1))])
def test_grouped_pointwise_conv_matches_xla_convolution_and_its_gradients(groups, strides):
  kx, kk, kr = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (2, 5, 6, 6))
  kernel = jax.random.normal(kk, (1, 1, 6 // groups, 12))
  _assert_matches_with_gradients(
      lambda x, k: layers.grouped_pointwise_conv(x, k, strides, groups),
      _lax_conv(strides, ((0, 0), (0, 0)), groups), x, kernel, kr)
  # By hand: group 1 of output channel 6 reads input channels 3..5 only.
  one = jnp.zeros((1, 1, 1, 6)).at[0, 0, 0, 4].set(2.0)
  unit = jnp.zeros((1, 1, 3, 12)).at[0, 0, 1, 6].set(5.0)
  out = layers.grouped_pointwise_conv(one, unit, (1, 1), 2)
  np.testing.assert_array_equal(out[0, 0, 0], np.eye(12)[6] * 10.0)


def _grouped_convs(model, x, variables):
  jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x)[0])(x)
  return [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"
          and eqn.params["feature_group_count"] > 1]


# MobileNetV2: one depthwise conv per inverted residual (1+2+3+4+3+3+1 = 17).
# ShuffleV2: two per down-sampling unit (3 x 2), one per unit (3 + 7 + 3).
# ShuffleV1: per unit (4 + 8 + 4) a depthwise conv and two grouped 1x1 convs, except
# the first unit's first 1x1 conv: 16 + 31.
@pytest.mark.parametrize("name, depthwise_layers", [("MobileNetV2", 17), ("ShuffleV2", 19),
                                                     ("ShuffleV1", 47)])
def test_zoo_depthwise_convs_are_taps_on_cpu_and_convolutions_on_request(name,
                                                                         depthwise_layers):
  model = models.create(name, 10)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  assert jax.default_backend() == "cpu"
  assert not _grouped_convs(model, x, variables)  # 'auto' on the CPU: taps
  with layers.implementation("lax"):
    assert len(_grouped_convs(model, x, variables)) == depthwise_layers
    expected = model.apply(variables, x)[0]
  np.testing.assert_allclose(model.apply(variables, x)[0], expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="implementation must be one of"):
    with layers.implementation("winograd"):
      pass


def test_max_pool_taps_match_nn_max_pool_with_first_maximum_gradients():
  # Ties within windows (integers in 0..3): the gradient goes to one element per
  # window, the first maximum in row-major order, as nn.max_pool and PyTorch route it.
  x = jax.random.randint(jax.random.key(0), (2, 6, 8, 3), 0, 4).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
  results = []
  for name in ("taps", "lax"):
    with layers.implementation(name):
      pool = lambda x: layers.max_pool(x, (2, 2), (2, 2))
      results.append((pool(x), jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)))
  (out, grad), (expected, expected_grad) = results
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(grad, expected_grad)
  # By hand for the first window of the first channel.
  window = np.asarray(x[0, :2, :2, 0]).ravel()
  first = int(np.argmax(window))
  hand = np.zeros(4)
  hand[first] = weights[0, 0, 0, 0]
  np.testing.assert_array_equal(np.asarray(grad[0, :2, :2, 0]).ravel(), hand)
  assert out[0, 0, 0, 0] == window.max()


def _conditionals(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.case")


def test_relu_output_is_materialised_only_when_differentiated_on_the_taps_path(
    monkeypatch):
  # Only for XLA's convolutions (their kernel gradients read transposed copies).
  with_onednn = layers.onednn.available()
  monkeypatch.setattr(layers.onednn, "available", lambda: False)
  x = jnp.asarray([[[[-2.0, 0.0, 3.0]], [[1.5, -0.5, 0.0]]]])  # [1, 2, 1, 3]
  weights = jnp.asarray([[[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]])
  loss = lambda x: jnp.sum(layers.relu(x) * weights)
  expected_grad = np.asarray([[[[0, 0, 3.0]], [[4.0, 0, 0]]]])  # 0 at and below 0
  for name, conditionals in (("taps", 1), ("lax", 0)):
    with layers.implementation(name):
      np.testing.assert_array_equal(layers.relu(x), np.maximum(x, 0))
      np.testing.assert_array_equal(jax.grad(loss)(x), expected_grad)
      np.testing.assert_array_equal(jax.grad(loss)(x), jax.grad(
          lambda x: jnp.sum(jax.nn.relu(x) * weights))(x))
      assert _conditionals(jax.value_and_grad(loss), x) == conditionals
      assert _conditionals(layers.relu, x) == 0  # inference and exports: plain ReLU
      # Second order (e.g. a gradient penalty) goes through the rule too: ReLU's is 0.
      hvp = jax.jvp(jax.grad(loss), (x,), (jnp.ones_like(x),))[1]
      np.testing.assert_array_equal(hvp, np.zeros_like(x))
  model = models.create("resnet8", 10)
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  variables = model.init(jax.random.key(0), images)

  def train_loss(params):
    (logits, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                 mutable=["batch_stats"])
    return jnp.sum(logits)

  # resnet8: 7 conv-BN-ReLU / block outputs (stem, 3 blocks x 2).
  assert _conditionals(jax.grad(train_loss), variables["params"]) == 7
  # With oneDNN's convolutions, which read the NHWC input itself, the ReLU stays plain.
  monkeypatch.undo()
  if with_onednn:
    assert _conditionals(jax.grad(train_loss), variables["params"]) == 0
