"""kd_jax.pretrained: PyTorch checkpoints of the reference definitions -> zoo variables.

The PyTorch models below are written here after the reference definitions
(RepDistiller's models/{resnet,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py and
torchvision's ResNet), with the same module names, so that their state dicts are what
the published checkpoints hold. Each is seeded, given non-trivial BatchNorm statistics,
saved RepDistiller-style (`{'model': state_dict, ...}`) and as .safetensors (written by
`write_safetensors`, keys sorted as the safetensors library writes them), imported,
and its eval-mode logits compared with the Flax model's on the same images.
"""
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint as ckpt_lib
from kd_jax import cli, configs, models, pretrained
from kd_jax import data as data_lib

torch = pytest.importorskip("torch", reason="the PyTorch references need the torch extra "
                            "(pip install -e \".[torch]\")")
nn, F = torch.nn, torch.nn.functional

# The logits of a float32 network agree with PyTorch's up to the rounding of the two
# summation orders (XLA vs. oneDNN kernels): measured at most 6.4e-7 of the largest
# logit over the eight architectures here (up to 50 layers), so 1e-5 leaves a 15x
# margin, while one wrong tensor (a transposed kernel, swapped BatchNorm statistics)
# moves the logits by orders of magnitude more.
RTOL = 1e-5


# --- Reference definitions (names as in the published code) -----------------------------

