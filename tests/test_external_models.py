"""User Flax modules (not the zoo) as teacher and student, named by import path.

The modules live in tests/external_models.py; taps are checked against their
submodules applied by hand, and a tiny distillation runs between the two.
"""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import configs, data, experiment, models, pretrained, rundir
from tests import digit_folders
from tests import external_models as user

CNN = "tests.external_models:tiny_cnn"
MLP = "tests.external_models:tiny_mlp"


def _tiny_config():
  spec = importlib.util.spec_from_file_location(
      "experiments_digits", os.path.join(configs.EXPERIMENTS_DIR, "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def _images(n=2):
  return jax.random.normal(jax.random.key(1), (n, 8, 8, 1))


def test_taps_are_the_submodule_outputs_by_path():
  model = models.create(CNN, 10, width=4)
  x = _images()
  variables = model.init(jax.random.key(0), x)
  # The user's variables sit at the top, as the module alone would have them.
  assert jax.tree.structure(variables) == jax.tree.structure(
      user.tiny_cnn(10, 4).init(jax.random.key(0), x))
  logits, taps = model.apply(variables, x)

  def part(*path):  # the variables of the submodule at `path`
    return {collection: _at(tree, path) for collection, tree in variables.items()}

  layer1 = user.Stage(4).apply(part("layer1"), x, False)
  np.testing.assert_allclose(taps["layer1"], layer1, rtol=1e-6)
  block = user.Block(8).apply(part("layer2", "block_0"), layer1, False)
  np.testing.assert_allclose(taps["layer2/block_0"], block, rtol=1e-6)
  np.testing.assert_allclose(taps["layer2/block_0/conv"], jax.lax.conv_general_dilated(
      layer1, variables["params"]["layer2"]["block_0"]["conv"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")), rtol=1e-5, atol=1e-6)
  # The embedding is what the classifier reads: the pooled last stage.
  np.testing.assert_allclose(taps["embedding"], jnp.mean(taps["layer2"], axis=(1, 2)),
                             rtol=1e-6)
  np.testing.assert_allclose(logits, user.tiny_cnn(10, 4).apply(variables, x), rtol=1e-6)
  assert logits.dtype == jnp.float32 and taps["head"].shape == (2, 10)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_a_module_without_train_built_in_setup():
  model = models.create(MLP, 10, hidden=12, cpu_ops=True, bn_axis_name="data")
  x = _images(3)
  variables = model.init(jax.random.key(0), x)
  logits, taps = model.apply(variables, x, train=True)  # train is not passed on
  assert sorted(taps) == ["classifier", "embedding", "features", "hidden"]
  np.testing.assert_allclose(taps["embedding"], jax.nn.relu(taps["hidden"]))
  np.testing.assert_allclose(logits, user.tiny_mlp(10, 12).apply(variables, x), rtol=1e-6)


def test_a_missing_tap_lists_the_module_paths():
  config = _tiny_config()
  config.teacher.name, config.teacher.kwargs = CNN, {"width": 4}
  config.student.name = MLP
  config.distill.terms = [dict(method="fitnet", weight=1.0, student_tap="features",
                               teacher_tap="layer3", adapter="conv1x1")]
  with pytest.raises(ValueError) as e:
    configs.validate(config, deep=True)
  message = str(e.value)
  assert "\n" not in message and "has no tap 'layer3'" in message
  assert "module paths: " in message and "layer1, layer1/block_0" in message


@pytest.mark.parametrize("name, kwargs, expected", [
    ("no_such_package_kd:f", {}, "student.name='no_such_package_kd:f': cannot import "
                                 "no_such_package_kd (No module named"),
    ("tests.external_models:missing", {}, "has no attribute missing"),
    ("tests.external_models:NOT_CALLABLE", {}, "names a int, not a callable"),
    ("tests.external_models:no_classes", {}, "no_classes does not take num_classes"),
    (":tiny_cnn", {}, "is not an import path"),
    (CNN, {"depth": 3}, "does not take student.kwargs={'depth': 3}"),
    ("tests.external_models", {}, "is not a known model"),
])
def test_bad_import_paths_are_one_line_errors(name, kwargs, expected):
  config = _tiny_config()
  config.student.name, config.student.kwargs = name, kwargs
  with pytest.raises(ValueError) as e:
    configs.validate(config)
  assert "\n" not in str(e.value) and expected in str(e.value)


def test_torch_weights_need_a_zoo_model():
  with pytest.raises(ValueError, match="zoo models only"):
    pretrained.family(CNN)


def test_distill_between_two_user_modules(tmp_path):
  config = _tiny_config()
  # On an image folder written here: RGB PNGs of the digits read as grayscale.
  config.data.name = f"folder:{digit_folders.write_digits(tmp_path / 'images')}"
  config.data.channels, config.data.flip = 1, False
  config.student.train_split = None
  config.teacher.name, config.teacher.kwargs = CNN, {"width": 4}
  config.student.name, config.student.kwargs = MLP, {"hidden": 8}
  config.teacher.train.epochs = 0.5
  config.train.epochs = 2
  config.train_vanilla = False
  config.data.validation_fraction = 0.0  # no validation phases: fewer compiles
  config.student.validation_split = None
  config.eval_batch_size = 360
  config.export.variants = ("fp32",)
  config.distill.terms = [
      dict(method="kd", weight=0.9, temperature=4.0),
      dict(method="fitnet", weight=1.0, student_tap="features", teacher_tap="layer1",
           adapter="conv1x1"),
      dict(method="pkt", weight=1.0)]  # on the embeddings
  workdir = str(tmp_path / "run")
  summary = experiment.distill(config, workdir)
  for key in ("teacher_accuracy", "distilled_accuracy"):
    assert math.isfinite(summary[key])
  assert summary["teacher"] == CNN and summary["student"] == MLP
  assert math.isfinite(summary["tflite"]["fp32"]["accuracy"])
  with open(os.path.join(workdir, "export", "export.json")) as f:
    assert json.load(f)["student fp32"]["macs"] > 0
  # The saved models reload by their import path, the teacher's checked by check_run.
  config = configs.validate(config)
  experiment.check_run(config, workdir)
  info = data.get_info(config.data)
  teacher, t_vars = rundir.load_teacher(config, workdir, info)
  student, s_vars = rundir.load_phase(config, workdir, rundir.DISTILLED, info)
  assert teacher.factory == CNN and student.factory == MLP
  x = _images()
  assert np.all(np.isfinite(student.apply(s_vars, x)[0]))
  assert np.all(np.isfinite(teacher.apply(t_vars, x)[0]))
