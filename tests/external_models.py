"""Two small user modules that are not in the zoo, for tests/test_external_models.py.

The tests name them by import path, e.g. ``tests.external_models:tiny_cnn``.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
  """Convolution, BatchNorm, ReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                     name="bn")(x)
    return nn.relu(x)


class Stage(nn.Module):
  """Two blocks, the second with a stride of two (by pooling)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Block(self.features, self.dtype, name="block_0")(x, train)
    x = Block(self.features, self.dtype, name="block_1")(x, train)
    return nn.max_pool(x, (2, 2), (2, 2))


class TinyCNN(nn.Module):
  """Two stages and a linear classifier; takes ``train``."""
  num_classes: int
  width: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Stage(self.width, self.dtype, name="layer1")(x, train)
    x = Stage(2 * self.width, self.dtype, name="layer2")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


def tiny_cnn(num_classes: int, width: int = 8, dtype: Any = jnp.float32) -> nn.Module:
  return TinyCNN(num_classes, width, dtype)


class TinyMLP(nn.Module):
  """A BatchNorm-free convolution and an MLP, built in ``setup``; no ``train`` argument."""
  num_classes: int
  hidden: int = 16

  def setup(self):
    self.features = nn.Conv(4, (3, 3), strides=(2, 2), name="features")
    self.hidden_layer = nn.Dense(self.hidden, name="hidden")
    self.classifier = nn.Dense(self.num_classes, name="classifier")

  def __call__(self, x):
    x = nn.relu(self.features(x))
    x = nn.relu(self.hidden_layer(x.reshape(x.shape[0], -1)))
    return self.classifier(x)


def tiny_mlp(num_classes: int, hidden: int = 16) -> nn.Module:
  return TinyMLP(num_classes, hidden)


def no_classes(width: int = 8) -> nn.Module:
  return TinyCNN(10, width)


NOT_CALLABLE = 3
