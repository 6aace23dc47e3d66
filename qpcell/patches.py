"""Training patches: window sampling and a seeded, augmenting torch ``Dataset``.

Pixels are at the training resolution (the caller rescales images, points and regions first).
Windows are given by their top-left corner ``(x0, y0)`` and cover the half-open box
``[x0, x0 + size) x [y0, y0 + size)`` of pixel indices.

Padding: a window that reaches past the image (only when the image is smaller than the window)
is filled with **white** (255), the colour of glass and of what ``Slide.read`` returns outside a
slide. Reflection would mirror cells that carry no label into the patch and teach the model
that they are background. The targets of the padded area are background: they are what the
target function returns for an image without points.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import shapely
import torch
from PIL import Image
from torch.utils.data import Dataset

from qpcell.config import MaskConfig, PatchConfig
from qpcell.errors import QpcellError
from qpcell.masks import sdrdin_targets

_PC = PatchConfig()
PAD_VALUE = 255  # white

TargetFn = Callable[..., dict[str, np.ndarray]]


def grid_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start offsets of windows of ``size`` every ``stride`` pixels along an axis of ``length``.

    The last window is flush with the end of the axis; an axis shorter than ``size`` gets one
    window at 0 (padded later).

    Examples
    --------
    >>> grid_starts(500, 224, 120)
    array([  0, 120, 240, 276])
    """
    if size <= 0 or stride <= 0:
        raise QpcellError(f"window size and stride must be positive, got {size}, {stride}")
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - size + 1, stride, dtype=np.int64)
    if starts[-1] != length - size:
        starts = np.append(starts, length - size)
    return starts


def count_points_in_windows(xy, x0, y0, size: int) -> np.ndarray:
    """Number of points in each window ``[x0, x0+size) x [y0, y0+size)`` (vectorised)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x0 = np.asarray(x0, dtype=np.int64)
    y0 = np.asarray(y0, dtype=np.int64)
    counts = np.zeros(x0.shape, dtype=np.int64)
    if xy.shape[0] == 0 or x0.size == 0:
        return counts
    order = np.argsort(xy[:, 0], kind="stable")
    xs, ys = xy[order, 0], xy[order, 1]
    for col in np.unique(x0):
        lo, hi = np.searchsorted(xs, [col, col + size], side="left")
        yc = np.sort(ys[lo:hi])
        sel = x0 == col
        counts[sel] = (np.searchsorted(yc, y0[sel] + size, side="left")
                       - np.searchsorted(yc, y0[sel], side="left"))
    return counts


def sample_windows(image_hw, xy, *, size: int = _PC.size, stride: int = _PC.stride,
                   regions=None, background_fraction: float = _PC.background_fraction,
                   rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Training windows of one image: a regular grid, kept where annotations are.

    Parameters
    ----------
    image_hw
        ``(H, W)`` of the image in pixels.
    xy
        ``(N, 2)`` annotated points ``(x, y)`` in pixels.
    size, stride
        Window side and grid step in pixels (S-DRDIN: 224 and 120). The last window of each
        row and column is flush with the image edge; an image smaller than ``size`` gets one
        window at 0, white-padded by :class:`PatchDataset`.
    regions
        Annotated regions (shapely geometries in pixels) or ``None`` for the whole image. Only
        windows whose area overlaps a region (more than touching its boundary) are kept.
    background_fraction
        Windows that contain no point are "background"; this share of them is kept
        (``round(fraction * n_background)`` chosen at random without replacement). 1 keeps all,
        0 none.
    rng
        ``numpy.random.Generator`` or seed for choosing background windows.

    Returns
    -------
    np.ndarray
        ``(K, 2)`` int64 ``(x0, y0)`` of the kept windows, row-major (by ``y0``, then ``x0``).
    """
    if not 0.0 <= background_fraction <= 1.0:
        raise QpcellError(f"background_fraction must be in [0, 1], got {background_fraction}")
    h, w = (int(s) for s in image_hw)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ys, xs = grid_starts(h, size, stride), grid_starts(w, size, stride)
    y0, x0 = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    if regions is not None:
        geoms = [g for g in (regions if isinstance(regions, Sequence) else [regions])
                 if g is not None and not g.is_empty]
        if not geoms:
            return np.zeros((0, 2), dtype=np.int64)
        union = shapely.union_all(geoms)
        shapely.prepare(union)
        boxes = shapely.box(x0, y0, x0 + size, y0 + size)
        keep = shapely.intersects(union, boxes) & ~shapely.touches(union, boxes)
        x0, y0 = x0[keep], y0[keep]
    has_point = count_points_in_windows(xy, x0, y0, size) > 0
    background = np.flatnonzero(~has_point)
    n_keep = int(np.floor(background_fraction * background.size + 0.5))
    chosen = rng.choice(background, size=n_keep, replace=False) if n_keep else background[:0]
    keep = has_point.copy()
    keep[chosen] = True
    return np.stack([x0[keep], y0[keep]], axis=1).astype(np.int64)


