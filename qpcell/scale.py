"""How large the annotated nuclei are, in pixels: the working scale of images without a pixel size.

A scan without metadata says nothing of its µm/px, and the spacing of annotated cells follows
their density as much as their size. The size of the nuclei does not: around each annotated
point the stained nucleus is a dark blob, and the scale-normalised Laplacian of Gaussian
``-sigma² ∇²G_sigma * OD`` of the nuclear optical density peaks where ``sigma`` matches it
(``radius ≈ sigma √2`` for a disc). :func:`nucleus_radius_px` takes the median of that
response over the points at each ``sigma`` and returns the radius where the median peaks.

The optical density is that of the nuclear stains: haematoxylin plus DAB (``skimage.color``'s
HED separation), so nuclei count whether they are counterstained or DAB-positive (Ki67, ER/PR),
while eosin and the unstained background do not.

:func:`estimate_mpp` turns the radius into a pixel size by :data:`NUCLEUS_RADIUS_UM`, the
nucleus radius qpcell assumes where nothing else is known; what matters downstream is only
that nuclei arrive at the size the model's pixel constants expect, so a 2x or 3x scan of the
same tissue gets 1/2 or 1/3 of the pixel size and is read at the same working scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from qpcell.errors import QpcellError

#: Nucleus radius (µm) that a nucleus of measured radius r px is taken to have when the image
#: carries no pixel size (not in the papers: a typical lymphocyte or tumour nucleus is 6-10 µm
#: across; this value puts EndoNuke-like nuclei at about the S-DRDIN model's 0.44 µm/px).
NUCLEUS_RADIUS_UM = 2.0
#: Blob radii searched (pixels of the image as given).
RADII_PX = tuple(np.geomspace(1.5, 48.0, 31).round(3).tolist())
#: Points sampled per estimate (the median settles well before this).
MAX_POINTS = 400


def nuclear_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density of the nuclear stains (haematoxylin + DAB) of an RGB image.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 (extra channels ignored)

    Returns
    -------
    (H, W) float32, >= 0 (OD units)
    """
    from skimage.color import rgb2hed

    hed = rgb2hed(np.asarray(rgb)[..., :3])
    return np.clip(hed[..., 0], 0, None).astype(np.float32) + np.clip(
        hed[..., 2], 0, None).astype(np.float32)


def _crops(od: np.ndarray, xy: np.ndarray, half: int) -> np.ndarray:
    """``(N, 2h+1, 2h+1)`` windows of ``od`` centred on the points (reflected at the edges)."""
    padded = np.pad(od, half, mode="reflect")
    c = np.rint(xy).astype(np.int64)
    c[:, 0] = np.clip(c[:, 0], 0, od.shape[1] - 1)
    c[:, 1] = np.clip(c[:, 1], 0, od.shape[0] - 1)
    size = 2 * half + 1
    rows = c[:, 1, None] + np.arange(size)[None, :]
    cols = c[:, 0, None] + np.arange(size)[None, :]
    return padded[rows[:, :, None], cols[:, None, :]]


