"""Pretrained PyTorch weights for the zoo: published teachers as kd_jax variables.

RepDistiller and mdistiller ship their CIFAR teachers as ``{'model': state_dict, ...}``
``.pth`` files; torchvision, timm and Lightning save ImageNet ResNets as (possibly
prefixed) state dicts. `load_torch_checkpoint` turns any of them, or a ``.safetensors``
file, into the ``params`` / ``batch_stats`` of `kd_jax.models.create(model,
num_classes)`, whose eval-mode logits then equal the PyTorch model's.

The mapping is structural: every leaf module of the Flax tree (a convolution, a dense
layer, a BatchNorm) is named after the PyTorch module of the reference definition that
plays its role, by a few path rules per architecture family (`_RULES`), and its tensors
are converted by role: conv weight OIHW -> HWIO kernel, linear ``(out, in)`` -> ``(in,
out)``, BatchNorm weight / bias / running_mean / running_var -> scale / bias / mean /
var (``num_batches_tracked`` dropped). Matching by name, not by position, works for
``.safetensors`` files, whose writers sort the keys, and names the missing keys in
errors. Every tensor's shape is checked before anything is returned: a checkpoint of
another architecture or class count fails in one line that names the first missing /
unexpected keys and shape mismatches, and the zoo model it fits, if one does.

``.pth`` / ``.pt`` files need PyTorch (``pip install -e ".[torch]"``), read with
``weights_only=True``; ``.safetensors`` files are read here with NumPy alone.

`import_teacher` writes such weights into a workdir as a finished teacher phase
(``<workdir>/teacher/variables`` and ``model.json``, with its accuracy on the config's
eval split), which is what ``kd-jax import-teacher`` and a run whose
``teacher.checkpoint`` is a ``.pth`` / ``.pt`` / ``.safetensors`` file do.
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint as ckpt_lib
from kd_jax import data as data_lib
from kd_jax import evaluate as eval_lib
from kd_jax import models
from kd_jax import parallel
from kd_jax import phase as phase_lib
from kd_jax.metric_writer import log

TORCH_SUFFIXES = (".pth", ".pt")
SUFFIXES = TORCH_SUFFIXES + (".safetensors",)
# Keys that may wrap the state dict in a saved dict (RepDistiller, mdistiller: 'model').
_WRAPPERS = ("model", "state_dict", "net")
# Prefixes that wrappers add to every key: DataParallel, Lightning, torch.compile.
_PREFIXES = ("module.", "model.", "_orig_mod.")
_SHOWN = 3  # how many keys of each kind of mismatch an error names

_CONV_BN = {"conv": 0, "bn": 1}
_MOBILENET_PARTS = {"expand": 0, "depthwise": 1, "project": 2}
_SHUFFLE_V1_PARTS = {"reduce": 1, "depthwise": 2, "expand": 3}
_SHUFFLE_V2_DOWN = {"left_depthwise": 1, "left_pointwise": 2, "right_reduce": 3,
                    "right_depthwise": 4, "right_pointwise": 5}

# Per family: (Flax leaf module path regex, PyTorch module name: a format string over
# the groups, or a function of them). The names are those of RepDistiller's CIFAR
# definitions and torchvision's ResNets.
_RULES: dict[str, list[tuple[str, str | Callable[..., str]]]] = {
    "resnet": [
        (r"stem/conv", "conv1"), (r"stem/bn", "bn1"),
        (r"stage(\d+)_block(\d+)/conv_bn(\d)/(conv|bn)", "layer{0}.{1}.{3}{2}"),
        (r"stage(\d+)_block(\d+)/downsample/(conv|bn)",
         lambda s, b, r: f"layer{s}.{b}.downsample.{_CONV_BN[r]}"),
        (r"classifier", "fc")],
    "wrn": [
        (r"stem", "conv1"),
        (r"stage(\d)_block(\d+)/(bn1|conv1|bn2|conv2)", "block{0}.layer.{1}.{2}"),
        (r"stage(\d)_block(\d+)/shortcut", "block{0}.layer.{1}.convShortcut"),
        (r"final_bn", "bn1"), (r"classifier", "fc")],
    "vgg": [
        (r"block(\d)_conv(\d+)/(conv|bn)",
         lambda k, j, r: f"block{k}.{3 * int(j) + _CONV_BN[r]}"),
        (r"classifier", "classifier")],
    "mobilenetv2": [
        (r"stem/(conv|bn)", lambda r: f"conv1.{_CONV_BN[r]}"),
        (r"group(\d)_block(\d+)/(expand|depthwise|project)/(conv|bn)",
         lambda g, b, p, r: f"blocks.{g}.{b}.conv.{3 * _MOBILENET_PARTS[p] + _CONV_BN[r]}"),
        (r"head_conv/(conv|bn)", lambda r: f"conv2.{_CONV_BN[r]}"),
        (r"classifier", "classifier.0")],
    "shufflev1": [
        (r"stem/conv", "conv1"), (r"stem/bn", "bn1"),
        (r"stage(\d)_block(\d+)/(reduce|depthwise|expand)/(conv|bn)",
         lambda s, b, p, r: f"layer{s}.{b}.{r}{_SHUFFLE_V1_PARTS[p]}"),
        (r"classifier", "linear")],
    "shufflev2": [
        (r"stem/conv", "conv1"), (r"stem/bn", "bn1"),
        (r"stage(\d)_down/(\w+)/(conv|bn)",
         lambda s, p, r: f"layer{s}.0.{r}{_SHUFFLE_V2_DOWN[p]}"),
        (r"stage(\d)_block(\d+)/(reduce|depthwise|expand)/(conv|bn)",
         lambda s, b, p, r: f"layer{s}.{int(b) + 1}.{r}{_SHUFFLE_V1_PARTS[p]}"),
        (r"head_conv/conv", "conv2"), (r"head_conv/bn", "bn2"),
        (r"classifier", "linear")],
}
# The PyTorch name of each family's first convolution (its weight gives the image
# channels) and of its classifier (whose weight gives the class count).
_STEM = {"resnet": "conv1", "wrn": "conv1", "vgg": "block0.0", "mobilenetv2": "conv1.0",
         "shufflev1": "conv1", "shufflev2": "conv1"}
_CLASSIFIER = {"resnet": "fc", "wrn": "fc", "vgg": "classifier",
               "mobilenetv2": "classifier.0", "shufflev1": "linear", "shufflev2": "linear"}


# Zoo name prefix -> family, for the models with a PyTorch reference.
_FAMILIES = (("resnet", "resnet"), ("wrn_", "wrn"), ("vgg", "vgg"),
             ("MobileNetV2", "mobilenetv2"), ("ShuffleV1", "shufflev1"),
             ("ShuffleV2", "shufflev2"))


def family(model: str) -> str:
  """The architecture family of a zoo model name (a key of `_RULES`).

  Raises:
    ValueError: for a model without a PyTorch reference (or an unknown name).
  """
  if models.is_external(model):
    raise ValueError(f"teacher.checkpoint: PyTorch / safetensors weights load into zoo "
                     f"models only, not teacher.name={model!r}; load them in your factory "
                     "or train the teacher in this run")
  models.create(model, 1)  # an unknown name fails here with the closest known name
  for prefix, name in _FAMILIES:
    if model.startswith(prefix):
      return name
  raise ValueError(f"model {model!r} has no PyTorch reference to load weights from; "
                   f"use one of {', '.join(importable())}")


def importable() -> list[str]:
  """The zoo models `load_torch_checkpoint` maps (those with a PyTorch reference)."""
  prefixes = tuple(prefix for prefix, _ in _FAMILIES)
  return [name for name in models.available() if name.startswith(prefixes)]


def torch_module_name(model: str, path: tuple[str, ...]) -> str:
  """The PyTorch module name of the Flax leaf module at `path` of zoo model `model`."""
  joined = "/".join(path)
  for pattern, target in _RULES[family(model)]:
    match = re.fullmatch(pattern, joined)
    if match:
      groups = match.groups()
      return target(*groups) if callable(target) else target.format(*groups)
  raise ValueError(f"no PyTorch name for the module {joined!r} of {model}")


# --- Reading files ---------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
                       "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                       "BOOL": "?"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file, with NumPy only (bfloat16 -> float32).

  The format: an 8-byte little-endian header length, a JSON header mapping each name
  to its ``dtype``, ``shape`` and ``data_offsets`` (begin, end) into the byte buffer
  that follows, tensors stored row-major and little-endian.
  """
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
  (header_len,) = struct.unpack("<Q", blob[:8])
  if header_len > len(blob) - 8:
    raise ValueError(f"{path} is not a safetensors file (header of {header_len} bytes in "
                     f"a {len(blob)}-byte file)")
  try:
    header = json.loads(blob[8:8 + header_len])
  except ValueError as e:
    raise ValueError(f"{path} is not a safetensors file (unreadable header: {e})") from None
  data = memoryview(blob)[8 + header_len:]
  tensors = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(spec.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has dtype {spec.get('dtype')!r}; "
                       f"readable dtypes are {', '.join(_SAFETENSORS_DTYPES)}")
    shape = tuple(spec["shape"])
    begin, end = spec["data_offsets"]
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != size or not 0 <= begin <= end <= len(data):
      raise ValueError(f"{path}: tensor {name!r} has offsets {begin}..{end} for "
                       f"{size} bytes in a {len(data)}-byte buffer; the file is damaged")
    array = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    if spec["dtype"] == "BF16":  # bfloat16 is the upper half of a float32
      array = (array.astype(np.uint32) << 16).view(np.float32)
    tensors[name] = array
  return tensors


