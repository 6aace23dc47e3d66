"""Probability maps -> cells (points, classes, scores).

Two recipes, one per source paper. Both work on the maps of *one* image or tile, in that map's
own pixel grid (``x`` = column, ``y`` = row, index coordinates), and return
:class:`~qpcell.points.Detections`; the caller shifts and scales them to the slide.

``postprocess_sdrdin`` (S-DRDIN 2.5)
    threshold the detection map -> drop connected components smaller than ``min_area_px`` ->
    Euclidean distance transform -> local maxima in a ``peak_window_px`` square window, each
    component on its own -> maxima dilated by a disc of radius 2 px (at 0.44 µm/px) and each
    dilated instance reduced to the centroid of its maxima (so a plateau, or maxima a few
    pixels apart, give one cell) -> class = argmax of the class probabilities averaged over a
    ``class_box_px`` square box around the cell (eq. 3).
``postprocess_peaks`` (MTL-IHC)
    local peaks of every class map above a threshold, then peaks of different classes closer
    than ``min_distance_px`` are merged (the higher one wins).

Choices the papers leave open (documented here, tested in ``tests/test_postprocess.py``):

* a pixel is foreground when ``det >= threshold``; components use 8-connectivity;
* ``score`` = the detection probability at the cell's pixel (the centre rounded to the nearest
  pixel, halves up);
* ``class_probs`` = the class probabilities averaged over the box (box clipped at the map's
  border, the mean taken over the pixels inside), divided by their sum, i.e. the probability of
  each class *given* that there is a cell (for softmax models whose background channel was
  dropped); pass ``normalize=False`` for the raw means. The class is the argmax either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max

from qpcell.config import PAPER_MPP, PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.points import CellClass, Detections

#: S-DRDIN 2.5: "the local maxima were dilated by a disk with a radius of 2 pixels" (at 0.44 µm/px).
MERGE_RADIUS_UM = 2.0 * PAPER_MPP

_EIGHT = np.ones((3, 3), dtype=bool)


def merge_radius_px(cfg: PostprocessConfig) -> int:
    """Radius (pixels at ``cfg.mpp``) of the disc that joins nearby maxima into one cell."""
    return max(1, round(MERGE_RADIUS_UM / cfg.mpp))


def _check_maps(det: np.ndarray | None, cls: np.ndarray | None) -> tuple[int, int]:
    if det is not None and det.ndim != 2:
        raise QpcellError(f"detection map must be (H, W), got shape {det.shape}")
    if cls is not None:
        if cls.ndim != 3:
            raise QpcellError(f"class maps must be (C, H, W), got shape {cls.shape}")
        if det is not None and cls.shape[1:] != det.shape:
            raise QpcellError(f"class maps {cls.shape} do not match the detection map {det.shape}")
    return det.shape if det is not None else cls.shape[1:]


def box_means(maps: np.ndarray, rows: np.ndarray, cols: np.ndarray, box: int) -> np.ndarray:
    """Mean of each map over a ``box`` x ``box`` square centred on each (row, col) pixel.

    Boxes are clipped at the border and averaged over the pixels inside. Vectorised, in
    float64, with the cheaper of two ways: small boxes gather their pixels directly
    (cost O(C·N·box²)); big ones use one cumulative sum along the rows of the maps, each box
    being the sum over its rows of a difference of two entries (O(C·H·W + C·N·box)).

    Parameters
    ----------
    maps
        ``(C, H, W)`` array.
    rows, cols
        ``(N,)`` integer pixel indices of the box centres.
    box
        Side of the square (odd; an even value reaches one pixel further down/right).

    Returns
    -------
    ``(N, C)`` float64 means.
    """
    c, h, w = maps.shape
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    n = rows.size
    if n == 0:
        return np.zeros((0, c))
    half = box // 2
    offsets = np.arange(-half, box - half)
    rspan = rows[:, None] + offsets[None, :]  # (N, box) rows of each box
    cspan = cols[:, None] + offsets[None, :]
    rin = (rspan >= 0) & (rspan < h)
    cin = (cspan >= 0) & (cspan < w)
    rspan = np.clip(rspan, 0, h - 1)
    area = rin.sum(axis=1) * cin.sum(axis=1)
    sums = np.empty((c, n))
    if n * box * box <= 2 * h * w:
        cspan = np.clip(cspan, 0, w - 1)
        inside = rin[:, :, None] & cin[:, None, :]  # (N, box, box)
        step = max(1, 4_000_000 // max(1, c * box * box))  # bounded memory
        for i in range(0, n, step):
            j = slice(i, i + step)
            vals = maps[:, rspan[j, :, None], cspan[j, None, :]]  # (C, n, box, box)
            sums[:, j] = np.where(inside[None, j], vals, 0).sum(axis=(2, 3), dtype=np.float64)
    else:
        cum = np.zeros((c, h, w + 1), dtype=np.float64)
        np.cumsum(maps, axis=2, dtype=np.float64, out=cum[:, :, 1:])
        c0 = np.clip(cols - half, 0, w)[:, None]
        c1 = np.clip(cols + (box - half), 0, w)[:, None]
        strips = cum[:, rspan, c1] - cum[:, rspan, c0]  # (C, N, box): row sums of each box
        sums = np.where(rin[None], strips, 0.0).sum(axis=2)
    return (sums / np.maximum(area, 1)).T


def _normalise(probs: np.ndarray) -> np.ndarray:
    total = probs.sum(axis=1, keepdims=True)
    uniform = np.full_like(probs, 1.0 / max(1, probs.shape[1]))
    return np.where(total > 0, probs / np.where(total > 0, total, 1.0), uniform)


def apply_class_gain(probs: np.ndarray, gain) -> np.ndarray:
    """``(N, C)`` class probabilities times the per-class ``gain`` (``C`` factors >= 0),
    renormalised to sum to 1: a shift of the class priors. The cell's class is their argmax.

    >>> apply_class_gain(np.array([[0.7, 0.3]]), (1.0, 3.0)).round(4).tolist()
    [[0.4375, 0.5625]]
    """
    probs = np.asarray(probs, dtype=np.float64)
    gain = np.asarray(gain, dtype=np.float64)
    if gain.shape != probs.shape[1:] or np.any(gain < 0) or not np.all(np.isfinite(gain)):
        raise QpcellError(f"class gains {gain.tolist()} must be {probs.shape[1]} finite "
                          "factors >= 0, one per class")
    return _normalise(probs * gain)


def neighbour_context(xy: np.ndarray, probs: np.ndarray, radius_px: float, weight: float
                      ) -> np.ndarray:
    """Class probabilities mixed with the cells' neighbourhood.

    Each cell's row becomes ``(1 - weight) p_i + weight * mean(p_j)`` over the other cells
    ``j`` whose centres lie within ``radius_px`` of its own (``<=``); a cell without such a
    neighbour keeps its row. A mixture of rows that sum to 1 sums to 1.

    Parameters
    ----------
    xy
        ``(N, 2)`` cell centres, pixels.
    probs
        ``(N, C)`` class probabilities.
    radius_px
        Neighbourhood radius, pixels of ``xy``.
    weight
        Share of the neighbours' mean, in [0, 1]; 0 returns ``probs`` unchanged.

    Examples
    --------
    >>> xy = np.array([[0.0, 0.0], [3.0, 0.0], [50.0, 0.0]])
    >>> p = np.array([[0.6, 0.4], [0.0, 1.0], [1.0, 0.0]])
    >>> neighbour_context(xy, p, radius_px=5, weight=0.5).tolist()
    [[0.3, 0.7], [0.3, 0.7], [1.0, 0.0]]
    """
    probs = np.asarray(probs, dtype=np.float64)
    if not 0.0 <= weight <= 1.0:
        raise QpcellError(f"context weight {weight!r} must be from 0 to 1")
    if weight == 0 or radius_px <= 0 or len(probs) < 2:
        return probs
    pairs = cKDTree(np.asarray(xy, dtype=np.float64)).query_pairs(radius_px,
                                                                  output_type="ndarray")
    if not len(pairs):
        return probs
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    count = np.bincount(i, minlength=len(probs)).astype(np.float64)
    sums = np.stack([np.bincount(i, weights=probs[j, c], minlength=len(probs))
                     for c in range(probs.shape[1])], axis=1)
    has = count > 0
    out = probs.copy()
    out[has] = (1.0 - weight) * probs[has] + weight * sums[has] / count[has, None]
    return out


def class_probabilities(means: np.ndarray, xy: np.ndarray, cfg: PostprocessConfig, *,
                        normalize: bool = True) -> np.ndarray:
    """A tile's ``(N, C)`` box means -> the probabilities its cells' classes are chosen from:
    normalised (see the module notes), mixed with their neighbours'
    (:func:`neighbour_context`, ``cfg.context_*``) and times the class gains."""
    probs = _normalise(means) if normalize else np.asarray(means, dtype=np.float64)
    probs = neighbour_context(xy, probs, cfg.context_radius_px, cfg.context_weight)
    if cfg.class_gain:
        probs = apply_class_gain(probs, cfg.class_gain)
    return probs


def relabel_with_gain(dets: Detections, gain) -> Detections:
    """The same cells, each class chosen again from its probabilities times ``gain``
    (:func:`apply_class_gain`); the stored probabilities become the shifted ones."""
    if not len(dets):
        return dets
    probs = apply_class_gain(dets.class_probs, gain)
    return replace(dets, labels=np.argmax(probs, axis=1), class_probs=probs.astype(np.float32))


def _round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5).astype(np.int64)


def squared_distances(fg: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (int64, px²) from the foreground pixels ``(rows, cols)`` of
    ``fg`` to the nearest background pixel of the image.

    Exactly the square of ``scipy.ndimage.distance_transform_edt(fg)`` there, computed
    separably and only where asked: the vertical distance ``g`` of each pixel to the
    background above or below it in its column (from the runs of foreground down each
    column), then ``min over dx of dx² + g(x ± dx)²``, stopping for each pixel at the first
    ``dx`` whose square is no smaller than its best so far, so the cost follows the size of
    the cells, not of the image.
    """
    fg = np.asarray(fg, dtype=bool)
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    h, w = fg.shape
    if rows.size == 0:
        return np.zeros(0, np.int64)
    if fg.all():  # no background at all: scipy's own convention
        d = ndimage.distance_transform_edt(fg)[rows, cols]
        return np.rint(d * d).astype(np.int64)
    far = h + w + 1  # more than any distance inside the image
    # foreground runs down each column, in column-major order
    xs, ys = np.nonzero(fg.T)
    start = np.ones(ys.size, dtype=bool)  # a run starts at a column's top or after a gap
    start[1:] = (ys[1:] != ys[:-1] + 1) | (xs[1:] != xs[:-1])
    run = np.cumsum(start) - 1
    first = ys[start]
    last = np.append(ys[np.nonzero(start)[0][1:] - 1], ys[-1])
    top, bottom = first[run], last[run]
    up = np.where(top > 0, ys - top + 1, far)
    down = np.where(bottom < h - 1, bottom + 1 - ys, far)
    g = np.minimum(up, down)
    # no pixel looks further sideways than its own vertical distance, nor past the image
    reach = min(int(g.max()), w)
    dtype = np.int32 if 2 * far * far < 2**31 else np.int64
    g2 = np.full((h, w + 2 * reach), far * far, dtype=dtype)  # beyond the image: no background
    g2[:, reach:w + reach] = 0
    g2[ys, xs + reach] = g * g
    flat = g2.ravel()
    base = rows * g2.shape[1] + cols + reach
    best = flat[base].astype(np.int64)
    idx = np.nonzero(best > 1)[0]
    b, cur = base[idx], best[idx]
    dx = 1
    while idx.size and dx <= reach:
        cur = np.minimum(cur, np.minimum(flat[b - dx], flat[b + dx]) + dx * dx)
        dx += 1
        more = cur > dx * dx
        if not more.all():
            best[idx[~more]] = cur[~more]
            idx, b, cur = idx[more], b[more], cur[more]
    best[idx] = cur
    return best


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _padded(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
            pad: int, fill) -> tuple[np.ndarray, np.ndarray, int]:
    """``values`` scattered on a ``fill``-ed image padded by ``pad``: (flat image, flat index
    of each pixel, padded width)."""
    height, width = shape
    wp = width + 2 * pad
    img = np.full((height + 2 * pad, wp), fill, dtype=values.dtype)
    img[rows + pad, cols + pad] = values
    return img.ravel(), (rows + pad) * wp + (cols + pad), wp


