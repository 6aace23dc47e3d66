"""S-DRDIN (paper 000) and its variants: a dense inception encoder and one or two decoders.

Architecture (defaults = the paper's configuration, base 16, depth 4, 224 x 224 RGB input)::

    encoder   e0 = Inc(x, 16)            @ 1     (Inc = InceptionBlock, sum of 3 ReLU paths)
              e1 = Inc(avgpool2(e0), 32) @ 1/2
              e2 = Inc(avgpool2(e1), 64) @ 1/4
              e3 = Inc(avgpool2(e2), 128) @ 1/8  (bottleneck)
    decoder   d2 = Inc(cat[up(e3)->64,  e2, avgpool4(e0)], 64)      @ 1/4  (144 -> 64 channels)
              d1 = Inc(cat[up(d2)->32,  e1, up2(e2)->32], 32)       @ 1/2  (96 -> 32)
              d0 = Inc(cat[up(d1)->16,  e0], 16)                    @ 1    (32 -> 16)

``up`` = 2x2 transposed conv, stride 2. The two "dense" cross-level skips (first encoder block
average-pooled 4x4 into the deepest decoder level; third encoder block upsampled by a transposed
conv into the next one) follow the public DRDIN (pathdata/UNMaSk, IHC_Cell_Detection). For other
depths the same rule is used: ``dense = [(0, depth-2), (depth-2, depth-3)]`` (pairs
``(encoder level, decoder level)``; valid pairs only), or pass ``dense`` explicitly.

S-DRDIN has a classification decoder (-> 1x1 conv -> C+1 logits, softmax, background last)
and a detection decoder of the same shape whose input from the classification decoder's last
block is concatenated with its own last block, then 3x3 conv-ReLU, 3x3 conv-ReLU (``base``
channels each) and a 1x1 conv -> 1 logit (sigmoid).

Stop-gradient ("applied to all the skip connections between the encoder path and the
detection branch"): every same-level skip and every dense skip entering the detection decoder
is ``detach()``-ed, so the detection loss cannot reach the encoder through any skip. The
bottleneck feature is the detection decoder's trunk, not a skip connection, so by default it is
**not** detached (``detach_bottleneck=True`` detaches it too); neither is the classification
features' input to the detection head (the paper adds it "to compensate" for the stopped
gradients; ``detach_cls_features=True`` detaches it). Hence the detection loss still reaches the
encoder through the bottleneck (all encoder blocks) and through the classification decoder,
only not directly through the skips. With both options on, the encoder gets no gradient from
the detection loss at all.

Variants (paper 000, section 2.4): ``s-drdin-gradient`` (no detach), ``drdin-detection``
(encoder + detection decoder and head, no classification branch, no detach),
``drdin-classification`` (encoder + classification decoder; its detection map is
``1 - p(background)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qpcell.errors import QpcellError
from qpcell.losses import bce_loss, dice_loss, weighted_cross_entropy
from qpcell.models.blocks import InceptionBlock, conv, conv_norm, glorot_init, up2

# variant -> (classification branch, detection branch, stop-gradient on detection skips)
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "s-drdin": (True, True, True),
    "s-drdin-gradient": (True, True, False),
    "drdin-detection": (False, True, False),
    "drdin-classification": (True, False, False),
}


def default_dense(depth: int) -> list[tuple[int, int]]:
    """DRDIN's dense skips generalised to ``depth`` levels: ``[(0, depth-2), (depth-2, depth-3)]``.

    Pairs are ``(encoder level, decoder level)``; level 0 is full resolution. Pairs joining a
    level to itself or to a level that does not exist are left out.
    """
    pairs = [(0, depth - 2), (depth - 2, depth - 3)]
    return [(s, d) for s, d in pairs if s != d and 0 <= d <= depth - 2 and 0 <= s < depth]


class DenseEncoder(nn.Module):
    """Inception blocks of widths ``widths`` joined by 2x2 average pooling; returns every block."""

    def __init__(self, in_channels: int, widths: list[int], batch_norm: bool = False) -> None:
        super().__init__()
        cins = [in_channels, *widths[:-1]]
        self.blocks = nn.ModuleList(InceptionBlock(c, w, batch_norm)
                                    for c, w in zip(cins, widths, strict=True))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class _DecoderLevel(nn.Module):
    def __init__(self, level: int, cin_up: int, widths: list[int], sources: list[int],
                 batch_norm: bool = False) -> None:
        super().__init__()
        w = widths[level]
        self.up = up2(cin_up, w)
        self.sources = tuple(sources)
        self.dense = nn.ModuleList()
        cin = 2 * w
        for s in sources:
            if s < level:  # finer encoder block: average-pool down to this level
                self.dense.append(nn.AvgPool2d(2 ** (level - s)))
                cin += widths[s]
            else:  # coarser encoder block: transposed conv up to this level
                self.dense.append(up2(widths[s], w, 2 ** (s - level)))
                cin += w
        self.block = InceptionBlock(cin, w, batch_norm)


class DenseDecoder(nn.Module):
    """U-Net decoder of inception blocks with DRDIN's dense cross-level skips.

    ``forward(feats, detach_skips=..., detach_bottleneck=...)`` returns the last (full
    resolution) block's output. ``detach_skips`` detaches every encoder feature that enters
    through a skip (same-level or dense); ``detach_bottleneck`` detaches the trunk input.
    """

    def __init__(self, widths: list[int], dense: list[tuple[int, int]],
                 batch_norm: bool = False) -> None:
        super().__init__()
        depth = len(widths)
        self.levels = nn.ModuleList()
        cin = widths[-1]
        for level in range(depth - 2, -1, -1):
            sources = [s for s, d in dense if d == level]
            self.levels.append(_DecoderLevel(level, cin, widths, sources, batch_norm))
            cin = widths[level]

    def forward(self, feats: list[Tensor], *, detach_skips: bool = False,
                detach_bottleneck: bool = False) -> Tensor:
        def skip(t: Tensor) -> Tensor:
            return t.detach() if detach_skips else t

        x = feats[-1].detach() if detach_bottleneck else feats[-1]
        level = len(feats) - 2
        for lv in self.levels:
            parts = [lv.up(x), skip(feats[level])]
            parts += [m(skip(feats[s])) for s, m in zip(lv.sources, lv.dense, strict=True)]
            x = lv.block(torch.cat(parts, dim=1))
            level -= 1
        return x


def classification_maps(cls_logits: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(det, cls)`` from C+1 softmax logits: ``det = 1 - p(background)``, ``cls = p[:, :C]``."""
    p = torch.softmax(cls_logits.float(), dim=1)
    return 1.0 - p[:, n_classes], p[:, :n_classes]


