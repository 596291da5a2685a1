"""The model zoo: teachers and students of the CRD benchmark, by name.

Flax linen reproductions of the PyTorch definitions of RepDistiller (Tian, Krishnan,
Isola, "Contrastive Representation Distillation", ICLR 2020) for CIFAR, plus
torchvision's ImageNet ResNets: same widths, depths, biases and BatchNorm placement,
hence the same parameter counts. Mobile students: torchvision's MobileNetV3-Small and
-Large, timm's EfficientNet-Lite0 and RepVGG-A0 (trained with branches, exported
re-parameterised as a plain 3x3-conv stack: `export_form`), each also with a stride-1
stem for 32x32 inputs (``*_cifar``, same parameters), and DeiT-Tiny, a vision
transformer with a distillation token (timm's ``deit_tiny_distilled_patch16_224``;
``deit_tiny_cifar`` with 4x4 patches for 32x32 inputs).

Example::

  model = create("resnet8", num_classes=100)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  logits, taps = model.apply(variables, images)  # inference
  (logits, taps), updates = model.apply(variables, images, train=True,
                                        mutable=["batch_stats"])

Every model takes NHWC float images and returns ``(logits, taps)``; see `Classifier`.
A name of the form ``package.module:factory`` builds the user's own linen module
instead, wrapped to return ``(logits, taps)`` with taps by module path (see
`kd_jax.models.external`).
"""
from __future__ import annotations

import functools
from typing import Callable, List

import flax.linen as nn
import jax

from kd_jax.models import external
from kd_jax.models.efficientnet_lite import EfficientNetLite0
from kd_jax.models.layers import Classifier, export_form, portable
from kd_jax.models.mobilenetv2 import MobileNetV2
from kd_jax.models.mobilenetv3 import MobileNetV3
from kd_jax.models.repvgg import RepVGG, reparameterize
from kd_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from kd_jax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from kd_jax.models.vgg import CONFIGS as VGG_CONFIGS, VGG
from kd_jax.models.vit import DeiT
from kd_jax.models.wrn import WideResNet
from kd_jax.registry import Registry

__all__ = ["Classifier", "available", "check_name", "create", "export_form", "is_external",
           "portable", "reparameterize"]


def _cifar_resnet(depth: int, stem_width: int, stage_widths) -> Callable[..., nn.Module]:
  """RepDistiller's CIFAR ResNet-``depth``: three stages of ``(depth - 2) / 6`` blocks."""
  n = (depth - 2) // 6
  return functools.partial(ResNet, stage_sizes=(n, n, n), stem_width=stem_width,
                           stage_widths=tuple(stage_widths), block=BasicBlock)


def _imagenet_resnet(block, stage_sizes) -> Callable[..., nn.Module]:
  return functools.partial(ResNet, stage_sizes=tuple(stage_sizes), stem_width=64,
                           stage_widths=(64, 128, 256, 512), block=block,
                           imagenet_stem=True)


_REGISTRY: Registry[Callable[..., nn.Module]] = Registry(
    "model", hint="set teacher.name / student.name")
for _name, _factory in {
    **{f"resnet{d}": _cifar_resnet(d, 16, (16, 32, 64))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar_resnet(8, 32, (64, 128, 256)),
    "resnet32x4": _cifar_resnet(32, 32, (64, 128, 256)),
    **{f"wrn_{d}_{k}": functools.partial(WideResNet, depth=d, widen_factor=k)
       for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": functools.partial(VGG, blocks=cfg) for d, cfg in VGG_CONFIGS.items()},
    "MobileNetV2": functools.partial(MobileNetV2, expansion=6, width_mult=0.5),
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
    "resnet18": _imagenet_resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _imagenet_resnet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _imagenet_resnet(Bottleneck, (3, 4, 6, 3)),
    **{f"mobilenetv3_{v}{suffix}": functools.partial(MobileNetV3, variant=v,
                                                     cifar_stem=bool(suffix))
       for v in ("small", "large") for suffix in ("", "_cifar")},
    **{f"efficientnet_lite0{suffix}": functools.partial(EfficientNetLite0,
                                                        cifar_stem=bool(suffix))
       for suffix in ("", "_cifar")},
    **{f"repvgg_a0{suffix}": functools.partial(RepVGG, cifar_stem=bool(suffix))
       for suffix in ("", "_cifar")},
    "deit_tiny": DeiT,
    "deit_tiny_cifar": functools.partial(DeiT, patch_size=4),
}.items():
  _REGISTRY.register(_name, _factory)


def available() -> List[str]:
  """Names accepted by `create`, in registry order."""
  return _REGISTRY.names()


def is_external(name: str) -> bool:
  """Whether ``name`` is an import path (``package.module:factory``), not a zoo name."""
  return external.is_import_path(name)


def check_name(name: str, key: str, kwargs=None) -> None:
  """One-line ValueError naming config key ``key`` unless `create` accepts ``name``
  (and an external factory takes ``kwargs``)."""
  if is_external(name):
    external.check(name, kwargs or {}, key)
  elif name not in available():
    raise ValueError(f"{key}={name!r} is not a known model; known models: "
                     f"{', '.join(available())}, or an import path package.module:factory")


def create(name: str, num_classes: int, *, cpu_ops: bool | None = None,
           **kw) -> nn.Module:
  """Builds the model ``name``.

  Args:
    name: one of `available()`, or ``package.module:factory`` (`external.create`).
    num_classes: size of the logits.
    cpu_ops: the module's ``cpu_ops`` field (`kd_jax.models.cpu_ops`); None picks
      True when JAX's default backend is the CPU, else False. The choice is a field of
      the returned module, so ``jit`` sees it and ``repr`` shows it.
    **kw: other fields of the module (``dtype``, ``bn_axis_name``, architecture fields).

  Returns:
    An unbound Flax module; ``apply(variables, x, train=False) -> (logits, taps)``.

  Raises:
    ValueError: for an unknown name, or an import path that does not import.
  """
  if is_external(name):
    return external.create(name, num_classes, cpu_ops=cpu_ops, **kw)
  factory = _REGISTRY.get(name)
  if cpu_ops is None:
    cpu_ops = jax.default_backend() == "cpu"
  return factory(num_classes=num_classes, cpu_ops=bool(cpu_ops), **kw)