def rare_class_windows(windows: Sequence[tuple[int, int, int]],
                       points: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
                       size: int, *, share: float, repeats: int) -> list[tuple[int, int, int]]:
    """``windows`` plus ``repeats`` more copies of each window holding a rare-class point.

    Parameters
    ----------
    windows
        ``(image_index, x0, y0)`` training windows (pixels).
    points
        Per image, ``(xy (N, 2) pixels, labels (N,))``.
    n_classes, size
        Number of cell classes; window side in pixels.
    share, repeats
        A class is rare when it holds fewer than ``share`` of all the points (and at least
        one); windows with one of its points appear ``1 + repeats`` times.
    """
    counts = np.zeros(n_classes, np.int64)
    for _, labels in points:
        counts += np.bincount(np.asarray(labels, np.int64), minlength=n_classes)[:n_classes]
    rare = np.flatnonzero((counts > 0) & (counts < share * max(1, counts.sum())))
    out = list(windows)
    if repeats <= 0 or rare.size == 0:
        return out
    extra = []
    for i, x0, y0 in windows:
        xy, labels = points[i]
        sel = np.isin(np.asarray(labels), rare)
        if sel.any() and count_points_in_windows(np.asarray(xy)[sel], [x0], [y0], size)[0]:
            extra.append((i, x0, y0))
    return out + extra * int(repeats)