class SDRDIN(nn.Module):
    """S-DRDIN and its variants (see the module docstring).

    Parameters
    ----------
    n_classes
        Number of cell classes ``C`` (the classification output has ``C + 1`` channels).
    variant
        One of :data:`VARIANTS`.
    base, depth
        Encoder widths are ``base * 2**i`` for ``i < depth`` (paper: 16, 4 -> 16, 32, 64, 128).
        Inputs must have sides divisible by ``2**(depth-1)``.
    dense
        ``(encoder level, decoder level)`` dense skips; default :func:`default_dense`.
    detach_bottleneck, detach_cls_features
        Extra stop-gradients for the detection branch (default off, see module docstring).
    det_head_convs
        Number of 3x3 conv-ReLU layers before the detection 1x1 conv (paper: 2).
    in_channels
        Input channels (RGB: 3).
    batch_norm
        Batch normalisation after every conv of the blocks and the detection head (not in the
        paper; the fast training recipe uses it, :mod:`qpcell.recipe`).
    det_dice
        Weight of a soft-Dice term added to the detection BCE (paper: 0).
    """

    #: Layers a starting model must fill, and the class output layer, fitted anew when the
    #: classes differ (:mod:`qpcell.pretrained`).
    encoder_layers = ("encoder.",)
    class_layers = ("cls_head.",)

    def __init__(self, n_classes: int, *, variant: str = "s-drdin", base: int = 16,
                 depth: int = 4, dense: list | None = None, detach_bottleneck: bool = False,
                 detach_cls_features: bool = False, det_head_convs: int = 2,
                 in_channels: int = 3, batch_norm: bool = False, det_dice: float = 0.0
                 ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise QpcellError(f"unknown S-DRDIN variant {variant!r}; choose from {list(VARIANTS)}")
        if n_classes < 1 or base < 1 or depth < 2 or det_head_convs < 0:
            raise QpcellError(f"invalid S-DRDIN settings: n_classes={n_classes}, base={base}, "
                              f"depth={depth}, det_head_convs={det_head_convs}")
        self.name = variant
        self.n_classes = n_classes
        self.has_cls, self.has_det, self.detach = VARIANTS[variant]
        widths = [base * 2**i for i in range(depth)]
        dense_pairs = default_dense(depth) if dense is None else [tuple(map(int, p)) for p in dense]
        for s, d in dense_pairs:
            if not (0 <= s < depth and 0 <= d <= depth - 2 and s != d):
                raise QpcellError(f"dense skip {(s, d)} is not valid for depth {depth}")
        self.detach_bottleneck = bool(detach_bottleneck)
        self.detach_cls_features = bool(detach_cls_features)
        self.multiple = 2 ** (depth - 1)
        self._spec = {"name": variant, "n_classes": int(n_classes), "base": int(base),
                      "depth": int(depth), "dense": [list(p) for p in dense_pairs],
                      "detach_bottleneck": self.detach_bottleneck,
                      "detach_cls_features": self.detach_cls_features,
                      "det_head_convs": int(det_head_convs), "in_channels": int(in_channels),
                      "batch_norm": bool(batch_norm), "det_dice": float(det_dice)}
        self.det_dice = float(det_dice)

        self.encoder = DenseEncoder(in_channels, widths, batch_norm)
        if self.has_cls:
            self.cls_decoder = DenseDecoder(widths, dense_pairs, batch_norm)
            self.cls_head = conv(widths[0], n_classes + 1, 1)
        if self.has_det:
            self.det_decoder = DenseDecoder(widths, dense_pairs, batch_norm)
            layers: list[nn.Module] = []
            cin = widths[0] * (2 if self.has_cls else 1)
            for _ in range(det_head_convs):
                layers += [conv_norm(cin, widths[0], 3, batch_norm), nn.ReLU(inplace=True)]
                cin = widths[0]
            layers.append(conv(cin, 1, 1))
            self.det_head = nn.Sequential(*layers)
        glorot_init(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise QpcellError(f"{self.name}: input sides {tuple(x.shape[-2:])} must be multiples "
                              f"of {self.multiple}")
        feats = self.encoder(x)
        out: dict[str, Tensor] = {}
        c = None
        if self.has_cls:
            c = self.cls_decoder(feats)
            out["cls_logits"] = self.cls_head(c)
        if self.has_det:
            d = self.det_decoder(feats, detach_skips=self.detach,
                                 detach_bottleneck=self.detach_bottleneck)
            if c is not None:
                d = torch.cat([d, c.detach() if self.detach_cls_features else c], dim=1)
            out["det_logits"] = self.det_head(d)
        return out

    def maps(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(det (B,H,W), cls (B,C,H,W) or None)`` probabilities."""
        cls = None
        if self.has_cls:
            det_from_cls, cls = classification_maps(out["cls_logits"], self.n_classes)
        if self.has_det:
            det = torch.sigmoid(out["det_logits"].float())[:, 0]
        else:
            det = det_from_cls
        return det, cls

    def loss(self, out: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Pixel-weighted CE (classification) + BCE (detection), each where the branch exists."""
        parts: dict[str, Tensor] = {}
        if self.has_cls:
            parts["ce"] = weighted_cross_entropy(out["cls_logits"], targets["cls"])
        if self.has_det:
            parts["bce"] = bce_loss(out["det_logits"], targets["det"])
            if self.det_dice:
                parts["dice"] = self.det_dice * dice_loss(out["det_logits"], targets["det"])
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def spec(self) -> dict:
        """Name and constructor arguments, JSON-ready: ``create_model(**spec)`` rebuilds it."""
        return {k: (list(map(list, v)) if k == "dense" else v) for k, v in self._spec.items()}


__all__ = ["VARIANTS", "default_dense", "DenseEncoder", "DenseDecoder", "SDRDIN",
           "classification_maps"]
