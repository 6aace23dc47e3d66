"""A classical, QuPath-style baseline: colour deconvolution, peak detection, a random forest.

What a QuPath user does without deep learning, in three steps, all on numpy arrays:

1. **Stains** (:func:`stain_channels`): colour deconvolution of the RGB image into
   haematoxylin, eosin and DAB optical densities (``skimage.color.rgb2hed``, Ruifrok &
   Johnston's vectors), plus the total optical density and the RGB values.
2. **Detection** (:func:`nucleus_response`, :func:`find_peaks`): nuclei are blobs of
   haematoxylin (+ ``dab_weight`` x DAB, for nuclear IHC stains such as ER/PR or Ki67)
   optical density. The sum is smoothed by a scale-normalised Laplacian of Gaussian
   (``-sigma² ∇²G``, a blob filter) of ``sigma`` px about the nucleus radius / sqrt(2);
   cells are its local maxima at least ``min_distance`` px apart and above ``threshold``.
   The three numbers (and ``dab_weight``) are chosen on annotated images for detection F1
   at the matching radius (:func:`tune_detection`), as a QuPath user tunes "Cell detection".
3. **Classification** (:func:`cell_features`, :class:`ClassicalModel`): per cell, the mean,
   maximum and spread of every stain channel in a disc of half the nucleus radius and of the
   nucleus radius, the mean in rings out to 2 and 4 nucleus radii (the cell's surroundings,
   like QuPath's "smoothed features"), and the blob's shape (Hessian eigenvalues of the
   response: elongated or round). A random forest (scikit-learn) is trained on the features
   at the annotated training points, labels = their classes (QuPath's "Train object
   classifier"), and applied at the detected peaks.

Units: every length is in pixels of the image given (``nucleus_radius_px`` sets the scale).
Coordinates are ``(x, y)`` = (column, row).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max

from qpcell.errors import QpcellError
from qpcell.points import CellClass, Detections

#: Names of the stain channels of :func:`stain_channels`, in order.
CHANNELS = ("haematoxylin", "eosin", "dab", "od", "red", "green", "blue")
#: Disc radii and ring edges, in nucleus radii.
DISC_RADII = (0.5, 1.0)
RING_EDGES = ((1.0, 2.0), (2.0, 4.0))
#: Tuning grids: sigma and minimum distance in nucleus radii, DAB weights, threshold count.
SIGMA_GRID = (0.5, 0.7, 0.9)
DISTANCE_GRID = (0.6, 0.8, 1.0, 1.3)
DAB_GRID = (0.0, 1.0)
N_THRESHOLDS = 24


# --------------------------------------------------------------------------- stains
def stain_channels(rgb: np.ndarray) -> np.ndarray:
    """``(7, H, W)`` float32: H, E, DAB optical densities, total OD, and R, G, B in [0, 1].

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 RGB (extra channels are dropped).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise QpcellError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    hed = rgb2hed(rgb).astype(np.float32)  # optical densities, log10 based
    od = -np.log10((rgb.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
    out = np.empty((7, *rgb.shape[:2]), dtype=np.float32)
    out[0:3] = np.moveaxis(hed, 2, 0)
    out[3] = od
    out[4:7] = np.moveaxis(rgb.astype(np.float32) / 255.0, 2, 0)
    return out


def nucleus_response(channels: np.ndarray, sigma_px: float, dab_weight: float = 1.0
                     ) -> np.ndarray:
    """``(H, W)`` float32 blob response: scale-normalised LoG of H + ``dab_weight`` x DAB.

    Bright where a nucleus-sized blob of haematoxylin (and DAB) optical density sits.
    """
    signal = channels[0] + dab_weight * channels[2]
    return (-(sigma_px ** 2) * ndimage.gaussian_laplace(signal, sigma_px)).astype(np.float32)


def find_peaks(response: np.ndarray, min_distance_px: float, threshold: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``response`` above ``threshold``, at least ``min_distance_px`` apart.

    Returns
    -------
    xy : (N, 2) float64 (x, y) pixels; values : (N,) float32 response at each peak
    """
    md = max(1, int(round(min_distance_px)))
    rc = peak_local_max(response, min_distance=md, threshold_abs=threshold,
                        exclude_border=False)
    if len(rc) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.float32)
    return rc[:, ::-1].astype(np.float64), response[rc[:, 0], rc[:, 1]].astype(np.float32)


# --------------------------------------------------------------------------- features
def _offsets(r0: float, r1: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``(dy, dx)`` with ``r0 < |d| <= r1`` (``r0 < 0``: the centre too)."""
    k = int(np.ceil(r1))
    dy, dx = np.mgrid[-k:k + 1, -k:k + 1]
    d = np.hypot(dy, dx)
    sel = (d > r0) & (d <= r1 + 1e-9)
    if not sel.any():  # a disc smaller than one pixel: the centre alone
        sel = d == 0
    return dy[sel], dx[sel]


def _gather(maps: np.ndarray, rows: np.ndarray, cols: np.ndarray, dy: np.ndarray,
            dx: np.ndarray) -> np.ndarray:
    """``(C, N, K)`` values of ``maps`` at each point + offset (clamped at the border)."""
    h, w = maps.shape[1:]
    r = np.clip(rows[:, None] + dy[None, :], 0, h - 1)
    c = np.clip(cols[:, None] + dx[None, :], 0, w - 1)
    return maps[:, r, c]


def feature_names(channels: Sequence[str] = CHANNELS) -> list[str]:
    """Names of the columns of :func:`cell_features`."""
    names = []
    for r in DISC_RADII:
        names += [f"{c}: disc {r:g}R mean" for c in channels]
    names += [f"{c}: disc 1R max" for c in channels]
    names += [f"{c}: disc 1R std" for c in channels]
    for r0, r1 in RING_EDGES:
        names += [f"{c}: ring {r0:g}-{r1:g}R mean" for c in channels]
    names += ["response", "hessian: larger eigenvalue", "hessian: smaller eigenvalue",
              "hessian: anisotropy"]
    return names


def cell_features(channels: np.ndarray, response: np.ndarray, xy: np.ndarray,
                  nucleus_radius_px: float) -> np.ndarray:
    """``(N, F)`` float32 features of the cells at ``xy`` (see :func:`feature_names`).

    Parameters
    ----------
    channels
        ``(7, H, W)`` from :func:`stain_channels`.
    response
        ``(H, W)`` from :func:`nucleus_response` (blob strength and shape).
    xy
        ``(N, 2)`` cell centres (x, y) in pixels; rounded to the nearest pixel.
    nucleus_radius_px
        ``R``: discs and rings are multiples of it.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    n_feat = len(feature_names())
    if n == 0:
        return np.zeros((0, n_feat), np.float32)
    h, w = response.shape
    cols = np.clip(np.floor(xy[:, 0] + 0.5).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(xy[:, 1] + 0.5).astype(np.int64), 0, h - 1)
    big = float(nucleus_radius_px)
    parts = []
    for r in DISC_RADII:
        parts.append(_gather(channels, rows, cols, *_offsets(-1, r * big)).mean(axis=2))
    disc = _gather(channels, rows, cols, *_offsets(-1, big))
    parts += [disc.max(axis=2), disc.std(axis=2)]
    for r0, r1 in RING_EDGES:
        parts.append(_gather(channels, rows, cols, *_offsets(r0 * big, r1 * big)).mean(axis=2))
    # blob shape: eigenvalues of the response's Hessian at the cell, at the nucleus scale
    s = max(0.5, big / 2)
    hrr = ndimage.gaussian_filter(response, s, order=(2, 0))[rows, cols]
    hcc = ndimage.gaussian_filter(response, s, order=(0, 2))[rows, cols]
    hrc = ndimage.gaussian_filter(response, s, order=(1, 1))[rows, cols]
    mean = (hrr + hcc) / 2
    root = np.sqrt(((hrr - hcc) / 2) ** 2 + hrc ** 2)
    l1, l2 = mean + root, mean - root  # l2 <= l1; a bright blob has both negative
    aniso = root / (np.abs(mean) + 1e-6)
    feats = np.concatenate([np.concatenate(parts, axis=0).T,
                            np.stack([response[rows, cols], l1, l2, aniso], axis=1)], axis=1)
    return feats.astype(np.float32)


# --------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class DetectionSettings:
    """The detection step's parameters (pixels)."""

    sigma_px: float
    min_distance_px: float
    threshold: float
    dab_weight: float = 1.0


def _detection_counts(pred: Sequence[np.ndarray], true: Sequence[np.ndarray], radius: float
                      ) -> tuple[int, int, int]:
    from qpcell.metrics import match_points

    tp = fp = fn = 0
    for p, t in zip(pred, true, strict=True):
        m = match_points(p, t, radius)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return tp, fp, fn


def tune_detection(images: Sequence[np.ndarray], points: Sequence[np.ndarray], *,
                   nucleus_radius_px: float, match_radius_px: float,
                   sigma_grid: Sequence[float] = SIGMA_GRID,
                   distance_grid: Sequence[float] = DISTANCE_GRID,
                   dab_grid: Sequence[float] = DAB_GRID, n_thresholds: int = N_THRESHOLDS,
                   ) -> tuple[DetectionSettings, float]:
    """Choose the detection settings with the best detection F1 on annotated images.

    Parameters
    ----------
    images
        ``(H, W, 3)`` uint8 RGB images.
    points
        ``(N, 2)`` annotated cell centres (x, y) of each image, pixels.
    nucleus_radius_px
        Typical nucleus radius ``R``; ``sigma_grid`` and ``distance_grid`` are multiples of it.
    match_radius_px
        Matching radius for the F1 (pixels).
    dab_grid
        DAB weights tried (0 = haematoxylin only).
    n_thresholds
        Thresholds tried per setting: quantiles of all candidate peak values.

    Returns
    -------
    settings, f1
    """
    if not images:
        raise QpcellError("no images to tune the classical detection on")
    chans = [stain_channels(im) for im in images]
    best: tuple[float, DetectionSettings] | None = None
    for s_mult, dab in itertools.product(sigma_grid, dab_grid):
        sigma = max(0.5, s_mult * nucleus_radius_px)
        responses = [nucleus_response(c, sigma, dab) for c in chans]
        for d_mult in distance_grid:
            md = max(1.0, float(round(d_mult * nucleus_radius_px)))
            found = [find_peaks(r, md, 0.0) for r in responses]
            values = np.concatenate([v for _, v in found]) if found else np.zeros(0)
            if values.size == 0:
                continue
            qs = np.unique(np.quantile(values, np.linspace(0.0, 0.9, n_thresholds)))
            for t in qs:
                pred = [xy[v > t] for xy, v in found]
                f1 = _f1(*_detection_counts(pred, points, match_radius_px))
                setting = DetectionSettings(sigma, md, float(t), float(dab))
                if best is None or f1 > best[0]:
                    best = (f1, setting)
    if best is None:
        raise QpcellError("the classical detection found no peaks in the tuning images")
    return best[1], best[0]


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


# --------------------------------------------------------------------------- the model
@dataclass
class ClassicalModel:
    """Tuned detection + a fitted random forest; :meth:`predict` finds and classifies cells.

    Build it with :func:`fit_classical`.
    """

    classes: tuple[CellClass, ...]
    detection: DetectionSettings
    nucleus_radius_px: float
    forest: object  # sklearn.ensemble.RandomForestClassifier
    tune_f1: float = float("nan")
    info: dict = field(default_factory=dict)

    def predict(self, rgb: np.ndarray) -> Detections:
        """Cells of one RGB image: ``xy`` in its pixels, class probabilities from the forest.

        ``scores`` = ``v / (v + threshold)`` of the blob response ``v`` (0.5 at the threshold).
        """
        chans = stain_channels(rgb)
        d = self.detection
        response = nucleus_response(chans, d.sigma_px, d.dab_weight)
        xy, values = find_peaks(response, d.min_distance_px, d.threshold)
        if len(xy) == 0:
            return Detections.empty(self.classes)
        probs = self._probabilities(cell_features(chans, response, xy, self.nucleus_radius_px))
        scores = values / (values + max(d.threshold, 1e-6))
        return Detections(xy, probs.argmax(axis=1), np.clip(scores, 0, 1), probs, self.classes)

    def _probabilities(self, feats: np.ndarray) -> np.ndarray:
        """``(N, C)`` class probabilities (classes never seen in training get 0)."""
        p = self.forest.predict_proba(feats)
        out = np.zeros((len(feats), len(self.classes)), np.float32)
        out[:, self.forest.classes_.astype(np.int64)] = p
        return out

    def describe(self) -> dict:
        """JSON-ready summary of the settings."""
        return {"detection": asdict(self.detection), "nucleus_radius_px": self.nucleus_radius_px,
                "tune_f1": self.tune_f1, **self.info}


def fit_classical(images: Sequence[np.ndarray], points: Sequence[tuple[np.ndarray, np.ndarray]],
                  classes: Sequence[CellClass], *, nucleus_radius_px: float,
                  match_radius_px: float, tune_images: Sequence[np.ndarray] | None = None,
                  tune_points: Sequence[np.ndarray] | None = None, n_estimators: int = 200,
                  min_samples_leaf: int = 2, seed: int = 0, n_jobs: int = 1) -> ClassicalModel:
    """Tune the detection and train the random forest.

    Parameters
    ----------
    images, points
        Training images (``(H, W, 3)`` uint8) and their ``(xy (N, 2), labels (N,))``.
    classes
        The class list the labels index.
    nucleus_radius_px
        Typical nucleus radius in pixels (sets the filter, peak distance and feature scales).
    match_radius_px
        Matching radius (pixels) of the detection F1 that the tuning maximises.
    tune_images, tune_points
        Images and ``(N, 2)`` points to tune the detection on (default: the training ones).
    n_estimators, min_samples_leaf, seed, n_jobs
        Random forest settings.
    """
    from sklearn.ensemble import RandomForestClassifier

    classes = tuple(classes)
    if len(images) != len(points):
        raise QpcellError(f"{len(images)} images but {len(points)} point sets")
    if tune_images is None:
        tune_images, tune_points = images, [xy for xy, _ in points]
    settings, f1 = tune_detection(tune_images, tune_points or [],
                                  nucleus_radius_px=nucleus_radius_px,
                                  match_radius_px=match_radius_px)
    feats, labels = [], []
    for im, (xy, lab) in zip(images, points, strict=True):
        if len(xy) == 0:
            continue
        chans = stain_channels(im)
        response = nucleus_response(chans, settings.sigma_px, settings.dab_weight)
        feats.append(cell_features(chans, response, xy, nucleus_radius_px))
        labels.append(np.asarray(lab, np.int64))
    if not feats:
        raise QpcellError("no annotated cells to train the classical classifier on")
    x, y = np.concatenate(feats), np.concatenate(labels)
    forest = RandomForestClassifier(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf,
                                    random_state=seed, n_jobs=n_jobs)
    forest.fit(x, y)
    return ClassicalModel(classes, settings, float(nucleus_radius_px), forest, float(f1),
                          {"n_training_cells": int(len(y)), "n_features": int(x.shape[1]),
                           "n_estimators": n_estimators})


__all__ = ["CHANNELS", "DetectionSettings", "ClassicalModel", "stain_channels",
           "nucleus_response", "find_peaks", "cell_features", "feature_names", "tune_detection",
           "fit_classical"]
