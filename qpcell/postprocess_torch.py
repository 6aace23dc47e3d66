"""Probability maps -> cells for a whole batch of tiles, in torch ops, on the maps' device.

The S-DRDIN 2.5 recipe of :func:`qpcell.postprocess.postprocess_sdrdin`, step for step, so
that the maps never leave the device that computed them: only the cells come back. The
same code runs on CPU tensors (the tests compare the two paths there).

Steps (all tiles of the batch at once; ``valid`` is the part of each tile inside the image,
the rest counts as *outside*: neither cell nor background, as if the map were cropped):

1. foreground = ``det >= threshold`` inside ``valid``;
2. 8-connected components by parallel union-find (hooking roots onto their neighbours'
   smallest label, then pointer jumping); components under ``min_area_px`` pixels are
   dropped;
3. the exact squared Euclidean distance transform (px²) of the foreground: the distance to
   the background above or below in each column (cumulative max / min of row indices),
   then ``min over dx of dx² + g(x ± dx)²``, stopped at the first ``dx`` whose square is no
   smaller than every pixel's best so far (as :func:`qpcell.postprocess.squared_distances`);
4. peaks: pixels equal to the maximum of their ``peak_window_px`` window among pixels of
   their own component. A separable max-pool decides most pixels; only 3 x 3 maxima that
   a pixel of *another* component outshines are checked pixel by pixel;
5. peaks closer than ``2·R + 1`` px (``R`` = :func:`qpcell.postprocess.merge_radius_px`) in
   one component are one cell (connected groups, found by min-label propagation with
   pointer jumping), at the centroid of its peaks; cells come in the raster order of their
   first peak;
6. cells whose centre lies outside the tile's ``core`` are dropped (integer comparisons on
   the sums of peak coordinates, so no rounding can move a cell across the boundary);
7. the score (detection probability at the centre rounded half up) and the class maps
   summed over the ``class_box_px`` box clipped to ``valid`` (one cumulative sum along the
   rows, in float64 where the device has it).

The class probabilities are then the box means, normalised, mixed with the neighbouring
cells' and multiplied by the class gains on the host, by the very function of the CPU path
(:func:`cells_of_batch`). The neighbours of a core's cells lie around the core: with the
mixing on, the caller passes ``core`` grown by the context radius to step 6 and the core
itself to :func:`cells_of_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.points import CellClass, Detections
from qpcell.postprocess import class_probabilities, merge_radius_px

#: Steps of the distance transform between two (synchronising) checks for convergence.
_CHECK_EVERY = {"cuda": 4, "cpu": 1}
#: Pixels x window pixels gathered at once when checking peaks one by one.
_GATHER_CHUNK = 4_000_000


@dataclass
class BatchCells:
    """Cells of a batch of tiles, on the host.

    Attributes
    ----------
    tile
        ``(N,)`` int64: which tile of the batch each cell is in.
    xy
        ``(N, 2)`` float64 ``(x, y)`` centres in the tile's pixels (column, row).
    scores
        ``(N,)`` float32 detection probability at the rounded centre.
    box_means
        ``(N, C)`` float64 mean class probabilities in the clipped box, or ``None`` without
        class maps.
    """

    tile: np.ndarray
    xy: np.ndarray
    scores: np.ndarray
    box_means: np.ndarray | None


def _boxes(boxes, b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(B, 4)`` int64 ``(x0, y0, x1, y1)`` on ``device``; ``None`` = the whole tile."""
    if boxes is None:
        return torch.tensor([[0, 0, w, h]], dtype=torch.int64, device=device).expand(b, 4)
    t = torch.as_tensor(np.asarray(boxes, dtype=np.int64)).to(device)
    if t.shape != (b, 4):
        raise QpcellError(f"expected ({b}, 4) boxes, got shape {tuple(t.shape)}")
    return t


