"""Channel pruning and model cost: counts by hand, exact slicing, training and export."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import Mesh

from kd_jax import export, models, objective as objective_lib, parallel, train
from kd_jax.edge import cost, prune
from kd_jax.models.resnet import Bottleneck, ResNet

INPUT = (8, 8, 1)
NUM_CLASSES = 10

# resnet8 on 8x8x1, 10 classes. Blocks (C_in -> C_out at H x W): 16->16 at 8x8,
# 16->32 at 4x4, 32->64 at 2x2. A block of inner width m has conv1 3x3xC_in xm, BN(m),
# conv2 3x3xm xC_out, BN(C_out), and a 1x1 conv-BN shortcut when C_in != C_out:
#   params(m) = m (9 C_in + 2 + 9 C_out) + 2 C_out [+ C_in C_out + 2 C_out]
#   block1 290 m + 32, block2 434 m + 640, block3 866 m + 2304
#   stem 3x3x1x16 + 32 = 176, classifier 64 x 10 + 10 = 650  -> constant 3802.
RESNET8_PARAMS = (3802, (290, 434, 866))
# wrn_16_1 on 8x8x1: six pre-activation blocks BN(C_in) conv1 BN(m) conv2 [+ 1x1
# shortcut conv when C_in != C_out]: params(m) = m (9 C_in + 2 + 9 C_out) + 2 C_in
# [+ C_in C_out]; (C_in, C_out) = (16,16), (16,16), (16,32), (32,32), (32,64), (64,64)
#   -> 290 m + 32, 290 m + 32, 434 m + 544, 578 m + 64, 866 m + 2112, 1154 m + 128;
#   stem 3x3x1x16 (no BN) = 144, final BN 128, classifier 650  -> constant 3834.
WRN_16_1_PARAMS = (3834, (290, 290, 434, 578, 866, 1154))
# MACs of one inner channel: H W 9 (C_in + C_out) (its filter, and its input slice of
# conv2; every tap counts, padding included).
RESNET8_CHANNEL_MACS = (8 * 8 * 9 * 32, 4 * 4 * 9 * 48, 2 * 2 * 9 * 96)
WRN_16_1_CHANNEL_MACS = (8 * 8 * 9 * 32, 8 * 8 * 9 * 32, 4 * 4 * 9 * 48, 4 * 4 * 9 * 64,
                         2 * 2 * 9 * 96, 2 * 2 * 9 * 128)
# resnet8 on 8x8x1: stem 64 x 9 x 16 = 9_216; block1 2 x 64 x 9 x 16 x 16 = 294_912;
# block2 16 x 9 x (16 x 32 + 32 x 32) + 16 x 16 x 32 = 229_376; block3
# 4 x 9 x (32 x 64 + 64 x 64) + 4 x 32 x 64 = 229_376; classifier 64 x 10 = 640.
RESNET8_MACS = 763_520
CASES = {  # name: (params formula, MACs of one inner channel, unpruned widths)
    "resnet8": (RESNET8_PARAMS, RESNET8_CHANNEL_MACS, (16, 32, 64)),
    "wrn_16_1": (WRN_16_1_PARAMS, WRN_16_1_CHANNEL_MACS, (16, 16, 32, 32, 64, 64)),
}


def _trained_like(model, seed=0):
  """Initial variables with BatchNorm scales, shifts and statistics moved off their init."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *INPUT)))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    if key[-1] in ("scale", "var"):
      flat[key] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape), jnp.float32)
    elif key[-1] in ("bias", "mean"):
      flat[key] = jnp.asarray(rng.normal(0.0, 0.3, value.shape), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _images(n=4, seed=1):
  return np.random.default_rng(seed).normal(size=(n, *INPUT)).astype(np.float32)


def _ratio_removing(channel_macs, removed_per_block, macs_before):
  """The flops_ratio whose target is reached exactly by removing these channels."""
  after = macs_before - np.dot(removed_per_block, channel_macs)
  return (after + 0.5) / macs_before  # half a MAC above: robust to float rounding


def test_default_mid_widths_keep_the_architecture():
  for name, (_, _, widths) in CASES.items():
    default = models.create(name, NUM_CLASSES)
    assert default.mid_widths is None
    explicit = models.create(name, NUM_CLASSES, mid_widths=widths)
    shapes = [jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, *INPUT)))
              for m in (default, explicit)]
    chex.assert_trees_all_equal_shapes(*shapes)
    from_config = models.create(name, NUM_CLASSES, mid_widths=list(widths))
    assert from_config.mid_widths == widths and hash(from_config) == hash(explicit)
  # A bottleneck's mid width is that of both inner convs (torchvision's `width`):
  # stem 3x3x3x8 + 16 = 232; conv1 8x2 + 4 = 20; conv2 3x3x2x2 + 4 = 40;
  # conv3 2x16 + 32 = 64; downsample 8x16 + 32 = 160; classifier 16x3 + 3 = 51.
  bottleneck = ResNet(num_classes=3, stage_sizes=(1,), stage_widths=(4,), stem_width=8,
                      block=Bottleneck, mid_widths=(2,))
  variables = jax.eval_shape(bottleneck.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert cost.count_params(variables) == 232 + 20 + 40 + 64 + 160 + 51


@pytest.mark.parametrize("mid_widths", [(16, 32), (16, 0, 64)])
def test_bad_mid_widths_are_one_line_errors(mid_widths):
  model = models.create("resnet8", NUM_CLASSES, mid_widths=mid_widths)
  with pytest.raises(ValueError, match=r"^mid_widths must be 3 positive widths, one per "
                                       r"residual block in order; got") as info:
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *INPUT)))
  assert "\n" not in str(info.value)


