"""Building blocks shared by the models, and model-size helpers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def glorot_init(module: nn.Module) -> nn.Module:
    """Glorot (Xavier) uniform weights and zero biases for every conv / transposed conv / linear.

    The Keras default that S-DRDIN uses ("weights were initialized using uniform glorot"). The
    Glorot bound ``sqrt(6 / (fan_in + fan_out))`` is symmetric in the fans, so PyTorch's fan
    convention for transposed convolutions gives the same bound as Keras.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    """``k x k`` convolution, stride 1, 'same' padding, with bias."""
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def conv_norm(cin: int, cout: int, k: int, batch_norm: bool = False) -> nn.Module:
    """:func:`conv`, followed by batch normalisation when ``batch_norm`` (then without bias)."""
    if not batch_norm:
        return conv(cin, cout, k)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class InceptionBlock(nn.Module):
    """DRDIN inception block: the **sum** of three ReLU conv paths, each ``width`` channels wide.

    Paths: 1x1 then 3x3; 3x3 then 3x3; 1x1 (every conv followed by ReLU). ``batch_norm``
    puts batch normalisation between each conv and its ReLU (not in the paper).
    """

    def __init__(self, cin: int, width: int, batch_norm: bool = False) -> None:
        super().__init__()
        self.in_channels, self.width = cin, width
        c = conv_norm
        self.a1, self.a2 = c(cin, width, 1, batch_norm), c(width, width, 3, batch_norm)
        self.b1, self.b2 = c(cin, width, 3, batch_norm), c(width, width, 3, batch_norm)
        self.c1 = c(cin, width, 1, batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        relu = torch.relu
        a = relu(self.a2(relu(self.a1(x))))
        b = relu(self.b2(relu(self.b1(x))))
        return a + b + relu(self.c1(x))


class DoubleConv(nn.Sequential):
    """U-Net unit: (3x3 conv [-> BatchNorm] -> ReLU) twice."""

    def __init__(self, cin: int, cout: int, *, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def up2(cin: int, cout: int, factor: int = 2) -> nn.ConvTranspose2d:
    """Transposed conv that upsamples by ``factor`` (kernel = stride = factor)."""
    return nn.ConvTranspose2d(cin, cout, factor, stride=factor)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def gmacs(model: nn.Module, size: int | tuple[int, int] = 224, in_channels: int = 3) -> float:
    """Giga multiply-accumulates of one forward pass on a ``size x size`` image (batch 1).

    Counts convolutions, transposed convolutions and linear layers with forward hooks
    (bias additions, activations, pooling and normalisation are not counted).
    Conv: ``out elements * (C_in / groups) * kh * kw``; transposed conv:
    ``in elements * (C_out / groups) * kh * kw``; linear: ``out elements * in_features``.
    """
    h, w = (size, size) if isinstance(size, int) else size
    total = 0

    def hook(m: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += output.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            total += inputs[0].numel() * (m.out_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += output.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, h, w, device=device, dtype=dtype))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return total / 1e9


__all__ = ["glorot_init", "conv", "InceptionBlock", "DoubleConv", "up2", "count_parameters",
           "gmacs"]
