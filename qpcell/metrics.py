"""Scoring predicted cells against point annotations: matching, detection and class scores.

The protocol (DESIGN.md section 3, pinned here so that every number qpcell reports means
the same thing):

Matching (:func:`match_points`)
    One-to-one pairs of a predicted and a true point at most ``radius`` pixels apart
    (distance ``<= radius``; a point exactly on the circle matches). Among all one-to-one
    matchings the one with the **most pairs** is chosen; distance only breaks ties (among
    the maximum matchings, the one with the smallest total distance). This is a minimum
    cost maximum-cardinality bipartite matching on the sparse radius graph (KD-tree); only
    the points that have a choice to make enter the solver, and no dense matrix over all
    the points is ever built, so 100,000 cells per image take a fraction of a second.

Detection (:attr:`Report.detection`)
    TP = matched pairs, FP = unmatched predictions, FN = unmatched truths, pooled
    (summed) over images before precision, recall and F1 are computed (S-DRDIN 2.5).

Classification (:attr:`Report.classification`), over the matched pairs only
    Per class: precision, recall, F1 of the predicted class against the true class, and the
    support (number of matched pairs whose *true* class it is). Weighted precision, recall
    and F1 average the per-class values with the supports as weights (S-DRDIN's "weighted
    by the proportion of cell types"; identical to scikit-learn's ``average="weighted"``).
    Accuracy = share of matched pairs whose classes agree. ``F_c`` per class is
    HoVer-Net's type score (Graham et al., Medical Image Analysis 2019)::

        F_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d)

    where FP_d / FN_d are the unmatched predictions / truths of class c, and TP_c, TN_c,
    FP_c, FN_c are counted over the matched pairs **in which the true or the predicted
    class is c** -- exactly as HoVer-Net's released ``compute_stats.py`` (and CoNIC,
    CellViT after it) computes it, so TN_c is 0 and our numbers compare with
    published ones. (Counting TN_c over *all* matched pairs would let a rare class score
    close to 1 just because most pairs belong to other classes.) The detection recall of
    each class (share of its true cells matched at all, S-DRDIN Table A.5) and the
    confusion matrix (rows = true class, columns = predicted class) come along.

Class-aware scores (:attr:`Report.class_aware`, paper 003)
    For each class k, predictions of class k are matched against truths of class k only
    (other classes are invisible). ``total_*`` are precision, recall and F1 of the TP/FP/FN
    pooled over images ("totalF1"); ``mean_f1`` is the mean over images of the per-image F1
    ("meanF1"). An image with neither a true nor a predicted cell of class k is **skipped**
    from that mean (its F1 would be 0/0); ``n_images`` says how many images entered it.

Annotated regions
    When an image comes with regions (shapely polygons in the image's pixels), predicted
    and true points outside every region are removed before matching; a point exactly on
    a region's boundary counts as inside. ``None`` or an empty list means the whole image
    is annotated.

Zero divisions (one rule everywhere)
    "Nothing expected and nothing predicted" is perfect agreement: precision = recall =
    F1 = 1.0. Likewise: accuracy and the weighted scores when there are no matched pairs
    because both sides are empty; a class's classification scores when no matched pair
    involves it (its support is 0, so it weighs nothing in the weighted scores); F_c when
    class c occurs nowhere; class-aware scores (``mean_f1`` too, with ``n_images = 0``)
    when class k occurs on neither side.
    Otherwise a zero denominator gives 0.0: with truths but no predictions, precision =
    recall = F1 = 0; with predictions but no truths, likewise 0. Counts (TP, FP, FN,
    support) are always reported, so a reader can tell a vacuous 1.0 from a real one.

Units: coordinates and the radius are in pixels of the full-resolution image; convert
micrometres with the pixel size (``radius_px = radius_um / mpp``) before calling.

Example
-------
>>> import numpy as np
>>> m = match_points(np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[1.0, 0.0]]), radius=5)
>>> m.pred_idx.tolist(), m.true_idx.tolist(), m.distance.tolist()
([0], [0], [1.0])
>>> (m.tp, m.fp, m.fn)
(1, 1, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from qpcell.errors import QpcellError

__all__ = [
    "Matching", "match_points", "DetectionScores", "ClassScores", "ClassificationScores",
    "ClassAwareScores", "ImageScores", "Report", "score_dataset", "radius_sweep", "prf",
]


class PointSet(Protocol):
    """Anything with ``.xy`` (N, 2) pixels and ``.labels`` (N,) class indices."""

    xy: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------- matching

@dataclass(frozen=True)
class Matching:
    """The result of :func:`match_points`.

    Attributes
    ----------
    pred_idx, true_idx
        ``(K,)`` int64 indices of the matched predicted and true points, pair by pair,
        sorted by ``pred_idx``.
    distance
        ``(K,)`` float64 distance of each pair in pixels (``<= radius``).
    n_pred, n_true
        Number of predicted and true points that were matched against each other.
    radius
        The matching radius in pixels.
    """

    pred_idx: np.ndarray
    true_idx: np.ndarray
    distance: np.ndarray
    n_pred: int
    n_true: int
    radius: float = 0.0

    @property
    def tp(self) -> int:
        """Number of matched pairs."""
        return int(len(self.pred_idx))

    @property
    def fp(self) -> int:
        """Number of unmatched predictions."""
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        """Number of unmatched truths."""
        return self.n_true - self.tp

    def unmatched_pred(self) -> np.ndarray:
        """Indices of the predictions without a partner."""
        keep = np.ones(self.n_pred, dtype=bool)
        keep[self.pred_idx] = False
        return np.flatnonzero(keep)

    def unmatched_true(self) -> np.ndarray:
        """Indices of the truths without a partner."""
        keep = np.ones(self.n_true, dtype=bool)
        keep[self.true_idx] = False
        return np.flatnonzero(keep)


def _points(xy, what: str) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise QpcellError(f"{what}: points must have shape (N, 2), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise QpcellError(f"{what}: a point has a NaN or infinite coordinate")
    return arr


def _radius(radius) -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise QpcellError(f"matching radius {radius!r} is not a number") from None
    if not math.isfinite(r) or r < 0:
        raise QpcellError(f"matching radius {radius!r} px must be a finite number >= 0")
    return r


MAX_EDGES = 20_000_000
"""Most prediction-truth pairs within the radius that :func:`match_points` accepts (about
1 GB of memory); cells are never that crowded, so more means a radius far too large."""

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


def match_points(pred_xy, true_xy, radius: float) -> Matching:
    """Pair predicted with true points one-to-one: most pairs within ``radius``, then closest.

    Parameters
    ----------
    pred_xy, true_xy
        ``(N, 2)`` and ``(M, 2)`` point coordinates (x, y) in pixels.
    radius
        Largest distance of a pair, pixels (inclusive: a pair exactly ``radius`` apart
        matches; ``radius=0`` pairs only coinciding points).

    Returns
    -------
    Matching
        The pairs (sorted by prediction index) and their distances. The number of pairs is
        the maximum possible; among matchings with that many pairs, the total distance is
        minimal.

    Notes
    -----
    The radius graph comes from a KD-tree (``cKDTree.sparse_distance_matrix``). An edge
    whose two points have no other edge is a sure pair. The points left (those with a
    choice) are solved together: when their block is small (``DENSE_LIMIT``), by one
    ``linear_sum_assignment`` on cost ``distance - B`` per edge and 0 per non-edge, with
    ``B`` above any matching's total distance so that one more pair always pays; otherwise
    by one sparse minimum-weight full matching (LAPJVsp) of an augmented graph, per
    connected component in effect (see ``_sparse_assignment``). Both give the
    maximum-cardinality matching of least total distance; no dense matrix over all points
    is built.

    Examples
    --------
    Greedy nearest-first matching would pair the middle points and leave two cells
    unmatched; the maximum matching finds both pairs:

    >>> import numpy as np
    >>> m = match_points([[0.0, 0.0], [4.0, 0.0]], [[3.0, 0.0], [-3.0, 0.0]], radius=3.5)
    >>> sorted(zip(m.pred_idx.tolist(), m.true_idx.tolist(), strict=True))
    [(0, 1), (1, 0)]
    """
    pred = _points(pred_xy, "predictions")
    true = _points(true_xy, "truths")
    r = _radius(radius)
    n_pred, n_true = len(pred), len(true)
    if n_pred == 0 or n_true == 0:
        return Matching(_EMPTY_I, _EMPTY_I, _EMPTY_F, n_pred, n_true, r)
    pred_tree, true_tree = cKDTree(pred), cKDTree(true)
    if n_pred * n_true > MAX_EDGES:
        n_edges = int(pred_tree.count_neighbors(true_tree, r))
        if n_edges > MAX_EDGES:
            raise QpcellError(f"a matching radius of {r:g} px links {n_edges:,} pairs of "
                              f"{n_pred:,} predicted and {n_true:,} true cells; that is far too "
                              "many for cells (is the radius in pixels?)")
    edges = pred_tree.sparse_distance_matrix(true_tree, r, output_type="ndarray")
    if len(edges) == 0:
        return Matching(_EMPTY_I, _EMPTY_I, _EMPTY_F, n_pred, n_true, r)
    ei = edges["i"].astype(np.int64)
    ej = edges["j"].astype(np.int64)
    ed = edges["v"].astype(np.float64)
    keep = ed <= r  # the tree's own test; kept explicit for rounding safety
    ei, ej, ed = ei[keep], ej[keep], ed[keep]
    pi, tj, dist = _max_matching(ei, ej, ed, n_pred, n_true)
    order = np.argsort(pi, kind="stable")
    return Matching(pi[order], tj[order], dist[order], n_pred, n_true, r)


DENSE_LIMIT = 250_000
"""Largest ``(#predictions x #truths)`` block, among the points with a choice to make, that
is solved as one dense assignment (fast for small images); larger ones go sparse."""


def _max_matching(ei: np.ndarray, ej: np.ndarray, ed: np.ndarray, n_pred: int,
                  n_true: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-cardinality, minimum-distance matching of the bipartite edge list."""
    if len(ei) == 0:
        return _EMPTY_I, _EMPTY_I, _EMPTY_F
    # an edge whose two ends have no other edge is a component of its own: a sure pair
    deg_p = np.bincount(ei, minlength=n_pred)
    deg_t = np.bincount(ej, minlength=n_true)
    single = (deg_p[ei] == 1) & (deg_t[ej] == 1)
    if single.all():
        return ei, ej, ed
    out_p, out_t, out_d = [ei[single]], [ej[single]], [ed[single]]
    hard = ~single
    hi, hj, hd = ei[hard], ej[hard], ed[hard]
    # local numbering of the predictions and truths with a choice to make
    up, li = np.unique(hi, return_inverse=True)
    ut, lj = np.unique(hj, return_inverse=True)
    p, t = len(up), len(ut)
    if p * t <= DENSE_LIMIT:
        rows, cols = _dense_assignment(li, lj, hd, p, t)
    else:
        rows, cols = _sparse_assignment(li, lj, hd, p, t)
    # distances of the chosen pairs, looked up among the hard edges
    key_edges = li * t + lj
    srt = np.argsort(key_edges)
    pos = srt[np.searchsorted(key_edges, rows * t + cols, sorter=srt)]
    out_p.append(up[rows])
    out_t.append(ut[cols])
    out_d.append(hd[pos])
    return (np.concatenate(out_p).astype(np.int64), np.concatenate(out_t).astype(np.int64),
            np.concatenate(out_d))


def _dense_assignment(li: np.ndarray, lj: np.ndarray, d: np.ndarray, p: int,
                      t: int) -> tuple[np.ndarray, np.ndarray]:
    """Small block: ``linear_sum_assignment`` on cost ``d - B`` per edge, 0 per non-edge.

    With ``B`` above the largest possible total distance of a matching, one more pair
    always lowers the cost: the optimum has the most pairs, then the least distance.
    """
    big = (min(p, t) + 1.0) * float(d.max()) + 1.0
    cost = np.zeros((p, t))
    cost[li, lj] = d - big
    edge = np.zeros((p, t), dtype=bool)
    edge[li, lj] = True
    r, c = linear_sum_assignment(cost)
    keep = edge[r, c]
    return r[keep], c[keep]


def _sparse_assignment(li: np.ndarray, lj: np.ndarray, d: np.ndarray, p: int,
                       t: int) -> tuple[np.ndarray, np.ndarray]:
    """Large block: one sparse minimum-weight full matching (LAPJVsp) of an augmented graph.

    Every prediction ``i`` gets a private "unmatched" partner ``D_i`` and every truth ``j``
    a private partner ``E_j``, each at cost ``B`` (per connected component, above half its
    largest possible total distance), plus a zero-cost mirror edge ``E_j - D_i`` for every
    real edge ``(i, j)`` so that a full matching always exists. A full matching costs
    ``sum(distances) + B * (#unmatched)``; its minimum is the maximum-cardinality,
    minimum-distance matching of the real edges.
    """
    graph = coo_matrix((np.ones(len(li), dtype=np.int8), (li, lj + p)), shape=(p + t, p + t))
    ncomp, comp = connected_components(graph, directed=False)
    comp_p, comp_t = comp[:p], comp[p:]
    cp = np.bincount(comp_p, minlength=ncomp)
    ct = np.bincount(comp_t, minlength=ncomp)
    dmax = np.zeros(ncomp)
    np.maximum.at(dmax, comp_p[li], d)
    big = (np.minimum(cp, ct) + 1.0) * dmax + 1.0
    offset = 1.0  # keeps every weight > 0 (the solver drops explicit zeros)
    rows = np.concatenate([li, np.arange(p), p + np.arange(t), p + lj])
    cols = np.concatenate([lj, t + np.arange(p), np.arange(t), t + li])
    w = np.concatenate([d, big[comp_p], big[comp_t], np.zeros(len(li))]) + offset
    r_ind, c_ind = min_weight_full_bipartite_matching(
        coo_matrix((w, (rows, cols)), shape=(p + t, t + p)).tocsr())
    real = (r_ind < p) & (c_ind < t)
    return r_ind[real].astype(np.int64), c_ind[real].astype(np.int64)


# --------------------------------------------------------------------------- scores

def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts, with the module's zero-division rule.

    Both sides empty (``tp = fp = fn = 0``) -> ``(1.0, 1.0, 1.0)``; otherwise a zero
    denominator gives 0.0.

    >>> prf(8, 2, 0)
    (0.8, 1.0, 0.8888888888888888)
    >>> prf(0, 0, 5), prf(0, 3, 0), prf(0, 0, 0)
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    """
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return float(precision), float(recall), float(f1)


class DetectionScores(NamedTuple):
    """Class-agnostic detection scores, TP/FP/FN pooled over images."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> DetectionScores:
        return cls(int(tp), int(fp), int(fn), *prf(tp, fp, fn))


class ClassScores(NamedTuple):
    """Classification scores of one class over the matched pairs."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int  # matched pairs whose true class is this one
    fc: float  # HoVer-Net F_c


@dataclass(frozen=True)
class ClassificationScores:
    """Classification of the matched pairs (see the module docstring)."""

    per_class: list[ClassScores]
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    accuracy: float
    n_matched: int
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    detection_recall: list[float]  # per class: share of its true cells matched at all


@dataclass(frozen=True)
class ClassAwareScores:
    """Paper 003's per-class scores: predicted k matched against true k only."""

    name: str
    total_precision: float
    total_recall: float
    total_f1: float
    mean_f1: float
    tp: int
    fp: int
    fn: int
    n_images: int  # images that entered mean_f1 (those with a true or predicted k)


@dataclass(frozen=True)
class ImageScores:
    """Class-agnostic detection counts of one image (after the region restriction)."""

    name: str
    n_pred: int
    n_true: int
    tp: int
    fp: int
    fn: int
    f1: float


@dataclass(frozen=True)
class Report:
    """Every score of one evaluation at one radius (see the module docstring).

    Attributes
    ----------
    radius
        Matching radius in pixels.
    class_names
        The classes the labels refer to, in order.
    detection
        Detection scores pooled over images.
    classification
        Classification of the matched pairs.
    class_aware
        Per class: paper 003's totalF1 / meanF1 (class-aware matching).
    n_images
        Number of images scored.
    n_pred, n_true
        Predicted and true cells scored (inside the annotated regions).
    n_pred_outside, n_true_outside
        Cells left out because they lie outside every annotated region.
    mean_distance
        Mean distance (pixels) of the matched pairs; 0.0 with no pairs.
    per_image
        Detection counts of each image.
    """

    radius: float
    class_names: tuple[str, ...]
    detection: DetectionScores
    classification: ClassificationScores
    class_aware: list[ClassAwareScores]
    n_images: int
    n_pred: int
    n_true: int
    n_pred_outside: int = 0
    n_true_outside: int = 0
    mean_distance: float = 0.0
    per_image: list[ImageScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain Python numbers, lists and strings; no NaN)."""
        return {
            "radius_px": self.radius,
            "class_names": list(self.class_names),
            "n_images": self.n_images,
            "n_pred": self.n_pred,
            "n_true": self.n_true,
            "n_pred_outside_regions": self.n_pred_outside,
            "n_true_outside_regions": self.n_true_outside,
            "mean_match_distance_px": self.mean_distance,
            "detection": _clean(self.detection._asdict()),
            "classification": {
                "per_class": [_clean(c._asdict()) for c in self.classification.per_class],
                "weighted_precision": self.classification.weighted_precision,
                "weighted_recall": self.classification.weighted_recall,
                "weighted_f1": self.classification.weighted_f1,
                "accuracy": self.classification.accuracy,
                "n_matched": self.classification.n_matched,
                "confusion": {"rows": "true class", "columns": "predicted class",
                              "matrix": self.classification.confusion},
                "detection_recall": dict(zip(self.class_names,
                                             self.classification.detection_recall,
                                             strict=True)),
            },
            "class_aware": [_clean(asdict(c)) for c in self.class_aware],
            "per_image": [_clean(asdict(s)) for s in self.per_image],
        }


def _clean(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (float, np.floating)):
            v = float(v) if math.isfinite(v) else None
        out[k] = v
    return out


# --------------------------------------------------------------------------- datasets

@dataclass
class _Prepared:
    pred_xy: list[np.ndarray]
    pred_lab: list[np.ndarray]
    true_xy: list[np.ndarray]
    true_lab: list[np.ndarray]
    names: list[str]
    n_pred_out: int
    n_true_out: int


def _labels(obj, n: int, n_classes: int, what: str) -> np.ndarray:
    lab = np.asarray(obj.labels, dtype=np.float64).reshape(-1)
    if lab.shape[0] != n:
        raise QpcellError(f"{what}: {n} points but {lab.shape[0]} labels")
    if lab.size and (not np.all(np.mod(lab, 1) == 0) or lab.min() < 0 or lab.max() >= n_classes):
        raise QpcellError(f"{what}: class labels must be integers in 0..{n_classes - 1}")
    return lab.astype(np.int64)


def _inside(xy: np.ndarray, regions) -> np.ndarray:
    """Boolean mask of the points inside (or on the boundary of) any region."""
    if regions is None or len(xy) == 0:
        return np.ones(len(xy), dtype=bool)
    geoms = [g for g in regions if g is not None]
    if not geoms:
        return np.ones(len(xy), dtype=bool)
    import shapely

    area = shapely.union_all([shapely.make_valid(g) for g in geoms])
    shapely.prepare(area)
    return np.asarray(shapely.covers(area, shapely.points(xy)), dtype=bool)


def _prepare(pairs, class_names, regions, names) -> _Prepared:
    pairs = list(pairs)
    if regions is not None and len(regions) != len(pairs):
        raise QpcellError(f"{len(pairs)} image pairs but regions for {len(regions)} images")
    if names is not None and len(names) != len(pairs):
        raise QpcellError(f"{len(pairs)} image pairs but {len(names)} names")
    n_classes = len(class_names)
    if n_classes == 0:
        raise QpcellError("no cell classes given")
    prep = _Prepared([], [], [], [], [], 0, 0)
    for k, item in enumerate(pairs):
        try:
            pred, true = item
        except (TypeError, ValueError):
            raise QpcellError(f"image {k}: expected a (prediction, truth) pair") from None
        name = str(names[k]) if names is not None else str(getattr(true, "name", k))
        pxy = _points(pred.xy, f"image {name!r}, predictions")
        txy = _points(true.xy, f"image {name!r}, truths")
        plab = _labels(pred, len(pxy), n_classes, f"image {name!r}, predictions")
        tlab = _labels(true, len(txy), n_classes, f"image {name!r}, truths")
        reg = None if regions is None else regions[k]
        pin, tin = _inside(pxy, reg), _inside(txy, reg)
        prep.n_pred_out += int((~pin).sum())
        prep.n_true_out += int((~tin).sum())
        prep.pred_xy.append(pxy[pin])
        prep.pred_lab.append(plab[pin])
        prep.true_xy.append(txy[tin])
        prep.true_lab.append(tlab[tin])
        prep.names.append(name)
    return prep


def _score(prep: _Prepared, class_names: tuple[str, ...], radius: float) -> Report:
    c = len(class_names)
    confusion = np.zeros((c, c), dtype=np.int64)
    unmatched_pred = np.zeros(c, dtype=np.int64)  # FP_d per predicted class
    unmatched_true = np.zeros(c, dtype=np.int64)  # FN_d per true class
    true_total = np.zeros(c, dtype=np.int64)
    ca_tp = np.zeros(c, dtype=np.int64)
    ca_fp = np.zeros(c, dtype=np.int64)
    ca_fn = np.zeros(c, dtype=np.int64)
    ca_f1_sum = np.zeros(c)
    ca_n = np.zeros(c, dtype=np.int64)
    per_image: list[ImageScores] = []
    tp = fp = fn = 0
    dist_sum = 0.0
    for pxy, plab, txy, tlab, name in zip(prep.pred_xy, prep.pred_lab, prep.true_xy,
                                          prep.true_lab, prep.names, strict=True):
        m = match_points(pxy, txy, radius)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        dist_sum += float(m.distance.sum())
        per_image.append(ImageScores(name, len(pxy), len(txy), m.tp, m.fp, m.fn,
                                     prf(m.tp, m.fp, m.fn)[2]))
        np.add.at(confusion, (tlab[m.true_idx], plab[m.pred_idx]), 1)
        unmatched_pred += np.bincount(plab[m.unmatched_pred()], minlength=c)
        unmatched_true += np.bincount(tlab[m.unmatched_true()], minlength=c)
        true_total += np.bincount(tlab, minlength=c)
        for k in range(c):
            pk, tk = plab == k, tlab == k
            npk, ntk = int(pk.sum()), int(tk.sum())
            if npk == 0 and ntk == 0:
                continue
            mk = match_points(pxy[pk], txy[tk], radius)
            ca_tp[k] += mk.tp
            ca_fp[k] += mk.fp
            ca_fn[k] += mk.fn
            ca_f1_sum[k] += prf(mk.tp, mk.fp, mk.fn)[2]
            ca_n[k] += 1

    detection = DetectionScores.from_counts(tp, fp, fn)
    n_matched = int(confusion.sum())
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    diag = np.diag(confusion)
    per_class: list[ClassScores] = []
    for k, name in enumerate(class_names):
        p, r, f = prf(int(diag[k]), int(predicted[k] - diag[k]), int(support[k] - diag[k]))
        # HoVer-Net F_c over the pairs that involve class k (TN_c = 0, as in its code)
        tp_c = int(diag[k])
        fp_c = int(predicted[k] - diag[k])
        fn_c = int(support[k] - diag[k])
        den = 2 * tp_c + 2 * fp_c + 2 * fn_c + int(unmatched_pred[k]) + int(unmatched_true[k])
        fc = 2 * tp_c / den if den else 1.0
        per_class.append(ClassScores(name, p, r, f, int(support[k]), float(fc)))
    if n_matched:
        w = support / n_matched
        wp = float(sum(w[k] * per_class[k].precision for k in range(c)))
        wr = float(sum(w[k] * per_class[k].recall for k in range(c)))
        wf = float(sum(w[k] * per_class[k].f1 for k in range(c)))
        acc = float(diag.sum() / n_matched)
    else:
        vacuous = 1.0 if tp + fp + fn == 0 else 0.0
        wp = wr = wf = acc = vacuous
    det_recall = [float((support[k]) / true_total[k]) if true_total[k] else 1.0
                  for k in range(c)]
    classification = ClassificationScores(per_class, wp, wr, wf, acc, n_matched,
                                          confusion.tolist(), det_recall)
    class_aware = []
    for k, name in enumerate(class_names):
        p, r, f = prf(int(ca_tp[k]), int(ca_fp[k]), int(ca_fn[k]))
        mean_f1 = float(ca_f1_sum[k] / ca_n[k]) if ca_n[k] else 1.0
        class_aware.append(ClassAwareScores(name, p, r, f, mean_f1, int(ca_tp[k]),
                                            int(ca_fp[k]), int(ca_fn[k]), int(ca_n[k])))
    return Report(
        radius=float(radius), class_names=tuple(class_names), detection=detection,
        classification=classification, class_aware=class_aware, n_images=len(prep.names),
        n_pred=int(sum(len(x) for x in prep.pred_xy)),
        n_true=int(sum(len(x) for x in prep.true_xy)),
        n_pred_outside=prep.n_pred_out, n_true_outside=prep.n_true_out,
        mean_distance=dist_sum / tp if tp else 0.0, per_image=per_image,
    )


def score_dataset(pairs: Sequence[tuple[PointSet, PointSet]], class_names: Sequence[str],
                  radius: float, *, regions: Sequence[Sequence | None] | None = None,
                  names: Sequence[str] | None = None) -> Report:
    """Score predictions against truths over a set of images at one matching radius.

    Parameters
    ----------
    pairs
        One ``(pred, true)`` per image; each anything with ``.xy`` ``(N, 2)`` pixels and
        ``.labels`` ``(N,)`` integer indices into ``class_names``
        (:class:`~qpcell.points.Detections`, :class:`~qpcell.points.AnnotatedImage`). Both
        sides must use the same class numbering (map by name first when they differ).
    class_names
        Names of the classes, in label order (at least one).
    radius
        Matching radius in pixels (inclusive).
    regions
        ``None``, or one entry per image: ``None`` / an empty list (the whole image is
        annotated) or a list of shapely geometries; points of either side outside all of
        them are ignored (a point on a boundary is inside).
    names
        Image names for :attr:`Report.per_image` (default: ``true.name`` when present,
        else the position).

    Returns
    -------
    Report
        Detection, classification and class-aware scores; see the module docstring for the
        exact definitions and the zero-division rule.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace as P
    >>> true = P(xy=np.array([[0.0, 0.0], [20.0, 0.0]]), labels=np.array([0, 1]))
    >>> pred = P(xy=np.array([[1.0, 0.0], [21.0, 0.0], [50.0, 50.0]]), labels=np.array([0, 0, 1]))
    >>> rep = score_dataset([(pred, true)], ["tumour", "immune"], radius=5)
    >>> rep.detection.tp, rep.detection.fp, rep.detection.fn
    (2, 1, 0)
    >>> rep.classification.accuracy
    0.5
    """
    names_t = tuple(str(n) for n in class_names)
    r = _radius(radius)
    prep = _prepare(pairs, names_t, regions, names)
    return _score(prep, names_t, r)


def radius_sweep(pairs: Sequence[tuple[PointSet, PointSet]], class_names: Sequence[str],
                 radii: Sequence[float], *, regions: Sequence[Sequence | None] | None = None,
                 names: Sequence[str] | None = None) -> list[Report]:
    """:func:`score_dataset` at each radius in ``radii`` (pixels), in the order given.

    The region restriction is computed once and shared by all radii (paper 003, Fig. 3).
    """
    names_t = tuple(str(n) for n in class_names)
    rs = [_radius(r) for r in radii]
    if not rs:
        raise QpcellError("the radius sweep needs at least one radius")
    prep = _prepare(pairs, names_t, regions, names)
    return [_score(prep, names_t, r) for r in rs]
