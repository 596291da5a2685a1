"""DeiT-Tiny and its distillation-token objective.

The model: taps and shapes, class head in training and the mean of the two heads in
evaluation, builtins-only TFLite (fp32 logits within 1e-4 of the largest logit of
JAX's; measured 1.2e-6 relative), int8 conversion. The loss: hand-computed values of both
variants, jit == eager, gradients. End to end: a tiny DeiT (one block, width 16, 4x4
patches of the 8x8 digits) distilled with the `deit` term through `experiment.distill`,
interrupted and resumed.
"""
import functools
import json
import math
import os

import chex
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint, configs, experiment, export, losses, models, report
from kd_jax import objective as objective_lib
from kd_jax import train
from tests.test_mobile_students import _random_variables

TINY = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)


def _abstract_apply(model, shape, **kw):
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  return jax.eval_shape(functools.partial(model.apply, **kw), variables,
                        jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("name, side, tokens", [("deit_tiny", 224, 198),
                                                 ("deit_tiny_cifar", 32, 66)])
def test_taps_are_token_sequences_and_the_distillation_head(name, side, tokens):
  logits, taps = _abstract_apply(models.create(name, 1000), (2, side, side, 3))
  chex.assert_shape(logits, (2, 1000))
  assert set(taps) == {*(f"block_{k}" for k in range(1, 13)), "embedding",
                       "distill_embedding", "distill_logits"}
  chex.assert_shape([taps[f"block_{k}"] for k in range(1, 13)], (2, tokens, 192))
  chex.assert_shape([taps["embedding"], taps["distill_embedding"]], (2, 192))
  chex.assert_shape(taps["distill_logits"], (2, 1000))


def test_training_logits_are_the_class_head_evaluation_the_mean_of_both():
  model = models.create("deit_tiny_cifar", 10, **TINY)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables) == {"params"}
  params = variables["params"]
  head, distill = params["classifier"], params["distill_classifier"]
  train_logits, taps = jax.jit(functools.partial(model.apply, train=True))(variables, x)
  np.testing.assert_allclose(train_logits, taps["embedding"] @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(taps["distill_logits"],
                             taps["distill_embedding"] @ distill["kernel"] + distill["bias"],
                             rtol=1e-5, atol=1e-6)
  eval_logits, eval_taps = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(eval_logits, (train_logits + taps["distill_logits"]) / 2,
                             rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(eval_taps, taps)  # no dropout rng: no stochastic depth
  # With a 'dropout' rng in training, stochastic depth drops whole residual branches
  # (the one block's rate is 0: drop_path_rate is reached at the last block of two).
  deeper = models.create("deit_tiny_cifar", 10, **{**TINY, "depth": 2}, drop_path_rate=0.9)
  deeper_apply = jax.jit(lambda v, x, rngs: deeper.apply(v, x, train=True, rngs=rngs))
  deeper_variables = jax.jit(deeper.init)(jax.random.key(0), x)
  kept, _ = deeper_apply(deeper_variables, x, {})
  dropped, _ = deeper_apply(deeper_variables, x, {"dropout": jax.random.key(3)})
  chex.assert_tree_all_finite(dropped)
  assert not np.allclose(dropped, kept)


def test_patches_must_tile_the_image():
  with pytest.raises(ValueError, match=r"^a 8x8 image does not split into 16x16 patches; "
                     r"set the model's kwargs patch_size \(student.kwargs.patch_size"):
    _abstract_apply(models.create("deit_tiny", 10), (1, 8, 8, 1))


def test_exports_builtins_only_with_fp32_parity_and_converts_to_int8():
  rng = np.random.default_rng(0)
  model = models.create("deit_tiny_cifar", 10, cpu_ops=False)
  variables = _random_variables(model, rng)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(
      variables, images)[0])
  builtins = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for quantization in ("fp32", "int8"):
    flatbuffer = export.to_tflite(model, variables, (32, 32, 3), quantization,
                                  representative_images=images)
    ops = set(export.op_names(flatbuffer))
    # LayerNorm becomes SUM / SUB / MUL / RSQRT, attention BATCH_MATMUL and SOFTMAX,
    # the tanh GELU TFLite's own GELU.
    assert ops <= builtins, ops
    assert {"CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "GELU",
            "RSQRT"} <= ops
    if quantization == "fp32":
      got = export.TFLiteModel(flatbuffer)(images)
      assert np.abs(got - logits).max() <= 1e-4 * np.abs(logits).max()
    else:
      assert {"QUANTIZE", "DEQUANTIZE"} <= ops


# --- the loss ---------------------------------------------------------------------------


def _numpy_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_deit_loss_hand_computed():
  # Hard: the teacher picks classes 0 and 2; row 1's student logits (0, 0, 0) give
  # -log(1/3) = ln 3, row 2's (0, ln 2, ln 5) give p_2 = 5 / 8, so -log(5/8).
  student = np.array([[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(5.0)]])
  teacher = np.array([[3.0, 1.0, -1.0], [0.0, 0.5, 2.0]])
  hard = (math.log(3.0) - math.log(5.0 / 8.0)) / 2
  np.testing.assert_allclose(losses.deit(student, teacher), hard, rtol=1e-6)
  # Soft at T = 2: T^2 / (B K) sum_b KL(p_t,b || p_s,b), p = softmax(z / T).
  log_t, log_s = _numpy_log_softmax(teacher / 2), _numpy_log_softmax(student / 2)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
  soft = 4.0 * kl.sum() / (2 * 3)
  np.testing.assert_allclose(losses.deit(student, teacher, hard=False, temperature=2.0),
                             soft, rtol=1e-6)
  np.testing.assert_allclose(soft, losses.kd(student, teacher, 2.0) / 3, rtol=1e-6)
  for hard_labels in (True, False):
    fn = functools.partial(losses.deit, hard=hard_labels, temperature=2.0)
    each = losses.deit_per_example(student, teacher, hard_labels, 2.0)
    np.testing.assert_allclose(np.mean(each), fn(student, teacher), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(student, teacher), fn(student, teacher),
                               rtol=1e-6)
    with jax.enable_x64(True):
      check_grads(lambda s, fn=fn: fn(s, jnp.asarray(teacher)), (jnp.asarray(student),),
                  order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_deit_term_reads_the_distillation_head_and_needs_one():
  obj = objective_lib.build({"ce_weight": 0.5, "terms": [
      dict(method="deit", weight=0.5, hard=False, temperature=3.0)]},
      total_steps=1, steps_per_epoch=1)
  convolutional = {"embedding": jnp.zeros((2, 4)), "stage_1": jnp.zeros((2, 4, 4, 4))}
  with pytest.raises(ValueError, match=r"^term deit: student.name=resnet8 has no "
                     r"distillation head \(tap 'distill_logits'\); set student.name to "
                     r"deit_tiny or deit_tiny_cifar, or use method='kd'$"):
    objective_lib.resolve(obj, convolutional, convolutional, "resnet8", "resnet8")
  rng = np.random.default_rng(0)
  s_logits, distill, t_logits = (jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
                                 for _ in range(3))
  labels = jnp.array([0, 1, 2, 3])
  s_taps = {"embedding": jnp.zeros((4, 8)), "distill_logits": distill}
  obj = objective_lib.resolve(obj, s_taps, convolutional, "deit_tiny", "resnet8")
  total, parts, _ = obj(0, {}, s_logits, s_taps, t_logits, {}, labels, train=False)
  expected = losses.deit(distill, t_logits, hard=False, temperature=3.0)
  np.testing.assert_allclose(parts["deit"], expected, rtol=1e-6)
  np.testing.assert_allclose(
      total, 0.5 * losses.cross_entropy(s_logits, labels) + 0.5 * expected, rtol=1e-6)


# --- end to end -------------------------------------------------------------------------


class _Interrupt(Exception):
  pass


def test_tiny_deit_distils_and_resumes(tmp_path, monkeypatch):
  # An untrained resnet8 teacher, saved as a finished teacher phase: its decisions are
  # arbitrary but fixed, all the hard variant needs here.
  teacher = models.create("resnet8", 10)
  checkpoint.save_variables(
      str(tmp_path / "teacher_run" / "teacher"),
      jax.jit(functools.partial(teacher.init, train=False))(jax.random.key(0),
                                                             jnp.zeros((1, 8, 8, 1))),
      {"model": "resnet8", "num_classes": 10})
  config = configs.experiment_config("digits", "tiny")
  config.teacher.checkpoint = str(tmp_path / "teacher_run")
  config.student.name = "deit_tiny_cifar"
  config.student.kwargs = TINY
  config.student.validation_split = None  # no validation passes: shorter
  config.data.validation_fraction = 0.0
  config.train.update(epochs=1, checkpoint_every_steps=4, optimizer="adamw",
                      learning_rate=1e-3, weight_decay=0.05)
  config.train_vanilla = False
  config.export.variants = ()
  config.distill.ce_weight = 0.5
  config.distill.terms = [dict(method="deit", weight=0.5, hard=True)]
  real = train.make_train_step
  steps = []

  def counted(interrupt_at):
    def make(model, teacher, objective, *args, **kwargs):
      step = real(model, teacher, objective, *args, **kwargs)

      def run(*a):
        if objective.terms:  # the distilled phase, not the teacher's
          steps.append(1)
          if len(steps) == interrupt_at:
            raise _Interrupt()
        return step(*a)
      return run
    return make

  monkeypatch.setattr(train, "make_train_step", counted(6))
  workdir = tmp_path / "run"
  with pytest.raises(_Interrupt):
    experiment.distill(config, str(workdir))
  assert os.listdir(workdir / "distilled" / "checkpoints") == ["4"]
  steps.clear()
  monkeypatch.setattr(train, "make_train_step", counted(0))
  summary = experiment.distill(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  trained = [r for r in records if r["phase"] == "distilled" and r["kind"] == "train"]
  total = max(r["step"] for r in trained)
  assert len(steps) == total - 4  # the rerun started from the step-4 checkpoint
  assert trained and all(math.isfinite(r["deit"]) and math.isfinite(r["ce"])
                         for r in trained)
  assert 0.0 <= summary["distilled_accuracy"] <= 1.0
  # The report covers a ViT student: its token taps give no attention map, and it says so.
  text = report.write_report(config, str(workdir))
  assert "No attention map for the distilled student" in text
  assert "attention maps](attention_maps.png)" in text  # the teacher's (resnet8) map


# --- edge features ----------------------------------------------------------------------


def test_edge_features_on_a_vision_transformer():
  from kd_jax.edge import early_exit, prune, quantize
  model = models.create("deit_tiny_cifar", 10, **TINY)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"^channel pruning supports ResNets of BasicBlocks "
                     r"and WideResNets .*got DeiT, choose one of those models$"):
    prune.prune(model, variables, (8, 8, 1), flops_ratio=0.5)
  heads = early_exit.ExitHeads(10, ("block_1",))
  with pytest.raises(ValueError, match=r"^the student has no NHWC feature-map taps for "
                     r"exit heads .*; set edge.exits.enabled=False"):
    early_exit.init_exit_heads(heads, model, variables, (8, 8, 1))
  # QAT: dense outputs and the marked tensors (LayerNorm outputs, attention weights,
  # GELU outputs, residual sums) get ranges; one training batch sets them.
  qat = quantize.quant_aware(model)
  qat_variables = jax.jit(qat.init)(jax.random.key(0), x)
  ranges = [path for path, _ in jax.tree_util.tree_leaves_with_path(
      qat_variables["batch_stats"]) if path[-1].key.endswith("_range")]
  assert any("weights" in str(p) for p in ranges) and any("gelu" in str(p) for p in ranges)
  (logits, _), stats = jax.jit(functools.partial(
      qat.apply, train=True, mutable=["batch_stats"]))(qat_variables, x)
  chex.assert_tree_all_finite((logits, stats))
  rounded, _ = jax.jit(qat.apply)({**qat_variables, **stats}, x)
  plain, _ = jax.jit(model.apply)(variables, x)
  assert 0 < np.abs(rounded - plain).max() < 0.5 * np.abs(plain).max() + 0.1