def test_macs_by_hand_and_against_xla():
  model = models.create("resnet8", NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *INPUT)))
  assert cost.macs(model, variables, INPUT) == RESNET8_MACS
  assert cost.macs(model, variables, (5, *INPUT)) == RESNET8_MACS  # per image
  assert cost.count_params(variables) == RESNET8_PARAMS[0] + np.dot(RESNET8_PARAMS[1],
                                                                    (16, 32, 64))
  # Only what the outputs depend on counts: up to stage 1 is the stem and block 1.
  concrete = model.init(jax.random.key(0), jnp.zeros((1, *INPUT)))
  stage_1 = lambda x: model.apply(concrete, x)[1]["stage_1"]
  assert cost.function_macs(stage_1, INPUT) == 9_216 + 294_912

  # XLA counts 2 flops per MAC on unpadded convolutions and matrix products.
  kernel, dense = jnp.ones((3, 3, 1, 6)), jnp.ones((6 * 6 * 6, 5))

  def conv_dense(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(1, -1) @ dense

  image = jax.ShapeDtypeStruct((1, *INPUT), jnp.float32)
  flops = jax.jit(conv_dense).lower(image).compile().cost_analysis()["flops"]
  assert cost.function_macs(conv_dense, INPUT) == 6 * 6 * 6 * 9 + 5 * 216 == flops / 2

  # A cond costs its dearest branch, a scan its body times its length.
  square = jnp.ones((3, 3))
  row = lambda x: x.reshape(1, -1)[:, :3]
  branch = lambda x: jax.lax.cond(x.sum() > 0, lambda r: r @ square, lambda r: r, row(x))
  loop = lambda x: jax.lax.scan(lambda r, _: (r @ square, None), row(x), length=5)[0]
  assert cost.function_macs(branch, INPUT) == 9
  assert cost.function_macs(loop, INPUT) == 5 * 9


@pytest.mark.parametrize("name, criterion", [("resnet8", "bn_scale"), ("wrn_16_1", "l1")])
def test_pruned_counts_match_the_formulas(name, criterion):
  (constant, per_channel), channel_macs, full = CASES[name]
  model = models.create(name, NUM_CLASSES)
  variables = _trained_like(model)
  result = prune.prune(model, variables, INPUT, 0.5, criterion)
  widths, full = np.asarray(result.mid_widths), np.asarray(full)
  assert result.model.mid_widths == result.mid_widths
  assert [len(result.kept[b]) for b in model.block_names()] == list(widths)
  assert np.all(widths >= 1) and np.all(widths < full)
  assert result.params_before == constant + np.dot(per_channel, full)
  assert result.params_after == constant + np.dot(per_channel, widths)
  assert result.params_after == cost.count_params(result.variables)
  assert result.macs_after == result.macs_before - np.dot(channel_macs, full - widths)
  assert result.macs_after <= 0.5 * result.macs_before
  # The pruned variables are exactly what the narrower model initialises.
  chex.assert_trees_all_equal_shapes(result.variables, jax.eval_shape(
      result.model.init, jax.random.key(0), jnp.zeros((1, *INPUT))))


def test_ratio_one_keeps_everything():
  model = models.create("wrn_16_1", NUM_CLASSES)
  variables = _trained_like(model)
  result = prune.prune(model, variables, INPUT, 1.0)
  assert result.mid_widths == CASES["wrn_16_1"][2]
  assert result.macs_after == result.macs_before
  chex.assert_trees_all_equal(result.variables, variables)


@pytest.mark.parametrize("name, dead", [
    ("resnet8", {"stage1_block0": [1, 5, 6], "stage2_block0": [0, 31],
                 "stage3_block0": list(range(10, 20))}),
    ("wrn_16_1", {"stage1_block1": [3], "stage2_block0": [2, 30],
                  "stage3_block1": [0, 1, 63]}),
])
def test_pruning_dead_channels_leaves_the_function_unchanged(name, dead):
  model = models.create(name, NUM_CLASSES)
  variables = _trained_like(model)
  norms = {"resnet8": ("conv_bn1", "bn"), "wrn_16_1": ("bn2",)}[name]
  flat = traverse_util.flatten_dict(variables)
  for block, channels in dead.items():  # BN(x) = 0, so ReLU(BN(x)) = 0: dead channels
    for leaf in ("scale", "bias"):
      key = ("params", block, *norms, leaf)
      flat[key] = flat[key].at[np.asarray(channels)].set(0.0)
  variables = traverse_util.unflatten_dict(flat)
  _, channel_macs, full = CASES[name]
  blocks = model.block_names()
  removed = [len(dead.get(b, ())) for b in blocks]
  result = prune.prune(model, variables, INPUT, _ratio_removing(
      channel_macs, removed, cost.macs(model, variables, INPUT)))
  for block, width in zip(blocks, full):
    np.testing.assert_array_equal(result.kept[block],
                                  np.setdiff1d(np.arange(width), dead.get(block, [])))
  assert result.mid_widths == tuple(np.subtract(full, removed))
  images = _images()
  expected = model.apply(variables, images)
  got = result.model.apply(result.variables, images)
  chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)