def _box_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h, device=box.device).view(1, h, 1)
    cols = torch.arange(w, device=box.device).view(1, 1, w)
    x0, y0, x1, y1 = (box[:, k].view(-1, 1, 1) for k in range(4))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def _neighbour_min(lab: torch.Tensor, big: int) -> torch.Tensor:
    """Smallest value among the 8 neighbours of each pixel (``big`` beyond the tile)."""
    b, h, w = lab.shape
    p = F.pad(lab, (1, 1, 1, 1), value=big)
    out = torch.full_like(lab, big)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                torch.minimum(out, p[:, dy:dy + h, dx:dx + w], out=out)
    return out


def label_components(fg: torch.Tensor) -> torch.Tensor:
    """8-connected components of each ``(H, W)`` mask of a ``(B, H, W)`` bool batch.

    Union-find in parallel: every round, the root of each pixel's label is hooked onto the
    smallest label among its neighbours in the mask (``scatter_reduce`` with ``amin``),
    then the label trees are flattened by pointer jumping, so the rounds needed grow with
    the logarithm of a component's size more than with its diameter.

    Returns
    -------
    ``(B, H, W)`` float32 labels: 0 off the mask, else ``1 +`` the raster index (``row·W +
    col``) of the component's first pixel; exact for tiles up to 2^24 pixels.
    """
    b, h, w = fg.shape
    if h * w >= 2 ** 24:
        raise QpcellError(f"tiles of {h}x{w} px are too big to label on the device")
    n = b * h * w
    big = n  # larger than every pixel index
    parent = torch.arange(n, device=fg.device)
    flat_fg = fg.reshape(-1)
    while True:
        lab = torch.where(fg, parent.view(b, h, w), big)
        low = torch.minimum(_neighbour_min(lab, big), lab).reshape(-1)
        lab = lab.reshape(-1)
        hook = flat_fg & (low < lab)
        if not bool(hook.any()):
            break
        parent.scatter_reduce_(0, lab[hook], low[hook], "amin")
        while True:  # pointer jumping until every pixel points at its root
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
    local = parent.view(b, h, w) - torch.arange(b, device=fg.device).view(b, 1, 1) * (h * w)
    return torch.where(fg, (local + 1).float(), 0.0)