class TorchMissingError(ImportError, ValueError):
  """PyTorch is needed (a ``.pth``) but not installed: an ImportError, and bad input
  (ValueError) to the ``kd-jax`` command, which prints it as one line."""


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TorchMissingError(f"reading {path} needs PyTorch: pip install -e \".[torch]\" (or "
                      "save the state dict as .safetensors, read without it)") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} cannot be read with torch.load(weights_only=True) "
                     f"({first}); save model.state_dict() rather than the model") from None


def _to_numpy(value: Any) -> np.ndarray | None:
  """A tensor as a NumPy array (bfloat16 widened to float32); None for a non-tensor."""
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach") and hasattr(value, "numpy"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return None


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
  """The state dict inside what a ``.pth`` holds, as NumPy arrays, prefixes stripped."""
  while isinstance(obj, Mapping) and not any(_to_numpy(v) is not None for v in obj.values()):
    inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise ValueError(f"{path} holds no state dict: a dict with keys "
                       f"{sorted(obj)[:8]}, none of {list(_WRAPPERS)} a state dict")
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                     "model.state_dict() (or {'model': model.state_dict()})")
  tensors = {str(k): _to_numpy(v) for k, v in obj.items()}
  return {k: v for k, v in tensors.items() if v is not None}


def _strip_prefixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  stripped = True
  while stripped and tensors:
    stripped = False
    for prefix in _PREFIXES:
      if all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        stripped = True
  return tensors


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a ``.pth`` / ``.pt`` / ``.safetensors`` file by PyTorch name.

  A ``.pth`` may hold the state dict itself or a dict with it under ``model``,
  ``state_dict`` or ``net``; prefixes shared by every key (``module.``, ``model.``,
  ``_orig_mod.``) are removed.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    tensors = read_safetensors(path)
  elif suffix in TORCH_SUFFIXES:
    tensors = _unwrap(_read_torch(path), path)
  else:
    raise ValueError(f"{path}: a PyTorch checkpoint must end in {', '.join(SUFFIXES)}")
  return _strip_prefixes(tensors)