def _hand_made_resnet8():
  """resnet8 whose inner channel scores are set by hand (see the test)."""
  model = models.create("resnet8", NUM_CLASSES)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *INPUT)))
  params = variables["params"]
  scale = {"stage1_block0": np.ones(16), "stage2_block0": np.ones(32),
           "stage3_block0": np.full(64, 2.0)}
  scale["stage1_block0"][3] = -0.5
  scale["stage3_block0"][7] = 0.8
  signs = np.where(np.arange(9 * 16) % 2, 1.0, -1.0).reshape(3, 3, 16, 1)
  magnitude = {"stage1_block0": np.full(16, 0.1), "stage2_block0": np.full(32, 0.1),
               "stage3_block0": np.full(64, 0.05)}
  magnitude["stage2_block0"][4] = 0.01
  magnitude["stage3_block0"][7] = 0.02
  for block in scale:
    in_channels = params[block]["conv_bn1"]["conv"]["kernel"].shape[2]
    params[block]["conv_bn1"]["bn"]["scale"] = jnp.asarray(scale[block], jnp.float32)
    params[block]["conv_bn1"]["conv"]["kernel"] = jnp.asarray(
        np.tile(signs, (1, 1, in_channels // 16, 1)) * magnitude[block], jnp.float32)
  return model, variables


def test_criteria_rank_by_hand():
  model, variables = _hand_made_resnet8()
  bn_scale = prune.channel_importance(model, variables, "bn_scale")
  l1 = prune.channel_importance(model, variables, "l1")
  assert list(bn_scale) == list(l1) == model.block_names()
  np.testing.assert_allclose(bn_scale["stage1_block0"][[0, 3]], [1.0, 0.5])
  np.testing.assert_allclose(bn_scale["stage3_block0"][[0, 7]], [2.0, 0.8])
  # L1 of a filter: kh x kw x C_in taps of magnitude |w|.
  np.testing.assert_allclose(l1["stage1_block0"][:2], [144 * 0.1] * 2, rtol=1e-6)
  np.testing.assert_allclose(l1["stage2_block0"][[0, 4]], [144 * 0.1, 144 * 0.01],
                             rtol=1e-6)
  np.testing.assert_allclose(l1["stage3_block0"][[0, 7]], [288 * 0.05, 288 * 0.02],
                             rtol=1e-6)

  # One MAC below the full model: exactly one channel goes, the lowest relative to its
  # layer's mean.
  ratio = (RESNET8_MACS - 1) / RESNET8_MACS

  def removed(criterion):
    kept = prune.prune(model, variables, INPUT, ratio, criterion).kept
    return {b: sorted(set(range(w)) - set(kept[b].tolist()))
            for b, w in zip(model.block_names(), (16, 32, 64))}

  # bn_scale: 0.5 / (15.5 / 16) = 0.516 in block 1, 0.8 / (126.8 / 64) = 0.404 in
  # block 3: block 3's channel 7 goes, though 0.5 is the smallest raw |gamma|.
  assert removed("bn_scale") == {"stage1_block0": [], "stage2_block0": [],
                                 "stage3_block0": [7]}
  # l1: 0.01 / (3.11 / 32) = 0.103 in block 2, 0.02 / (3.17 / 64) = 0.404 in block 3.
  assert removed("l1") == {"stage1_block0": [], "stage2_block0": [4],
                           "stage3_block0": []}


def test_min_channels_bounds_every_block():
  model, variables = _hand_made_resnet8()
  result = prune.prune(model, variables, INPUT, 0.45, "l1", min_channels=4)
  assert min(result.mid_widths) >= 4
  assert result.macs_after <= 0.45 * RESNET8_MACS


@pytest.mark.parametrize("kwargs, message", [
    (dict(flops_ratio=0.0), r"^flops_ratio must be in \(0, 1\]; got 0.0$"),
    (dict(flops_ratio=1.5), r"^flops_ratio must be in \(0, 1\]; got 1.5$"),
    (dict(flops_ratio=0.5, criterion="l2"),
     r"^criterion must be one of bn_scale, l1; got 'l2'$"),
    (dict(flops_ratio=0.5, min_channels=0), r"^min_channels must be at least 1; got 0$"),
    (dict(flops_ratio=0.05), r"^flops_ratio=0.05 is out of reach: with min_channels=1 "
                             r"per block the MACs go down to 0\.\d+ of the model's; "
                             r"raise flops_ratio$"),
])
def test_bad_input_is_a_one_line_error(kwargs, message):
  model = models.create("resnet8", NUM_CLASSES)
  with pytest.raises(ValueError, match=message) as info:
    prune.prune(model, _trained_like(model), INPUT, **kwargs)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, kind", [("vgg8", "VGG"), ("MobileNetV2", "MobileNetV2"),
                                        ("resnet50", "ResNet")])
def test_models_without_prunable_blocks_are_refused(name, kind):
  model = models.create(name, NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *INPUT)))
  with pytest.raises(ValueError, match=r"^channel pruning supports ResNets of BasicBlocks "
                                       rf"and WideResNets .*; got {kind}, choose one of "
                                       r"those models$") as info:
    prune.prune(model, variables, INPUT, 0.5)
  assert "\n" not in str(info.value)


