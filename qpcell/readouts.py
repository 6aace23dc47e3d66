"""What a pathologist reports from classified cells: counts, percentages, densities, positive
fraction and hotspots, per region (pure: arrays in, tables out).

Units: cell centres ``xy`` and region polygons are in full-resolution pixels (QuPath's);
``mpp`` is µm per pixel. Areas are reported in µm² when ``mpp`` is known, px² otherwise;
densities in cells per mm² (only when ``mpp`` is known).

Regions
-------
A cell belongs to a region when its centre lies inside the region's polygon (holes excluded).
Regions may overlap or nest: each is read out on its own, so an outer annotation counts the
cells of the annotations inside it too (as QuPath's parent annotations do). The first row of
:func:`region_readouts` is always the whole image (every cell; area = the image's).

Positive fraction
-----------------
``positive / (positive + negative)`` cells, where the negative classes are named, or are every
class not named positive (:class:`PositiveRule`). This is the Ki67 index when the classes are
"Ki67-positive" / "Ki67-negative" tumour cells.

Hotspots
--------
:func:`find_hotspots` searches circles of a given area whose centres lie on a grid of ``bin``
px spacing (``radius / BINS_PER_RADIUS``) over the cells' bounding box. Cells are counted into
the grid's bins; a disk convolution of the bin counts (FFT) gives, for every grid centre, a lower
bound (bins wholly inside the circle) and an upper bound (bins touching it) of the number of
cells of each class in its circle. Candidates are then counted exactly (k-d tree), best bound
first, until no uncounted candidate can beat the best exact one: the result is the best circle
of the grid, found by counting a small share of them. Its figures are exact counts of cells
whose centre lies within the radius.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree
from shapely.geometry.base import BaseGeometry

from qpcell.errors import QpcellError

#: Prefix of every measurement qpcell writes on a QuPath annotation (a rerun replaces these).
MEASUREMENT_PREFIX = "qpcell: "
#: Class of the hotspot annotations qpcell writes.
HOTSPOT_CLASS = "qpcell hotspot"
#: Colour of the hotspot annotations (RGB).
HOTSPOT_COLOR = (255, 200, 0)
#: Cells a hotspot must hold to count (the usual minimum of Ki67 counting guidelines).
HOTSPOT_MIN_CELLS = 500
#: Grid spacing of the hotspot search: the circle's radius over this.
BINS_PER_RADIUS = 24
#: The search grid has at most this many centres (the spacing grows on huge extents).
MAX_GRID = 1_000_000
#: At most this many circles are counted exactly per hotspot search.
MAX_EXACT = 8_192
UM2_PER_MM2 = 1e6


# ----------------------------------------------------------------------------------------
# Positive fraction
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PositiveRule:
    """Which classes are positive and which are negative; ``negative`` empty = all others."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()

    def negatives(self, class_names: Sequence[str]) -> tuple[str, ...]:
        """The negative classes among ``class_names``."""
        if self.negative:
            return tuple(n for n in self.negative if n in class_names)
        return tuple(n for n in class_names if n not in self.positive)

    def split(self, counts: Mapping[str, int]) -> tuple[int, int]:
        """``(positive, negative)`` cells of ``counts`` (class name -> cells)."""
        pos = sum(int(counts.get(n, 0)) for n in self.positive)
        neg = sum(int(counts.get(n, 0)) for n in self.negatives(list(counts)))
        return pos, neg

    def fraction(self, counts: Mapping[str, int]) -> float | None:
        """``positive / (positive + negative)``, or ``None`` without such cells."""
        pos, neg = self.split(counts)
        return pos / (pos + neg) if pos + neg else None

    def describe(self) -> str:
        neg = " + ".join(self.negative) if self.negative else "all other classes"
        return f"{' + '.join(self.positive)} / ({' + '.join(self.positive)} + {neg})"