# --- The mapping ------------------------------------------------------------------------

def _leaf_modules(tree: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple, Mapping]]:
  """(path, variables) of each module of a ``params`` tree that holds arrays."""
  if any(not isinstance(v, Mapping) for v in tree.values()):
    yield path, tree
    return
  for name, sub in tree.items():
    yield from _leaf_modules(sub, path + (name,))


# (PyTorch tensor name, Flax collection, Flax variable name, PyTorch shape from the Flax
# shape, Flax array from the PyTorch array)
_CONV = (("weight", "params", "kernel", lambda s: (s[3], s[2], s[0], s[1]),
          lambda a: a.transpose(2, 3, 1, 0)),
         ("bias", "params", "bias", tuple, np.asarray))
_DENSE = (("weight", "params", "kernel", lambda s: s[::-1], lambda a: a.T),
          ("bias", "params", "bias", tuple, np.asarray))
_NORM = (("weight", "params", "scale", tuple, np.asarray),
         ("bias", "params", "bias", tuple, np.asarray),
         ("running_mean", "batch_stats", "mean", tuple, np.asarray),
         ("running_var", "batch_stats", "var", tuple, np.asarray))


@functools.lru_cache(maxsize=None)
def _plan(model: str, num_classes: int, in_channels: int) -> tuple[tuple, ...]:
  """What `model` needs from a state dict: one row per PyTorch tensor, in Flax order.

  Rows are ``(torch key, torch shape, collection, Flax path of the variable, convert)``.
  """
  net = models.create(model, num_classes, cpu_ops=False)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0),
                                           jnp.zeros((1, 32, 32, in_channels))))
  rows = []
  for path, variables in _leaf_modules(shapes["params"]):
    if "scale" in variables:
      roles = _NORM
    elif len(variables["kernel"].shape) == 4:
      roles = _CONV
    else:
      roles = _DENSE
    torch_name = torch_module_name(model, path)
    for torch_leaf, collection, leaf, torch_shape, convert in roles:
      source = shapes[collection]
      for name in path:
        source = source[name]
      if leaf not in source:  # a conv without bias
        continue
      rows.append((f"{torch_name}.{torch_leaf}", tuple(torch_shape(source[leaf].shape)),
                   collection, path + (leaf,), convert))
  return tuple(rows)


