"""Test-time views: each tile also seen flipped and turned, its maps turned back and averaged.

A network trained with random flips and 90-degree turns (:mod:`qpcell.patches`) gives
slightly different maps for the same tissue seen another way round. Averaging the maps of
several views of a tile, each mapped back to the tile's own orientation, smooths out that
noise: one forward pass per view, so ``"flips"`` costs four times the network's time and
``"dihedral"`` eight. docs/RESULTS.md ("Test-time views") measures what it buys.

A view is ``(k, flip)``: the tile turned by ``k`` quarter turns (``numpy.rot90`` over the
image axes), then mirrored left-right when ``flip``. Maps come back by the inverse: the mirror,
then ``-k`` quarter turns. The post-processing settings of a model are tuned on maps of the
views it predicts with (its config's ``"views"``), since averaged maps peak lower.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

View = tuple[int, bool]

#: The sets of views, by name: none; the four flips (none, left-right, up-down, both, which
#: are the half turn with and without a mirror); all eight turns and mirrors of a square.
VIEWS: dict[str, tuple[View, ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),
    "dihedral": tuple((k, f) for k in range(4) for f in (False, True)),
}
#: What a model without a ``"views"`` entry (written before views existed) predicts with.
DEFAULT_VIEWS = "none"


def check_views(name: str) -> str:
    """``name`` if it names a set of :data:`VIEWS`, else ValueError."""
    if name not in VIEWS:
        raise ValueError(f"unknown test-time views {name!r}; choose from "
                         f"{', '.join(VIEWS)}")
    return name


def view_tiles(tiles: np.ndarray, view: View) -> np.ndarray:
    """``tiles`` ``(B, H, W, C)`` as ``view`` sees them (contiguous; H and W swap for odd k)."""
    k, flip = view
    out = np.rot90(tiles, k, axes=(1, 2))
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def unview_map(m, view: View):
    """A map ``(..., H', W')`` of a viewed tile back in the tile's orientation (numpy arrays
    or torch tensors)."""
    k, flip = view
    if isinstance(m, torch.Tensor):
        if flip:
            m = torch.flip(m, dims=(-1,))
        return torch.rot90(m, -k, dims=(-2, -1)) if k % 4 else m
    if flip:
        m = m[..., ::-1]
    return np.rot90(m, -k, axes=(-2, -1)) if k % 4 else m


def view_mean(predict_maps: Callable, tiles: np.ndarray, views: str
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """The maps of ``tiles`` ``(B, H, W, 3)`` averaged over the views named ``views``.

    ``predict_maps(tiles)`` gives ``(B, H, W)`` detection and ``(B, C, H, W)`` class maps
    (or None). Returns float32 maps of the same shapes.
    """
    chosen = VIEWS[check_views(views)]
    if len(chosen) == 1:
        return predict_maps(tiles)
    det_sum = cls_sum = None
    for view in chosen:
        det, cls = predict_maps(view_tiles(np.asarray(tiles), view))
        det = unview_map(det, view)
        det_sum = det.astype(np.float32) if det_sum is None else det_sum + det
        if cls is not None:
            cls = unview_map(cls, view)
            cls_sum = cls.astype(np.float32) if cls_sum is None else cls_sum + cls
    n = np.float32(len(chosen))
    return det_sum / n, None if cls_sum is None else cls_sum / n


__all__ = ["View", "VIEWS", "DEFAULT_VIEWS", "check_views", "view_tiles", "unview_map",
           "view_mean"]
