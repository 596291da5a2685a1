"""`kd-jax profile`: exact MACs, the Pareto front and the rules by hand, end to end on tiny
candidates (a model name, a checkpoint folder, PyTorch checkpoint files) with top-1s
measured on the digits' test split, and its one-line errors."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kd_jax import checkpoint, cli, configs, models, pretrained, profile
from kd_jax import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "kd_jax", "experiments", "profile_cifar.py:tiny")


class _ConvNet(nn.Module):
  """A 3x3 VALID convolution to 8 channels, then a dense layer; no biases."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(8, (3, 3), padding="VALID", use_bias=False)(x)
    logits = nn.Dense(self.num_classes, use_bias=False)(h.reshape(h.shape[0], -1))
    return logits, {"embedding": h}


def test_macs_and_peak_activations_of_a_known_network():
  model = _ConvNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  costs = profile.compiled_costs(model, variables, (8, 8, 1))
  # conv: 6x6x8 outputs x 3x3x1 taps = 2592; dense: 288 inputs x 10 outputs = 2880.
  assert costs["macs"] == 2592 + 2880
  # XLA's own count of the compiled forward (2 flops a MAC) agrees: the cross-check of
  # kd_jax's one MAC count.
  compiled = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(
      variables, jnp.zeros((1, 8, 8, 1))).compile()
  assert compiled.cost_analysis()["flops"] / 2 == costs["macs"]
  # At least the conv output (288 floats) and the logits (10) are live at once; at most
  # every intermediate buffer (conv output, its flattened copy) without any reuse.
  assert 4 * (288 + 10) <= costs["peak_activation_bytes"] <= 4 * (2 * 288 + 10)


ROWS = [dict(label="a", accuracy=70.0, tflite_int8_ms=1.0),
        dict(label="b", accuracy=75.0, tflite_int8_ms=3.0),
        dict(label="c", accuracy=74.0, tflite_int8_ms=4.0),   # b is better and faster
        dict(label="d", accuracy=79.0, tflite_int8_ms=9.0),
        dict(label="e", accuracy=None, tflite_int8_ms=0.5),   # no top-1: never picked
        dict(label="f", accuracy=75.0, tflite_int8_ms=3.0)]   # ties b exactly


def test_pareto_front_and_recommendation_rules_by_hand():
  assert profile.pareto_front(ROWS, "tflite_int8_ms") == [True, True, False, True, False,
                                                          True]
  # A row without the cost neither competes nor lies on the front.
  assert profile.pareto_front(ROWS, "tflite_int8_uj") == [False] * len(ROWS)
  rule = dict(rule="best_accuracy_under_latency", latency="tflite_int8",
              latency_budget_ms=5.0, min_accuracy=0.0)
  index, reason = profile.recommend(ROWS, rule)
  assert index == 1  # b and f tie on both: the first listed
  assert reason == ("b: the highest top-1 (75.00%) of the 4 candidates with TFLite int8 "
                    "latency ≤ 5 ms (3.00 ms)")
  assert profile.recommend(ROWS, {**rule, "latency_budget_ms": 0.9})[0] is None
  index, reason = profile.recommend(
      ROWS, {**rule, "rule": "fastest_above_accuracy", "min_accuracy": 74.5})
  assert index == 1 and reason.startswith("b: the lowest TFLite int8 latency (3.00 ms) of "
                                          "the 3 candidates with top-1 ≥ 74.5%")


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
  """A `kd-jax train-teacher`-style workdir holding a resnet8 with a recorded top-1."""
  workdir = tmp_path_factory.mktemp("teacher")
  model = models.create("resnet8", 10)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 1)))
  checkpoint.save_variables(str(workdir / "teacher"), variables, {
      "model": "resnet8", "num_classes": 10, "dataset": "kd_digits",
      "metrics": {"accuracy": 0.5, "num_examples": 359}})
  return str(workdir)