def _component_peaks(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, comp: np.ndarray,
                     window: int) -> np.ndarray:
    """Which of the component pixels ``(rows, cols)`` (raster order, ``values`` there) are
    maxima of their ``window`` x ``window`` neighbourhood among pixels of their component.

    Candidates are first the maxima of their 3 x 3 neighbourhood (which, for 8-connected
    components, never holds another component). A candidate whose whole component fits in
    its window is a peak when it holds the component's maximum; any other candidate is
    compared with every pixel of its window that belongs to its component.
    """
    h = int(window) // 2
    if rows.size == 0:
        return np.zeros(0, np.int64)
    if np.issubdtype(values.dtype, np.integer) and values.min() >= 0:
        values, low = values.astype(np.int64), -1  # below every value
    else:
        values, low = values.astype(np.float64), -np.inf
    flat, base, wp = _padded(values, rows, cols, comp.shape, 1, low)
    keep = np.ones(rows.size, dtype=bool)
    for dy, dx in _NEIGHBOURS:  # 3 x 3: other components never reach here
        keep &= values >= flat[base + dy * wp + dx]
    idx = np.nonzero(keep)[0]
    if h <= 1 or idx.size == 0:
        return idx
    own = comp[rows, cols]
    # bounding box and maximum of every component, from its pixels sorted by label
    order = np.argsort(own, kind="stable")
    sorted_own = own[order]
    starts = np.flatnonzero(np.r_[True, sorted_own[1:] != sorted_own[:-1]])
    slot = np.zeros(int(sorted_own[-1]) + 1, dtype=np.int64)
    slot[sorted_own[starts]] = np.arange(starts.size)
    r_sorted, c_sorted = rows[order], cols[order]
    y0, y1 = np.minimum.reduceat(r_sorted, starts), np.maximum.reduceat(r_sorted, starts)
    x0, x1 = np.minimum.reduceat(c_sorted, starts), np.maximum.reduceat(c_sorted, starts)
    top = np.maximum.reduceat(values[order], starts)
    r, c, o = rows[idx], cols[idx], slot[own[idx]]
    inside = (y0[o] >= r - h) & (y1[o] <= r + h) & (x0[o] >= c - h) & (x1[o] <= c + h)
    result = np.zeros(idx.size, dtype=bool)
    result[inside] = values[idx[inside]] >= top[o[inside]]
    rest = np.nonzero(~inside)[0]
    if rest.size:
        flat, base, wp = _padded(values, rows, cols, comp.shape, h, low)
        flat_c, _, _ = _padded(own, rows, cols, comp.shape, h, 0)
        dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
        offsets = (dy * wp + dx).ravel()
        step = max(1, 2_000_000 // offsets.size)  # bounded memory
        for i in range(0, rest.size, step):
            k = idx[rest[i:i + step]]
            at = base[k, None] + offsets[None, :]
            vals = np.where(flat_c[at] == own[k, None], flat[at], low)
            result[rest[i:i + step]] = values[k] >= vals.max(axis=1)
    return idx[result]


def window_peaks(dist: np.ndarray, comp: np.ndarray, window: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels equal to the maximum of their ``window`` x ``window`` neighbourhood, where the
    neighbourhood only counts pixels of the same component (``comp`` > 0, 8-connected).

    The same pixels as ``skimage.feature.peak_local_max(dist, footprint=ones((w, w)),
    labels=comp, min_distance=1, exclude_border=False)`` (no thinning: every pixel of a
    plateau is returned), computed without a loop over components (see
    :func:`_component_peaks`).

    Returns
    -------
    rows, cols
        Peak pixels in raster order.
    """
    rows, cols = np.nonzero(comp > 0)
    keep = _component_peaks(np.asarray(dist, dtype=np.float64)[rows, cols], rows, cols,
                            comp, window)
    return rows[keep], cols[keep]


def cell_centres(det: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The S-DRDIN detection steps alone: ``(N, 2)`` float64 ``(x, y)`` cell centres.

    Maxima of the distance transform (:func:`window_peaks`) closer than ``2·R + 1`` px
    (``R`` = :func:`merge_radius_px`: their radius-``R`` discs touch, the paper's dilation)
    and in the same component are one cell, placed at the centroid of its maxima. Centres
    are sorted by the raster order of their first maximum pixel, so the result is
    deterministic. The distance transform is computed only at foreground pixels
    (:func:`squared_distances`; squared distances rank the pixels as distances do).
    """
    det = np.asarray(det)
    fg = det >= cfg.threshold
    comp, n = ndimage.label(fg, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 2))
    if cfg.min_area_px > 1:  # every component has at least one pixel
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        small = areas < cfg.min_area_px
        small[0] = True
        if small[1:].any():
            fg = ~small[comp]
            if not fg.any():
                return np.zeros((0, 2))
            comp = np.where(fg, comp, 0)
    rows, cols = np.nonzero(fg)
    sq = squared_distances(fg, rows, cols)
    peak = _component_peaks(sq, rows, cols, comp, int(cfg.peak_window_px))
    pr, pc = rows[peak], cols[peak]
    if pr.size == 0:
        return np.zeros((0, 2))
    # join maxima whose discs touch (same component only): connected groups
    pts = np.column_stack([pc, pr]).astype(np.float64)
    pairs = cKDTree(pts).query_pairs(r=2 * merge_radius_px(cfg) + 1 + 1e-9,
                                     output_type="ndarray")
    if len(pairs):
        lab = comp[pr, pc]
        pairs = pairs[lab[pairs[:, 0]] == lab[pairs[:, 1]]]
    if len(pairs):
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                           shape=(len(pts), len(pts)))
        _, group = connected_components(graph, directed=False)
    else:
        group = np.arange(len(pts))
    count = np.bincount(group).astype(np.float64)
    cx = np.bincount(group, weights=pc) / count
    cy = np.bincount(group, weights=pr) / count
    first = np.full(len(count), len(pts))
    np.minimum.at(first, group, np.arange(len(pts)))
    order = np.argsort(first, kind="stable")
    return np.stack([cx[order], cy[order]], axis=1)


