"""Tests for kd_jax.edge.early_exit: cascade table, MACs, head training, TFLite exits."""
import collections
import os

from ai_edge_litert import schema_py_generated as tflite_schema
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from kd_jax import data, export, losses, parallel, train
from kd_jax.edge import cost
from kd_jax.edge import early_exit
from kd_jax.models import create

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
EXITS = ("stage_1", "stage_2")  # stage_3 is what the final classifier already reads
TRAIN = dict(steps=30, batch_size=32, learning_rate=1e-2)
TEACHER_SCALE = 20.0


@pytest.fixture(scope="module")
def student():
  model = create("resnet8", num_classes=NUM_CLASSES)
  return model, model.init(jax.random.key(1), jnp.zeros((1, *IMAGE_SHAPE)))


def _sharpened(variables):
  """The same network with its classifier scaled: logits x TEACHER_SCALE."""
  params = dict(variables["params"])
  params["classifier"] = jax.tree.map(lambda w: TEACHER_SCALE * w, params["classifier"])
  return {**variables, "params": params}


@pytest.fixture(scope="module")
def trained(student):
  """Exits with a 1x1 conv-BN-ReLU, trained against a teacher with confident logits.

  The teacher is the student itself with its classifier scaled (`_sharpened`).
  """
  model, variables = student
  heads = early_exit.ExitHeads(NUM_CLASSES, EXITS, hidden=8)
  before = train.fingerprint(variables)
  head_variables, history = early_exit.train_exit_heads(
      model, variables, model, _sharpened(variables), data.default_data_config(),
      heads=heads, **TRAIN)
  return dict(heads=heads, head_variables=head_variables, history=history,
              student_fingerprint_before=before)


@pytest.fixture(scope="module")
def evaluated(student, trained):
  model, variables = student
  outputs, labels = early_exit.exit_outputs(
      model, variables, trained["heads"], trained["head_variables"],
      data.eval_iterator(data.default_data_config(), batch_size=128))
  macs = early_exit.exit_macs(model, variables, trained["heads"],
                              trained["head_variables"], IMAGE_SHAPE)
  return dict(outputs=outputs, labels=labels, macs=macs)


def _logits(confidence, predicted, num_classes=2):
  """Logits whose softmax puts `confidence` on class `predicted` (2 classes)."""
  probs = np.full(num_classes, 1.0 - confidence)
  probs[predicted] = confidence
  return np.log(probs)


def test_threshold_table_hand_computed():
  # Four examples of class 0; (confidence, predicted class) at each exit:
  #   example  stage_1     stage_2     final
  #   0        0.90 right  0.95 right  right
  #   1        0.60 wrong  0.80 right  right
  #   2        0.55 wrong  0.70 wrong  right
  #   3        0.70 right  0.60 wrong  wrong
  table = {"stage_1": [(0.9, 0), (0.6, 1), (0.55, 1), (0.7, 0)],
           "stage_2": [(0.95, 0), (0.8, 0), (0.7, 1), (0.6, 1)],
           "final": [(0.99, 0), (0.99, 0), (0.99, 0), (0.99, 1)]}
  outputs = {name: np.stack([_logits(c, k) for c, k in rows]).astype(np.float32)
             for name, rows in table.items()}
  labels = np.zeros(4, np.int32)
  macs = {"stage_1": dict(macs=10, head_macs=1), "stage_2": dict(macs=30, head_macs=2),
          "final": dict(macs=50, head_macs=0)}
  # Stopping at stage_1 / stage_2 / final costs 10 / 30 + 1 / 50 + 1 + 2 (shared
  # layers computed once).
  rows = early_exit.threshold_table(outputs, labels, macs, [0.0, 0.65, 0.75, 1.01])
  assert rows == [
      # All stop at stage_1: examples 0 and 3 right.
      dict(threshold=0.0, accuracy=0.5, avg_macs=10.0, macs_ratio=10 / 50,
           exit_share={"stage_1": 1.0, "stage_2": 0.0, "final": 0.0}),
      # 0, 3 stop at stage_1 (right); 1 (right), 2 (wrong) at stage_2.
      dict(threshold=0.65, accuracy=0.75, avg_macs=(10 + 31 + 31 + 10) / 4,
           macs_ratio=20.5 / 50,
           exit_share={"stage_1": 0.5, "stage_2": 0.5, "final": 0.0}),
      # 0 at stage_1, 1 at stage_2, 2 and 3 at final: only 3 is wrong.
      dict(threshold=0.75, accuracy=0.75, avg_macs=(10 + 31 + 53 + 53) / 4,
           macs_ratio=36.75 / 50,
           exit_share={"stage_1": 0.25, "stage_2": 0.25, "final": 0.5}),
      # Nothing reaches 1.01: the final classifier, with both heads run before it.
      dict(threshold=1.01, accuracy=0.75, avg_macs=53.0, macs_ratio=53 / 50,
           exit_share={"stage_1": 0.0, "stage_2": 0.0, "final": 1.0}),
  ]


