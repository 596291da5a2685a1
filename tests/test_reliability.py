"""Reliability: gradient accumulation, the non-finite guard's rollback, damaged checkpoints."""
import errno
import glob
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from kd_jax import checkpoint, experiment, objective as objective_lib, parallel, phase, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _MLP(nn.Module):
  """No BatchNorm, so accumulated and big-batch gradients are the same computation."""
  num_classes: int = 10
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(h), {"embedding": h}


def _accumulated_params(k, batches):
  cfg = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4, accumulation_steps=k)
  optimizer = train.make_optimizer(cfg, optax.constant_schedule(0.1))
  model = _MLP()
  mesh = Mesh(np.asarray(jax.devices()[:4]), (parallel.DATA_AXIS,))
  obj = objective_lib.build({"ce_weight": 1.0}, total_steps=8, steps_per_epoch=8)
  state = parallel.replicate(train.init_state(model, optimizer, (8, 8, 1),
                                              jax.random.key(0)), mesh)
  step_fn = train.make_train_step(model, None, obj, optimizer, mesh)
  for i, b in enumerate(batches):
    state, _ = step_fn(state, {}, parallel.to_global(b, mesh), train.step_rng(0, i))
  return parallel.to_host(state.params)


def test_accumulated_update_equals_the_big_batch_update():
  rng = np.random.default_rng(0)
  big = {"image": rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
         "label": rng.integers(0, 10, 32).astype(np.int32)}
  micro = [{k: v[i * 8:(i + 1) * 8] for k, v in big.items()} for i in range(4)]
  once = _accumulated_params(1, [big])
  accumulated = _accumulated_params(4, micro)
  chex.assert_trees_all_close(accumulated, once, atol=1e-6, rtol=1e-5)
  first_three = _accumulated_params(4, micro[:3])  # no update before the k-th step
  chex.assert_trees_all_equal(first_three, _accumulated_params(1, []))


