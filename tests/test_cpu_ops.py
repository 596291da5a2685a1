"""Tests of `kd_jax.models.cpu_ops`: the CPU rewrites equal the `lax` ops they replace."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import cpu_ops


def _lax_conv(strides, padding, groups):
  return lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def _assert_matches_with_gradients(conv, reference, x, kernel, key):
  """`conv` equals `reference` at (x, kernel), and so do their gradients."""
  expected = reference(x, kernel)
  np.testing.assert_allclose(conv(x, kernel), expected, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(key, expected.shape)
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * weights), argnums=(0, 1))(
      x, kernel) for f in (reference, conv)]
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, kernel_size, strides, padding", [
    ((2, 9, 7, 5), 3, (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 6), 3, (2, 2), ((1, 1), (1, 1))),
    ((1, 6, 7, 3), 3, (2, 1), ((0, 1), (2, 0))),
    ((2, 8, 8, 4), 5, (1, 2), ((2, 2), (2, 2))),
])
def test_depthwise_taps_match_xla_convolution_and_its_gradients(shape, kernel_size,
                                                                strides, padding):
  channels = shape[-1]
  kx, kk, kr = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 1, channels))
  _assert_matches_with_gradients(
      lambda x, k: cpu_ops.depthwise_conv(x, k, strides, padding),
      _lax_conv(strides, padding, channels), x, kernel, kr)


@pytest.mark.parametrize("batch, chunk_examples, strides, chunks", [
    (6, 2, (1, 1), 3), (6, 4, (2, 2), 2), (5, 2, (1, 2), 5), (4, 9, (1, 1), 1)])
def test_depthwise_kernel_gradient_in_batch_chunks(monkeypatch, batch, chunk_examples,
                                                   strides, chunks):
  # The kernel gradient is reduced over chunks of the largest divisor of the batch
  # that fits the byte budget: 2, 3 and 1 examples, or the whole batch of 4 at once.
  shape, channels = (batch, 8, 6, 5), 5
  out_bytes = (8 // strides[0]) * (6 // strides[1]) * channels * 4
  monkeypatch.setattr(cpu_ops, "_KERNEL_GRAD_CHUNK_BYTES", chunk_examples * out_bytes)
  kx, kk, kr = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, 3, 1, channels))
  padding = ((1, 1), (1, 1))
  weights = jax.random.normal(kr, (batch, 8 // strides[0], 6 // strides[1], channels))

  def loss(f):
    return lambda x, k: jnp.sum(f(x, k) * weights)

  xla = loss(_lax_conv(strides, padding, channels))
  taps = loss(lambda x, k: cpu_ops.depthwise_conv(x, k, strides, padding))
  expected = jax.grad(xla, argnums=(0, 1))(x, kernel)
  loop = [eqn for eqn in jax.make_jaxpr(jax.grad(taps, argnums=1))(x, kernel).eqns
          if eqn.primitive.name in ("while", "scan")]
  assert [eqn.params.get("length") for eqn in loop] == ([] if chunks == 1 else [chunks])
  chex.assert_trees_all_close(jax.jit(jax.grad(taps, argnums=(0, 1)))(x, kernel),
                              expected, rtol=1e-5, atol=1e-5)
  # A bfloat16 layer gets a bfloat16 kernel gradient, accumulated in float32.
  low = jax.grad(taps, argnums=1)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32), expected[1], rtol=0.05, atol=0.3)


def test_depthwise_taps_by_hand():
  # One channel, a 3x3 image 1..9, kernel with 1 at the centre and 10 at the
  # bottom-right, zero padding 1: out[i, j] = x[i, j] + 10 * x[i + 1, j + 1].
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0).at[2, 2].set(10.0)
  out = cpu_ops.depthwise_conv(x, kernel, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(out[0, :, :, 0], [[51, 62, 3], [84, 95, 6], [7, 8, 9]])
  strided = cpu_ops.depthwise_conv(x, kernel, (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(strided[0, :, :, 0], [[51, 3], [7, 9]])


@pytest.mark.parametrize("groups, strides", [(3, (1, 1)), (2, (2, 1))])
def test_grouped_pointwise_conv_matches_xla_convolution_and_its_gradients(groups, strides):
  kx, kk, kr = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (2, 5, 6, 6))
  kernel = jax.random.normal(kk, (1, 1, 6 // groups, 12))
  _assert_matches_with_gradients(
      lambda x, k: cpu_ops.grouped_pointwise_conv(x, k, strides, groups),
      _lax_conv(strides, ((0, 0), (0, 0)), groups), x, kernel, kr)
  # By hand: group 1 of output channel 6 reads input channels 3..5 only.
  one = jnp.zeros((1, 1, 1, 6)).at[0, 0, 0, 4].set(2.0)
  unit = jnp.zeros((1, 1, 3, 12)).at[0, 0, 1, 6].set(5.0)
  out = cpu_ops.grouped_pointwise_conv(one, unit, (1, 1), 2)
  np.testing.assert_array_equal(out[0, 0, 0], np.eye(12)[6] * 10.0)


def _grouped_convs(model, x, variables):
  jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x)[0])(x)
  return [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"
          and eqn.params["feature_group_count"] > 1]


# MobileNetV2: one depthwise conv per inverted residual (1+2+3+4+3+3+1 = 17).
# ShuffleV2: two per down-sampling unit (3 x 2), one per unit (3 + 7 + 3).
# ShuffleV1: per unit (4 + 8 + 4) a depthwise conv and two grouped 1x1 convs, except
# the first unit's first 1x1 conv: 16 + 31.
@pytest.mark.parametrize("name, depthwise_layers", [("MobileNetV2", 17), ("ShuffleV2", 19),
                                                     ("ShuffleV1", 47)])
def test_zoo_grouped_convs_are_rewritten_only_with_cpu_ops(name, depthwise_layers):
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  rewritten = models.create(name, 10, cpu_ops=True)
  plain = models.create(name, 10, cpu_ops=False)
  variables = plain.init(jax.random.key(0), x)
  # The same parameters either way: the variables of one apply to the other.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      rewritten.init(jax.random.key(0), x), variables)
  assert not _grouped_convs(rewritten, x, variables)
  assert len(_grouped_convs(plain, x, variables)) == depthwise_layers
  assert len(_grouped_convs(models.portable(rewritten), x, variables)) == depthwise_layers
  np.testing.assert_allclose(rewritten.apply(variables, x)[0], plain.apply(variables, x)[0],
                             rtol=1e-5, atol=1e-5)


def test_create_picks_cpu_ops_for_the_default_backend_as_a_visible_field():
  assert jax.default_backend() == "cpu"
  model = models.create("vgg8", 10)
  assert model.cpu_ops and "cpu_ops = True" in repr(model)
  assert not models.create("vgg8", 10, cpu_ops=False).cpu_ops
  assert not models.portable(model).cpu_ops and models.portable(model).num_classes == 10
  # A jitted function of the module is traced again for the other choice.
  x = jnp.ones((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  forward = jax.jit(lambda m, v: m.apply(v, x)[0], static_argnums=0)
  chex.assert_trees_all_close(forward(model, variables),
                              forward(models.portable(model), variables), rtol=1e-5)
  assert forward._cache_size() == 2
