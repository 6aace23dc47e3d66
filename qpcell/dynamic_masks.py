"""Dynamic masks of paper 003 (MTL-IHC, section 2.2): a random polygon around every point.

"In each training iteration, the cell marks with random polygon and size in new estimated masks
are generated" — the paper gives no distribution, so this module fixes one (all lengths in
pixels of the mask):

* **size**: each cell draws a base radius ``r0 ~ U(radius_px[0], radius_px[1])``;
* **shape**: ``n ~ U{vertices[0] .. vertices[1]}`` vertices at angles
  ``rotation + 2 pi k / n + e_k`` with a uniform random ``rotation`` and a small angular jitter
  ``e_k ~ U(-0.2, 0.2) * 2 pi / n``, each at radius ``r_k = r0 * U(1 - jitter, 1 + jitter)``
  clipped to ``radius_px``. So every vertex radius lies in ``radius_px``, sizes vary from cell
  to cell (not only vertex to vertex) and shapes vary from triangles to near-discs.

The polygon is star-shaped around its point (consecutive vertices are less than pi apart), so
it always contains the point and a pixel is inside exactly when it lies on the inner side of
the edge of the angular sector it falls in. Rasterisation uses that: vectorised over every
point and every pixel of a small window around it (no Python loop over points). A pixel is in
the polygon when its **centre** is (pixel centres at integer coordinates, as in
:mod:`qpcell.masks`). Polygons of different points may overlap; each class has its own channel
(multi-label, like :func:`qpcell.masks.circle_masks`).

Reproducible: the same ``numpy.random.Generator`` state gives the same masks; every call draws
new polygons (the paper regenerates them every iteration).
"""

from __future__ import annotations

import numpy as np

from qpcell.config import MTLConfig
from qpcell.errors import QpcellError

_MTL = MTLConfig()
ANGLE_JITTER = 0.2  # fraction of the vertex spacing; < 0.25 keeps every sector under pi


def _check(xy, labels, n_classes: int, shape) -> tuple[np.ndarray, np.ndarray, int, int]:
    xy = np.asarray(xy, dtype=np.float64)
    xy = xy.reshape(0, 2) if xy.size == 0 else xy
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.all(np.isfinite(xy)):
        raise QpcellError(f"points must be a finite (N, 2) array, got shape {xy.shape}")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != xy.shape[0]:
        raise QpcellError(f"{xy.shape[0]} points but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise QpcellError(f"a label is outside 0..{n_classes - 1}")
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0:
        raise QpcellError(f"mask shape must be positive, got {tuple(shape)}")
    return xy, labels, h, w


def random_polygons(n: int, *, radius_px: tuple[float, float] = _MTL.dynamic_radius_px,
                    vertices: tuple[int, int] = _MTL.dynamic_vertices, jitter: float = 0.3,
                    rng: np.random.Generator | int | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random star-shaped polygons centred on the origin (see the module docstring).

    Parameters
    ----------
    n
        Number of polygons.
    radius_px
        ``(min, max)`` vertex distance from the centre, pixels.
    vertices
        ``(min, max)`` number of vertices, both included (min >= 3).
    jitter
        Relative spread of the vertex radii around each polygon's base radius (0 = regular
        polygons of random size).
    rng
        Generator or seed.

    Returns
    -------
    verts : (n, V, 2) float64
        Vertex ``(x, y)`` offsets in order of increasing angle ``atan2(y, x)``; rows beyond a
        polygon's count repeat its first vertex.
    counts : (n,) int64
        Vertices of each polygon.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    rmin, rmax = (float(r) for r in radius_px)
    vmin, vmax = (int(v) for v in vertices)
    if not 0 < rmin <= rmax:
        raise QpcellError(f"dynamic radius range must satisfy 0 < min <= max, got {radius_px}")
    if not 3 <= vmin <= vmax:
        raise QpcellError(f"dynamic vertex range must satisfy 3 <= min <= max, got {vertices}")
    if not 0 <= jitter < 1:
        raise QpcellError(f"radius jitter must be in [0, 1), got {jitter}")
    counts = rng.integers(vmin, vmax + 1, size=n).astype(np.int64)
    base = rng.uniform(rmin, rmax, size=n)
    rotation = rng.uniform(0.0, 2 * np.pi, size=n)
    k = np.arange(vmax)
    spacing = 2 * np.pi / counts
    angles = (rotation[:, None] + spacing[:, None] * k[None, :]
              + rng.uniform(-ANGLE_JITTER, ANGLE_JITTER, (n, vmax)) * spacing[:, None])
    radii = np.clip(base[:, None] * rng.uniform(1 - jitter, 1 + jitter, (n, vmax)), rmin, rmax)
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)
    unused = k[None, :] >= counts[:, None]
    verts[unused] = np.broadcast_to(verts[:, :1], verts.shape)[unused]
    return verts, counts