def _tiny_teacher_config(**train_overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "digits_tiny", os.path.join(ROOT, "kd_jax", "experiments", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.teacher.train.update(train_overrides)
  return c


def test_nonfinite_steps_roll_back_to_the_last_checkpoint(tmp_path, monkeypatch):
  real = phase.data_lib.train_iterator
  made = []

  def poisoned(*args, start_step=0, **kwargs):
    it = real(*args, start_step=start_step, **kwargs)
    first = not made
    made.append(start_step)
    for step, b in enumerate(it, start=start_step):
      if first and step in (11, 12):  # steps 12 and 13 see NaN images, once
        b = {**b, "image": np.full_like(b["image"], np.nan)}
      yield b

  monkeypatch.setattr(phase.data_lib, "train_iterator", poisoned)
  c = _tiny_teacher_config(max_nonfinite_steps=2, rollback_lr_factor=0.5)
  result = experiment.train_teacher(c, str(tmp_path))
  assert made == [0, 10]  # a fresh iterator from the restored step 10
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  rollbacks = [r for r in records if r["kind"] == "rollback"]
  # Steps 12 and 13 are skipped; the host looks at log_every_steps=5: at step 15.
  assert rollbacks == [{"phase": "teacher", "kind": "rollback", "step": 10,
                        "rollback_from_step": 15, "lr_scale": 0.5}]
  chex.assert_tree_all_finite(result.variables)
  assert result.metrics["accuracy"] > 0.3
  trains = [r for r in records if r["kind"] == "train" and r["step"] > 13]
  assert trains and all(r["skipped"] == 0 for r in trains)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  c = _tiny_teacher_config()
  first = experiment.train_teacher(c, str(tmp_path / "a"))
  ckpts = tmp_path / "a" / "teacher" / "checkpoints"
  # 1 epoch of the 1,294 examples left after the 10% validation hold-out: 40 steps.
  assert sorted(os.listdir(ckpts), key=int) == ["30", "40"]
  # Simulate a crash during the last save: the phase is unfinished and the newest
  # checkpoint's data files are truncated.
  os.remove(tmp_path / "a" / "teacher" / "model.json")
  data_files = [p for p in glob.glob(str(ckpts / "40" / "**" / "*"), recursive=True)
                if os.path.isfile(p) and os.path.getsize(p) > 64]
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  second = experiment.train_teacher(c, str(tmp_path / "a"))
  said = [l for l in capsys.readouterr().out.splitlines() if "checkpoint 40" in l]
  assert len(said) == 1 and "is damaged" in said[0], said
  assert "falling back to the previous one" in said[0]
  assert os.path.isdir(tmp_path / "a" / "teacher" / "damaged_checkpoints" / "40")
  # Resumed from step 30 and replayed 30..40 exactly.
  chex.assert_trees_all_equal(second.variables, first.variables)


def test_checkpointer_restore_skips_unreadable_and_returns_none_when_empty(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  like = {"w": jnp.zeros((3,))}
  assert ckpt.restore(like) is None
  ckpt.save(1, {"w": jnp.ones((3,))})
  ckpt.save(2, {"w": 2 * jnp.ones((3,))})
  step, state = ckpt.restore(like)
  assert step == 2 and float(state["w"][0]) == 2.0
  step, state = ckpt.restore(like, before=2)
  assert step == 1 and float(state["w"][0]) == 1.0
  ckpt.close()


def test_mixed_precision_logits_stay_close_and_training_converges(tmp_path):
  from kd_jax import models
  x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype(np.float32)
  fp32 = models.create("resnet8", 10)
  bf16 = models.create("resnet8", 10, dtype=jnp.bfloat16)
  variables = fp32.init(jax.random.key(0), x, train=False)
  # Give BatchNorm realistic statistics first, then compare inference logits.
  _, upd = fp32.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {**variables, **upd}
  a, _ = fp32.apply(variables, x)
  b, _ = bf16.apply(variables, x)
  assert b.dtype == jnp.float32  # losses reduce in float32
  scale = float(jnp.max(jnp.abs(a)))
  assert float(jnp.max(jnp.abs(a - b))) <= 0.05 * scale + 1e-3  # bf16 has 8 mantissa bits

  c = _tiny_teacher_config()
  c.mixed_precision = True
  result = experiment.train_teacher(c, str(tmp_path))
  assert all(l.dtype == np.float32 for l in jax.tree.leaves(result.variables))
  assert result.metrics["accuracy"] > 0.5  # fp32 reaches ~0.8 in this one epoch


def test_a_checkpoint_of_another_structure_is_an_error_and_stays(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(3, {"w": jnp.ones((3,)), "b": jnp.zeros((2,))})
  for like, says in (({"w": jnp.zeros((4,)), "b": jnp.zeros((2,))}, r"w: shape \(3,\) there, \(4,\) here"),
                     ({"w": jnp.zeros((3,))}, "unexpected b"),
                     ({"w": jnp.zeros((3,)), "b": jnp.zeros((2,)), "c": jnp.zeros(())}, "missing c")):
    with pytest.raises(checkpoint.CheckpointMismatch, match=says):
      ckpt.restore(like)
  assert ckpt.latest_step() == 3 and os.path.isdir(tmp_path / "c" / "3")
  assert not os.path.exists(tmp_path / "damaged_checkpoints")
  ckpt.close()


def test_a_read_error_is_retried_then_reported_without_moving_anything(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, "RETRY_WAITS_S", (0.0, 0.0))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  like = {"w": jnp.zeros((3,))}
  ckpt.save(1, {"w": jnp.ones((3,))})
  real, calls = ckpt._manager.restore, []

  def flaky(*args, **kwargs):  # fails twice (an NFS hiccup), then reads
    calls.append(1)
    if len(calls) <= 2:
      raise OSError(errno.EIO, "Input/output error")
    return real(*args, **kwargs)
  monkeypatch.setattr(ckpt._manager, "restore", flaky)
  step, state = ckpt.restore(like)
  assert step == 1 and len(calls) == 3 and float(state["w"][0]) == 1.0

  def broken(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")
  monkeypatch.setattr(ckpt._manager, "restore", broken)
  with pytest.raises(OSError, match="could not read checkpoint 1 .*a read error.*left where it is"):
    ckpt.restore(like)
  assert ckpt.latest_step() == 1 and os.path.isdir(tmp_path / "c" / "1")
  ckpt.close()


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, {"w": jnp.ones((3,))})

  def full(*args, **kwargs):
    os.makedirs(tmp_path / "c" / "2.orbax-checkpoint-tmp-123", exist_ok=True)
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt._manager, "save", full)
  with pytest.raises(OSError, match="could not write checkpoint 2 .*No space left.*intact"):
    ckpt.save(2, {"w": 2 * jnp.ones((3,))})
  assert sorted(os.listdir(tmp_path / "c")) == ["1"]
  step, state = ckpt.restore({"w": jnp.zeros((3,))})
  assert step == 1 and float(state["w"][0]) == 1.0
  ckpt.close()
