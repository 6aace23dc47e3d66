"""Plain U-Net baseline (Ronneberger et al. 2015) for S-DRDIN's comparison (paper 000, Table 2-3).

Encoder: ``depth`` levels of (3x3 conv-ReLU) x 2 with ``base * 2**i`` channels, 2x2 max pooling
between levels; decoder: 2x2 transposed conv, concatenate the same-level encoder output,
(3x3 conv-ReLU) x 2; a 1x1 conv to ``C + 1`` logits (softmax, background last). 'Same' padding,
so the output has the input's size. No batch normalisation by default (``batch_norm=True`` adds
it after every conv). Defaults (base 16, depth 4: 16-32-64-128) mirror S-DRDIN's encoder widths;
the model is smaller than S-DRDIN, as in the paper, where the U-Net trained fastest (Table A.4).
Trained with a softmax cross-entropy on the C + 1 channel class map, its pixels weighted by
``class_weights`` (:data:`CLASS_WEIGHTS`):

* ``"none"``: plain, unweighted, as the paper's baseline;
* ``"batch"``: S-DRDIN's pixel weights (eq. 1), every class of the batch, the background too,
  counts alike;
* ``"cells"``: only the class term, ``-log p(c | cell)``, is weighted, so that the cell
  classes count alike among the cell pixels; the detection term (cell against background) is
  the plain loss's (:func:`qpcell.losses.cell_balanced_cross_entropy`).

``class_power`` (with ``"cells"``) softens that balance: 1 counts the classes alike, 0.5 weighs
a class's pixels by the inverse square root of its count (:func:`cell_balanced_cross_entropy`).

``class_region`` (> 1, with ``"cells"``) puts the class term on discs that many times wider
than the detection's, each pixel going to its nearest point: the class decoder then learns from
the whole nucleus and its rim, the detection map still from the central disc.

With the plain loss the common classes dominate and a rare one can stay unlearnt for minutes;
with ``"batch"`` the background weighs as little as the rarest class and the detection map
loses precision (docs/RESULTS.md, "The network for a budget"). Detection map =
``1 - p(background)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from qpcell.errors import QpcellError
from qpcell.losses import cell_balanced_cross_entropy, cross_entropy, weighted_cross_entropy
from qpcell.masks import sdrdin_targets
from qpcell.models.blocks import DoubleConv, glorot_init, up2
from qpcell.models.sdrdin import classification_maps

#: Pixel weightings of the U-Net's cross-entropy (see the module docstring).
CLASS_WEIGHTS = {"none": cross_entropy, "batch": weighted_cross_entropy,
                 "cells": cell_balanced_cross_entropy}


class UNet(nn.Module):
    """Plain U-Net with a ``C + 1`` channel softmax output (see the module docstring)."""

    #: Layers a starting model must fill, and the class output (:mod:`qpcell.pretrained`).
    encoder_layers = ("down.",)
    class_layers = ("head.",)

    def __init__(self, n_classes: int, *, base: int = 16, depth: int = 4,
                 batch_norm: bool = False, in_channels: int = 3,
                 class_weights: str = "none", class_weighted: bool = False,
                 class_region: float = 1.0, class_power: float = 1.0) -> None:
        super().__init__()
        if class_weighted:  # the option's first, boolean form: S-DRDIN's weights
            class_weights = "batch"
        if (n_classes < 1 or base < 1 or depth < 2 or class_weights not in CLASS_WEIGHTS
                or not class_region >= 1 or (class_region > 1 and class_weights != "cells")
                or not 0 <= class_power <= 1 or (class_power != 1 and class_weights != "cells")):
            raise QpcellError(f"invalid U-Net settings: n_classes={n_classes}, base={base}, "
                              f"depth={depth}, class_weights={class_weights!r} (one of "
                              f"{', '.join(CLASS_WEIGHTS)}), class_region={class_region} "
                              "(at least 1; above 1 only with class_weights='cells'), "
                              f"class_power={class_power} (0 to 1; other than 1 only with "
                              "class_weights='cells')")
        self.name = "unet"
        self.n_classes = n_classes
        self.multiple = 2 ** (depth - 1)
        self._spec = {"name": "unet", "n_classes": int(n_classes), "base": int(base),
                      "depth": int(depth), "batch_norm": bool(batch_norm),
                      "in_channels": int(in_channels), "class_weights": class_weights,
                      "class_region": float(class_region), "class_power": float(class_power)}
        self.class_weights = class_weights
        self.class_region = float(class_region)
        self.class_power = float(class_power)
        widths = [base * 2**i for i in range(depth)]
        cins = [in_channels, *widths[:-1]]
        self.down = nn.ModuleList(DoubleConv(c, w, batch_norm=batch_norm)
                                  for c, w in zip(cins, widths, strict=True))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(up2(widths[i + 1], widths[i]) for i in range(depth - 2, -1, -1))
        self.up_convs = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], batch_norm=batch_norm)
                                      for i in range(depth - 2, -1, -1))
        self.head = nn.Conv2d(widths[0], n_classes + 1, 1)
        glorot_init(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise QpcellError(f"unet: input sides {tuple(x.shape[-2:])} must be multiples "
                              f"of {self.multiple}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.up_convs, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return {"cls_logits": self.head(x)}

    def maps(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(det = 1 - p(background) (B,H,W), cls (B,C,H,W))``."""
        return classification_maps(out["cls_logits"], self.n_classes)

    def target_fn(self, radius_px: float):
        """``(xy, labels, (h, w)) -> targets``: S-DRDIN's ``"cls"`` and ``"det"`` on discs of
        ``radius_px``, and with ``class_region > 1`` ``"cls_region"`` (``(C, h, w)``, one-hot
        on discs ``class_region`` times wider)."""
        n, wide = self.n_classes, radius_px * self.class_region  # values: the model stays out

        def targets(xy, labels, shape) -> dict[str, np.ndarray]:
            out = sdrdin_targets(xy, labels, n, shape, radius_px)
            if wide > radius_px:
                out["cls_region"] = sdrdin_targets(xy, labels, n, shape, wide)["cls"][:n]
            return out

        return targets

    def loss(self, out: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Softmax cross-entropy against the ``"cls"`` target, weighted by ``class_weights``
        (the class term on ``"cls_region"`` when the targets have it)."""
        if self.class_weights == "cells":  # the only weighting with a region and a power
            ce = cell_balanced_cross_entropy(out["cls_logits"], targets["cls"],
                                             targets.get("cls_region"), power=self.class_power)
        else:
            ce = CLASS_WEIGHTS[self.class_weights](out["cls_logits"], targets["cls"])
        return ce, {"ce": float(ce.detach())}

    def spec(self) -> dict:
        """Name and constructor arguments, JSON-ready: ``create_model(**spec)`` rebuilds it."""
        return dict(self._spec)


__all__ = ["CLASS_WEIGHTS", "UNet"]
