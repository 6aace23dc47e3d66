"""Synthetic multiplex-IHC images with point annotations, for the demo and the tests.

Images are rendered in optical density (Beer-Lambert): each stain adds ``density * stain
vector`` and the RGB image is ``255 * exp(-OD)``. Every cell has a haematoxylin nucleus;
the classes differ by chromogen colour and pattern (membrane ring, cytoplasm, or nuclear
stain), as in multiplex IHC. Cells may touch; tissue has textured stroma and empty areas.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from qpcell.points import AnnotatedImage, CellClass

# Optical density per unit stain in (R, G, B), roughly as in Ruifrok & Johnston (2001).
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
DAB = np.array([0.27, 0.57, 0.78])
FAST_RED = np.array([0.10, 0.85, 0.60])
VIOLET = np.array([0.55, 0.95, 0.15])
YELLOW = np.array([0.03, 0.20, 0.95])


@dataclass(frozen=True)
class Phenotype:
    """How one cell class looks: a chromogen (OD vector) and where it sits."""

    name: str
    color: tuple[int, int, int]
    stain: np.ndarray | None
    pattern: str  # "membrane", "cytoplasm", "nucleus" or "none"


PHENOTYPES = (
    Phenotype("CD8+", (150, 90, 30), DAB, "membrane"),
    Phenotype("CD4+", (220, 40, 60), FAST_RED, "cytoplasm"),
    Phenotype("FOXP3+", (120, 40, 170), VIOLET, "nucleus"),
    Phenotype("Negative", (60, 90, 220), None, "none"),
)


def phenotypes(n_classes: int) -> tuple[Phenotype, ...]:
    """The first ``n_classes`` phenotypes (2 to 4)."""
    if not 1 <= n_classes <= len(PHENOTYPES):
        raise ValueError(f"n_classes must be 1..{len(PHENOTYPES)}, got {n_classes}")
    return PHENOTYPES[:n_classes]


def _place_cells(shape: tuple[int, int], n: int, min_dist: float, rng: np.random.Generator,
                 margin: float, empty: np.ndarray) -> np.ndarray:
    """Up to ``n`` centres, at least ``min_dist`` px apart, outside the ``empty`` mask."""
    h, w = shape
    pts: list[np.ndarray] = []
    for _ in range(n * 30):
        if len(pts) >= n:
            break
        p = rng.uniform([margin, margin], [w - 1 - margin, h - 1 - margin])
        if empty[int(p[1]), int(p[0])]:
            continue
        if pts and np.min(np.hypot(*(np.asarray(pts) - p).T)) < min_dist:
            continue
        pts.append(p)
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-9)


def render_image(shape: tuple[int, int] = (256, 256), n_classes: int = 4, *,
                 density: float = 1.0, nucleus_radius_px: float = 4.5,
                 rng: np.random.Generator | int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one synthetic mIHC image.

    Parameters
    ----------
    shape
        ``(height, width)`` in pixels.
    n_classes
        Number of cell phenotypes (see :data:`PHENOTYPES`).
    density
        Cells per 1,000 px² of tissue, relative to the default (about 2.6 per 1,000 px²).
    nucleus_radius_px
        Mean nucleus radius in pixels (about 2 µm at 0.44 µm/px).
    rng
        Random generator or seed.

    Returns
    -------
    image : (H, W, 3) uint8 RGB
    xy : (N, 2) float64 cell centres (x, y) in pixels
    labels : (N,) int64 class indices
    """
    rng = np.random.default_rng(rng)
    h, w = shape
    kinds = phenotypes(n_classes)
    # Empty (cell-free) lumen-like areas: thresholded smooth noise.
    empty = _smooth_noise(shape, 18, rng) > 1.1
    n_cells = int(density * 0.0026 * h * w * (1 - empty.mean()))
    xy = _place_cells(shape, n_cells, 1.9 * nucleus_radius_px, rng, 2.0, empty)
    labels = rng.integers(0, n_classes, len(xy))

    od = np.zeros((h, w, 3))
    stroma = 0.10 + 0.05 * _smooth_noise(shape, 6, rng)
    od += np.clip(stroma, 0, None)[..., None] * EOSIN * ~empty[..., None]
    od += 0.03 * np.clip(_smooth_noise(shape, 2, rng), 0, None)[..., None] * HAEMATOXYLIN

    yy, xx = np.mgrid[0:h, 0:w]
    reach = int(np.ceil(nucleus_radius_px * 2.4)) + 2
    for (cx, cy), label in zip(xy, labels, strict=True):
        kind = kinds[label]
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        angle = rng.uniform(0, np.pi)
        a = nucleus_radius_px * rng.uniform(0.85, 1.2)
        b = a * rng.uniform(0.7, 1.0)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        r_nuc = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        nucleus = np.clip(1.5 - 1.5 * r_nuc, 0, 1) ** 0.5
        local = od[y0:y1, x0:x1]
        local += (0.55 + 0.15 * rng.random()) * nucleus[..., None] * HAEMATOXYLIN
        if kind.stain is None:
            continue
        strength = rng.uniform(0.5, 0.9)
        r = np.hypot(dx, dy) / a
        if kind.pattern == "membrane":
            ring = np.exp(-((r - 1.55) ** 2) / 0.08)
        elif kind.pattern == "cytoplasm":
            ring = np.clip(1.9 - r, 0, 1) * (r > 0.7)
        else:
            ring = nucleus * 1.1
        local += strength * ring[..., None] * kind.stain

    od += rng.normal(0, 0.015, od.shape)
    image = np.clip(255 * np.exp(-np.clip(od, 0, None)), 0, 255).astype(np.uint8)
    return image, xy, labels.astype(np.int64)