def test_threshold_table_rejects_mismatched_exits():
  outputs = {"stage_1": np.zeros((2, 3)), "final": np.zeros((2, 3))}
  with pytest.raises(ValueError, match="same exits"):
    early_exit.threshold_table(outputs, np.zeros(2), {"final": dict(macs=1, head_macs=0)},
                               [0.5])
  with pytest.raises(ValueError, match="same exits"):
    early_exit.threshold_table({"stage_1": outputs["stage_1"]}, np.zeros(2),
                               {"stage_1": dict(macs=1, head_macs=1)}, [0.5])


def test_threshold_extremes_on_trained_exits(evaluated):
  outputs, labels, macs = evaluated["outputs"], evaluated["labels"], evaluated["macs"]
  accuracy = {name: float(np.mean(np.argmax(logits, -1) == labels))
              for name, logits in outputs.items()}
  first, everything = early_exit.threshold_table(outputs, labels, macs, [0.0, 1.01])
  assert first["exit_share"] == {"stage_1": 1.0, "stage_2": 0.0, "final": 0.0}
  assert first["accuracy"] == accuracy["stage_1"]
  assert first["avg_macs"] == macs["stage_1"]["macs"]
  assert everything["exit_share"] == {"stage_1": 0.0, "stage_2": 0.0, "final": 1.0}
  assert everything["accuracy"] == accuracy["final"]
  assert everything["avg_macs"] == (macs["final"]["macs"] + macs["stage_1"]["head_macs"]
                                    + macs["stage_2"]["head_macs"])


def test_exit_macs_hand_computed(evaluated):
  # resnet8 on 8x8x1, MACs = output elements x kernel taps x input channels:
  #   stem 3x3 1->16 at 8x8:                                   64*9*16      =   9216
  #   stage_1, two 3x3 16->16 at 8x8:                          2*64*9*16*16 = 294912
  #   stage_2 at 4x4: 3x3 16->32, 3x3 32->32, 1x1 16->32:      73728+147456+8192
  #   stage_3 at 2x2: 3x3 32->64, 3x3 64->64, 1x1 32->64:      73728+147456+8192
  #   classifier 64->10:                                       640
  # Heads (hidden=8): 1x1 C->8 at HxW, then dense 8->10 (pooling costs no MACs).
  stage_1 = 9216 + 294912
  stage_2 = stage_1 + 73728 + 147456 + 8192
  full = stage_2 + 73728 + 147456 + 8192 + 640
  head_1, head_2 = 64 * 16 * 8 + 80, 16 * 32 * 8 + 80
  assert evaluated["macs"] == {
      "stage_1": dict(macs=stage_1 + head_1, head_macs=head_1),
      "stage_2": dict(macs=stage_2 + head_2, head_macs=head_2),
      "final": dict(macs=full, head_macs=0)}
  assert list(evaluated["macs"]) == ["stage_1", "stage_2", "final"]


def test_head_parameter_counts(student):
  model, variables = student
  # Per head: [1x1 conv C*h + BN scale and bias 2h] + dense (h or C)*10 + 10.
  for hidden, expected in ((None, (16 * 10 + 10) + (32 * 10 + 10)),
                           (8, (16 * 8 + 16 + 90) + (32 * 8 + 16 + 90))):
    heads = early_exit.ExitHeads(NUM_CLASSES, EXITS, hidden=hidden)
    head_variables = early_exit.init_exit_heads(heads, model, variables, IMAGE_SHAPE)
    assert cost.count_params(head_variables) == expected
    assert list(head_variables["params"]) == list(EXITS)