class BasicBlock(nn.Module):
  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
  """RepDistiller's resnet{depth} (filters (16, 16, 32, 64)) / resnet{depth}x4."""

  def __init__(self, depth, filters, num_classes, in_channels=3):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters[0])
    inplanes = filters[0]
    for i, planes in enumerate(filters[1:]):
      blocks = []
      for j in range(n):
        blocks.append(BasicBlock(inplanes, planes, 2 if i > 0 and j == 0 else 1))
        inplanes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(filters[-1], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottleneck(nn.Module):
  """torchvision's: the stride on the 3x3 conv, 4x expansion."""

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(nn.Module):
  def __init__(self, block, layers, num_classes):
    super().__init__()
    expansion = 4 if block is Bottleneck else 1
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      blocks = []
      for j in range(n):
        blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
        inplanes = planes * expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WrnBlock(nn.Module):
  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal = in_planes == out_planes
    if not self.equal:
      self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return out + (x if self.equal else self.convShortcut(act))


class WrnStage(nn.Module):
  def __init__(self, n, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WrnBlock(in_planes if i == 0 else out_planes, out_planes,
                                          stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  def __init__(self, depth, widen, num_classes):
    super().__init__()
    n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = WrnStage(n, widths[0], widths[1], 1)
    self.block2 = WrnStage(n, widths[1], widths[2], 2)
    self.block3 = WrnStage(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1))


class VGG(nn.Module):
  def __init__(self, cfg, num_classes):
    super().__init__()
    in_channels = 3
    for k, widths in enumerate(cfg):
      layers = []
      for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU()]
        in_channels = width
      setattr(self, f"block{k}", nn.Sequential(*layers[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    for k in range(5):
      if k in (1, 2, 3):
        x = F.max_pool2d(x, 2, 2)
      x = F.relu(getattr(self, f"block{k}")(x))
    return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, t):
    super().__init__()
    hidden = inp * t
    self.use_res = stride == 1 and inp == oup
    self.conv = nn.Sequential(
        nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup))

  def forward(self, x):
    return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
  """RepDistiller's mobile_half: T=6, width 0.5."""

  def __init__(self, num_classes, t=6, width=0.5):
    super().__init__()
    settings = ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1),
                (t, 160, 3, 2), (t, 320, 1, 1))
    channels = int(32 * width)
    self.conv1 = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1, bias=False),
                               nn.BatchNorm2d(channels), nn.ReLU())
    self.blocks = nn.ModuleList()
    for expansion, c, n, s in settings:
      layers = []
      for i in range(n):
        layers.append(InvertedResidual(channels, int(c * width), s if i == 0 else 1,
                                       expansion))
        channels = int(c * width)
      self.blocks.append(nn.Sequential(*layers))
    self.conv2 = nn.Sequential(nn.Conv2d(channels, 1280, 1, bias=False),
                               nn.BatchNorm2d(1280), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    for block in self.blocks:
      x = block(x)
    return self.classifier(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


def shuffle(x, groups):
  n, c, h, w = x.shape
  return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
  def __init__(self, in_planes, out_planes, stride, groups):
    super().__init__()
    mid, self.stride = out_planes // 4, stride
    self.g = 1 if in_planes == 24 else groups
    self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)

  def forward(self, x):
    out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
    if self.stride == 2:
      return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
    return F.relu(out + x)


class ShuffleV1(nn.Module):
  def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
               groups=3):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    in_planes = 24
    for i, (planes, n) in enumerate(zip(out_planes, num_blocks)):
      blocks = []
      for j in range(n):
        blocks.append(ShuffleV1Block(in_planes, planes - (in_planes if j == 0 else 0),
                                     2 if j == 0 else 1, groups))
        in_planes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.linear = nn.Linear(out_planes[-1], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ShuffleV2Block(nn.Module):
  def __init__(self, channels):
    super().__init__()
    half = channels // 2
    self.conv1 = nn.Conv2d(half, half, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(half)
    self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
    self.bn2 = nn.BatchNorm2d(half)
    self.conv3 = nn.Conv2d(half, half, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(half)

  def forward(self, x):
    kept, x = x.chunk(2, dim=1)
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return shuffle(torch.cat([kept, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class ShuffleV2Down(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(nn.Module):
  def __init__(self, num_classes, widths=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    cin = 24
    for i, (width, n) in enumerate(zip(widths, num_blocks)):
      setattr(self, f"layer{i + 1}", nn.Sequential(
          ShuffleV2Down(cin, width), *[ShuffleV2Block(width) for _ in range(n)]))
      cin = width
    self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
    self.bn2 = nn.BatchNorm2d(widths[3])
    self.linear = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


_CIFAR_FILTERS = (16, 16, 32, 64)
_X4_FILTERS = (32, 64, 128, 256)
_VGG = {8: ((64,), (128,), (256,), (512,), (512,)),
        11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
        13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
        16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
        19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)}
# Every zoo model with a PyTorch reference: name -> builder(num_classes).
REFERENCES = {
    **{f"resnet{d}": (lambda k, d=d: CifarResNet(d, _CIFAR_FILTERS, k))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda k: CifarResNet(8, _X4_FILTERS, k),
    "resnet32x4": lambda k: CifarResNet(32, _X4_FILTERS, k),
    **{f"wrn_{d}_{w}": (lambda k, d=d, w=w: WideResNet(d, w, k))
       for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (lambda k, cfg=cfg: VGG(cfg, k)) for d, cfg in _VGG.items()},
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    "resnet18": lambda k: TorchvisionResNet(BasicBlock, (2, 2, 2, 2), k),
    "resnet34": lambda k: TorchvisionResNet(BasicBlock, (3, 4, 6, 3), k),
    "resnet50": lambda k: TorchvisionResNet(Bottleneck, (3, 4, 6, 3), k),
}


# --- Helpers -----------------------------------------------------------------------------

def reference(name, num_classes, seed=0):
  """The seeded reference model in eval mode, BatchNorm affine and statistics random."""
  torch.manual_seed(seed)
  net = REFERENCES[name](num_classes)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.uniform_(-0.3, 0.3)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
  return net.eval()


def write_safetensors(path, tensors):
  """A .safetensors file: u64 header length, JSON header, raw little-endian tensors."""
  codes = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("float16"): "F16"}
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):  # the safetensors library also writes names sorted
    array = np.ascontiguousarray(tensors[name])
    header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    chunks.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    offset += array.nbytes
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def numpy_state(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def save_pth(net, path):
  """As RepDistiller's train_teacher.py saves a model."""
  torch.save({"epoch": 240, "model": net.state_dict(), "accuracy": 73.0}, path)


def flax_logits(name, num_classes, variables, images_nchw):
  # The lax convolutions (cpu_ops=False) compile 4x faster here than the CPU rewrites,
  # which tests/test_cpu_ops.py checks against them.
  model = models.create(name, num_classes, cpu_ops=False)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return np.asarray(apply(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def relative_error(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --- Tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,num_classes", [
    ("resnet8x4", 100), ("wrn_40_2", 100), ("vgg13", 100), ("MobileNetV2", 100),
    ("ShuffleV1", 100), ("ShuffleV2", 10), ("resnet18", 10), ("resnet50", 10)])
def test_imported_logits_equal_the_pytorch_models(name, num_classes, tmp_path):
  net = reference(name, num_classes)
  images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = net(images).numpy()
  save_pth(net, tmp_path / "teacher.pth")
  write_safetensors(tmp_path / "teacher.safetensors", numpy_state(net))

  variables = pretrained.load_torch_checkpoint(str(tmp_path / "teacher.pth"), name,
                                               num_classes)
  from_safetensors = pretrained.load_torch_checkpoint(
      str(tmp_path / "teacher.safetensors"), name, num_classes)
  jax.tree.map(np.testing.assert_array_equal, variables, from_safetensors)
  got = flax_logits(name, num_classes, variables, images.numpy())
  assert np.std(expected) > 0.05  # logits that differ per class and image
  error = relative_error(got, expected)
  print(f"{name}: max |logit difference| / max |logit| = {error:.2e}")
  assert error < RTOL, error
  # Every variable of the model is loaded, nothing else.
  like = jax.eval_shape(lambda: models.create(name, num_classes).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.structure(variables) == jax.tree.structure(like)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, like)


def test_every_zoo_model_maps_its_reference_state_dict_exactly():
  # Names and shapes of every tensor, both ways: the state dict of each reference
  # definition fills every variable of the zoo model with the shape Flax expects (the
  # parity test above checks values on one model of each family). Shapes only: the
  # references are built on the meta device, the tensors are broadcast zeros.
  assert sorted(REFERENCES) == sorted(pretrained.importable())
  for name in pretrained.importable():
    with torch.device("meta"):
      state = REFERENCES[name](100).state_dict()
    tensors = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
    variables = pretrained.variables_from_state_dict(tensors, name, 100)  # raises on
    # any missing, unexpected or mis-shaped tensor; and nothing is counted twice:
    count = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert sum(x.size for x in jax.tree.leaves(variables)) == count, name


def test_prefixes_and_wrappers_are_removed(tmp_path):
  torch.manual_seed(0)
  net = CifarResNet(8, (16, 16, 32, 64), 10).eval()
  state = net.state_dict()
  torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")
  torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
             tmp_path / "lightning.pth")
  torch.save({"net": state}, tmp_path / "net.pth")
  want = pretrained.variables_from_state_dict(numpy_state(net), "resnet8", 10)
  for file in ("dp.pt", "lightning.pth", "net.pth"):
    got = pretrained.load_torch_checkpoint(str(tmp_path / file), "resnet8", 10)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert float(want["params"]["classifier"]["kernel"][3, 5]) == float(net.fc.weight[5, 3].detach())


def test_wrong_class_count_names_the_mismatch_and_the_fitting_model(tmp_path):
  save_pth(CifarResNet(8, (32, 64, 128, 256), 100), tmp_path / "t.pth")
  with pytest.raises(ValueError) as error:
    pretrained.load_torch_checkpoint(str(tmp_path / "t.pth"), "resnet8x4", 10)
  message = str(error.value)
  assert "\n" not in message
  assert "2 shape mismatches (fc.weight: expected (10, 256), found (100, 256)" in message
  assert "fc.bias: expected (10,), found (100,)" in message
  assert message.endswith("it fits model='resnet8x4' with num_classes=100")
  assert "missing" not in message and "unexpected" not in message


def test_wrong_architecture_names_keys_and_the_fitting_model(tmp_path):
  save_pth(CifarResNet(14, (16, 16, 32, 64), 10), tmp_path / "t.pth")
  with pytest.raises(ValueError) as error:
    pretrained.load_torch_checkpoint(str(tmp_path / "t.pth"), "resnet8", 10)
  message = str(error.value)
  assert "\n" not in message
  # resnet14 has two blocks per stage where resnet8 has one: layerK.1.* are extra.
  assert "unexpected keys (layer1.1.conv1.weight, layer1.1.bn1.weight, " in message
  assert "missing" not in message
  assert message.endswith("it fits model='resnet14' with num_classes=10")

  save_pth(CifarResNet(8, (16, 16, 32, 64), 10), tmp_path / "r8.pth")
  with pytest.raises(ValueError, match=r"is not a wrn_16_1 with num_classes=10: \d+ missing "
                     r"keys \(block1\.layer\.0\.bn1\.weight, .* it fits model='resnet8' "
                     r"with num_classes=10$"):
    pretrained.load_torch_checkpoint(str(tmp_path / "r8.pth"), "wrn_16_1", 10)


def test_safetensors_reader_dtypes_and_damage(tmp_path):
  path = tmp_path / "t.safetensors"
  bf16 = np.array([0x3F80, 0xC040], np.uint16)  # bfloat16 bits of 1.0 and -3.0
  header = {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
            "b": {"dtype": "I64", "shape": [1, 1], "data_offsets": [4, 12]},
            "__metadata__": {"format": "pt"}}
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + bf16.tobytes()
                   + np.array([[-5]], "<i8").tobytes())
  tensors = pretrained.read_safetensors(str(path))
  np.testing.assert_array_equal(tensors["a"], np.array([1.0, -3.0], np.float32))
  assert tensors["a"].dtype == np.float32 and tensors["b"].tolist() == [[-5]]
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match="tensor 'b' has offsets 4..12 .* damaged"):
    pretrained.read_safetensors(str(path))


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch, capsys):
  (tmp_path / "t.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
    pretrained.load_torch_checkpoint(str(tmp_path / "t.pth"), "resnet8", 10)
  # The kd-jax command prints it as one line, exit status 2.
  with pytest.raises(SystemExit) as exit_:
    cli.main(["kd-jax", "import-teacher", f"--checkpoint={tmp_path / 't.pth'}",
              "--model=resnet8", "--num_classes=10", f"--workdir={tmp_path}",
              f"--config={TINY}"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip().startswith(
      f"kd-jax: error: reading {tmp_path / 't.pth'} needs PyTorch: pip install -e")


def test_models_without_reference_and_other_files_fail_clearly(tmp_path):
  (tmp_path / "t.npz").write_bytes(b"")
  with pytest.raises(ValueError, match=r"must end in \.pth, \.pt, \.safetensors"):
    pretrained.read_state_dict(str(tmp_path / "t.npz"))
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    pretrained.read_state_dict(str(tmp_path / "none.pth"))
  torch.save(CifarResNet(8, _CIFAR_FILTERS, 10), tmp_path / "whole_model.pth")
  with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"
                     r" \(.*\); save model.state_dict\(\) rather than the model$"):
    pretrained.read_state_dict(str(tmp_path / "whole_model.pth"))
  torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
  with pytest.raises(ValueError, match="holds no state dict: a dict with keys"):
    pretrained.read_state_dict(str(tmp_path / "no_weights.pth"))
  mobile = {name for name in models.available() if name.startswith(("mobilenetv3",
                                                                     "efficientnet",
                                                                     "repvgg", "deit"))}
  assert set(pretrained.importable()) == set(models.available()) - mobile
  with pytest.raises(ValueError, match="has no PyTorch reference to load weights from"):
    pretrained.family("mobilenetv3_small")
  with pytest.raises(ValueError, match="unknown model 'resnet9'"):
    pretrained.family("resnet9")


# --- A PyTorch teacher in a run -----------------------------------------------------------

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "kd_jax", "experiments", "digits.py") + ":tiny"


def digits_split(config, split):
  """All images (NCHW, as PyTorch takes them) and labels of a split of the tiny config."""
  batches = list(data_lib.host_eval_iterator(config.data, batch_size=512, split=split))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  images = np.concatenate([b["image"] for b in batches])[keep].transpose(0, 3, 1, 2)
  return torch.from_numpy(images), np.concatenate([b["label"] for b in batches])[keep]


def test_import_teacher_then_a_run_skips_the_teacher_phase(tmp_path, capsys):
  # The tiny config's teacher: resnet8 on 8x8 one-channel digits, trained in PyTorch
  # for 40 Adam steps so that its accuracy is well above chance.
  config = configs.validate(configs.experiment_config("digits", "tiny"))
  images, labels = digits_split(config, "train")
  torch.manual_seed(0)
  net = CifarResNet(8, (16, 16, 32, 64), 10, in_channels=1)
  optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
  for step in range(40):
    batch = slice(64 * step % 1216, 64 * step % 1216 + 64)
    optimizer.zero_grad()
    F.cross_entropy(net(images[batch]), torch.from_numpy(labels[batch]).long()).backward()
    optimizer.step()
  save_pth(net.eval(), tmp_path / "resnet8.pth")
  test_images, test_labels = digits_split(config, "eval")
  with torch.no_grad():
    torch_accuracy = float(np.mean(net(test_images).argmax(1).numpy() == test_labels))
  assert torch_accuracy > 0.5

  imported = str(tmp_path / "imported")
  cli.main(["kd-jax", "import-teacher", f"--checkpoint={tmp_path / 'resnet8.pth'}",
            "--model=resnet8", "--num_classes=10", f"--workdir={imported}",
            f"--config={TINY}"])
  printed = float(capsys.readouterr().out.split("teacher accuracy ")[1].split()[0])
  # The same images through the same weights: the same predictions (359 test digits).
  assert printed == pytest.approx(torch_accuracy, abs=1e-6)
  with open(os.path.join(imported, "teacher", "model.json")) as f:
    meta = json.load(f)
  assert (meta["model"], meta["num_classes"], meta["dataset"]) == ("resnet8", 10, "kd_digits")
  assert meta["metrics"]["accuracy"] == pytest.approx(printed, abs=1e-6)

  run = str(tmp_path / "run")
  cli.main(["kd-jax", "distill", f"--config={TINY}", f"--workdir={run}",
            f"--config.teacher.checkpoint={tmp_path / 'resnet8.pth'}",
            # the shortest distilled student: 1 epoch of 144 digits, no export
            "--config.train_vanilla=False", "--config.train.epochs=1",
            "--config.export.variants=()", "--config.student.train_split=train[:10%]"])
  with open(os.path.join(run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["teacher_accuracy"] == meta["metrics"]["accuracy"]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    phases = {json.loads(line).get("phase") for line in f}
  assert "teacher" not in phases and "distilled" in phases  # no teacher training
  assert not os.path.exists(os.path.join(run, "teacher", "checkpoints"))
  variables, _ = ckpt_lib.load_variables(
      os.path.join(run, "teacher"),
      jax.eval_shape(lambda: models.create("resnet8", 10).init(
          jax.random.key(0), jnp.zeros((1, 8, 8, 1)))))
  want = pretrained.load_torch_checkpoint(str(tmp_path / "resnet8.pth"), "resnet8", 10)
  jax.tree.map(np.testing.assert_array_equal, variables, want)


def test_import_teacher_refuses_another_dataset_class_count(tmp_path):
  save_pth(CifarResNet(8, (16, 16, 32, 64), 100, in_channels=1), tmp_path / "t.pth")
  with pytest.raises(ValueError, match="kd_digits has 10 classes, the checkpoint's resnet8 "
                     "100"):
    pretrained.import_teacher(str(tmp_path / "t.pth"), "resnet8", 100, str(tmp_path),
                              configs.validate(configs.experiment_config("digits", "tiny")))