def synthetic_classes(n_classes: int = 4) -> tuple[CellClass, ...]:
    """The class list (names and QuPath colours) of the synthetic phenotypes."""
    return tuple(CellClass(k.name, k.color) for k in phenotypes(n_classes))


def synthetic_dataset(n_images: int, shape: tuple[int, int] = (256, 256), n_classes: int = 4, *,
                      seed: int = 0, mpp: float = 0.44, prefix: str = "synthetic",
                      ) -> list[tuple[AnnotatedImage, np.ndarray]]:
    """``n_images`` rendered images with their annotations.

    Returns
    -------
    list of (AnnotatedImage, image array); ``AnnotatedImage.image`` is ``None`` until the
    pixels are saved (see :func:`qpcell.io.project.write_project`).
    """
    classes = synthetic_classes(n_classes)
    seeds = np.random.SeedSequence(seed).spawn(n_images)
    out = []
    for i, s in enumerate(seeds):
        image, xy, labels = render_image(shape, n_classes, rng=np.random.default_rng(s))
        ann = AnnotatedImage(f"{prefix}-{i:03d}", None, xy, labels, classes, mpp=mpp)
        out.append((ann, image))
    return out


def write_synthetic_project(folder, n_images: int, shape: tuple[int, int] = (256, 256),
                            n_classes: int = 4, *, seed: int = 0, mpp: float = 0.44,
                            prefix: str = "synthetic") -> list[AnnotatedImage]:
    """Render ``n_images`` and write them as a GeoJSON project folder (PNG + GeoJSON each).

    Returns the annotated images, with ``image`` pointing at the written PNGs.
    """
    from pathlib import Path

    from PIL import Image

    from qpcell.io.atomic import atomic_open
    from qpcell.io.project import write_project

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    for ann, pixels in synthetic_dataset(n_images, shape, n_classes, seed=seed, mpp=mpp,
                                         prefix=prefix):
        png = folder / f"{ann.name}.png"
        with atomic_open(png, "wb") as handle:
            Image.fromarray(pixels).save(handle, format="PNG")
        ann.image = png
        staged.append(ann)
    # The PNGs are in place already: write only the annotations, classes and metadata.
    write_project(folder, [replace(a, image=None) for a in staged])
    return staged
