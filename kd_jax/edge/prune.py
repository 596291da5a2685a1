"""Structured channel pruning of residual networks to a MACs target.

The channels pruned are the inner channels of each residual block: the outputs of its
first convolution, which no residual sum constrains (``mid_widths`` of `ResNet` with
`BasicBlock` and of `WideResNet`). A channel's importance is the magnitude of its
BatchNorm scale (``bn_scale``, Liu et al., "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017) or the L1 norm of its filter (``l1``, Li et al.,
"Pruning Filters for Efficient ConvNets", ICLR 2017). Raw magnitudes are not
comparable across layers (an L1 norm grows with the fan-in, BatchNorm scales drift
with depth: ranked raw, whole layers of small magnitude would go first), so each
score is divided by its layer's mean before one global ranking: a channel is judged
against its own layer, whatever the layer's scale and width. (Dividing by the layer's
L2 norm instead, as Molchanov et al., ICLR 2017, scales a layer of n similar channels
by 1/sqrt(n), and the widest layers would be emptied first.) The least important
channels are removed, globally, until the MACs reach the target, and then physically:
`prune` returns a narrower module and its sliced variables, so the exported TFLite
model is smaller and faster. Distil the result to recover accuracy.

Example::

  result = prune(model, variables, (32, 32, 3), flops_ratio=0.5)
  logits, _ = result.model.apply(result.variables, images)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.edge.cost import count_params, macs
from kd_jax.models.resnet import BasicBlock, ResNet
from kd_jax.models.wrn import WideResNet

CRITERIA = ("bn_scale", "l1")

Path = Tuple[str, ...]


class _InnerLayer(NamedTuple):
  """Where a block's inner channels are made (conv), normalised (norm) and read."""
  block: str
  conv: Path
  norm: Path
  next_conv: Path


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """A pruned model and what pruning changed.

  Attributes:
    model: the narrower module, ``model.clone(mid_widths=mid_widths)``.
    variables: its variables: every collection of the input sliced to the kept
      channels, in new arrays (none shares a buffer with the input's).
    mid_widths: the inner width of each block, in ``model.block_names()`` order.
    kept: block name -> indices (ascending) of the input model's inner channels kept.
    params_before, params_after: `count_params` of the input and the pruned variables.
    macs_before, macs_after: `macs` of the input and the pruned model on one image.
  """
  model: nn.Module
  variables: Dict[str, Any]
  mid_widths: Tuple[int, ...]
  kept: Dict[str, np.ndarray]
  params_before: int
  params_after: int
  macs_before: int
  macs_after: int


def _inner_layers(model: nn.Module) -> List[_InnerLayer]:
  """The prunable layers of each residual block of ``model``, in block order."""
  if isinstance(model, ResNet) and model.block is BasicBlock:
    return [_InnerLayer(b, (b, "conv_bn1", "conv"), (b, "conv_bn1", "bn"),
                        (b, "conv_bn2", "conv")) for b in model.block_names()]
  if isinstance(model, WideResNet):
    return [_InnerLayer(b, (b, "conv1"), (b, "bn2"), (b, "conv2"))
            for b in model.block_names()]
  raise ValueError(f"channel pruning supports ResNets of BasicBlocks and WideResNets "
                   f"(resnet8 ... resnet110, resnet8x4, resnet32x4, resnet18, resnet34, "
                   f"wrn_*); got {getattr(model, 'factory', type(model).__name__)}, "
                   "choose one of those models")


def _get(tree: Any, path: Path) -> Any:
  """``tree[path[0]][path[1]]...``."""
  for key in path:
    tree = tree[key]
  return tree