def test_profile_command_on_a_name_and_a_checkpoint(saved_teacher, tmp_path, capsys):
  out = str(tmp_path / "profile")
  cli.main(["kd-jax", "profile", f"--config={TINY}", f"--workdir={out}",
            f"--config.candidates=resnet8,{saved_teacher}"])
  printed = capsys.readouterr().out
  with open(os.path.join(out, "profile.json")) as f:
    result = json.load(f)
  named, loaded = result["rows"]
  assert (named["label"], loaded["label"]) == (
      "resnet8", f"resnet8 ({os.path.basename(saved_teacher)})")
  # The published resnet8 count with 100 classes and 3 input channels, 83,892, less
  # 90 classes x 65 classifier weights and 2 x 3x3x16 stem weights.
  assert named["params"] == loaded["params"] == 83_892 - 90 * 65 - 2 * 9 * 16
  assert named["macs"] == loaded["macs"] > 0  # same network, other weights
  # The saved model's weights are at hand: measured (not its saved 50%) on the digits.
  assert named["accuracy"] is None and 0 < loaded["accuracy"] < 100
  assert loaded["accuracy_source"] == "measured (kd_digits test, 359 images)"
  assert result["host"]["calibration"] == "2 kd_digits train images"
  for row in result["rows"]:
    for key in ("tflite_fp32_ms", "tflite_int8_ms", "throughput_images_per_s"):
      assert row[key] > 0, key
    assert row["tflite_int8_bytes"] < 0.4 * row["tflite_fp32_bytes"]
    for q in ("fp32", "int8"):  # energy per inference, labelled
      assert row[f"tflite_{q}_uj"] > 0 and row[f"tflite_{q}_energy"] in ("measured",
                                                                        "estimated")
  assert [r["recommended"] for r in result["rows"]] == [False, True]
  assert result["recommendation"].startswith("resnet8 (")
  assert os.path.getsize(os.path.join(out, "pareto.png")) > 0
  text = open(os.path.join(out, "profile.md")).read()
  assert text in printed
  assert (f"| resnet8 ({os.path.basename(saved_teacher)}) **★** | "
          f"{loaded['accuracy']:.2f} | measured (kd_digits test, 359 images) |") in text
  assert f"| {named['params'] / 1e6:.2f} | {named['macs'] / 1e6:.1f} |" in text
  assert "int8 calibrated on 2 kd_digits train images." in text


def test_without_a_dataset_a_saved_model_keeps_its_saved_top1(saved_teacher):
  config = configs.experiment_config("profile_cifar", "tiny")
  config.data.name = None
  config.candidates = f"resnet8,{saved_teacher}"
  named, loaded = profile.resolve_candidates(config)
  assert (named.accuracy, loaded.accuracy) == (None, 50.0)
  assert loaded.accuracy_source == "checkpoint (kd_digits eval)"
  assert profile.dataset_info(config) is None
  images, what = profile.calibration_images(config, None)
  assert images.shape == (2, 8, 8, 1) and what == "2 synthetic (normal noise) images"


# PyTorch names of the Flax variables of a leaf module (kd_jax.pretrained maps the
# module names; a BatchNorm's scale is its weight).
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _torch_state_dict(torch, model_name, variables):
  """`variables` as the state dict of `model_name`'s PyTorch reference definition:
  conv kernels HWIO -> OIHW, dense kernels transposed."""
  state = {}
  for collection in ("params", "batch_stats"):
    for path, array in traverse_util.flatten_dict(variables[collection]).items():
      array = np.array(array)  # a writable copy, as torch.from_numpy wants
      if path[-1] == "kernel":
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
      name = pretrained.torch_module_name(model_name, path[:-1])
      state[f"{name}.{_TORCH_LEAF[path[-1]]}"] = torch.from_numpy(
          np.ascontiguousarray(array))
  return state


def _teacher(model_name, seed):
  """Seeded variables of a 10-class digits model, BatchNorm statistics made non-trivial
  so that predictions vary across images."""
  model = models.create(model_name, 10)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(seed)
  stats = {path: rng.uniform(-0.3, 0.3, x.shape) if path[-1] == "mean"
           else rng.uniform(0.5, 2.0, x.shape)
           for path, x in traverse_util.flatten_dict(variables["batch_stats"]).items()}
  return model, {"params": variables["params"], "batch_stats": jax.tree.map(
      jnp.float32, traverse_util.unflatten_dict(stats))}


