"""Each method of experiments/digits_recent.py trains end to end from one tiny teacher."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import configs, experiment, losses, models, objective, parallel, train
from kd_jax.experiments import digits_recent


@pytest.fixture
def teacher_dir(tiny_teacher):
  return tiny_teacher


@pytest.mark.parametrize("method", [m for m in digits_recent.METHODS if m != "kd"])
def test_method_trains_end_to_end(method, teacher_dir, tmp_path):
  c = digits_recent.get_config(f"{method}:tiny")
  c.teacher.checkpoint = teacher_dir
  c.train_vanilla = False
  c.export.variants = ()
  summary = experiment.distill(c, str(tmp_path))
  assert 0.1 < summary["distilled_accuracy"] <= 1.0
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["phase"] == "distilled" and r["kind"] == "train"]
  names = [t.name_ for t in objective.build(c.distill, total_steps=1, steps_per_epoch=1).terms]
  for name in names:
    assert all(np.isfinite(r[name]) for r in train), name
  if method == "ft":  # the paraphraser's own phase ran first and its loss fell
    pre = [r["fitnet/reconstruction"] for r in records if r["kind"] == "train"
           and r["phase"] == "distilled_pretrain_factor_transfer_stage_3"]
    # (3 epochs at learning rate 0.5 in the tiny variant: 1.20 → 0.70 measured)
    assert len(pre) >= 4 and pre[-1] < 0.8 * pre[0]


def test_factor_transfer_keeps_the_pretrained_paraphraser_frozen():
  """Two SGD steps (weight decay on) move the translator but not the paraphraser."""
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    student = teacher = models.create("resnet8", 10)
    x = jnp.zeros((2, 8, 8, 1))
    t_vars = teacher.init(jax.random.key(1), x[:1], train=False)
    obj = objective.build(dict(terms=[dict(method="factor_transfer", weight=200.0,
                                           student_tap="stage_3")]),
                          total_steps=2, steps_per_epoch=2)
    taps = teacher.apply(t_vars, x, train=False)[1]
    obj = objective.resolve(obj, taps, taps, "resnet8", "resnet8")
    recipe = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                  schedule="constant")
    optimizer = train.make_optimizer(recipe, optax.constant_schedule(0.1))
    state = train.init_state(student, optimizer, (8, 8, 1), jax.random.key(0), obj,
                             teacher, t_vars)
    frozen = jax.tree.map(np.array,
                          state.term_state[losses.PARAPHRASER]["factor_transfer/stage_3"])
    assert "paraphraser" not in jax.tree_util.keystr(state.params)  # no optimizer
    mesh = parallel.data_mesh()
    step = train.make_train_step(student, teacher, obj, optimizer, mesh)
    before = jax.tree.map(np.array, state.params["terms"])
    state = parallel.replicate(state, mesh)
    rng = np.random.default_rng(0)
    for i in range(2):
      batch = {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
               "label": rng.integers(0, 10, size=8).astype(np.int32)}
      state, metrics = step(state, parallel.replicate(t_vars, mesh),
                            parallel.to_global(batch, mesh), train.step_rng(0, i))
    assert np.isfinite(float(metrics["factor_transfer/stage_3"]))
    state = parallel.to_host(state)
    chex.assert_trees_all_equal(
        state.term_state[losses.PARAPHRASER]["factor_transfer/stage_3"], frozen)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         state.params["terms"])
    assert all(jax.tree.leaves(moved))  # every translator parameter trained
  finally:
    jax.config.update("jax_disable_most_optimizations", False)


def test_wkd_takes_its_cost_from_the_teacher_classifier():
  teacher = models.create("resnet8", 10)
  variables = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  obj = objective.build(dict(terms=[dict(method="wkd")]), total_steps=1, steps_per_epoch=1)
  taps = jax.eval_shape(lambda: teacher.apply(variables, jnp.zeros((2, 8, 8, 1)),
                                              train=False)[1])
  resolved = objective.resolve(obj, taps, taps, "resnet8", "resnet8",
                               teacher_params=variables["params"])
  kernel = resolved.terms[0].hyper["classifier_kernel"]
  np.testing.assert_array_equal(kernel, variables["params"]["classifier"]["kernel"])
  with pytest.raises(ValueError, match="wkd takes no classifier_kernel"):
    objective.build(dict(terms=[dict(method="wkd", classifier_kernel=1.0)]),
                    total_steps=1, steps_per_epoch=1)


def test_srd_projects_the_student_embedding_to_the_teacher_width():
  obj = objective.build(dict(terms=[dict(method="srd", adapter="linear")]), total_steps=1,
                        steps_per_epoch=1)
  term = obj.terms[0]
  assert (term.student_tap, term.teacher_tap, term.adapter) == ("embedding", "embedding",
                                                               "linear")
  s_taps = {"embedding": jax.ShapeDtypeStruct((2, 64), jnp.float32)}
  t_taps = {"embedding": jax.ShapeDtypeStruct((2, 128), jnp.float32)}
  assert objective.resolve(obj, s_taps, t_taps, "s", "t").terms[0].teacher_features == 128
  bare = objective.build(dict(terms=[dict(method="srd")]), total_steps=1, steps_per_epoch=1)
  with pytest.raises(ValueError, match="add adapter='linear'"):
    objective.resolve(bare, s_taps, t_taps, "s", "t")