def postprocess_sdrdin(det: np.ndarray, cls: np.ndarray | None, cfg: PostprocessConfig,
                       classes: Sequence[CellClass], *, normalize: bool = True) -> Detections:
    """Cells from S-DRDIN maps (paper 000, section 2.5).

    Parameters
    ----------
    det
        ``(H, W)`` detection probability in [0, 1].
    cls
        ``(C, H, W)`` class probabilities, or ``None`` for a detection-only model (every cell
        gets class 0 and probability 1 for it).
    cfg
        Threshold, minimum area, peak window, class box and context radius, in pixels of
        this map (use ``cfg.scaled(map_mpp)``), and the class gains (``cfg.class_gain``: the
        box means are multiplied by them and renormalised before the argmax).
    classes
        The model's classes (``C`` of them).
    normalize
        Divide the box means by their sum (see the module notes).

    Returns
    -------
    Detections
        ``xy`` in this map's pixel grid (column, row), ``mpp=None``.

    Examples
    --------
    >>> import numpy as np
    >>> from qpcell.points import make_classes
    >>> det = np.zeros((64, 64), np.float32)
    >>> yy, xx = np.mgrid[:64, :64]
    >>> det[(yy - 20) ** 2 + (xx - 30) ** 2 <= 36] = 1.0
    >>> d = postprocess_sdrdin(det, None, PostprocessConfig(min_area_px=10), make_classes(["cell"]))
    >>> d.xy.tolist()
    [[30.0, 20.0]]
    """
    classes = tuple(classes)
    det = np.asarray(det, dtype=np.float32)
    cls = None if cls is None else np.asarray(cls, dtype=np.float32)
    _check_maps(det, cls)
    if cls is not None and cls.shape[0] != len(classes):
        raise QpcellError(f"{cls.shape[0]} class maps for {len(classes)} classes")
    xy = cell_centres(det, cfg)
    if len(xy) == 0:
        return Detections.empty(classes)
    cols = np.clip(_round_half_up(xy[:, 0]), 0, det.shape[1] - 1)
    rows = np.clip(_round_half_up(xy[:, 1]), 0, det.shape[0] - 1)
    scores = det[rows, cols]
    if cls is None:
        probs = np.zeros((len(xy), len(classes)))
        probs[:, 0] = 1.0
    else:
        probs = class_probabilities(box_means(cls, rows, cols, int(cfg.class_box_px)), xy,
                                    cfg, normalize=normalize)
    labels = np.argmax(probs, axis=1)
    return Detections(xy, labels, scores, probs.astype(np.float32), classes)


