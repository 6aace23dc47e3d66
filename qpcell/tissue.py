"""Where the tissue is: a coarse mask from a thumbnail, so prediction skips empty glass.

The mask is computed on a low-resolution thumbnail (longest side ``max_size`` px): optical
density ``OD = -log10((RGB + 1) / 256)``, its maximum over the three channels, thresholded with
Otsu's method. Otsu's threshold is clamped to ``[b + MARGIN_MIN, b + MARGIN_MAX]`` above the
glass level ``b`` (the 2nd percentile of OD, i.e. the brightest pixels): with glass, faint
tissue and dark cells Otsu tends to split tissue from cells, and the upper clamp keeps faint
tissue in; on a blank image the lower clamp keeps glass noise out. Skipping a tile with cells
loses them, reading an empty one costs a little time: the clamps lean towards tissue. The mask
is then dilated by a few thumbnail pixels so that cells at the tissue edge are not lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

#: Tissue is at least this much denser than glass (OD; 0.02 ~ 245 -> 234 grey levels) ...
MARGIN_MIN = 0.02
#: ... and anything this much denser is tissue (OD; 0.05 ~ 245 -> 218 grey levels).
MARGIN_MAX = 0.05
#: Tiles whose core has less tissue than this share are skipped.
MIN_TISSUE_FRACTION = 0.01


@dataclass
class TissueMask:
    """A boolean tissue mask on a thumbnail grid.

    Attributes
    ----------
    mask
        ``(h, w)`` bool, True = tissue.
    scale
        Thumbnail pixels per full-resolution pixel.
    threshold
        The optical-density threshold used.
    """

    mask: np.ndarray
    scale: float
    threshold: float

    def fractions(self, boxes: np.ndarray) -> np.ndarray:
        """Share of tissue inside each full-resolution box ``(x0, y0, x1, y1)``, ``(N,)``.

        A box smaller than a thumbnail pixel still looks at the pixel it falls in.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        h, w = self.mask.shape
        ii = np.zeros((h + 1, w + 1), dtype=np.int64)
        ii[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1)
        b = boxes * self.scale
        x0 = np.clip(np.floor(b[:, 0]).astype(np.int64), 0, w - 1)
        y0 = np.clip(np.floor(b[:, 1]).astype(np.int64), 0, h - 1)
        x1 = np.clip(np.ceil(b[:, 2]).astype(np.int64), x0 + 1, w)
        y1 = np.clip(np.ceil(b[:, 3]).astype(np.int64), y0 + 1, h)
        inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return inside / ((x1 - x0) * (y1 - y0))


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Maximum over channels of ``-log10((v + 1) / 256)``, float32 ``(H, W)``."""
    od = -np.log10((rgb.astype(np.float32) + 1.0) / 256.0)
    return od.max(axis=2)


def tissue_mask_from_rgb(rgb: np.ndarray, scale: float = 1.0, *, dilate_px: int = 2
                         ) -> TissueMask:
    """Tissue mask of an RGB thumbnail (see the module notes)."""
    od = optical_density(rgb)
    glass = float(np.percentile(od, 2)) if od.size else 0.0
    thr = float(threshold_otsu(od)) if od.size and od.max() > od.min() else np.inf
    thr = float(np.clip(thr, glass + MARGIN_MIN, glass + MARGIN_MAX))
    mask = od > thr
    if dilate_px > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=int(dilate_px))
    return TissueMask(mask, float(scale), thr)


def tissue_mask(slide, *, max_size: int = 1024, dilate_px: int = 2) -> TissueMask:
    """Tissue mask of a :class:`~qpcell.io.slides.Slide` from its thumbnail."""
    thumb, scale = slide.thumbnail(max_size)
    return tissue_mask_from_rgb(thumb, scale, dilate_px=dilate_px)


__all__ = ["TissueMask", "tissue_mask", "tissue_mask_from_rgb", "optical_density",
           "MIN_TISSUE_FRACTION", "MARGIN_MIN", "MARGIN_MAX"]