def _input_channels(tensors: Mapping[str, np.ndarray], fam: str) -> int:
  stem = tensors.get(_STEM[fam] + ".weight")
  return int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3


def _num_classes(tensors: Mapping[str, np.ndarray], fam: str) -> int | None:
  head = tensors.get(_CLASSIFIER[fam] + ".weight")
  return int(head.shape[0]) if head is not None and head.ndim == 2 else None


def _differences(plan, tensors: Mapping[str, np.ndarray]):
  """(missing keys, unexpected keys, [(key, expected, found)]) of `tensors` vs `plan`."""
  expected = {key: shape for key, shape, *_ in plan}
  missing = [key for key in expected if key not in tensors]
  unexpected = [key for key in tensors
                if key not in expected and not key.endswith(".num_batches_tracked")]
  mismatched = [(key, expected[key], tuple(tensors[key].shape)) for key in expected
                if key in tensors and tuple(tensors[key].shape) != expected[key]]
  return missing, unexpected, mismatched


def fitting_models(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, int]]:
  """The zoo models (name, num_classes) whose every tensor `tensors` holds, shape for
  shape, with nothing left over."""
  fits = []
  for model in importable():
    fam = family(model)
    num_classes = _num_classes(tensors, fam)
    if num_classes is None or _STEM[fam] + ".weight" not in tensors:
      continue
    if not any(_differences(_plan(model, num_classes, _input_channels(tensors, fam)),
                            tensors)):
      fits.append((model, num_classes))
  return fits


def _listed(items: list, total_word: str) -> str:
  shown = ", ".join(items[:_SHOWN])
  more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return f"{len(items)} {total_word} ({shown}{more})"


def variables_from_state_dict(tensors: Mapping[str, np.ndarray], model: str,
                              num_classes: int, source: str = "the state dict") -> dict:
  """`load_torch_checkpoint` on tensors already read (PyTorch names -> arrays)."""
  fam = family(model)
  plan = _plan(model, int(num_classes), _input_channels(tensors, fam))
  missing, unexpected, mismatched = _differences(plan, tensors)
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(_listed(missing, "missing keys"))
    if unexpected:
      parts.append(_listed(unexpected, "unexpected keys"))
    if mismatched:
      parts.append(_listed([f"{k}: expected {e}, found {f}" for k, e, f in mismatched],
                           "shape mismatches"))
    fits = fitting_models(tensors)
    hint = ("it fits " + " or ".join(f"model={m!r} with num_classes={n}" for m, n in fits)
            if fits else "it fits no zoo model that has a PyTorch reference")
    raise ValueError(f"{source} is not a {model} with num_classes={num_classes}: "
                     f"{'; '.join(parts)}; {hint}")
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, _, collection, path, convert in plan:
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(np.ascontiguousarray(convert(tensors[key])),
                                 dtype=jnp.float32)
  return variables