def test_training_lowers_exit_kd_and_leaves_student_unchanged(student, trained,
                                                              evaluated):
  model, variables = student
  assert train.fingerprint(variables) == trained["student_fingerprint_before"]
  assert set(trained["history"]) == {"loss"} | {f"{tap}/{metric}" for tap in EXITS
                                                for metric in ("ce", "kd", "accuracy")}
  assert trained["history"]["loss"].shape == (TRAIN["steps"],)
  # On the held-out split, against the teacher's logits: TEACHER_SCALE x final.
  initial = early_exit.init_exit_heads(trained["heads"], model, variables, IMAGE_SHAPE)
  before, _ = early_exit.exit_outputs(
      model, variables, trained["heads"], initial,
      data.eval_iterator(data.default_data_config(), batch_size=128))
  after = evaluated["outputs"]
  np.testing.assert_array_equal(before["final"], after["final"])
  for tap in EXITS:
    kd_before = float(losses.kd(before[tap], TEACHER_SCALE * before["final"]))
    kd_after = float(losses.kd(after[tap], TEACHER_SCALE * after["final"]))
    assert kd_after < 0.5 * kd_before, (tap, kd_before, kd_after)


def test_training_is_deterministic_and_the_same_on_one_device(student):
  model, variables = student
  heads = early_exit.ExitHeads(NUM_CLASSES, EXITS, hidden=8)
  run = lambda mesh=None: early_exit.train_exit_heads(
      model, variables, model, variables, data.default_data_config(), heads=heads,
      steps=4, batch_size=32, learning_rate=1e-2, seed=3, mesh=mesh)[0]
  four_devices = run()
  assert train.fingerprint(run()) == train.fingerprint(four_devices)
  one_device = run(Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               one_device, four_devices)


def test_exit_outputs_drop_padding_and_match_exit_functions(student, trained):
  model, variables = student
  heads, head_variables = trained["heads"], trained["head_variables"]
  images = np.random.default_rng(0).normal(size=(12, *IMAGE_SHAPE)).astype(np.float32)
  labels = np.arange(12, dtype=np.int32) % NUM_CLASSES
  mask = np.array([1] * 10 + [0] * 2, np.float32)  # the last two rows are padding
  batches = [{"image": images[:8], "label": labels[:8]},
             {"image": images[8:], "label": labels[8:], "mask": mask[8:]}]
  outputs, kept_labels = early_exit.exit_outputs(model, variables, heads, head_variables,
                                                 batches)
  assert list(outputs) == ["stage_1", "stage_2", "final"]
  np.testing.assert_array_equal(kept_labels, labels[:10])
  for name, logits in outputs.items():
    fn = early_exit.exit_function(model, variables, heads, head_variables, name)
    np.testing.assert_allclose(logits, jax.jit(fn)(images[:10]), atol=1e-6)


@pytest.mark.parametrize("taps, message", [
    (("stage_4",), "feature-map taps"),
    (("embedding",), "feature-map taps"),
    (("stage_2", "stage_1"), "shallowest first"),
    (("stage_1", "stage_1"), "shallowest first"),
])
def test_bad_exit_taps_are_rejected(student, taps, message):
  model, variables = student
  heads = early_exit.ExitHeads(NUM_CLASSES, taps)
  with pytest.raises(ValueError, match=message):
    early_exit.init_exit_heads(heads, model, variables, IMAGE_SHAPE)


def _conv_count(flatbuffer):
  """Number of convolution operators (the stem's 1-channel conv is a depthwise one)."""
  model = tflite_schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
  codes = [model.operatorCodes[op.opcodeIndex]
           for subgraph in model.subgraphs for op in subgraph.operators]
  ops = collections.Counter(
      export._BUILTIN_OP_NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
      for code in codes)
  return ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"]


@pytest.fixture(scope="module")
def exported(student, trained, tmp_path_factory):
  model, variables = student
  out_dir = str(tmp_path_factory.mktemp("exits"))
  images = np.random.default_rng(1).normal(size=(16, *IMAGE_SHAPE)).astype(np.float32)
  return out_dir, early_exit.export_cascade(
      model, variables, trained["heads"], trained["head_variables"], IMAGE_SHAPE,
      out_dir, parity_images=images)


