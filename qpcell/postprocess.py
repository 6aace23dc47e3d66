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

    Boxes are clipped at the border and averaged over the pixels inside. Vectorised: one
    cumulative sum down the rows (float64), then each box is a difference of two rows of it
    summed over the box's columns; cost O(C·H·W + C·N·box).

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
    if rows.size == 0:
        return np.zeros((0, c))
    half = box // 2
    cum = np.zeros((c, h + 1, w), dtype=np.float64)
    np.cumsum(maps, axis=1, dtype=np.float64, out=cum[:, 1:])
    r0 = np.clip(rows - half, 0, h)[:, None]
    r1 = np.clip(rows + (box - half), 0, h)[:, None]
    span = cols[:, None] + np.arange(-half, box - half)[None, :]  # (N, box) columns
    inside = (span >= 0) & (span < w)
    span = np.clip(span, 0, w - 1)
    strips = cum[:, r1, span] - cum[:, r0, span]  # (C, N, box): column sums of each box
    sums = np.where(inside[None], strips, 0.0).sum(axis=2)
    area = (r1[:, 0] - r0[:, 0]) * inside.sum(axis=1)
    return (sums / np.maximum(area, 1)).T


def _normalise(probs: np.ndarray) -> np.ndarray:
    total = probs.sum(axis=1, keepdims=True)
    uniform = np.full_like(probs, 1.0 / max(1, probs.shape[1]))
    return np.where(total > 0, probs / np.where(total > 0, total, 1.0), uniform)


def _round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5).astype(np.int64)


def window_peaks(dist: np.ndarray, comp: np.ndarray, window: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels equal to the maximum of their ``window`` x ``window`` neighbourhood, where the
    neighbourhood only counts pixels of the same component (``comp`` > 0, 8-connected).

    The same pixels as ``skimage.feature.peak_local_max(dist, footprint=ones((w, w)),
    labels=comp, min_distance=1, exclude_border=False)`` (no thinning: every pixel of a
    plateau is returned), computed without a loop over components: candidates are the
    pixels that are maxima of their 3 x 3 neighbourhood (which, for 8-connected components,
    never holds another component), then each candidate's window is gathered and compared.

    Returns
    -------
    rows, cols
        Peak pixels in raster order.
    """
    m3 = ndimage.maximum_filter(dist, size=3, mode="constant", cval=0.0)
    cand = (comp > 0) & (dist >= m3)
    rows, cols = np.nonzero(cand)
    h = int(window) // 2
    if h <= 1 or rows.size == 0:
        return rows, cols
    height, width = dist.shape
    wp = width + 2 * h
    pd = np.pad(dist, h, mode="constant", constant_values=-1.0).ravel()
    pc = np.pad(comp, h, mode="constant", constant_values=0).ravel()
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
    offsets = (dy * wp + dx).ravel()
    base = (rows + h) * wp + (cols + h)
    own = comp[rows, cols]
    value = dist[rows, cols]
    keep = np.empty(rows.size, dtype=bool)
    step = max(1, 2_000_000 // offsets.size)  # bounded memory for big windows
    for i in range(0, rows.size, step):
        idx = base[i:i + step, None] + offsets[None, :]
        vals = np.where(pc[idx] == own[i:i + step, None], pd[idx], -1.0)
        keep[i:i + step] = value[i:i + step] >= vals.max(axis=1)
    return rows[keep], cols[keep]


def cell_centres(det: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The S-DRDIN detection steps alone: ``(N, 2)`` float64 ``(x, y)`` cell centres.

    Maxima of the distance transform (:func:`window_peaks`) closer than ``2·R + 1`` px
    (``R`` = :func:`merge_radius_px`: their radius-``R`` discs touch, the paper's dilation)
    and in the same component are one cell, placed at the centroid of its maxima. Centres
    are sorted by the raster order of their first maximum pixel, so the result is
    deterministic.
    """
    det = np.asarray(det)
    fg = det >= cfg.threshold
    comp, n = ndimage.label(fg, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 2))
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    small = areas < cfg.min_area_px
    small[0] = True
    keep = ~small[comp]
    if not keep.any():
        return np.zeros((0, 2))
    comp = np.where(keep, comp, 0)
    dist = ndimage.distance_transform_edt(keep)
    pr, pc = window_peaks(dist, comp, int(cfg.peak_window_px))
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
        Threshold, minimum area, peak window and class box, in pixels of this map
        (use ``cfg.scaled(map_mpp)``).
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
        probs = box_means(cls, rows, cols, int(cfg.class_box_px))
        if normalize:
            probs = _normalise(probs)
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
           "merge_radius_px", "MERGE_RADIUS_UM"]
