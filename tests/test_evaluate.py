"""Evaluation metrics are exact on a fake model whose logits are known."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kd_jax import evaluate, parallel


class _Lookup(nn.Module):
  """Returns the logits stored in row `image[0, 0, 0]` of a fixed table."""
  table: tuple
  bn_axis_name: str | None = None

  def __call__(self, x, train=False):
    logits = jnp.asarray(self.table, jnp.float32)[x[:, 0, 0, 0].astype(jnp.int32)]
    return logits, {"embedding": logits}


def _numpy_metrics(logits, labels, teacher_logits, bins=15):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  pred, conf = p.argmax(-1), p.max(-1)
  correct = pred == labels
  ece = 0.0
  for b in range(bins):
    in_bin = (np.minimum((conf * bins).astype(int), bins - 1) == b)
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  top5 = np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in range(len(labels))])
  return {"accuracy": correct.mean(), "nll": -np.mean(np.log(p[np.arange(len(labels)), labels])),
          "ece": ece, "top5_accuracy": top5,
          "teacher_agreement": np.mean(pred == teacher_logits.argmax(-1))}


def test_metrics_match_numpy_and_padding_is_ignored():
  rng = np.random.default_rng(0)
  n, classes = 14, 10
  table = rng.normal(size=(n, classes)) * 3
  teacher_table = rng.normal(size=(n, classes)) * 3
  labels = rng.integers(0, classes, n)
  labels[:4] = table[:4].argmax(-1)  # some right, most wrong
  images = np.zeros((16, 1, 1, 1), np.float32)
  images[:n, 0, 0, 0] = np.arange(n)
  batch_labels = np.zeros(16, np.int32)
  batch_labels[:n] = labels
  mask = np.zeros(16, np.float32)
  mask[:n] = 1  # two padding rows (pointing at row 0) must not count
  batches = [{"image": images[:8], "label": batch_labels[:8], "mask": mask[:8]},
             {"image": images[8:], "label": batch_labels[8:], "mask": mask[8:]}]
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  model = _Lookup(tuple(map(tuple, table)))
  teacher = _Lookup(tuple(map(tuple, teacher_table)))
  got = evaluate.evaluate(model, {}, batches, mesh, num_classes=classes, teacher=teacher,
                          teacher_variables={})
  want = _numpy_metrics(table, labels, teacher_table)
  assert got["num_examples"] == n
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_exact_accuracy_and_ece_of_a_known_case():
  # Two examples, confident (p=0.9 on class 0) and right, then wrong: accuracy 1/2;
  # both fall in the bin [0.8667, 0.9333): ECE = |1/2 - 0.9| = 0.4.
  logit = np.log(0.9 / (0.1 / 2))  # class 0 gets 0.9, two others 0.05 each
  logits = jnp.asarray([[logit, 0.0, 0.0], [logit, 0.0, 0.0]])
  sums = evaluate.batch_sums(logits, jnp.asarray([0, 1]), jnp.ones(2))
  out = evaluate.finalize(jax.tree.map(np.asarray, sums), num_classes=3)
  assert out["accuracy"] == 0.5
  np.testing.assert_allclose(out["ece"], 0.4, rtol=1e-5)
  np.testing.assert_allclose(out["nll"], -(np.log(0.9) + np.log(0.05)) / 2, rtol=1e-5)
  assert "top5_accuracy" not in out  # only reported with more than 5 classes


# --- Feature alignment: minibatch linear CKA with the unbiased HSIC estimator. ---------

def _numpy_hsic(x, y):
  """HSIC_1 of Song et al. (2012), written out on the real rows only, in float64."""
  x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
  n = len(x)
  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def test_cka_sums_match_the_unbiased_hsic_formula_and_ignore_padding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 3, 3, 2)) + 2.0  # ReLU-like offset: centring must not matter
  y = np.abs(rng.normal(size=(10, 5))) + x.reshape(10, -1)[:, :5]
  want = [_numpy_hsic(x, y), _numpy_hsic(x, x), _numpy_hsic(y, y)]
  got = evaluate.cka_sums(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                          jnp.ones(10))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Three padding rows of garbage (mask 0), inside jit: the same sums.
  x_pad = np.concatenate([x, 50 * rng.normal(size=(3, 3, 3, 2))]).astype(np.float32)
  y_pad = np.concatenate([y, 50 * rng.normal(size=(3, 5))]).astype(np.float32)
  mask = np.asarray([1.0] * 10 + [0.0] * 3, np.float32)
  np.testing.assert_allclose(jax.jit(evaluate.cka_sums)(x_pad, y_pad, mask), want,
                             rtol=1e-4)
  # Three real rows or fewer: HSIC_1 is undefined and the batch adds nothing.
  assert np.all(np.asarray(evaluate.cka_sums(x_pad[:3], y_pad[:3], jnp.ones(3))) == 0)


def test_cka_of_a_rotated_scaled_shifted_copy_is_one():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 6)).astype(np.float32)
  rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  y = (3.0 * x @ rotation + 5.0).astype(np.float32)
  sums = {"count": 12.0, "correct": 0.0, "nll": 0.0, "bin_correct": np.zeros(1),
          "bin_confidence": np.zeros(1),
          "cka": {"pair": np.asarray(evaluate.cka_sums(x, y, jnp.ones(12)))}}
  np.testing.assert_allclose(evaluate.finalize(sums, num_classes=2)["cka/pair"], 1.0,
                             rtol=1e-5)


def test_evaluate_reports_minibatch_cka_of_the_embeddings():
  rng = np.random.default_rng(2)
  n, classes = 14, 6
  table, teacher_table = rng.normal(size=(n, classes)), rng.normal(size=(n, classes))
  images = np.zeros((16, 1, 1, 1), np.float32)
  images[:n, 0, 0, 0] = np.arange(n)
  mask = (np.arange(16) < n).astype(np.float32)
  batches = [{"image": images[i:i + 8], "label": np.zeros(8, np.int32),
              "mask": mask[i:i + 8]} for i in (0, 8)]
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  got = evaluate.evaluate(_Lookup(tuple(map(tuple, table))), {}, batches, mesh,
                          num_classes=classes,
                          teacher=_Lookup(tuple(map(tuple, teacher_table))),
                          teacher_variables={})
  # The lookup models' embeddings are their logits; batches of 8 then 6 real rows.
  parts = [(table[:8], teacher_table[:8]), (table[8:n], teacher_table[8:n])]
  cross = sum(_numpy_hsic(s, t) for s, t in parts)
  own = sum(_numpy_hsic(s, s) for s, _ in parts) * sum(_numpy_hsic(t, t) for _, t in parts)
  np.testing.assert_allclose(got["cka/embedding"], cross / np.sqrt(own), rtol=1e-4)


def test_aligned_features_pass_the_student_tap_through_its_trained_adapter():
  from kd_jax import models, objective as objective_lib
  model = models.create("resnet8", 10)  # student and teacher, initialised apart
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 1)), jnp.float32)
  init, apply = jax.jit(model.init), jax.jit(model.apply)
  s_logits, s_taps = apply(init(jax.random.key(0), x), x)
  t_logits, t_taps = apply(init(jax.random.key(1), x), x)
  obj = objective_lib.build({"terms": [
      {"method": "kd"},
      {"method": "fitnet", "student_tap": "stage_2", "teacher_tap": "stage_2",
       "adapter": "conv1x1"},
      {"method": "attention_transfer", "student_tap": "stage_3", "teacher_tap": "stage_2"},
  ]}, total_steps=1, steps_per_epoch=1)
  obj = objective_lib.resolve(obj, s_taps, t_taps, "resnet8", "resnet8")
  labels = jnp.zeros(4, jnp.int32)
  term_vars = obj.init(jax.random.key(2), s_logits, s_taps, t_logits, t_taps, labels, labels)
  # Trained-looking BatchNorm statistics, so inference mode must use them.
  stats = {"mean": jnp.full((32,), 0.5), "var": jnp.full((32,), 4.0)}
  term_vars["batch_stats"]["fitnet/stage_2"]["adapter"]["BatchNorm_0"] = stats
  pairs = evaluate.aligned_features(obj, term_vars, s_taps, t_taps)
  assert sorted(pairs) == ["embedding", "fitnet/stage_2", "stage_3-stage_2"]
  adapter = term_vars["params"]["fitnet/stage_2"]["adapter"]
  conv = jnp.einsum("bhwc,cd->bhwd", s_taps["stage_2"], adapter["Conv_0"]["kernel"][0, 0])
  want = ((conv - 0.5) / np.sqrt(4.0 + 1e-5) * adapter["BatchNorm_0"]["scale"]
          + adapter["BatchNorm_0"]["bias"])
  np.testing.assert_allclose(pairs["fitnet/stage_2"][0], want, rtol=1e-5, atol=1e-5)
  assert pairs["fitnet/stage_2"][1] is t_taps["stage_2"]
  for name, s_tap, t_tap in (("stage_3-stage_2", "stage_3", "stage_2"),
                             ("embedding", "embedding", "embedding")):
    assert pairs[name][0] is s_taps[s_tap] and pairs[name][1] is t_taps[t_tap]


def test_predict_returns_every_real_example_with_its_attention_map():
  from kd_jax import models
  model = models.create("resnet8", 10)
  rng = np.random.default_rng(4)
  images = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:1])
  labels = rng.integers(0, 10, 12).astype(np.int32)
  mask = np.asarray([1.0] * 10 + [0.0] * 2, np.float32)
  batches = [{"image": images[i:i + 6], "label": labels[i:i + 6], "mask": mask[i:i + 6]}
             for i in (0, 6)]
  out = evaluate.predict(model, variables, batches, attention_tap="stage_2")
  logits, taps = model.apply(variables, images[:10], train=False)
  np.testing.assert_array_equal(out["label"], labels[:10])
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["embedding"], taps["embedding"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["attention"], np.mean(np.square(taps["stage_2"]), -1),
                             rtol=1e-5, atol=1e-6)
  assert out["attention"].shape == (10, 4, 4)