def polygon_area(verts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact areas (px²) of polygons from :func:`random_polygons` (shoelace formula)."""
    verts = np.asarray(verts, dtype=np.float64)
    nxt = np.roll(verts, -1, axis=1)
    idx = np.arange(verts.shape[0])
    # the closing edge runs from the last real vertex back to the first
    nxt[idx, counts - 1] = verts[:, 0]
    cross = verts[..., 0] * nxt[..., 1] - verts[..., 1] * nxt[..., 0]
    cross[np.arange(verts.shape[1])[None, :] >= counts[:, None]] = 0.0
    return 0.5 * np.abs(cross.sum(axis=1))


def rasterise_polygons(xy, labels, n_classes: int, shape, verts: np.ndarray,
                       counts: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float32 masks of star-shaped polygons ``verts`` placed at the points ``xy``.

    Parameters
    ----------
    xy
        ``(N, 2)`` centres ``(x, y)`` in pixels (may lie outside the mask: the part of the
        polygon inside is drawn).
    labels
        ``(N,)`` class of each point, ``0 <= label < n_classes``.
    verts, counts
        Polygons relative to their centre, from :func:`random_polygons`.
    """
    xy, labels, h, w = _check(xy, labels, n_classes, shape)
    out = np.zeros((n_classes, h * w), dtype=np.float32)
    n = xy.shape[0]
    if n == 0:
        return out.reshape(n_classes, h, w)
    verts = np.asarray(verts, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    if verts.shape[0] != n or counts.shape[0] != n:
        raise QpcellError(f"{n} points but {verts.shape[0]} polygons")
    reach = int(np.ceil(np.abs(verts).max())) + 1
    near = np.flatnonzero((xy[:, 0] > -reach) & (xy[:, 0] < w - 1 + reach)
                          & (xy[:, 1] > -reach) & (xy[:, 1] < h - 1 + reach))
    if near.size == 0:
        return out.reshape(n_classes, h, w)
    xy, labels, verts, counts = xy[near], labels[near], verts[near], counts[near]
    n, vmax = verts.shape[:2]

    # window pixels around each point: (n, P) offsets of pixel centres from the point
    d = np.arange(-reach, reach + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
    cols = np.rint(xy[:, 0]).astype(np.int64)[:, None] + dx[None, :]
    rows = np.rint(xy[:, 1]).astype(np.int64)[:, None] + dy[None, :]
    px = cols - xy[:, :1]
    py = rows - xy[:, 1:]

    # sector of each pixel: angle measured from the first vertex, counter-clockwise
    a_v = np.arctan2(verts[..., 1], verts[..., 0])  # (n, V)
    rel_v = np.mod(a_v - a_v[:, :1], 2 * np.pi)
    rel_v[np.arange(vmax)[None, :] >= counts[:, None]] = np.inf  # padding never bounds a sector
    rel_p = np.mod(np.arctan2(py, px) - a_v[:, :1], 2 * np.pi)  # (n, P)
    sector = (rel_p[:, :, None] >= rel_v[:, None, :]).sum(axis=-1) - 1  # (n, P) in 0..count-1
    sector = np.clip(sector, 0, counts[:, None] - 1)
    nxt = np.where(sector + 1 >= counts[:, None], 0, sector + 1)
    take = np.arange(n)[:, None]
    v0 = verts[take, sector]  # (n, P, 2)
    v1 = verts[take, nxt]
    ex, ey = v1[..., 0] - v0[..., 0], v1[..., 1] - v0[..., 1]
    cross = ex * (py - v0[..., 1]) - ey * (px - v0[..., 0])
    inside = cross >= -1e-9
    inside &= (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    which = np.broadcast_to(labels[:, None], inside.shape)[inside]
    out[which, (rows * w + cols)[inside]] = 1.0
    return out.reshape(n_classes, h, w)


def dynamic_masks(xy, labels, n_classes: int, shape, *,
                  radius_px: tuple[float, float] = _MTL.dynamic_radius_px,
                  vertices: tuple[int, int] = _MTL.dynamic_vertices, jitter: float = 0.3,
                  rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``(C, H, W)`` float32 masks of a fresh random polygon around every point (paper 003 eq. 4).

    Parameters
    ----------
    xy, labels, n_classes, shape
        Points ``(x, y)`` in pixels, their class indices, the number of classes and ``(H, W)``.
    radius_px, vertices, jitter
        Polygon distribution (see :func:`random_polygons`); MTL-IHC defaults from
        :class:`qpcell.config.MTLConfig`, in pixels at the mask's scale.
    rng
        Generator (advanced by the call) or seed; ``None`` draws fresh entropy.

    Examples
    --------
    >>> m = dynamic_masks([[8.0, 8.0]], [1], 2, (16, 16), rng=0)
    >>> m.shape, float(m[0].sum()), float(m[1, 8, 8])
    ((2, 16, 16), 0.0, 1.0)
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = np.asarray(xy, dtype=np.float64).reshape(-1, 2).shape[0]
    verts, counts = random_polygons(n, radius_px=radius_px, vertices=vertices, jitter=jitter,
                                    rng=rng)
    return rasterise_polygons(xy, labels, n_classes, shape, verts, counts)


__all__ = ["random_polygons", "polygon_area", "rasterise_polygons", "dynamic_masks"]