def test_segment_chain_reproduces_the_exits_with_builtin_ops(exported):
  out_dir, result = exported
  assert list(result["segments"]) == ["stage_1", "stage_2", "final"]
  assert result["paths"] == [os.path.join(out_dir, f"exit_segment_{k}_{name}.tflite")
                             for k, name in ((1, "stage_1"), (2, "stage_2"), (3, "final"))]
  # Every exit's and the final logits of the chained fp32 segments against JAX's
  # exit functions on 16 images: float32 sums reordered by XNNPACK (measured 6e-8).
  assert result["max_abs_logit_diff"] < 1e-5
  builtin_names = set(export._BUILTIN_OP_NAMES.values()) - {"CUSTOM"}
  for segment in result["segments"].values():
    assert os.path.getsize(segment["path"]) == segment["bytes"]
    assert set(segment["ops"]) <= builtin_names, segment["ops"]
  assert result["bytes"] == sum(s["bytes"] for s in result["segments"].values())


def test_each_stage_is_computed_once(student, exported, evaluated):
  model, variables = student
  _, result = exported
  segments = result["segments"]
  convs = []
  for segment in segments.values():
    with open(segment["path"], "rb") as f:
      convs.append(_conv_count(f.read()))
  # stem + 2 (stage_1) + the head's 1x1; 3 (stage_2, with its projection) + the head's;
  # 3 (stage_3): 11 convolutions in all, the student's 9 and the heads' 2.
  assert convs == [4, 4, 3]
  # The segments' student layers add up to the student, exactly.
  assert (sum(s["backbone_macs"] for s in segments.values())
          == cost.macs(model, variables, IMAGE_SHAPE) == evaluated["macs"]["final"]["macs"])
  # Leaving at exit k costs segments 1..k: threshold_table's shared-layer cost.
  macs = evaluated["macs"]
  assert segments["stage_1"]["macs"] == macs["stage_1"]["macs"]
  assert (segments["stage_1"]["macs"] + segments["stage_2"]["macs"]
          == macs["stage_2"]["macs"] + macs["stage_1"]["head_macs"])
  assert segments["stage_2"]["head_macs"] == macs["stage_2"]["head_macs"]
  assert sum(s["macs"] for s in segments.values()) == macs["final"]["macs"] + sum(
      macs[e]["head_macs"] for e in EXITS)


def test_cascade_measures_what_the_threshold_table_predicts(student, trained, exported):
  model, variables = student
  _, result = exported
  batch = next(data.eval_iterator(data.default_data_config(), batch_size=64))
  images, labels = batch["image"][:48], batch["label"][:48]
  outputs, _ = early_exit.exit_outputs(model, variables, trained["heads"],
                                       trained["head_variables"],
                                       [{"image": images, "label": labels}])
  macs = early_exit.exit_macs(model, variables, trained["heads"],
                              trained["head_variables"], IMAGE_SHAPE)
  full = export.to_tflite(model, variables, IMAGE_SHAPE)
  full_macs = macs["final"]["macs"]
  for threshold in (0.0, 0.6, 1.01):
    (predicted,) = early_exit.threshold_table(outputs, labels, macs, [threshold])
    measured = early_exit.measure_cascade(result["paths"], full, result["segments"],
                                          images, labels, threshold, full_macs, repeats=1)
    # Same stops as JAX (fp32 parity ~1e-7), so the same accuracy, shares and MACs.
    assert measured["exit_share"] == predicted["exit_share"], threshold
    assert measured["accuracy"] == predicted["accuracy"]
    assert measured["macs"] == pytest.approx(predicted["avg_macs"], rel=1e-12)
    assert measured["latency_ms"] > 0 and measured["full_latency_ms"] > 0
    assert measured["full_macs"] == full_macs and measured["images"] == 48
  # Everything leaves at the first exit at threshold 0: a fraction of the MACs.
  assert measured["macs"] > full_macs > early_exit.measure_cascade(
      result["paths"], full, result["segments"], images, labels, 0.0, full_macs,
      repeats=1)["macs"]
