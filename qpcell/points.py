"""Core types: cell classes, annotated images and detections.

Everything is arrays, not lists of objects, so that 100,000 cells cost a few megabytes.
Coordinates are always ``(x, y)`` = (column, row) in **pixels of the full-resolution
image**, as QuPath stores them; ``mpp`` is the pixel size in micrometres per pixel.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpcell.errors import QpcellError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class CellClass:
    """A cell class as QuPath shows it: a name and an RGB colour (0-255 each)."""

    name: str
    color: RGB

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise QpcellError("a cell class has an empty name")
        color = tuple(int(c) for c in self.color)
        if len(color) != 3 or any(c < 0 or c > 255 for c in color):
            raise QpcellError(f"class {self.name!r}: colour {self.color!r} is not RGB 0-255")
        object.__setattr__(self, "color", color)


def default_color(index: int) -> RGB:
    """A distinct, saturated colour for the ``index``-th class (golden-angle hues)."""
    hue = (index * 0.381966) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


def make_classes(names: Sequence[str],
                 colors: Sequence[RGB | None] | None = None) -> tuple[CellClass, ...]:
    """Build a class list from names, filling missing colours with :func:`default_color`.

    Raises
    ------
    QpcellError
        If a name is empty or repeated.
    """
    colors = list(colors) if colors is not None else [None] * len(names)
    seen: set[str] = set()
    out = []
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        if name in seen:
            raise QpcellError(f"class {name!r} is listed twice")
        seen.add(name)
        out.append(CellClass(name, color if color is not None else default_color(i)))
    return tuple(out)


def _as_xy(xy: np.ndarray | Sequence) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise QpcellError(f"points must have shape (N, 2), got {arr.shape}")
    return arr


def _check_labels(labels: np.ndarray, n_points: int, classes: Sequence[CellClass]) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise QpcellError("class labels must be integers")
    labels = labels.astype(np.int64)
    if labels.shape[0] != n_points:
        raise QpcellError(f"{n_points} points but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(labels.max() if labels.max() >= len(classes) else labels.min())
        raise QpcellError(f"label index {bad} is outside the {len(classes)} classes")
    return labels


@dataclass
class AnnotatedImage:
    """One image with its point annotations.

    Attributes
    ----------
    name
        A short identifier, usually the image file's stem.
    image
        Path to the pixels (PNG, TIFF, whole-slide image), or ``None`` when not known.
    xy
        ``(N, 2)`` float64 cell centres, (x, y) in full-resolution pixels.
    labels
        ``(N,)`` int64 index into ``classes``.
    classes
        The class list the labels refer to.
    regions
        Annotated regions (shapely polygons, full-resolution pixels); ``None`` means the
        whole image is annotated. Cells outside every region are ignored in scoring.
    mpp
        Pixel size in micrometres per pixel, or ``None`` when unknown.
    """

    name: str
    image: Path | None
    xy: np.ndarray
    labels: np.ndarray
    classes: tuple[CellClass, ...]
    regions: list[BaseGeometry] | None = None
    mpp: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xy = _as_xy(self.xy)
        if not np.all(np.isfinite(self.xy)):
            raise QpcellError(f"image {self.name!r}: a point has a NaN or infinite coordinate")
        self.classes = tuple(self.classes)
        try:
            self.labels = _check_labels(self.labels, len(self.xy), self.classes)
        except QpcellError as err:
            raise QpcellError(f"image {self.name!r}: {err}") from None
        if self.image is not None:
            self.image = Path(self.image)
        if self.mpp is not None and not (np.isfinite(self.mpp) and self.mpp > 0):
            raise QpcellError(f"image {self.name!r}: pixel size {self.mpp!r} µm is not positive")

    def __len__(self) -> int:
        return len(self.xy)

    def counts(self) -> dict[str, int]:
        """Number of points per class name."""
        n = np.bincount(self.labels, minlength=len(self.classes))
        return {c.name: int(k) for c, k in zip(self.classes, n, strict=True)}


@dataclass
class Detections:
    """Cells found by a model in one image.

    Attributes
    ----------
    xy
        ``(N, 2)`` float64 cell centres, (x, y) in full-resolution pixels.
    labels
        ``(N,)`` int64 predicted class index into ``classes``.
    scores
        ``(N,)`` float32 detection score in [0, 1].
    class_probs
        ``(N, C)`` float32 per-class probability (rows need not sum to 1 for sigmoid models).
    classes
        The model's class list.
    mpp
        Pixel size of the image in µm per pixel, when known (for µm outputs).
    """

    xy: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    class_probs: np.ndarray
    classes: tuple[CellClass, ...]
    mpp: float | None = None

    def __post_init__(self) -> None:
        self.xy = _as_xy(self.xy)
        self.classes = tuple(self.classes)
        n = len(self.xy)
        self.labels = _check_labels(self.labels, n, self.classes)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        probs = np.asarray(self.class_probs, dtype=np.float32)
        if probs.size == 0:
            probs = np.zeros((n, len(self.classes)), dtype=np.float32)
        self.class_probs = probs
        if self.scores.shape != (n,) or self.class_probs.shape != (n, len(self.classes)):
            raise QpcellError(
                f"detections: {n} points, {self.scores.shape[0]} scores, "
                f"probabilities of shape {self.class_probs.shape} for {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.xy)

    @classmethod
    def empty(cls, classes: Sequence[CellClass], mpp: float | None = None) -> Detections:
        """No cells."""
        return cls(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.float32),
                   np.zeros((0, len(classes)), np.float32), tuple(classes), mpp)

    def subset(self, keep: np.ndarray) -> Detections:
        """The detections selected by a boolean mask or index array."""
        return Detections(self.xy[keep], self.labels[keep], self.scores[keep],
                          self.class_probs[keep], self.classes, self.mpp)

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections moved by ``(dx, dy)`` pixels."""
        return Detections(self.xy + np.array([dx, dy]), self.labels, self.scores,
                          self.class_probs, self.classes, self.mpp)

    @classmethod
    def concatenate(cls, parts: Sequence[Detections], classes: Sequence[CellClass],
                    mpp: float | None = None) -> Detections:
        """Join several detection sets that share one class list."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(classes, mpp)
        return cls(np.concatenate([p.xy for p in parts]),
                   np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.class_probs for p in parts]), tuple(classes), mpp)

    def counts(self) -> dict[str, int]:
        """Number of cells per class name."""
        n = np.bincount(self.labels, minlength=len(self.classes))
        return {c.name: int(k) for c, k in zip(self.classes, n, strict=True)}