def squared_distance_map(fg: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance (int32, px²) from each foreground pixel to the nearest
    background pixel (inside and not foreground) of its tile; 0 elsewhere.

    Pixels outside (``~inside``) are not background, as beyond a cropped map. A tile without
    any background follows scipy's convention (:func:`scipy.ndimage.distance_transform_edt`
    then measures from the pixel just above the crop's top-left corner).
    """
    b, h, w = fg.shape
    dev = fg.device
    far = h + w + 1  # more than any distance inside a tile
    bg = inside & ~fg
    rows = torch.arange(h, device=dev, dtype=torch.int32).view(1, h, 1).expand(b, h, w)
    above = torch.cummax(torch.where(bg, rows, -1), dim=1).values
    up = torch.where(above >= 0, rows - above, far)
    below = torch.cummin(torch.where(bg, rows, h + far).flip(1), dim=1).values.flip(1)
    down = torch.where(below < h + far, below - rows, far)
    g = torch.minimum(up, down)
    g2 = torch.where(inside, g * g, far * far).to(torch.int32)
    d2 = g2.clone()
    no_bg = ~bg.flatten(1).any(1)
    counted = fg & ~no_bg.view(b, 1, 1)  # tiles without background are set below
    every = _CHECK_EVERY.get(dev.type, 4)
    dx = 1
    while dx < w:
        if (dx - 1) % every == 0:
            if dx * dx >= int(torch.where(counted, d2, 0).max()):
                break
        step = dx * dx
        torch.minimum(d2[..., dx:], g2[..., :-dx] + step, out=d2[..., dx:])
        torch.minimum(d2[..., :-dx], g2[..., dx:] + step, out=d2[..., :-dx])
        dx += 1
    no_bg &= fg.flatten(1).any(1)
    if bool(no_bg.any()):  # scipy: distance to (row -1, col 0) of the crop
        top = torch.where(inside, rows, h).flatten(1).min(1).values.view(b, 1, 1)
        cols = torch.arange(w, device=dev, dtype=torch.int32).view(1, 1, w)
        left = torch.where(inside, cols, w).flatten(1).min(1).values.view(b, 1, 1)
        corner = (rows - top + 1) ** 2 + (cols - left) ** 2
        d2 = torch.where(no_bg.view(b, 1, 1), corner.to(torch.int32), d2)
    return torch.where(fg, d2, 0)


def _window_max(v: torch.Tensor, half: int) -> torch.Tensor:
    """Maximum over the ``(2·half + 1)``² window of each pixel (separable; -inf beyond)."""
    k = 2 * half + 1
    m = F.max_pool2d(v[:, None], (k, 1), 1, (half, 0))
    return F.max_pool2d(m, (1, k), 1, (0, half))[:, 0]


def component_peaks(values: torch.Tensor, labels: torch.Tensor, window: int) -> torch.Tensor:
    """Pixels (``labels`` > 0) equal to the maximum of their ``window`` x ``window``
    neighbourhood among pixels of the same label: ``(B, H, W)`` bool.

    The pixels of :func:`qpcell.postprocess.window_peaks`; ``values`` must be exact in
    float32 (e.g. squared distances under 2^24).
    """
    fg = labels > 0
    v = torch.where(fg, values.float(), -1.0)
    peak = fg & (v >= _window_max(v, 1))  # 3 x 3: other components never reach here
    half = int(window) // 2
    if half <= 1:
        return peak
    sure = v >= _window_max(v, half)
    unsure = peak & ~sure
    idx = unsure.nonzero()
    peak &= sure
    if len(idx) == 0:
        return peak
    b, h, w = v.shape
    hp, wp = h + 2 * half, w + 2 * half
    vp = F.pad(v, (half, half, half, half), value=-1.0).reshape(-1)
    lp = F.pad(labels, (half, half, half, half), value=0.0).reshape(-1)
    dy, dx = torch.meshgrid(torch.arange(-half, half + 1, device=v.device),
                            torch.arange(-half, half + 1, device=v.device), indexing="ij")
    offsets = (dy * wp + dx).reshape(-1)
    step = max(1, _GATHER_CHUNK // offsets.numel())
    for i in range(0, len(idx), step):
        bi, ri, ci = idx[i:i + step].unbind(1)
        base = bi * (hp * wp) + (ri + half) * wp + (ci + half)
        at = base[:, None] + offsets[None, :]
        own = labels[bi, ri, ci]
        best = torch.where(lp[at] == own[:, None], vp[at], -1.0).max(dim=1).values
        keep = v[bi, ri, ci] >= best
        peak[bi[keep], ri[keep], ci[keep]] = True
    return peak


def _groups(pb: torch.Tensor, pr: torch.Tensor, pc: torch.Tensor, plab: torch.Tensor,
            radius: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Group of each peak: the smallest index of the peaks it is joined to (distance
    <= ``radius`` px, same label, same tile), through any chain of such pairs."""
    n = len(pb)
    group = torch.arange(n, device=pb.device)
    if n < 2:
        return group
    b, h, w = shape
    r = int(radius)
    hp, wp = h + 2 * r, w + 2 * r
    ids = torch.full((b * hp * wp,), -1, dtype=torch.int64, device=pb.device)
    base = pb * (hp * wp) + (pr + r) * wp + (pc + r)
    ids[base] = group
    offs = [(dy, dx) for dy in range(0, r + 1) for dx in range(-r, r + 1)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx <= r * r]
    offsets = torch.tensor([dy * wp + dx for dy, dx in offs], device=pb.device)
    nb = ids[base[:, None] + offsets[None, :]]  # (P, K): peaks in the half-disc after each
    ok = nb >= 0
    ok &= plab[nb.clamp_min(0)] == plab[:, None]
    i = torch.arange(n, device=pb.device)[:, None].expand_as(nb)[ok]
    j = nb[ok]
    if len(i) == 0:
        return group
    while True:
        old = group
        low = torch.minimum(group[i], group[j])
        group = group.scatter_reduce(0, i, low, "amin").scatter_reduce(0, j, low, "amin")
        group = group[group]  # pointer jumping: a peak's group is a peak of its group
        if torch.equal(group, old):
            return group


def _box_sums(cls: torch.Tensor, b: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
              valid: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``(N, C)`` of the class maps over each cell's box clipped to ``valid``, and the
    box's pixel count ``(N,)``."""
    dtype = torch.float64 if cls.device.type in ("cpu", "cuda") else torch.float32
    bsz, nc, h, w = cls.shape
    half = box // 2
    x0, y0, x1, y1 = (valid[b, k] for k in range(4))
    c0 = (c - half).clamp(min=x0, max=x1)
    c1 = (c + (box - half)).clamp(min=x0, max=x1)
    rspan = r[:, None] + torch.arange(-half, box - half, device=cls.device)[None, :]
    rin = (rspan >= y0[:, None]) & (rspan < y1[:, None])
    rspan = rspan.clamp(0, h - 1)
    tiles = torch.unique(b)
    sums = torch.zeros(len(b), nc, dtype=dtype, device=cls.device)
    # one tile at a time: a float64 cumulative sum of the whole batch would double its maps
    for t in tiles.tolist():
        sel = (b == t).nonzero()[:, 0]
        cum = F.pad(torch.cumsum(cls[t], dim=2, dtype=dtype), (1, 0))  # (C, H, W + 1)
        rs = rspan[sel]
        strips = cum[:, rs, c1[sel, None]] - cum[:, rs, c0[sel, None]]  # (C, n, box)
        sums[sel] = torch.where(rin[sel][None], strips, 0.0).sum(dim=2).T
    area = rin.sum(dim=1) * (c1 - c0)
    return sums, area


def sdrdin_batch(det: torch.Tensor, cls: torch.Tensor | None, cfg: PostprocessConfig, *,
                 valid=None, core=None) -> BatchCells:
    """S-DRDIN cells of a batch of maps, on their device (see the module notes).

    Parameters
    ----------
    det
        ``(B, H, W)`` detection probability.
    cls
        ``(B, C, H, W)`` class probabilities, or ``None``.
    cfg
        Post-processing settings in pixels of these maps.
    valid
        ``(B, 4)`` ``(x0, y0, x1, y1)``, px: each tile's part inside the image (the maps are
        treated as cropped to it); ``None`` = whole tiles.
    core
        ``(B, 4)`` ``(x0, y0, x1, y1)``, px: keep only cells whose centre is in
        ``[x0, x1) x [y0, y1)``; ``None`` = keep all.

    Returns
    -------
    BatchCells
        On the host; centres in the tiles' pixels.
    """
    if det.ndim != 3:
        raise QpcellError(f"detection maps must be (B, H, W), got shape {tuple(det.shape)}")
    if cls is not None and (cls.ndim != 4 or cls.shape[0] != det.shape[0]
                            or cls.shape[2:] != det.shape[1:]):
        raise QpcellError(f"class maps {tuple(cls.shape)} do not match the detection maps "
                          f"{tuple(det.shape)}")
    b, h, w = det.shape
    dev = det.device
    with torch.inference_mode():
        det = det.float()
        valid_t = _boxes(valid, b, h, w, dev)
        inside = _box_mask(valid_t, h, w)
        fg = inside & (det >= cfg.threshold)
        lab = label_components(fg)
        if cfg.min_area_px > 1 and bool(fg.any()):
            flat = (torch.arange(b, device=dev).view(b, 1, 1) * (h * w) + lab.long() - 1)
            areas = torch.bincount(flat[fg], minlength=b * h * w)
            small = fg.clone()
            small[fg] = areas[flat[fg]] < cfg.min_area_px
            fg &= ~small
            lab = torch.where(fg, lab, 0.0)
        d2 = squared_distance_map(fg, inside)
        peaks = component_peaks(d2, lab, int(cfg.peak_window_px))
        pb, pr, pc = peaks.nonzero().unbind(1)  # raster order, tile by tile
        group = _groups(pb, pr, pc, lab[pb, pr, pc], 2 * merge_radius_px(cfg) + 1, (b, h, w))
        n_all = torch.bincount(group, minlength=len(group))
        cells = (n_all > 0).nonzero()[:, 0]  # sorted: raster order of the first peak
        n = n_all[cells]
        sr = torch.zeros(len(group), dtype=torch.int64, device=dev).index_add_(0, group, pr)
        sc = torch.zeros(len(group), dtype=torch.int64, device=dev).index_add_(0, group, pc)
        sr, sc, cb = sr[cells], sc[cells], pb[cells]
        if core is not None:
            core_t = _boxes(core, b, h, w, dev)[cb]
            keep = ((sc >= core_t[:, 0] * n) & (sc < core_t[:, 2] * n)
                    & (sr >= core_t[:, 1] * n) & (sr < core_t[:, 3] * n))
            sr, sc, cb, n = sr[keep], sc[keep], cb[keep], n[keep]
        # the centre's pixel, rounded half up: floor((2 s + n) / 2 n), within the crop
        vb = valid_t[cb]
        rr = torch.div(2 * sr + n, 2 * n, rounding_mode="floor")
        cc = torch.div(2 * sc + n, 2 * n, rounding_mode="floor")
        rr = torch.minimum(torch.maximum(rr, vb[:, 1]), vb[:, 3] - 1)
        cc = torch.minimum(torch.maximum(cc, vb[:, 0]), vb[:, 2] - 1)
        scores = det[cb, rr, cc]
        means = None
        if cls is not None and len(cb):
            sums, area = _box_sums(cls, cb, rr, cc, valid_t, int(cfg.class_box_px))
            means = (sums.double().cpu().numpy()
                     / np.maximum(area.cpu().numpy(), 1)[:, None])
        elif cls is not None:
            means = np.zeros((0, cls.shape[1]))
        n_h = n.cpu().numpy().astype(np.float64)
        xy = np.stack([sc.cpu().numpy() / n_h, sr.cpu().numpy() / n_h], axis=1).reshape(-1, 2)
        return BatchCells(cb.cpu().numpy().astype(np.int64), xy,
                          scores.cpu().numpy().astype(np.float32), means)


def cells_of_batch(batch: BatchCells, n_tiles: int, cfg: PostprocessConfig,
                   classes: Sequence[CellClass], *, normalize: bool = True,
                   offsets=None, core=None) -> list[Detections]:
    """One :class:`Detections` per tile from :func:`sdrdin_batch`'s cells.

    Class probabilities as in :func:`qpcell.postprocess.postprocess_sdrdin`
    (:func:`~qpcell.postprocess.class_probabilities`: box means normalised, mixed with the
    tile's neighbouring cells, times ``cfg.class_gain``; argmax). ``core`` ``(B, 4)``
    ``(x0, y0, x1, y1)`` px: then keep only each tile's cells whose centre is in
    ``[x0, x1) x [y0, y1)`` (after the mixing, which needs the cells around the core).
    ``offsets`` ``(B, 2)`` ``(x, y)`` px are added to each tile's centres (e.g. the tile's
    origin on the slide grid).
    """
    classes = tuple(classes)
    if batch.box_means is not None and batch.box_means.shape[1] != len(classes):
        raise QpcellError(f"{batch.box_means.shape[1]} class maps for {len(classes)} classes")
    out = []
    bounds = np.searchsorted(batch.tile, np.arange(n_tiles + 1))
    for t in range(n_tiles):
        s = slice(bounds[t], bounds[t + 1])
        xy = batch.xy[s]
        if batch.box_means is None:
            probs = np.zeros((len(xy), len(classes)))
            probs[:, 0] = 1.0
        else:
            probs = class_probabilities(batch.box_means[s], xy, cfg, normalize=normalize)
        labels = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, np.int64)
        scores = batch.scores[s]
        if core is not None:
            x0, y0, x1, y1 = np.asarray(core, dtype=np.float64)[t]
            keep = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
            xy, probs, labels, scores = xy[keep], probs[keep], labels[keep], scores[keep]
        if offsets is not None:
            xy = xy + np.asarray(offsets, dtype=np.float64)[t]
        out.append(Detections(xy, labels, scores, probs.astype(np.float32), classes))
    return out


__all__ = ["BatchCells", "sdrdin_batch", "cells_of_batch", "label_components",
           "squared_distance_map", "component_peaks"]