def test_pruned_model_exports_smaller_and_distils():
  teacher = models.create("resnet8", NUM_CLASSES)
  teacher_variables = _trained_like(teacher)
  result = prune.prune(teacher, teacher_variables, INPUT, 0.5, "bn_scale")
  student, student_variables = result.model, result.variables

  # fp32 TFLite of the pruned model: the same logits as JAX, fewer bytes.
  pruned_tflite = export.to_tflite(student, student_variables, INPUT)
  full_tflite = export.to_tflite(teacher, teacher_variables, INPUT)
  images = _images(6)
  jax_logits = np.asarray(student.apply(student_variables, images)[0])
  np.testing.assert_allclose(export.TFLiteModel(pruned_tflite)(images), jax_logits,
                             atol=1e-4, rtol=0)
  # Smaller by at least the removed conv weights, 4 bytes each (BatchNorm is folded).
  removed_channels = sum(16 + 32 + 64 - np.asarray(result.mid_widths))
  removed_conv_weights = result.params_before - result.params_after - 2 * removed_channels
  assert len(full_tflite) - len(pruned_tflite) >= 4 * removed_conv_weights

  # One distillation step from the unpruned model, starting from the pruned weights
  # (the state is donated: the teacher's buffers must not be among the student's).
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  objective = objective_lib.build(
      {"ce_weight": 0.1, "terms": [{"method": "kd", "weight": 0.9, "temperature": 4.0}]},
      total_steps=1, steps_per_epoch=1)
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = train.init_state(student, optimizer, INPUT, jax.random.key(0), objective,
                           teacher, teacher_variables)
  chex.assert_trees_all_equal_shapes(state.params["student"], student_variables["params"])
  params = {**state.params, "student": student_variables["params"]}
  state = state.replace(params=params, opt_state=optimizer.init(params),
                        batch_stats={"student": student_variables["batch_stats"]})
  before = jax.device_get(student_variables["params"])
  step_fn = train.make_train_step(student, teacher, objective, optimizer, mesh)
  batch = {"image": _images(8), "label": np.arange(8, dtype=np.int32) % NUM_CLASSES}
  state, metrics = step_fn(parallel.replicate(state, mesh),
                           parallel.replicate(teacher_variables, mesh),
                           parallel.to_global(batch, mesh), train.step_rng(0, 0))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       jax.device_get(state.params["student"]), before)
  assert min(jax.tree.leaves(moved)) > 0.0