def postprocess_peaks(cls: np.ndarray, *, threshold: float, min_distance_px: float,
                      classes: Sequence[CellClass], normalize: bool = True) -> Detections:
    """Cells as local peaks of the class maps (paper 003, MTL-IHC inference).

    Each class map gives its peaks above ``threshold`` (``skimage.feature.peak_local_max``,
    ``min_distance = round(min_distance_px)``); then, over all classes together, a peak closer
    than ``min_distance_px`` (Euclidean) to a higher peak is dropped (ties: lower class index,
    then raster order wins).

    Parameters
    ----------
    cls
        ``(C, H, W)`` class probabilities.
    threshold
        Minimum peak value (strictly greater than).
    min_distance_px
        Peaks closer than this are one cell.
    classes
        The ``C`` classes.
    normalize
        ``class_probs`` = every class map sampled at the peak, divided by their sum (else raw).

    Returns
    -------
    Detections
        ``score`` = the peak value, label = the class whose map peaked.
    """
    classes = tuple(classes)
    cls = np.asarray(cls, dtype=np.float32)
    _check_maps(None, cls)
    if cls.shape[0] != len(classes):
        raise QpcellError(f"{cls.shape[0]} class maps for {len(classes)} classes")
    md = max(1, int(round(min_distance_px)))
    found = []
    for k in range(cls.shape[0]):
        p = peak_local_max(cls[k], min_distance=md, threshold_abs=threshold,
                           exclude_border=False)
        if len(p):
            found.append(np.column_stack([p, np.full(len(p), k)]))
    if not found:
        return Detections.empty(classes)
    pk = np.concatenate(found)  # (row, col, class)
    rows, cols, labs = pk[:, 0], pk[:, 1], pk[:, 2]
    values = cls[labs, rows, cols]
    order = np.lexsort((cols, rows, labs, -values))  # highest first, deterministic ties
    rows, cols, labs, values = rows[order], cols[order], labs[order], values[order]
    keep = _suppress(np.column_stack([cols, rows]).astype(np.float64), float(min_distance_px))
    rows, cols, labs, values = rows[keep], cols[keep], labs[keep], values[keep]
    probs = cls[:, rows, cols].T.astype(np.float64)
    if normalize:
        probs = _normalise(probs)
    return Detections(np.column_stack([cols, rows]).astype(np.float64), labs, values,
                      probs.astype(np.float32), classes)


def _suppress(xy: np.ndarray, radius: float) -> np.ndarray:
    """Greedy non-maximum suppression of points already sorted best first: keep mask."""
    keep = np.ones(len(xy), dtype=bool)
    if len(xy) < 2 or radius <= 0:
        return keep
    pairs = cKDTree(xy).query_pairs(r=np.nextafter(radius, 0), output_type="ndarray")
    if len(pairs) == 0:
        return keep
    pairs.sort(axis=1)
    # visit pairs by their better point; a kept point removes its worse neighbours
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    starts = np.searchsorted(pairs[:, 0], np.arange(len(xy)))
    ends = np.searchsorted(pairs[:, 0], np.arange(len(xy)), side="right")
    for i in np.unique(pairs[:, 0]):
        if keep[i]:
            keep[pairs[starts[i]:ends[i], 1]] = False
    return keep


__all__ = ["postprocess_sdrdin", "postprocess_peaks", "cell_centres", "window_peaks", "box_means",
           "apply_class_gain", "neighbour_context", "class_probabilities", "relabel_with_gain",
           "squared_distances", "merge_radius_px", "MERGE_RADIUS_UM"]
