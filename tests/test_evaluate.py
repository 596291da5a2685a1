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
