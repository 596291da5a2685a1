"""Residual adapters (kd_jax.models.adapters): exact at zero, beside the model's layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import adapters

SHAPE = (8, 8, 3)


def _init(module, seed):
  """Variables of `module`, initialised under jit (eager init compiles every op alone)."""
  return jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, *SHAPE)))


def _model_and_variables(name):
  model = models.create(name, 10)
  return model, _init(model, 0)


def test_resnet8_adapters_follow_its_blocks_and_start_as_the_model():
  model, variables = _model_and_variables("resnet8")
  wrapped = adapters.with_adapters(model, SHAPE)
  # One 1×1 conv per block, width of its output: 16² + 32² + 64² = 5,376 weights.
  assert wrapped.blocks == (("stage1_block0", 16), ("stage2_block0", 32),
                            ("stage3_block0", 64))
  fresh = _init(wrapped, 1)
  added = {k: v for k, v in fresh["params"].items() if k.startswith(adapters.PREFIX)}
  assert sum(p.size for p in jax.tree.leaves(added)) == 5376
  # The model's own variables keep their layout: the deployed ones load unchanged.
  assert set(fresh["params"]) - set(added) == set(variables["params"])
  combined = {**variables, "params": {**variables["params"], **added}}
  x = jax.random.normal(jax.random.key(2), (3, *SHAPE))
  logits, taps = model.apply(variables, x)
  got, got_taps = wrapped.apply(combined, x)
  np.testing.assert_array_equal(got, logits)
  np.testing.assert_array_equal(got_taps["stage_2"], taps["stage_2"])


@pytest.mark.parametrize("name", ["wrn_16_1", "vgg8", "MobileNetV2"])
def test_a_trained_adapter_changes_only_what_follows_its_block(name):
  model, variables = _model_and_variables(name)
  wrapped = adapters.with_adapters(model, SHAPE)
  fresh = _init(wrapped, 1)
  last = wrapped.blocks[-1][0]
  params = {**fresh["params"], **variables["params"]}
  params[adapters.PREFIX + last] = jax.tree.map(lambda w: w + 0.05,
                                                params[adapters.PREFIX + last])
  x = jax.random.normal(jax.random.key(2), (2, *SHAPE))
  logits, taps = model.apply(variables, x)
  got, got_taps = wrapped.apply({**variables, "params": params}, x)
  assert float(jnp.max(jnp.abs(got - logits))) > 0
  np.testing.assert_array_equal(got_taps["stage_1"], taps["stage_1"])


def test_a_model_without_zoo_blocks_is_refused():
  import flax.linen as nn

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3)(x.reshape(x.shape[0], -1)), {}

  with pytest.raises(ValueError, match="no blocks named like the zoo's"):
    adapters.with_adapters(Plain(), SHAPE)