def positive_rule(class_names: Sequence[str], positive: Sequence[str] | str | None,
                  negative: Sequence[str] | str | None = None) -> PositiveRule | None:
    """A :class:`PositiveRule` from class names (comma-separated text or lists).

    Returns ``None`` when ``positive`` is empty.

    Raises
    ------
    QpcellError
        If a name is not one of ``class_names``, or is both positive and negative.
    """
    def names(value) -> tuple[str, ...]:
        if not value:
            return ()
        items = [value] if isinstance(value, str) else list(value)
        return tuple(dict.fromkeys(n.strip() for i in items for n in i.split(",") if n.strip()))

    pos, neg = names(positive), names(negative)
    if not pos:
        if neg:
            raise QpcellError("negative classes given without positive ones "
                              "(--positive-classes)")
        return None
    for n in pos + neg:
        if n not in class_names:
            raise QpcellError(f"class {n!r} is not one of the model's classes "
                              f"({', '.join(class_names)})")
    both = set(pos) & set(neg)
    if both:
        raise QpcellError(f"class {sorted(both)[0]!r} is named both positive and negative")
    if not neg and len(pos) == len(class_names):
        raise QpcellError("every class is positive: name fewer --positive-classes")
    return PositiveRule(pos, neg)


# ----------------------------------------------------------------------------------------
# Per-region read-outs
# ----------------------------------------------------------------------------------------

