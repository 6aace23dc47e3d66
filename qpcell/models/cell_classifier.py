"""A second opinion on each cell's class: a small CNN that looks at the cell and the tissue
around it.

Not in the papers. The multi-task network classifies every pixel of a nucleus from features
shaped for detection too; this classifier is trained on one thing only, the class of an
annotated cell, from a square crop of ``crop_px`` pixels centred on it (21 µm at 0.44 µm/px:
the nucleus and its neighbours), with every cell drawn by the inverse square root of its class's
count. Its features are pooled twice, over the crop's centre (the cell itself: its stain) and
over the whole crop (its surroundings: epithelium against stroma), and the head reads both.
Its training windows may reach ``margin_px`` beyond the crop on each side, so that the crop's
features see real pixels around them, as they do in a tile; by default they do not (a wider
window costs more in steps than it gives, docs/RESULTS.md).

At prediction it runs densely (:meth:`CellClassifier.dense_logits`): the trunk once over the
tile, the two averages over every crop of its stride-8 features, the 1x1 head, and a bilinear
upsampling, so each pixel gets what the window centred on it would give (up to the features
near the window's border and half a pixel). Beyond the image it is white, in the windows and in
the dense map, as a slide reads beyond its edge: a cell near an image's edge then looks alike
in training, in validation and in ``qpcell predict``'s tiles, whose halo is white there.
:class:`WithCellClassifier` wraps a trained network and mixes that class map into the
network's own (:meth:`WithCellClassifier.maps`); the detection map is the network's. So
every path that turns maps into cells (tiles, test-time views, ensembles, the device
post-processing) uses it unchanged.

docs/RESULTS.md, "A cell classifier beside the network", measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qpcell.errors import QpcellError
from qpcell.models.blocks import DoubleConv

STRIDE = 8  # three 2x2 poolings
#: The crop side at the model's scale: 48 px x 0.44 µm/px = 21 µm, about two nuclei around one.
CROP_UM = 21.0
WIDTHS = (16, 32, 64, 128)
DROPOUT = 0.3  # on the pooled features, in training
#: How far training windows reach beyond the crop. 16 px gave real neighbours to the crop's
#: features but took 2.8 times the pixels, and in the same seconds it gained less than no
#: margin (docs/RESULTS.md, "The cell classifier looks at the cell too").
MARGIN_PX = 0
NAME = "with-cell-classifier"


def crop_px_for(mpp: float | None) -> int:
    """The crop side in pixels (a multiple of :data:`STRIDE`, at least 16) for a model that
    works at ``mpp`` µm/px; 48 px when the model works at the images' native scale."""
    if mpp is None:
        return 48
    return max(16, STRIDE * round(CROP_UM / mpp / STRIDE))