def channel_importance(model: nn.Module, variables: Any,
                       criterion: str = "bn_scale") -> Dict[str, np.ndarray]:
  """Importance of each inner channel of each residual block.

  Args:
    model: a `ResNet` of `BasicBlock` or a `WideResNet`.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``).
    criterion: ``'bn_scale'``: ``|gamma|`` of the BatchNorm after the block's first
      conv; ``'l1'``: the L1 norm of each output filter of that conv.

  Returns:
    Block name -> float64 ``[mid_width]`` scores, in ``model.block_names()`` order.

  Raises:
    ValueError: an unknown criterion or a model without prunable blocks.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
  layers = _inner_layers(model)
  params = variables["params"]
  scores = {}
  for layer in layers:
    if criterion == "bn_scale":
      score = np.abs(np.asarray(_get(params, layer.norm)["scale"], np.float64))
    else:
      kernel = np.asarray(_get(params, layer.conv)["kernel"], np.float64)
      score = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    scores[layer.block] = score
  return scores


def _macs_per_channel(model: nn.Module, variables: Any, layers: Sequence[_InnerLayer],
                      input_shape: Sequence[int]) -> np.ndarray:
  """MACs one inner channel of each block costs: its filter, and its slice of the next.

  MACs are affine in the inner widths, so these are exact: removing ``n_b`` channels
  of each block b lowers `macs` by ``sum_b n_b * cost_b``.
  """
  convs = {path for layer in layers for path in (layer.conv, layer.next_conv)}
  images = jax.ShapeDtypeStruct((1, *input_shape[-3:]), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(
          v, x, train=False, mutable=["intermediates"],
          capture_intermediates=lambda module, _: module.path in convs),
      variables, images)
  intermediates, params = state["intermediates"], variables["params"]
  costs = []
  for layer in layers:
    (produced,) = _get(intermediates, layer.conv)["__call__"]  # [1, H, W, mid]
    (consumed,) = _get(intermediates, layer.next_conv)["__call__"]  # [1, H', W', out]
    kh, kw, c_in, _ = _get(params, layer.conv)["kernel"].shape
    next_kh, next_kw, _, c_out = _get(params, layer.next_conv)["kernel"].shape
    costs.append(np.prod(produced.shape[1:3]) * kh * kw * c_in
                 + np.prod(consumed.shape[1:3]) * next_kh * next_kw * c_out)
  return np.asarray(costs, np.int64)


def _slice_variables(variables: Any, layers: Sequence[_InnerLayer],
                     kept: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """Keeps channels ``kept[block]``: outputs of conv and norm, inputs of next_conv.

  Every leaf of the result is a new array (sliced on the host), so none shares a
  buffer with ``variables``: the input model can be the teacher of a train step that
  donates the pruned student's state.
  """
  flat = {key: np.array(value) for key, value in
          traverse_util.flatten_dict(variables).items()}
  for layer in layers:
    keep = kept[layer.block]
    for key, value in flat.items():
      module_path, leaf = key[1:-1], key[-1]
      if module_path in (layer.conv, layer.norm):
        flat[key] = value[..., keep]
      elif module_path == layer.next_conv and leaf == "kernel":
        flat[key] = value[..., keep, :]
  return traverse_util.unflatten_dict({key: jnp.asarray(value)
                                       for key, value in flat.items()})


def prune(model: nn.Module, variables: Any, input_shape: Sequence[int],
          flops_ratio: float, criterion: str = "bn_scale",
          min_channels: int = 1) -> PruneResult:
  """Removes the least important inner channels until MACs <= ``flops_ratio`` x before.

  Channels are ranked across all blocks by `channel_importance` divided by its
  layer's mean, and removed from the least important up (a block keeps at least
  ``min_channels``), until the MACs of one image reach the target; ties go to the
  earlier block and channel. The kept channels keep their order and their weights.

  Args:
    model: a `ResNet` of `BasicBlock` or a `WideResNet` (possibly already pruned).
    variables: its trained variables; every collection is sliced.
    input_shape: one example's shape (H, W, C), for the MACs.
    flops_ratio: the target, a fraction of the input model's MACs, in (0, 1].
    criterion: ``'bn_scale'`` or ``'l1'`` (see `channel_importance`).
    min_channels: the fewest inner channels a block keeps.

  Returns:
    A `PruneResult`.

  Raises:
    ValueError: a ratio outside (0, 1] or below what ``min_channels`` allows, an
      unknown criterion, ``min_channels < 1``, or a model without prunable blocks.
  """
  if not 0.0 < flops_ratio <= 1.0:
    raise ValueError(f"flops_ratio must be in (0, 1]; got {flops_ratio}")
  if min_channels < 1:
    raise ValueError(f"min_channels must be at least 1; got {min_channels}")
  scores = channel_importance(model, variables, criterion)
  layers = _inner_layers(model)
  widths = np.asarray([len(scores[layer.block]) for layer in layers])
  costs = _macs_per_channel(model, variables, layers, input_shape)
  macs_before = macs(model, variables, input_shape)
  target = flops_ratio * macs_before
  smallest = macs_before - int(np.sum(np.maximum(widths - min_channels, 0) * costs))
  if smallest > target:
    raise ValueError(f"flops_ratio={flops_ratio} is out of reach: with min_channels="
                     f"{min_channels} per block the MACs go down to "
                     f"{smallest / macs_before:.3f} of the model's; raise flops_ratio")

  # A layer whose scores are all zero contributes zeros: the first to go.
  normalised = [scores[layer.block] / (np.mean(scores[layer.block]) or 1.0)
                for layer in layers]
  block_of = np.concatenate([np.full(w, b) for b, w in enumerate(widths)])
  channel_of = np.concatenate([np.arange(w) for w in widths])
  order = np.lexsort((channel_of, block_of, np.concatenate(normalised)))
  removed = np.zeros(len(block_of), bool)
  remaining, current = widths.copy(), macs_before
  for i in order:
    if current <= target:
      break
    if remaining[block_of[i]] > min_channels:
      removed[i] = True
      remaining[block_of[i]] -= 1
      current -= costs[block_of[i]]

  kept = {layer.block: channel_of[(block_of == b) & ~removed]
          for b, layer in enumerate(layers)}
  pruned_model = model.clone(mid_widths=tuple(int(w) for w in remaining))
  pruned_variables = _slice_variables(variables, layers, kept)
  return PruneResult(
      model=pruned_model, variables=pruned_variables, mid_widths=pruned_model.mid_widths,
      kept=kept, params_before=count_params(variables),
      params_after=count_params(pruned_variables), macs_before=macs_before,
      macs_after=macs(pruned_model, pruned_variables, input_shape))