def test_profiles_two_imported_teachers_with_measured_accuracies(tmp_path):
  torch = pytest.importorskip("torch", reason="saving .pth files needs the torch extra")
  config = configs.experiment_config("profile_cifar", "tiny")
  candidates, expected = [], {}
  for model_name, seed in (("resnet8", 1), ("wrn_16_1", 2)):
    model, variables = _teacher(model_name, seed)
    path = str(tmp_path / f"{model_name}.pth")
    torch.save({"epoch": 240, "model": _torch_state_dict(torch, model_name, variables)},
               path)  # as RepDistiller saves a teacher
    candidates.append(f"{model_name}={path}")
    # The top-1 computed here: the same eval-mode forward of the same variables on the
    # same preprocessed test images, on one device. Its logits (below 1 here) may differ
    # from the profile's sharded evaluation only by float32 rounding (~1e-6 at most),
    # below every image's margin between its two largest logits (> 1e-5, checked), so
    # both count the same argmaxes exactly.
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False)[0])
    correct = total = 0
    for batch in data_lib.host_eval_iterator(config.data,
                                             batch_size=config.eval_batch_size):
      keep = batch["mask"] > 0
      logits = np.asarray(forward(variables, batch["image"]))[keep]
      top2 = np.sort(logits, -1)[:, -2:]
      assert np.max(np.abs(logits)) < 1
      assert np.min(top2[:, 1] - top2[:, 0]) > 1e-5
      correct += int(np.sum(np.argmax(logits, -1) == batch["label"][keep]))
      total += int(np.sum(keep))
    expected[f"{model_name} ({model_name}.pth)"] = 100.0 * (correct / total)
  out = str(tmp_path / "profile")
  cli.main(["kd-jax", "profile", f"--config={TINY}", f"--workdir={out}",
            f"--config.candidates={','.join(candidates)}",
            "--config.quantizations=('int8',)"])  # the one variant recommend.latency needs
  with open(os.path.join(out, "profile.json")) as f:
    rows = json.load(f)["rows"]
  assert {r["label"]: r["accuracy"] for r in rows} == expected
  assert len(set(expected.values())) == 2 and all(0 < a < 100 for a in expected.values())
  assert [r["accuracy_source"] for r in rows] == ["measured (kd_digits test, 359 images)"] * 2
  text = open(os.path.join(out, "profile.md")).read()
  for label, accuracy in expected.items():
    assert f"| {label}" in text and f"| {accuracy:.2f} | measured (kd_digits test" in text


@pytest.mark.parametrize("override, message", [
    ("--config.candidates=resnet9", "candidate 'resnet9' is neither a model, a folder"),
    ("--config.candidates=t.pth", "candidate 't.pth' is a checkpoint file; name its "
     "model: MODEL=t.pth"),
    ("--config.candidates=resnet9=t.pth", "candidate 'resnet9=t.pth': 'resnet9' is not a "
     "model with a PyTorch reference"),
    ("--config.candidates=resnet8=missing.pth", "candidate 'resnet8=missing.pth': no file "
     "missing.pth"),
    ("--config.recommend.rule=cheapest", "recommend.rule='cheapest' is unknown; use one of"),
    ("--config.recommend.latency=tflite_fp16", "recommend.latency='tflite_fp16' is not "
     "measured; use one of tflite_fp32, tflite_int8"),
    ("--config.data.name=cifar100", "has data.name='kd_digits', not the config's "
     "data.name='cifar100'; set --config.data.name or drop it"),
    ("--config.input_shape=(8, 8, 3)", "data.name='kd_digits' has images of shape "
     "(8, 8, 1); set --config.input_shape='(8, 8, 1)'"),
])
def test_bad_profile_input_is_one_line(override, message, saved_teacher, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["kd-jax", "profile", f"--config={TINY}", f"--workdir={tmp_path}",
              f"--config.candidates=resnet8,{saved_teacher}", override])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("kd-jax: error: ") and "\n" not in err, err
  assert message in err
