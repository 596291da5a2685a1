"""Residual adapters: a few trainable parameters added to a trained model.

`WithAdapters(model, blocks)` runs `model` with a 1×1 convolution added residually after
each named top-level block, `y = x + conv1x1(x)`, the convolution initialised to zero so
that the wrapped model computes exactly what `model` does until the adapters train
(series residual adapters: Rebuffi, Bilen and Vedaldi, "Learning multiple visual domains
with residual adapters", NeurIPS 2017). The model's variables keep their layout (its
modules stay at the top level), the adapters sit beside them as `adapter_<block>`, so a
deployed model's variables load unchanged and the adapters alone are the update.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Top-level modules of the zoo that end a residual or plain block.
_BLOCK = re.compile(r"^(stage|group|block)\d+_(block|conv)\d+$")
PREFIX = "adapter_"


def block_names(params: Any) -> tuple[str, ...]:
  """The top-level blocks of a zoo model's `params` that adapters follow, in order."""
  return tuple(name for name in params if _BLOCK.match(name))


def _map_first(out: Any, fn):
  """`fn` of a block's output, or of its first element when the block returns a tuple
  (the zoo's residual blocks return `(output, pre-activation)`)."""
  if isinstance(out, tuple):
    return (fn(out[0]), *out[1:])
  return fn(out)


class WithAdapters(nn.Module):
  """`model` with a zero-initialised residual 1×1 conv after each block of `blocks`
  ((top-level module name, output channels) pairs); returns what `model` returns."""
  model: nn.Module
  blocks: tuple[tuple[str, int], ...]
  bn_axis_name: str | None = None  # passed on to `model` (cross-device BatchNorm)

  def setup(self):
    self.inner = (self.model if self.bn_axis_name is None
                  else self.model.clone(bn_axis_name=self.bn_axis_name))
    nn.share_scope(self, self.inner)
    self.adapters = {name: nn.Conv(channels, (1, 1), use_bias=False,
                                   kernel_init=nn.initializers.zeros,
                                   name=f"{PREFIX}{name}")
                     for name, channels in self.blocks}

  def __call__(self, x, train: bool = False):
    names = dict(self.blocks)

    def add_adapter(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = context.module.path
      if context.method_name == "__call__" and len(path) == 1 and path[0] in names:
        return _map_first(out, lambda y: y + self.adapters[path[0]](y))
      return out

    with nn.intercept_methods(add_adapter):
      return self.inner(x, train=train)


def with_adapters(model: nn.Module, input_shape: Sequence[int]) -> WithAdapters:
  """`model` (a zoo model) with an adapter after each of its blocks, their widths read
  from the block outputs on an input of `input_shape` (H, W, C)."""
  shapes: dict[str, tuple[int, ...]] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name == "__call__" and len(path) == 1 and _BLOCK.match(path[0]):
      _map_first(out, lambda y: shapes.__setitem__(path[0], y.shape))
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros((1, *input_shape)))
  jax.eval_shape(init)
  if not shapes:
    raise ValueError(f"{type(model).__name__} has no blocks named like the zoo's "
                     "(stageK_blockJ, groupK_blockJ, blockK_convJ) for adapters; "
                     "use another trainable subset")
  return WithAdapters(model, tuple((name, shape[-1]) for name, shape in shapes.items()))