class CellClassifier(nn.Module):
    """Windows ``(N, 3, window_px, window_px)`` in [0, 1] -> class logits ``(N, C)`` of the
    cell at their centre.

    A window is the crop of ``crop_px`` pixels with ``margin_px`` more on each side. The
    trunk's stride-8 features over the whole window are pooled twice: over the crop (the
    tissue around the cell) and over the centre (the cell itself: the central 2 x 2 features,
    or 1 x 1 for an odd number of them); the head reads both. The margin gives the crop's
    features real neighbours, as they have in the dense map (:meth:`dense_logits`), instead of
    the convolutions' zero padding, from which a network pooling over a crop learns where its
    centre is and which it never meets in a tile.
    """

    def __init__(self, n_classes: int, *, crop_px: int = 48, margin_px: int = MARGIN_PX,
                 widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        if (n_classes < 2 or crop_px < 2 * STRIDE or crop_px % STRIDE or margin_px < 0
                or margin_px % STRIDE or len(widths) != 4):
            raise QpcellError(f"invalid cell classifier: n_classes={n_classes} (at least 2), "
                              f"crop_px={crop_px} (a multiple of {STRIDE}, at least "
                              f"{2 * STRIDE}), margin_px={margin_px} (a multiple of {STRIDE}), "
                              f"widths={tuple(widths)} (four)")
        self.n_classes, self.crop_px, self.widths = int(n_classes), int(crop_px), tuple(widths)
        self.margin_px = int(margin_px)
        cins = (3, *widths[:-1])
        self.trunk = nn.ModuleList(DoubleConv(c, w, batch_norm=True)
                                   for c, w in zip(cins, widths, strict=True))
        self.head = nn.Conv2d(2 * widths[-1], n_classes, 1)

    @property
    def window_px(self) -> int:
        """The side of the windows :meth:`forward` takes: the crop and its margins."""
        return self.crop_px + 2 * self.margin_px

    def _centre(self) -> tuple[int, int]:
        # (side, offset) of the centre's features within the crop's
        n = self.crop_px // STRIDE
        side = 2 if n % 2 == 0 else 1
        return side, (n - side) // 2

    def features(self, x: Tensor) -> Tensor:
        """Stride-8 features of ``x`` (B, 3, H, W)."""
        for i, block in enumerate(self.trunk):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        return x

    def forward(self, windows: Tensor) -> Tensor:
        m, n = self.margin_px // STRIDE, self.crop_px // STRIDE
        crop = self.features(windows)[:, :, m:m + n, m:m + n]
        side, off = self._centre()
        pooled = torch.cat([crop[:, :, off:off + side, off:off + side].mean((2, 3), keepdim=True),
                            crop.mean((2, 3), keepdim=True)], 1)
        return self.head(F.dropout(pooled, DROPOUT, self.training))[:, :, 0, 0]

    def dense_logits(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` logits: at each pixel, those of the window centred on it.

        Output ``j`` of the crop-pooled features covers the padded pixels ``[8j, 8j + crop)``;
        padding ``crop / 2 - 4`` before makes the upsampled pixel ``p`` read output
        ``(p + 0.5) / 8 - 0.5``, the crop whose centre is half a pixel from ``p``. The centre's
        pooling over ``side`` features starts ``offset`` features later in the same crop.
        """
        h, w = x.shape[-2:]
        before = self.crop_px // 2 - STRIDE // 2
        after_h = before + (-(h + 2 * before)) % STRIDE
        after_w = before + (-(w + 2 * before)) % STRIDE
        x = F.pad(x, (before, after_w, before, after_h), value=1.0)  # white, as the crops
        feats = self.features(x)
        crop = F.avg_pool2d(feats, self.crop_px // STRIDE, stride=1)
        side, off = self._centre()
        centre = F.avg_pool2d(feats, side, stride=1)[:, :, off:off + crop.shape[-2],
                                                     off:off + crop.shape[-1]]
        logits = F.interpolate(self.head(torch.cat([centre, crop], 1)), scale_factor=STRIDE,
                               mode="bilinear", align_corners=False)
        return logits[:, :, :h, :w]

    def spec(self) -> dict:
        return {"crop_px": self.crop_px, "margin_px": self.margin_px,
                "widths": list(self.widths)}


class WithCellClassifier(nn.Module):
    """A trained network whose class map is mixed with a :class:`CellClassifier`'s."""

    def __init__(self, n_classes: int, *, base: dict, cells: dict, share: float) -> None:
        from qpcell.models import create_model

        super().__init__()
        if not 0.0 <= share <= 1.0:
            raise QpcellError(f"cell classifier share {share} is not between 0 and 1")
        base = dict(base)
        self.base = create_model(base.pop("name"), **{**base, "n_classes": n_classes})
        self.cells = CellClassifier(n_classes, **cells)
        self.n_classes, self.share, self.name = int(n_classes), float(share), NAME

    @classmethod
    def wrap(cls, base: nn.Module, cells: CellClassifier, share: float) -> WithCellClassifier:
        """The wrapper around the trained modules themselves (their weights, not copies)."""
        spec = base.spec()
        model = cls(int(spec["n_classes"]), base=spec, cells=cells.spec(), share=share)
        model.base, model.cells = base, cells
        return model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = dict(self.base(x))
        if self.share > 0:
            out["cell_logits"] = self.cells.dense_logits(x)
        return out

    def maps(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The network's detection map, and its class map with the class of each pixel mixed:
        ``(1 - share) p_net + share m p_cells``, where ``m`` is the network's class mass at the
        pixel (its class map's sum: ``1 - p(background)`` for the softmax networks). So the
        class probabilities given a cell mix as ``(1 - share)`` and ``share``, and the map's
        mass per pixel, which post-processing by class-map peaks thresholds, stays the
        network's."""
        det, cls = self.base.maps(out)
        if "cell_logits" in out and cls is not None:
            cls = cls.float()
            cells = torch.softmax(out["cell_logits"].float(), dim=1)
            cls = (1.0 - self.share) * cls + self.share * cls.sum(1, keepdim=True) * cells
        return det, cls

    def spec(self) -> dict:
        return {"name": NAME, "n_classes": self.n_classes, "base": self.base.spec(),
                "cells": self.cells.spec(), "share": self.share}


def base_spec(spec: dict) -> dict:
    """The network of a model description: the wrapped one for a :class:`WithCellClassifier`."""
    if spec.get("name") == NAME and isinstance(spec.get("base"), dict):
        return dict(spec["base"])
    return dict(spec)


def display_name(spec: dict) -> str:
    """The model's name for people: ``"unet + cell classifier"`` for a wrapped U-Net."""
    if spec.get("name") == NAME:
        return f"{base_spec(spec).get('name')} + cell classifier"
    return str(spec.get("name"))


def base_state(spec: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wrapped network's weights of a :class:`WithCellClassifier`'s ``state`` (names as
    the network has them); ``state`` itself for any other model."""
    if spec.get("name") != NAME:
        return state
    return {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}


__all__ = ["CROP_UM", "MARGIN_PX", "NAME", "STRIDE", "WIDTHS", "CellClassifier",
           "WithCellClassifier", "base_spec", "base_state", "crop_px_for", "display_name"]