def cell_windows(image_hws: Sequence[tuple[int, int]], points: Sequence[tuple], n: int, *,
                 size: int, background_share: float = 0.1, class_balance: float = 0.0,
                 rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``n`` training windows, each centred near an annotated cell or (some) anywhere.

    The alternative to the S-DRDIN grid (:func:`sample_windows`): every window holds at least
    one annotated cell (cells fill more of each patch, so more of each gradient step is spent
    where the annotations are), the cell sits anywhere in the middle half of the window, and
    ``background_share`` of the windows are placed uniformly over the images instead, so that
    empty tissue is still seen.

    Parameters
    ----------
    image_hws
        ``(H, W)`` of each image, pixels.
    points
        ``(xy (N, 2), labels (N,))`` per image, pixels.
    n
        Windows to draw.
    size
        Window side, pixels.
    background_share
        Share of windows placed uniformly (image chosen by its area).
    class_balance
        A cell of class ``c`` is drawn with weight ``share_c ** -class_balance``: 0 draws every
        cell alike, 1 every class alike, 0.5 halfway (rare classes seen more often, on a log
        scale).
    rng
        Generator or seed.

    Returns
    -------
    (n, 3) int64 rows ``(image index, x0, y0)``, as :class:`PatchDataset` takes them.
    """
    if not 0.0 <= background_share <= 1.0:
        raise QpcellError(f"background_share must be in [0, 1], got {background_share}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    owner = np.concatenate([np.full(len(np.asarray(xy).reshape(-1, 2)), i, np.int64)
                            for i, (xy, _) in enumerate(points)] or [np.zeros(0, np.int64)])
    xy_all = np.concatenate([np.asarray(xy, np.float64).reshape(-1, 2) for xy, _ in points]
                            or [np.zeros((0, 2))])
    lab_all = np.concatenate([np.asarray(lab, np.int64).reshape(-1) for _, lab in points]
                             or [np.zeros(0, np.int64)])
    hw = np.asarray(image_hws, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((n, 3), dtype=np.int64)
    n_bg = int(rng.binomial(n, background_share)) if len(xy_all) else n
    if n_bg:
        area = (hw[:, 0] * hw[:, 1]).astype(np.float64)
        img = rng.choice(len(hw), size=n_bg, p=area / area.sum())
        out[:n_bg, 0] = img
        out[:n_bg, 1] = np.floor(rng.uniform(0, 1, n_bg) * np.maximum(hw[img, 1] - size + 1, 1))
        out[:n_bg, 2] = np.floor(rng.uniform(0, 1, n_bg) * np.maximum(hw[img, 0] - size + 1, 1))
    n_cell = n - n_bg
    if n_cell:
        counts = np.bincount(lab_all, minlength=int(lab_all.max()) + 1).astype(np.float64)
        weight = (counts[lab_all] / counts.sum()) ** -float(class_balance)
        pick = rng.choice(len(xy_all), size=n_cell, p=weight / weight.sum())
        img = owner[pick]
        shift = rng.uniform(size / 4, 3 * size / 4, (n_cell, 2))
        x0 = np.floor(xy_all[pick, 0] - shift[:, 0] + 0.5)
        y0 = np.floor(xy_all[pick, 1] - shift[:, 1] + 0.5)
        # Keep windows inside the image where it is large enough (no padding to learn from).
        x0 = np.clip(x0, 0, np.maximum(hw[img, 1] - size, 0))
        y0 = np.clip(y0, 0, np.maximum(hw[img, 0] - size, 0))
        out[n_bg:] = np.stack([img, x0, y0], axis=1)
    return out[rng.permutation(n)]


def stack_windows(per_image: Sequence[np.ndarray]) -> np.ndarray:
    """``(K, 3)`` int64 ``(image_index, x0, y0)`` from one ``(K_i, 2)`` array per image."""
    parts = [np.column_stack([np.full(len(w), i, dtype=np.int64), np.asarray(w, np.int64)])
             for i, w in enumerate(per_image) if len(w)]
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def _wants_rng(fn: Callable) -> bool:
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class PatchDataset(Dataset):
    """Patches and their targets, augmented with seeded flips (and optional 90° rotations).

    Parameters
    ----------
    images
        One ``(H, W, 3)`` uint8 array per image (extra channels are dropped).
    points
        One ``(xy (N, 2), labels (N,))`` pair per image, pixels of that image.
    windows
        ``(image_index, x0, y0)`` rows, e.g. from :func:`stack_windows`.
    n_classes
        Number of cell classes; needed by the default target function.
    size
        Patch side in pixels.
    radius_px
        Disc radius of the default target function.
    target_fn
        ``target_fn(xy_in_patch, labels, (h, w)) -> dict[str, (..., h, w) array]``; default
        :func:`qpcell.masks.sdrdin_targets` with ``n_classes`` and ``radius_px``. If it takes a
        keyword ``rng``, it receives the item's ``numpy.random.Generator`` so that random
        targets are reproducible too. Points near the patch (within ``margin_px``) are passed
        so that discs cut by the patch edge are drawn.
    extra_maps, extra_key
        Optional dense maps, one ``(K, H, W)`` float32 array per image, cropped like the image
        (zero outside it) and returned under ``targets[extra_key]``.
    flips, rotate90
        Random horizontal and vertical flips; random multiples of 90° (square patches only).
        The same transform is applied to the image and to every target.
    colour
        ``colour(rgb (size, size, 3) uint8, rng) -> uint8`` applied to the patch's pixels only
        (e.g. :func:`qpcell.augment.stain_jitter`); ``None`` leaves them as they are.
    scale_jitter
        ``j > 0`` reads each window at a random scale ``f`` between ``1 / (1 + j)`` and
        ``1 + j`` (log-uniform): a square of ``size / f`` pixels about the window's centre
        (moved inside the image where needed) is resized to ``size`` (bilinear) and the
        points move with it; the target discs keep their radius in patch pixels. A window
        whose image is smaller than that square is read at scale 1. 0 (the default) draws
        nothing, so items are exactly as without it.
    seed
        Augmentation seed. Item ``i`` in epoch ``e`` draws from
        ``np.random.default_rng([seed, e, i])``: the same in every worker process and every
        run; call :meth:`set_epoch` to vary it between epochs.
    margin_px
        How far outside the patch points are still passed to ``target_fn``.

    Items are ``(image (3, size, size) float32 in [0, 1], targets dict[str, Tensor])``.
    """

    def __init__(self, images: Sequence[np.ndarray], points: Sequence[tuple], windows, *,
                 n_classes: int | None = None, size: int = _PC.size,
                 radius_px: float = MaskConfig().disc_radius_px,
                 target_fn: TargetFn | None = None,
                 extra_maps: Sequence[np.ndarray] | None = None, extra_key: str = "prior",
                 flips: bool = _PC.flips, rotate90: bool = _PC.rotate90, seed: int = 0,
                 margin_px: float = 16.0,
                 colour: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
                 scale_jitter: float = _PC.scale_jitter) -> None:
        if len(images) != len(points):
            raise QpcellError(f"{len(images)} images but {len(points)} point sets")
        if target_fn is None:
            if n_classes is None:
                raise QpcellError("PatchDataset needs n_classes for the default S-DRDIN targets")
            n, r = int(n_classes), float(radius_px)

            def target_fn(xy, labels, shape):
                return sdrdin_targets(xy, labels, n, shape, r)
        if not scale_jitter >= 0:
            raise QpcellError(f"scale_jitter must be at least 0, got {scale_jitter}")
        if extra_maps is not None and len(extra_maps) != len(images):
            raise QpcellError(f"{len(images)} images but {len(extra_maps)} extra maps")
        self.images = list(images)
        for i, im in enumerate(self.images):
            if im.ndim != 3 or im.shape[2] < 3:
                raise QpcellError(f"image {i}: expected (H, W, 3) RGB, got shape {im.shape}")
        self.points = []
        for xy, labels in points:
            xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            order = np.argsort(xy[:, 0], kind="stable")
            self.points.append((xy[order], labels[order]))
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1, 3)
        if self.windows.size and (self.windows[:, 0].min() < 0
                                  or self.windows[:, 0].max() >= len(self.images)):
            raise QpcellError("a window refers to an image index that does not exist")
        self.size = int(size)
        self.target_fn = target_fn
        self._fn_rng = _wants_rng(target_fn)
        self.extra_maps = None if extra_maps is None else list(extra_maps)
        self.extra_key = extra_key
        self.flips = flips
        self.rotate90 = rotate90
        self.colour = colour
        self.scale_jitter = float(scale_jitter)
        self.seed = int(seed)
        self.epoch = 0
        self.margin_px = float(margin_px)

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of this epoch (call before creating the epoch's loader)."""
        self.epoch = int(epoch)

    def _points_near(self, i: int, x0: int, y0: int, x1: int, y1: int):
        xy, labels = self.points[i]
        m = self.margin_px
        lo, hi = np.searchsorted(xy[:, 0], [x0 - m, x1 + m])
        sel = np.arange(lo, hi)
        sel = sel[(xy[sel, 1] >= y0 - m) & (xy[sel, 1] < y1 + m)]
        return xy[sel], labels[sel]

    def _targets(self, xy, labels, shape, rng) -> dict[str, np.ndarray]:
        kw = {"rng": rng} if self._fn_rng else {}
        return self.target_fn(xy, labels, shape, **kw)

    def __getitem__(self, index: int):
        i, x0, y0 = (int(v) for v in self.windows[index])
        s = self.size
        image = self.images[i]
        h, w = image.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        scaled = self._scaled_read(i, x0, y0, rng) if self.scale_jitter > 0 else None
        if scaled is not None:
            patch, targets = scaled
            return self._augmented(patch, targets, rng)
        # The part of the window inside the image, in image and in patch coordinates.
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
        if ix1 <= ix0 or iy1 <= iy0:
            raise QpcellError(f"window ({x0}, {y0}) lies outside image {i} ({w} x {h})")
        px0, py0 = ix0 - x0, iy0 - y0
        inner = (slice(py0, py0 + iy1 - iy0), slice(px0, px0 + ix1 - ix0))
        patch = np.full((s, s, 3), PAD_VALUE, dtype=np.uint8)
        patch[inner] = image[iy0:iy1, ix0:ix1, :3]

        xy, labels = self._points_near(i, ix0, iy0, ix1, iy1)
        xy = xy - np.array([ix0, iy0], dtype=np.float64)
        if (ix1 - ix0, iy1 - iy0) == (s, s):
            targets = self._targets(xy, labels, (s, s), rng)
        else:  # padded edge patch: background everywhere, then the real part
            targets = self._targets(np.zeros((0, 2)), np.zeros(0, np.int64), (s, s), rng)
            part = self._targets(xy, labels, (iy1 - iy0, ix1 - ix0), rng)
            for k, v in part.items():
                targets[k] = np.array(targets[k], copy=True)
                targets[k][(..., *inner)] = v
        targets = dict(targets)
        if self.extra_maps is not None:
            m = self.extra_maps[i]
            crop = np.zeros((m.shape[0], s, s), dtype=np.float32)
            crop[(slice(None), *inner)] = m[:, iy0:iy1, ix0:ix1]
            targets[self.extra_key] = crop
        return self._augmented(patch, targets, rng)

    def _scaled_read(self, i: int, x0: int, y0: int, rng: np.random.Generator):
        """``(patch, targets)`` of window ``(x0, y0)`` of image ``i`` read at a random scale
        (see ``scale_jitter``), or None where the image is too small for the square."""
        s = self.size
        factor = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.scale_jitter)))
        src = max(1, int(round(s / factor)))
        image = self.images[i]
        h, w = image.shape[:2]
        if src > h or src > w:
            return None
        sx0 = int(np.clip(round(x0 + (s - src) / 2), 0, w - src))
        sy0 = int(np.clip(round(y0 + (s - src) / 2), 0, h - src))
        box = (slice(sy0, sy0 + src), slice(sx0, sx0 + src))
        patch = np.asarray(Image.fromarray(np.ascontiguousarray(image[box][..., :3]))
                           .resize((s, s), Image.BILINEAR))
        xy, labels = self._points_near(i, sx0, sy0, sx0 + src, sy0 + src)
        k = s / src  # patch pixels per image pixel; pixel centres sit at index + 0.5
        xy = (xy - np.array([sx0, sy0], dtype=np.float64) + 0.5) * k - 0.5
        targets = dict(self._targets(xy, labels, (s, s), rng))
        if self.extra_maps is not None:
            targets[self.extra_key] = np.stack([
                np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32))
                           .resize((s, s), Image.BILINEAR))
                for m in self.extra_maps[i][(slice(None), *box)]])
        return patch, targets

    def _augmented(self, patch: np.ndarray, targets: dict, rng: np.random.Generator):
        """The item: colour, flips and rotations of ``patch`` (and ``targets``), as tensors."""
        # Augmentation: arrays are (..., H, W) for targets and (H, W, 3) for the image.
        if self.colour is not None:
            patch = self.colour(patch, rng)
        img = patch.transpose(2, 0, 1)  # (3, H, W)
        arrays = {"__image__": img, **targets}
        if self.flips:
            if rng.random() < 0.5:
                arrays = {k: np.flip(v, axis=-1) for k, v in arrays.items()}
            if rng.random() < 0.5:
                arrays = {k: np.flip(v, axis=-2) for k, v in arrays.items()}
        if self.rotate90:
            k90 = int(rng.integers(4))
            if k90:
                arrays = {k: np.rot90(v, k90, axes=(-2, -1)) for k, v in arrays.items()}
        img = arrays.pop("__image__")
        x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
        out = {}
        for k, v in arrays.items():
            v = np.ascontiguousarray(v)
            if np.issubdtype(v.dtype, np.floating):
                v = v.astype(np.float32, copy=False)
            out[k] = torch.from_numpy(v)
        return x, out


__all__ = ["PAD_VALUE", "grid_starts", "count_points_in_windows", "sample_windows",
           "rare_class_windows", "cell_windows",
           "stack_windows", "PatchDataset"]
