"""What a model costs on a device: its parameter count and its multiply-accumulates.

MACs are counted on the jaxpr of the inference forward pass of one image: a
convolution costs (output elements) x (kernel taps per output: kh x kw x C_in / groups),
a matrix product (output elements) x (contracted size). Every kernel tap counts, zero
padding included, the convention of published model tables (thop, ptflops);
element-wise work (BatchNorm, activations, pooling, sums) is not counted, as BatchNorm
is folded into the convolutions on export. XLA's cost analysis
(``jax.jit(f).lower(x).compile().cost_analysis()['flops']``) gives exactly 2 flops per
MAC on unpadded convolutions and matrix products, but leaves out padded taps and adds
the element-wise flops, so it is not used for the totals.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from kd_jax.models import layers as zoo_layers


def count_params(variables: Any) -> int:
  """Number of scalars in ``variables['params']`` (BatchNorm statistics are not counted)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def macs(model: nn.Module, variables: Any, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of ``model.apply(variables, x, train=False)`` on one image.

  Args:
    model: a Flax module returning ``(logits, taps)``.
    variables: its variables, or their shapes (``jax.ShapeDtypeStruct`` leaves).
    input_shape: one example's shape (H, W, C); a leading batch dimension is ignored.

  Returns:
    The MACs of the convolutions and matrix products the logits depend on.
  """
  model = zoo_layers.portable(model)  # a depthwise convolution is costed as one
  return _traced_macs(lambda v, images: model.apply(v, images, train=False)[0],
                      variables, _one_image(input_shape))


def function_macs(fn: Callable[[jax.Array], Any], input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of ``fn(images)`` on a batch of one image.

  Only the operations the outputs of ``fn`` depend on count, so a function returning an
  intermediate feature (an early exit) costs only the layers up to it. A ``cond``
  counts its most expensive branch, a ``scan`` its body times its length.

  Args:
    fn: a JAX function of a float32 ``[1, H, W, C]`` batch, returning arrays.
    input_shape: one example's shape (H, W, C); a leading batch dimension is ignored.

  Returns:
    The MACs, an int.
  """
  return _traced_macs(fn, _one_image(input_shape))


def _one_image(input_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, *input_shape[-3:]), jnp.float32)


def _traced_macs(fn: Callable[..., Any], *args: Any) -> int:
  """MACs of ``fn(*args)``, traced (not run) on arrays or their shapes."""
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_macs(jaxpr: jex_core.Jaxpr) -> int:
  """MACs of the equations that the outputs of ``jaxpr`` depend on."""
  live = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
  total = 0
  for eqn in reversed(jaxpr.eqns):
    if not live.intersection(eqn.outvars):
      continue
    live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    total += _equation_macs(eqn)
  return total


def _equation_macs(eqn: jex_core.JaxprEqn) -> int:
  """MACs of one equation: a convolution, a matrix product, or a call of sub-jaxprs."""
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    kernel = eqn.invars[1].aval.shape
    out_channels = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // out_channels
  if name == "dot_general":
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return (math.prod(eqn.outvars[0].aval.shape)
            * math.prod(lhs[d] for d in lhs_contracting))
  inner = [_jaxpr_macs(jaxpr) for jaxpr in jex_core.jaxprs_in_params(eqn.params)]
  if name == "cond":
    return max(inner)
  return sum(inner) * eqn.params.get("length", 1)