@dataclass
class RegionReadout:
    """The figures of one region.

    Attributes
    ----------
    name
        ``"image"`` for the whole image, else the region's name.
    area_px2
        Area in full-resolution px².
    mpp
        Pixel size (µm/px) or ``None``.
    counts
        Cells per class name (every class, zeros included).
    positive, negative
        Cells of the positive and negative classes (0 without a rule).
    """

    name: str
    area_px2: float
    mpp: float | None
    counts: dict[str, int]
    positive: int = 0
    negative: int = 0
    rule: PositiveRule | None = None
    index: int = 0

    @property
    def n_cells(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def area_um2(self) -> float | None:
        return None if self.mpp is None else self.area_px2 * self.mpp ** 2

    @property
    def area_mm2(self) -> float | None:
        a = self.area_um2
        return None if a is None else a / UM2_PER_MM2

    def percent(self, name: str) -> float | None:
        """Share of the region's cells in class ``name``, in %."""
        n = self.n_cells
        return 100.0 * self.counts.get(name, 0) / n if n else None

    def density_mm2(self, name: str | None = None) -> float | None:
        """Cells of class ``name`` (all cells for ``None``) per mm²; ``None`` without a pixel
        size or an area."""
        a = self.area_mm2
        if not a:
            return None
        k = self.n_cells if name is None else self.counts.get(name, 0)
        return k / a

    @property
    def positive_percent(self) -> float | None:
        """``100 · positive / (positive + negative)``; ``None`` without a rule or cells."""
        if self.rule is None or not self.positive + self.negative:
            return None
        return 100.0 * self.positive / (self.positive + self.negative)


def inside(xy: np.ndarray, region: BaseGeometry) -> np.ndarray:
    """Boolean mask of the points (``(N, 2)`` px) whose centre lies inside ``region``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if region is None or region.is_empty or not len(xy):
        return np.zeros(len(xy), dtype=bool)
    shapely.prepare(region)
    return shapely.contains_xy(region, xy[:, 0], xy[:, 1])


def _readout(name: str, index: int, labels: np.ndarray, class_names: Sequence[str],
             area_px2: float, mpp: float | None, rule: PositiveRule | None) -> RegionReadout:
    n = np.bincount(labels, minlength=len(class_names))
    counts = {c: int(k) for c, k in zip(class_names, n, strict=True)}
    pos, neg = rule.split(counts) if rule else (0, 0)
    return RegionReadout(name, float(area_px2), mpp, counts, pos, neg, rule, index)


def region_readouts(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                    image_size: tuple[int, int] | None,
                    regions: Sequence[tuple[str, BaseGeometry]] = (),
                    mpp: float | None = None,
                    rule: PositiveRule | None = None) -> list[RegionReadout]:
    """Counts, shares, densities and positive fraction of the whole image and each region.

    Parameters
    ----------
    xy, labels
        Cell centres ``(N, 2)`` (full-resolution px) and class indices ``(N,)`` into
        ``class_names``.
    image_size
        ``(width, height)`` px of the image (the whole-image row's area); ``None``: the
        bounding box of the regions, or of the cells.
    regions
        ``(name, polygon)`` pairs, polygons in full-resolution px.
    mpp
        µm per pixel (areas in µm², densities per mm²), or ``None``.
    rule
        Positive and negative classes, or ``None`` (no positive fraction).

    Returns
    -------
    list of RegionReadout
        The whole image first (``name="image"``, ``index=0``), then each region in order
        (``index`` 1, 2, ...).

    Examples
    --------
    >>> from shapely.geometry import box
    >>> r = region_readouts([[5, 5], [50, 50]], [0, 1], ["pos", "neg"], image_size=(100, 100),
    ...                     regions=[("a", box(0, 0, 10, 10))], mpp=1.0,
    ...                     rule=PositiveRule(("pos",)))
    >>> [(x.name, x.n_cells, x.positive_percent) for x in r]
    [('image', 2, 50.0), ('a', 1, 100.0)]
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(xy) != len(labels):
        raise QpcellError(f"{len(xy)} cells but {len(labels)} labels")
    if image_size is not None:
        area = float(image_size[0]) * float(image_size[1])
    else:
        geoms = [g for _, g in regions if g is not None and not g.is_empty]
        if geoms:
            x0, y0, x1, y1 = shapely.union_all(geoms).bounds
        elif len(xy):
            (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
        else:
            x0 = y0 = x1 = y1 = 0.0
        area = (x1 - x0) * (y1 - y0)
    out = [_readout("image", 0, labels, class_names, area, mpp, rule)]
    for i, (name, geom) in enumerate(regions, start=1):
        keep = inside(xy, geom)
        out.append(_readout(name, i, labels[keep], class_names,
                            0.0 if geom is None else geom.area, mpp, rule))
    return out


def qupath_measurements(r: RegionReadout) -> dict[str, float]:
    """The figures of ``r`` as QuPath annotation measurements (all named ``qpcell: ...``).

    ``qpcell: Num <class>``, ``qpcell: <class> %``, ``qpcell: <class> per mm^2`` (with a pixel
    size), ``qpcell: Num cells``, ``qpcell: cells per mm^2``, and with a rule
    ``qpcell: Num positive``, ``qpcell: Num negative``, ``qpcell: positive %``. Undefined
    figures (no cells, no pixel size) are left out, never written as NaN.
    """
    p = MEASUREMENT_PREFIX
    m: dict[str, float] = {f"{p}Num cells": float(r.n_cells)}
    total = r.density_mm2()
    if total is not None:
        m[f"{p}cells per mm^2"] = float(total)
    for name, k in r.counts.items():
        m[f"{p}Num {name}"] = float(k)
        pct = r.percent(name)
        if pct is not None:
            m[f"{p}{name} %"] = float(pct)
        dens = r.density_mm2(name)
        if dens is not None:
            m[f"{p}{name} per mm^2"] = float(dens)
    if r.rule is not None:
        m[f"{p}Num positive"] = float(r.positive)
        m[f"{p}Num negative"] = float(r.negative)
        pp = r.positive_percent
        if pp is not None:
            m[f"{p}positive %"] = float(pp)
    return m


def table_row(image: str, r: RegionReadout) -> dict[str, object]:
    """One row of ``summary.csv``: image, region, area, cells, then per class count / % /
    per mm², then positive, negative, positive %. Unknown figures are empty strings."""
    def fmt(v: float | None, digits: int) -> object:
        return "" if v is None else round(float(v), digits)

    row: dict[str, object] = {
        "image": image, "region": r.name,
        "area_um2": fmt(r.area_um2, 1), "area_px2": fmt(r.area_px2, 1),
        "cells": r.n_cells, "cells_per_mm2": fmt(r.density_mm2(), 2)}
    for name, k in r.counts.items():
        row[f"{name}"] = k
        row[f"{name} %"] = fmt(r.percent(name), 3)
        row[f"{name} per mm2"] = fmt(r.density_mm2(name), 2)
    if r.rule is not None:
        row["positive"] = r.positive
        row["negative"] = r.negative
        row["positive %"] = fmt(r.positive_percent, 3)
    return row


# ----------------------------------------------------------------------------------------
# Hotspots
# ----------------------------------------------------------------------------------------

@dataclass
class Hotspot:
    """The best circle of one kind.

    Attributes
    ----------
    kind
        ``"positive"`` (highest positive fraction) or ``"density"`` (most cells of ``target``).
    target
        The class whose density was maximised (``None`` for ``"positive"``).
    x, y, radius
        Centre and radius in full-resolution px.
    counts
        Exact cells per class inside the circle.
    exact
        ``True`` when the search proved no grid circle beats this one (always, unless
        :data:`MAX_EXACT` circles were counted first).
    """

    kind: str
    target: str | None
    x: float
    y: float
    radius: float
    counts: dict[str, int]
    mpp: float | None
    rule: PositiveRule | None = None
    min_cells: int = 0
    exact: bool = True
    checked: int = 0

    @property
    def n_cells(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def area_px2(self) -> float:
        return math.pi * self.radius ** 2

    @property
    def area_mm2(self) -> float | None:
        return None if self.mpp is None else self.area_px2 * self.mpp ** 2 / UM2_PER_MM2

    @property
    def positive_percent(self) -> float | None:
        if self.rule is None:
            return None
        pos, neg = self.rule.split(self.counts)
        return 100.0 * pos / (pos + neg) if pos + neg else None

    def density_mm2(self, name: str | None = None) -> float | None:
        a = self.area_mm2
        if not a:
            return None
        return (self.n_cells if name is None else self.counts.get(name, 0)) / a

    @property
    def label(self) -> str:
        """Short name, e.g. ``"positive % hotspot"`` or ``"Ki67-positive density hotspot"``."""
        return "positive % hotspot" if self.kind == "positive" else \
            f"{self.target} density hotspot"

    def measurements(self) -> dict[str, float]:
        """QuPath measurements of the hotspot annotation (``qpcell: ...``)."""
        r = RegionReadout(self.label, self.area_px2, self.mpp, dict(self.counts),
                          *(self.rule.split(self.counts) if self.rule else (0, 0)), self.rule)
        return qupath_measurements(r)


def hotspot_radius(area: float, mpp: float | None) -> float:
    """Radius (px) of a circle of ``area`` mm² (px² when ``mpp`` is ``None``)."""
    if not (area > 0 and math.isfinite(area)):
        raise QpcellError(f"hotspot area {area!r} is not positive")
    px2 = area * UM2_PER_MM2 / mpp ** 2 if mpp is not None else area
    return math.sqrt(px2 / math.pi)


@dataclass
class _Grid:
    """Cells binned on the candidate grid; centre of bin (i, j) = origin + (j, i)·bin + bin/2."""

    origin: tuple[float, float]
    bin: float
    shape: tuple[int, int]
    counts: np.ndarray  # (C, H, W) float64 cells per class and bin
    lower: np.ndarray | None = None  # (C, H, W) float32 cells surely in each circle
    upper: np.ndarray | None = None  # (C, H, W) float32 cells possibly in each circle

    def centres(self, flat: np.ndarray) -> np.ndarray:
        i, j = np.divmod(flat, self.shape[1])
        return np.stack([self.origin[0] + (j + 0.5) * self.bin,
                         self.origin[1] + (i + 0.5) * self.bin], axis=1)


def bin_counts(xy: np.ndarray, labels: np.ndarray, n_classes: int, bin_px: float,
               origin: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Cells per class in square bins of ``bin_px`` px: ``(n_classes, H, W)`` float64.

    Cells outside the grid are dropped.
    """
    h, w = shape
    j = np.floor((xy[:, 0] - origin[0]) / bin_px).astype(np.int64)
    i = np.floor((xy[:, 1] - origin[1]) / bin_px).astype(np.int64)
    ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    flat = (labels[ok].astype(np.int64) * h + i[ok]) * w + j[ok]
    return np.bincount(flat, minlength=n_classes * h * w).reshape(n_classes, h, w).astype(
        np.float64)


def _disk(radius_bins: float) -> np.ndarray:
    k = int(math.floor(radius_bins))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    return (np.hypot(xx, yy) <= radius_bins).astype(np.float64)


def _convolve(counts: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    if not kernel.any():
        return np.zeros_like(counts)
    out = fftconvolve(counts, kernel[None], mode="same", axes=(1, 2))
    return np.rint(np.maximum(out, 0.0)).astype(np.float32)  # whole cell counts


def _grid(xy: np.ndarray, labels: np.ndarray, n_classes: int, radius: float,
          bins_per_radius: int) -> _Grid:
    lo = xy.min(axis=0)
    hi = xy.max(axis=0)
    extent = np.maximum(hi - lo, 1e-9)
    b = radius / bins_per_radius
    b = max(b, math.sqrt(float(extent[0] * extent[1]) / MAX_GRID), 1e-6)
    w, h = (int(math.floor(e / b)) + 1 for e in extent)
    g = _Grid((float(lo[0]), float(lo[1])), b, (h, w),
              bin_counts(xy, labels, n_classes, b, (float(lo[0]), float(lo[1])), (h, w)))
    slack = b / math.sqrt(2.0)  # a cell is at most this far from its bin's centre
    g.lower = _convolve(g.counts, _disk((radius - slack) / b))
    g.upper = _convolve(g.counts, _disk((radius + slack) / b))
    return g


class _Exact:
    """Exact cells per class within ``radius`` of given centres (k-d trees per class)."""

    def __init__(self, xy: np.ndarray, labels: np.ndarray, n_classes: int, radius: float):
        self.radius = radius
        self.trees = [cKDTree(xy[labels == k]) if np.any(labels == k) else None
                      for k in range(n_classes)]
        self.checked = 0

    def __call__(self, centres: np.ndarray) -> np.ndarray:
        self.checked += len(centres)
        out = np.zeros((len(self.trees), len(centres)), dtype=np.int64)
        for k, tree in enumerate(self.trees):
            if tree is not None and len(centres):
                out[k] = tree.query_ball_point(centres, self.radius, return_length=True,
                                               workers=-1)
        return out


def _best_by_bound(score_upper: np.ndarray, candidates: np.ndarray, exact_score,
                   max_exact: int, batch: int = 512) -> tuple[int, float, bool]:
    """Count candidates exactly, highest upper bound first, until none left can win.

    ``exact_score(flat)`` returns the exact scores (``-inf`` = not allowed) of the grid
    centres ``flat``. Returns ``(best flat index, its score, proven)``; index ``-1`` when no
    candidate is allowed.
    """
    order = candidates[np.argsort(-score_upper[candidates], kind="stable")]
    best, best_score, done = -1, -math.inf, 0
    while done < len(order):
        if score_upper[order[done]] <= best_score:
            return best, best_score, True
        if done >= max_exact:
            return best, best_score, False
        chunk = order[done:done + min(batch, max_exact - done)]
        scores = exact_score(chunk)
        k = int(np.argmax(scores))
        if scores[k] > best_score:
            best, best_score = int(chunk[k]), float(scores[k])
        done += len(chunk)
        batch = min(batch * 2, 8192)
    return best, best_score, True


def find_hotspots(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                  area: float, mpp: float | None, rule: PositiveRule | None = None,
                  min_cells: int = HOTSPOT_MIN_CELLS, density_classes: Sequence[str] | None = None,
                  bins_per_radius: int = BINS_PER_RADIUS, max_exact: int = MAX_EXACT
                  ) -> list[Hotspot]:
    """The highest-positive-fraction circle and the densest circle of each class.

    Parameters
    ----------
    xy, labels
        Cell centres ``(N, 2)`` (full-resolution px) and class indices into ``class_names``.
    area
        The circle's area in mm² (in px² when ``mpp`` is ``None``).
    mpp
        µm per pixel, or ``None``.
    rule
        Positive and negative classes; ``None``: no positive-fraction hotspot.
    min_cells
        A positive-fraction hotspot must hold at least this many positive + negative cells.
    density_classes
        Classes to find the densest circle of (default: every class with cells).
    bins_per_radius
        Grid spacing = radius / this (finer: more candidate centres).
    max_exact
        Stop after counting this many circles exactly (the result is then flagged
        ``exact=False``).

    Returns
    -------
    list of Hotspot
        The positive-fraction hotspot first (when a rule is given and some circle holds
        ``min_cells`` cells), then one density hotspot per class.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    names = list(class_names)
    radius = hotspot_radius(area, mpp)
    if not len(xy):
        return []
    grid = _grid(xy, labels, len(names), radius, bins_per_radius)
    exact = _Exact(xy, labels, len(names), radius)
    flat_upper = grid.upper.reshape(len(names), -1)
    flat_lower = grid.lower.reshape(len(names), -1)

    def make(kind: str, target: str | None, flat: int, proven: bool, start: int) -> Hotspot:
        checked = exact.checked - start
        centre = grid.centres(np.array([flat]))[0]
        counts = exact(centre[None])[:, 0]
        return Hotspot(kind, target, float(centre[0]), float(centre[1]), radius,
                       {n: int(k) for n, k in zip(names, counts, strict=True)}, mpp, rule,
                       min_cells if kind == "positive" else 0, proven, checked)

    out: list[Hotspot] = []
    if rule is not None:
        pos_idx = [names.index(n) for n in rule.positive]
        neg_idx = [names.index(n) for n in rule.negatives(names)]
        up_p = flat_upper[pos_idx].sum(0, dtype=np.float64)
        up_n = flat_upper[neg_idx].sum(0, dtype=np.float64)
        lo_n = flat_lower[neg_idx].sum(0, dtype=np.float64)
        possible = up_p + up_n >= min_cells
        with np.errstate(invalid="ignore", divide="ignore"):
            f_up = np.where(up_p + lo_n > 0, up_p / (up_p + lo_n), 0.0)
        f_up[~possible] = -math.inf

        def pos_score(flat: np.ndarray) -> np.ndarray:
            c = exact(grid.centres(flat))
            p, q = c[pos_idx].sum(0), c[neg_idx].sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                s = np.where(p + q >= max(min_cells, 1), p / np.maximum(p + q, 1), -math.inf)
            return s

        cand = np.flatnonzero(possible)
        if len(cand):
            start = exact.checked
            best, score, proven = _best_by_bound(f_up, cand, pos_score, max_exact)
            if best >= 0 and math.isfinite(score):
                out.append(make("positive", None, best, proven, start))
    wanted = names if density_classes is None else list(density_classes)
    for name in wanted:
        k = names.index(name)
        if not np.any(labels == k):
            continue
        up = flat_upper[k]
        floor = flat_lower[k].max()
        cand = np.flatnonzero(up >= floor)

        def dens_score(flat: np.ndarray, _k=k) -> np.ndarray:
            return exact(grid.centres(flat))[_k].astype(np.float64)

        start = exact.checked
        best, _, proven = _best_by_bound(up, cand, dens_score, max_exact)
        out.append(make("density", name, best, proven, start))
    return out


def density_map(xy: np.ndarray, labels: np.ndarray, n_classes: int, *,
                size: tuple[int, int], bin_px: float, mpp: float | None) -> np.ndarray:
    """Cells per class and square bin of ``bin_px`` px over an image of ``size`` = (w, h) px:
    ``(n_classes, H, W)`` in cells per mm² (cells per bin when ``mpp`` is ``None``)."""
    w = int(math.ceil(size[0] / bin_px))
    h = int(math.ceil(size[1] / bin_px))
    counts = bin_counts(np.asarray(xy, dtype=np.float64).reshape(-1, 2),
                        np.asarray(labels, dtype=np.int64).reshape(-1), n_classes, bin_px,
                        (0.0, 0.0), (max(h, 1), max(w, 1)))
    if mpp is None:
        return counts
    return counts / ((bin_px * mpp) ** 2 / UM2_PER_MM2)


# ----------------------------------------------------------------------------------------
# Agreement of counts (predicted vs true, per image)
# ----------------------------------------------------------------------------------------

@dataclass
class Agreement:
    """How well one per-image figure is predicted: ``true`` and ``pred`` over the images.

    ``mae`` mean absolute error; ``bias`` mean of ``pred - true``; ``loa`` Bland-Altman
    95% limits of agreement (``bias ± 1.96·sd``); ``r`` Pearson correlation (``None`` when
    either side is constant or fewer than 3 images).
    """

    name: str
    true: np.ndarray
    pred: np.ndarray

    @property
    def n(self) -> int:
        return len(self.true)

    @property
    def mae(self) -> float | None:
        return float(np.mean(np.abs(self.pred - self.true))) if self.n else None

    @property
    def bias(self) -> float | None:
        return float(np.mean(self.pred - self.true)) if self.n else None

    @property
    def loa(self) -> tuple[float, float] | None:
        if self.n < 2:
            return None
        d = self.pred - self.true
        sd = float(np.std(d, ddof=1))
        return float(d.mean() - 1.96 * sd), float(d.mean() + 1.96 * sd)

    @property
    def r(self) -> float | None:
        if self.n < 3 or np.ptp(self.true) == 0 or np.ptp(self.pred) == 0:
            return None
        return float(np.corrcoef(self.true, self.pred)[0, 1])

    def to_dict(self) -> dict:
        return {"n_images": self.n, "mae": self.mae, "bias": self.bias,
                "limits_of_agreement": self.loa, "pearson_r": self.r}


@dataclass
class CountAgreement:
    """Per-image true vs predicted counts per class and positive fraction.

    ``counts[name]``: :class:`Agreement` of the cells of class ``name`` per image;
    ``positive``: of the positive fraction in % (images where both sides have positive or
    negative cells), or ``None`` without a rule.
    """

    images: list[str]
    counts: dict[str, Agreement]
    positive: Agreement | None
    rule: PositiveRule | None
    rows: list[dict]

    def to_dict(self) -> dict:
        return {"per_class": {k: a.to_dict() for k, a in self.counts.items()},
                "positive_percent": None if self.positive is None else self.positive.to_dict(),
                "rule": None if self.rule is None else {"positive": list(self.rule.positive),
                                                        "negative": list(self.rule.negative)},
                "images": self.rows}


def count_agreement(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                    class_names: Sequence[str], names: Sequence[str], *,
                    regions: Sequence[Sequence[BaseGeometry] | None] | None = None,
                    rule: PositiveRule | None = None) -> CountAgreement:
    """Compare per-image counts and positive fractions of predictions and ground truth.

    Parameters
    ----------
    pairs
        Per image ``(pred_xy, pred_labels, true_xy, true_labels)`` (px; labels index
        ``class_names``).
    names
        Image names, one per pair.
    regions
        Per image the annotated regions (cells outside them are left out on both sides), or
        ``None`` for the whole image.
    rule
        Positive / negative classes for the positive fraction.
    """
    k = len(class_names)
    true_c = np.zeros((len(pairs), k))
    pred_c = np.zeros((len(pairs), k))
    for i, (pxy, plab, txy, tlab) in enumerate(pairs):
        reg = None if regions is None else regions[i]
        plab, tlab = np.asarray(plab, np.int64), np.asarray(tlab, np.int64)
        if reg:
            union = shapely.union_all([g for g in reg if g is not None])
            plab = plab[inside(pxy, union)]
            tlab = tlab[inside(txy, union)]
        pred_c[i] = np.bincount(plab, minlength=k)[:k]
        true_c[i] = np.bincount(tlab, minlength=k)[:k]
    counts = {n: Agreement(n, true_c[:, j], pred_c[:, j]) for j, n in enumerate(class_names)}
    rows = []
    pos_t, pos_p = [], []
    for i, name in enumerate(names):
        t = {n: int(true_c[i, j]) for j, n in enumerate(class_names)}
        p = {n: int(pred_c[i, j]) for j, n in enumerate(class_names)}
        row = {"image": name, "true": t, "predicted": p}
        if rule is not None:
            ft, fp = rule.fraction(t), rule.fraction(p)
            row["true_positive_percent"] = None if ft is None else 100 * ft
            row["predicted_positive_percent"] = None if fp is None else 100 * fp
            if ft is not None and fp is not None:
                pos_t.append(100 * ft)
                pos_p.append(100 * fp)
        rows.append(row)
    positive = None if rule is None else Agreement("positive %", np.array(pos_t),
                                                   np.array(pos_p))
    return CountAgreement(list(names), counts, positive, rule, rows)


__all__ = ["MEASUREMENT_PREFIX", "HOTSPOT_CLASS", "HOTSPOT_MIN_CELLS", "PositiveRule",
           "positive_rule", "RegionReadout", "region_readouts", "inside",
           "qupath_measurements", "table_row", "Hotspot", "hotspot_radius", "find_hotspots",
           "bin_counts", "density_map", "Agreement", "CountAgreement", "count_agreement"]