def blob_response(images: Sequence[np.ndarray], points: Sequence[np.ndarray],
                  radii_px: Sequence[float] = RADII_PX, max_points: int = MAX_POINTS,
                  seed: int = 0) -> np.ndarray:
    """Median scale-normalised LoG response of the nuclear density at annotated points.

    Parameters
    ----------
    images : RGB images (H, W, 3) uint8
    points : one (N, 2) array of ``(x, y)`` pixels per image
    radii_px : blob radii (pixels) at which to measure; ``sigma = radius / √2``
    max_points : at most this many points (drawn at random, seeded) over all images

    Returns
    -------
    (len(radii_px),) float: the median response over points at each radius
    """
    pairs = [(i, j) for i, p in enumerate(points) for j in range(len(p))]
    if not pairs:
        raise QpcellError("no annotated points to measure the nuclei at")
    rng = np.random.default_rng(seed)
    if len(pairs) > max_points:
        pairs = [pairs[k] for k in np.sort(rng.choice(len(pairs), max_points, replace=False))]
    sigmas = np.asarray(radii_px, dtype=np.float64) / np.sqrt(2.0)
    # Large blobs are measured on block means of the crops (an odd block of about sigma / 2
    # px, centred on the point), so every scale costs about the same.
    blocks = [1 + 2 * int(s / 4) for s in sigmas]
    reaches = [max(1, int(round(s * np.sqrt(2.0) / 3))) for s in sigmas]
    spans = [int(np.ceil((np.ceil(3 * s) + r + d) / d)) for s, r, d in zip(sigmas, reaches,
                                                                           blocks, strict=True)]
    half = max(d // 2 + m * d for d, m in zip(blocks, spans, strict=True))
    stacks = []
    for i in sorted({i for i, _ in pairs}):
        sel = np.array([j for k, j in pairs if k == i])
        od = nuclear_density(images[i])
        stacks.append(_crops(od, np.asarray(points[i], dtype=np.float64)[sel], half))
    crops = np.concatenate(stacks).astype(np.float32)
    n = len(crops)
    responses = np.empty((len(sigmas), n))
    for k, (s, d, m, reach) in enumerate(zip(sigmas, blocks, spans, reaches, strict=True)):
        lo = half - d // 2 - m * d
        size = (2 * m + 1) * d
        sub = crops[:, lo:lo + size, lo:lo + size]
        sub = sub.reshape(n, 2 * m + 1, d, 2 * m + 1, d).mean(axis=(2, 4))
        sd = np.sqrt(max(s * s - (d * d - 1) / 12.0, 0.25)) / d
        # The Laplacian within each crop only (not across the stack of crops), normalised by
        # the scale in block units so that every scale compares.
        log = -(s / d) ** 2 * (
            ndimage.gaussian_filter(sub, (0, sd, sd), order=(0, 2, 0), mode="nearest")
            + ndimage.gaussian_filter(sub, (0, sd, sd), order=(0, 0, 2), mode="nearest"))
        # A point sits within a few pixels of its nucleus's centre: take the strongest
        # response within a third of the radius tried of the point.
        r = max(1, int(round(reach / d)))
        responses[k] = log[:, m - r:m + r + 1, m - r:m + r + 1].reshape(n, -1).max(axis=1)
    return np.median(responses, axis=1)


def nucleus_radius_px(images: Sequence[np.ndarray], points: Sequence[np.ndarray],
                      radii_px: Sequence[float] = RADII_PX, max_points: int = MAX_POINTS,
                      seed: int = 0) -> float:
    """Typical radius (pixels) of the nuclei at annotated points.

    The radius at which :func:`blob_response` peaks, refined by a parabola through the peak
    and its neighbours in log-radius.

    Examples
    --------
    >>> from qpcell.synthetic import render_image
    >>> rgb, xy, _ = render_image((128, 128), 2, seed=0)[:3]
    >>> 2.0 < nucleus_radius_px([rgb], [xy]) < 12.0
    True
    """
    curve = blob_response(images, points, radii_px, max_points, seed)
    logr = np.log(np.asarray(radii_px, dtype=np.float64))
    k = int(np.argmax(curve))
    if not np.isfinite(curve[k]) or curve[k] <= 0:
        raise QpcellError("no nucleus-like blobs at the annotated points: cannot estimate "
                          "the scale; pass --mpp")
    if 0 < k < len(curve) - 1:
        y0, y1, y2 = curve[k - 1:k + 2]
        denom = y0 - 2 * y1 + y2
        step = logr[k + 1] - logr[k]
        offset = 0.5 * (y0 - y2) / denom if denom < 0 else 0.0
        return float(np.exp(logr[k] + np.clip(offset, -0.5, 0.5) * step))
    return float(radii_px[k])


def estimate_mpp(images: Sequence[np.ndarray], points: Sequence[np.ndarray],
                 nucleus_radius_um: float = NUCLEUS_RADIUS_UM, **kwargs) -> tuple[float, float]:
    """Pixel size (µm/px) that gives the annotated nuclei ``nucleus_radius_um``.

    Returns
    -------
    mpp : µm/px; radius_px : the measured nucleus radius in pixels
    """
    radius = nucleus_radius_px(images, points, **kwargs)
    return nucleus_radius_um / radius, radius


__all__ = ["NUCLEUS_RADIUS_UM", "nuclear_density", "blob_response", "nucleus_radius_px",
           "estimate_mpp"]