def load_torch_checkpoint(path: str, model: str, num_classes: int) -> dict:
  """Flax variables for `kd_jax.models.create(model, num_classes)` from a PyTorch file.

  Args:
    path: a ``.pth`` / ``.pt`` (a state dict, or a dict with it under ``model``,
      ``state_dict`` or ``net``) or a ``.safetensors`` file of the reference
      definition of `model` (RepDistiller's CIFAR models, torchvision's ResNets).
    model: a zoo name from `importable()`.
    num_classes: the classifier's output size in the checkpoint.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (float32): ``create(model,
    num_classes).apply(variables, x_nhwc, train=False)[0]`` equals the PyTorch model's
    eval-mode logits on the same images (NCHW there).

  Raises:
    ValueError: the file holds another architecture or class count (the message names
      the first missing / unexpected keys, shape mismatches and the model it fits), or
      is not a checkpoint.
    TorchMissingError: a ``.pth`` without PyTorch installed (an ImportError).
  """
  return variables_from_state_dict(read_state_dict(path), model, num_classes, source=path)


# --- A teacher phase from a checkpoint ---------------------------------------------------

def is_checkpoint_file(path: str | None) -> bool:
  """Whether `path` names a PyTorch / safetensors file (by its suffix), not a workdir."""
  return bool(path) and os.path.splitext(str(path))[1].lower() in SUFFIXES


def import_teacher(checkpoint: str, model: str, num_classes: int, workdir: str,
                   config) -> float:
  """Writes `checkpoint` as the finished teacher phase of `workdir`; returns its accuracy.

  The variables (`load_torch_checkpoint`) go to ``<workdir>/teacher/`` in the layout
  a trained teacher has, with a ``model.json`` holding the model name, the dataset and
  the metrics of the teacher on ``config.data``'s eval split; ``teacher.checkpoint=
  <workdir>`` then reuses it like a ``kd-jax train-teacher`` workdir.

  Args:
    checkpoint: a ``.pth`` / ``.pt`` / ``.safetensors`` file (see `load_torch_checkpoint`).
    model: the zoo name of its architecture.
    num_classes: its class count; must be the dataset's.
    workdir: where ``teacher/`` is written.
    config: a validated experiment config (its ``data`` and ``eval_batch_size``).

  Raises:
    ValueError: the checkpoint does not fit `model` / `num_classes`, or the dataset has
      another class count or image channels.
  """
  info = data_lib.get_info(config.data)
  if int(num_classes) != info.num_classes:
    raise ValueError(f"the dataset {config.data.name} has {info.num_classes} classes, the "
                     f"checkpoint's {model} {num_classes}; import a checkpoint trained on "
                     f"{config.data.name} or set --config.data.name to its dataset")
  variables = load_torch_checkpoint(checkpoint, model, num_classes)
  net = models.create(model, info.num_classes)
  like = phase_lib.variables_like(net, info.image_shape)
  if jax.tree.map(lambda s: s.shape, like) != jax.tree.map(np.shape, variables):
    raise ValueError(f"{checkpoint} takes images with another number of channels than "
                     f"{config.data.name}'s {tuple(info.image_shape)}; import a checkpoint "
                     f"trained on images like the dataset's")
  metrics = eval_lib.evaluate(net, variables, data_lib.eval_iterator(
      config.data, batch_size=config.eval_batch_size), parallel.data_mesh(),
                              num_classes=info.num_classes)
  directory = os.path.join(workdir, phase_lib.TEACHER)
  ckpt_lib.save_variables(directory, variables, {
      "model": model, "phase": phase_lib.TEACHER, "num_classes": info.num_classes,
      "dataset": config.data.name, "steps": 0, "metrics": metrics, "selection": {},
      "imported_from": os.path.abspath(checkpoint)})
  log(f"teacher: imported {model} from {checkpoint} into {directory}: accuracy "
      f"{metrics['accuracy']:.4f} on the eval split of {config.data.name}")
  return metrics["accuracy"]
