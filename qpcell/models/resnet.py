"""ResNet backbones (18/34/50/101) whose state dicts match torchvision's, for the MTL-IHC encoder.

Why our own ResNet: qpcell must install and train without torchvision. On the machines this
project targets, torchvision cannot be installed beside the CPU torch wheel (PyPI's torchvision
fails to import with torch 2.13.0+cpu: ``operator torchvision::nms does not exist``), and
``segmentation_models_pytorch`` needs torchvision or timm. So :func:`resnet` builds
torchvision's model when torchvision imports, and otherwise the compact copy below, which has
**the same modules under the same names** (``conv1``, ``bn1``, ``layer1`` .. ``layer4``;
``BasicBlock`` / ``Bottleneck`` with ``conv1``/``bn1``/``conv2``/``bn2``[/``conv3``/``bn3``] and
``downsample.0`` (1x1 conv) / ``downsample.1`` (BatchNorm); ResNet v1.5, stride on the 3x3
conv). Either way the classifier (``avgpool``, ``fc``) is dropped, so the two builds have
identical state dicts: a qpcell model trained on one loads on the other, and a torchvision
ImageNet weights file (``resnet50-11ad3fa6.pth`` etc., from the user's own torchvision cache)
loads with :func:`load_pretrained` (``torch.load(weights_only=True)``, ``fc.*`` dropped,
strict key matching). Nothing is downloaded.

Output stride 16 (DeepLabv3+): :func:`dilate_last_stage` replaces the stride of ``layer4`` by
dilation as torchvision's ``replace_stride_with_dilation=[False, False, True]`` does (first
block: stride 1, dilation 1; later blocks: dilation 2). It edits the convolutions in place, so
it works on both builds and also on ``BasicBlock`` (torchvision refuses dilation there).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from qpcell.errors import QpcellError

# name -> (block kind, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
BACKBONES: tuple[str, ...] = tuple(ARCHS)

# ImageNet statistics the torchvision weights were trained with (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (torchvision ``BasicBlock``)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with a residual connection (torchvision ``Bottleneck``, v1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The feature part of torchvision's ResNet (no ``avgpool``/``fc``), same module names."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def _torchvision_resnet(name: str) -> nn.Module | None:
    """torchvision's ResNet without weights and without the classifier, or None."""
    try:
        from torchvision import models as tv_models
    except Exception:  # noqa: BLE001 - absent, or present but broken (the nms operator error)
        return None
    model = getattr(tv_models, name)(weights=None)
    del model.fc, model.avgpool
    return model


def resnet(name: str, *, use_torchvision: bool | None = None) -> nn.Module:
    """A ResNet feature extractor ``name`` (one of :data:`BACKBONES`), randomly initialised.

    Parameters
    ----------
    use_torchvision
        ``None``: torchvision's model when torchvision imports, else ours; ``False``: ours;
        ``True``: torchvision's (error when it does not import). The state dicts are the same.
    """
    if name not in ARCHS:
        raise QpcellError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    if use_torchvision is not False:
        model = _torchvision_resnet(name)
        if model is not None:
            return model
        if use_torchvision:
            raise QpcellError("torchvision's ResNet was requested but torchvision does not import")
    kind, layers = ARCHS[name]
    return ResNet(BasicBlock if kind == "basic" else Bottleneck, layers)


def out_channels(name: str) -> tuple[int, int]:
    """Channels of ``layer1`` (stride 4) and ``layer4`` outputs of backbone ``name``."""
    expansion = 1 if ARCHS[name][0] == "basic" else 4
    return 64 * expansion, 512 * expansion


def dilate_last_stage(model: nn.Module, dilation: int = 2) -> nn.Module:
    """Output stride 32 -> 16: stride 1 in ``layer4``, its later blocks' 3x3 convs dilated.

    The same as torchvision's ``replace_stride_with_dilation=[False, False, True]``: the first
    block keeps dilation 1 (stride removed from its strided conv and its ``downsample``), every
    following block's 3x3 convs get ``dilation`` and matching padding. Parameters are unchanged.
    """
    for i, block in enumerate(model.layer4):
        for m in block.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if m.stride != (1, 1):
                m.stride = (1, 1)
            if i > 0 and m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)
    return model


def resnet_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(layer1 output (stride 4), layer4 output)`` of a torchvision-style ResNet."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    low = model.layer1(x)
    return low, model.layer4(model.layer3(model.layer2(low)))


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchvision ImageNet weights file into ``model`` (ours or torchvision's).

    The file is read with ``torch.load(weights_only=True)`` (no code runs); a plain state dict,
    or one under a ``"state_dict"`` / ``"model"`` key, is accepted; ``fc.*`` (the classifier) is
    dropped, a ``module.`` prefix (DataParallel) removed, and the rest must match exactly.

    Raises
    ------
    QpcellError
        If the file is missing, unreadable, or its keys or shapes do not match the backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise QpcellError("pretrained backbone weights not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file is the same user error
        raise QpcellError(f"cannot read pretrained weights ({err})", path) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise QpcellError("pretrained weights file holds no state dict", path)
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise QpcellError(f"pretrained weights do not fit this backbone: {first}", path) from None
    return model


__all__ = ["ARCHS", "BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "BasicBlock", "Bottleneck",
           "ResNet", "resnet", "out_channels", "dilate_last_stage", "resnet_features",
           "load_pretrained"]
