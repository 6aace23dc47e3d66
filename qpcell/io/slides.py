"""Pixels: PNG / JPEG / TIFF images and pyramidal whole slides, read at a chosen µm per pixel.

One class, :class:`Slide`, hides the file format. Coordinates are QuPath's: ``(x, y)`` in
full-resolution pixels of the image *after* the ``openslide.bounds-*`` crop that QuPath applies
to slides that carry one (the offset is added back when pixels are read).

Geometry of a resampled read
----------------------------
A read at pixel size ``mpp`` uses the *scale* ``s = mpp / slide.mpp`` (full-resolution pixels per
output pixel). Output pixel ``(i, j)`` covers the full-resolution square
``[x + j·s, x + (j+1)·s) × [y + i·s, y + (i+1)·s)`` (continuous coordinates, pixel ``k`` spanning
``[k, k+1)``), so its centre is at the full-resolution *index* coordinate
``(x + (j + 0.5)·s − 0.5, y + (i + 0.5)·s − 0.5)``; :func:`to_full_res` and
:func:`from_full_res` convert between the two grids. Pixels are taken from the coarsest pyramid
level that is still at least as fine as ``mpp``, blurred with a Gaussian of σ = (r − 1)/2 level
pixels (``r`` = the remaining downsample, as scikit-image's anti-aliasing) and linearly
interpolated. Every output pixel depends only on its own neighbourhood, so reading a region in
tiles gives exactly the pixels of one big read (:meth:`Slide.read_grid`).

Example
-------
>>> with open_slide("slide.svs") as slide:                       # doctest: +SKIP
...     tile = slide.read(1000, 2000, 512, 512, mpp=0.44)
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

from qpcell.errors import QpcellError

#: Pixel sizes outside this range (µm/px) are treated as missing (e.g. "72 dpi" TIFF tags).
MPP_RANGE = (0.02, 20.0)
#: Largest region (level pixels) decoded at once; bigger reads are done block by block.
_BLOCK = 4096
_PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".qptiff",
                  ".ndpi", ".scn", ".bif")


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------

def to_full_res(coord: np.ndarray | float, scale: float, origin: float = 0.0):
    """Full-resolution index coordinate of output-grid coordinate ``coord``.

    ``scale`` = full-resolution pixels per output pixel; ``origin`` = full-resolution
    (continuous) coordinate of the output grid's left/top edge.
    """
    return origin + (np.asarray(coord, dtype=np.float64) + 0.5) * scale - 0.5


def from_full_res(coord: np.ndarray | float, scale: float, origin: float = 0.0):
    """Inverse of :func:`to_full_res`: output-grid coordinate of a full-resolution one."""
    return (np.asarray(coord, dtype=np.float64) + 0.5 - origin) / scale - 0.5


def sane_mpp(value) -> float | None:
    """``value`` as a float when it is a plausible microscope pixel size in µm, else ``None``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1] else None


# --------------------------------------------------------------------------------------------
# pixel value normalisation
# --------------------------------------------------------------------------------------------

def _value_scale(arr: np.ndarray) -> float:
    """Factor mapping this image's values onto 0-255 (chosen once per image from a sample)."""
    if arr.dtype == np.uint8 or arr.dtype == bool:
        return 1.0
    if np.issubdtype(arr.dtype, np.floating):
        m = float(np.nanmax(arr)) if arr.size else 1.0
        return 255.0 if m <= 1.0 else 1.0
    m = int(arr.max()) if arr.size else 0
    if m <= 255:
        return 1.0
    for bits in (10, 12, 14, 16, 32):
        if m < 2 ** bits:
            return 255.0 / (2 ** bits - 1)
    return 255.0 / float(m)


def _to_rgb8(arr: np.ndarray, value_scale: float = 1.0) -> np.ndarray:
    """Any (H,W), (H,W,1..4) array -> (H,W,3) uint8 RGB; alpha composited on white."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    c = arr.shape[2]
    if arr.dtype == np.uint8 and c == 3:
        return np.ascontiguousarray(arr)
    a = arr.astype(np.float32)
    if value_scale != 1.0:
        a = a * np.float32(value_scale)
    a = np.nan_to_num(a, nan=255.0)
    if c in (2, 4):  # gray+alpha or RGBA: composite over white
        alpha = np.clip(a[:, :, -1:] / 255.0, 0.0, 1.0)
        a = a[:, :, :-1] * alpha + 255.0 * (1.0 - alpha)
        c -= 1
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c > 3:
        a = a[:, :, :3]
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# backends: level dimensions + raw in-bounds level reads
# --------------------------------------------------------------------------------------------

class _Backend(Protocol):
    level_dims: list[tuple[int, int]]  # (width, height) of each pyramid level

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 pixels of level ``level``, region fully inside the level."""

    def close(self) -> None: ...


def check_pixels(arr: np.ndarray, path: str | Path | None) -> None:
    """Refuse pixels qpcell would silently turn into a blank or wrong picture.

    Models see RGB brightfield: an image with more than 4 channels (multiplex fluorescence,
    a stack read the wrong way round) has no RGB view qpcell could choose for the user, and
    an image whose alpha is 0 everywhere composites to plain white (no cells).

    Raises
    ------
    QpcellError
        Naming ``path``.
    """
    channels = arr.shape[2] if arr.ndim == 3 else 1
    if channels > 4:
        raise QpcellError(f"has {channels} channels; qpcell reads RGB brightfield images (3 "
                          "channels, or 4 with transparency): export an RGB image of the "
                          "channels to use (QuPath: File > Export images, 'Rendered RGB')",
                          path)
    if channels in (2, 4) and arr.size and not np.any(arr[..., -1]):
        raise QpcellError("every pixel is fully transparent (alpha 0), so the image is "
                          "blank to qpcell; save it without the alpha channel", path)


class _ArrayBackend:
    """One in-memory image (PNG, JPEG, strip TIFF)."""

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
            raise QpcellError(f"expected an image array (H, W[, C]), got shape {array.shape}")
        self.array = _to_rgb8(array, _value_scale(array))
        self.level_dims = [(self.array.shape[1], self.array.shape[0])]

    def read_level(self, level, x, y, w, h):
        return self.array[y:y + h, x:x + w]

    def close(self) -> None:
        pass


class _TiffSlideBackend:
    """Pyramidal / tiled TIFF through tiffslide; reads in level coordinates."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        class _LevelCoords(tiffslide.TiffSlide):
            # tiffslide's documented hook: interpret read_region's location in the level's own
            # pixels, so no level-0 -> level rounding can shift a read by one pixel.
            def _read_region_loc_transform(self, location, level):
                return int(location[0]), int(location[1])

        self.ts = _LevelCoords(str(path))
        self.level_dims = [tuple(int(v) for v in d) for d in self.ts.level_dimensions]
        self.properties: dict = dict(self.ts.properties)
        self.ome_xml: str | None = None
        try:
            tf = self.ts.ts_tifffile
            if tf.is_ome:
                self.ome_xml = tf.ome_metadata
        except Exception:  # noqa: BLE001 - metadata only; pixels still readable
            pass
        # value scale from the smallest level (16-bit scans and the like)
        lw, lh = self.level_dims[-1]
        sample = self._raw(len(self.level_dims) - 1, 0, 0, min(lw, 2048), min(lh, 2048))
        check_pixels(sample, path)
        self.value_scale = _value_scale(sample)

    def _raw(self, level, x, y, w, h):
        return np.asarray(self.ts.read_region((x, y), level, (w, h), as_array=True,
                                              padding=False))

    def read_level(self, level, x, y, w, h):
        return _to_rgb8(self._raw(level, x, y, w, h), self.value_scale)

    def close(self) -> None:
        self.ts.close()


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------

_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
              "Å": 1e-4, "pm": 1e-6}


def _ome_mpp(xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, in µm."""
    if not xml:
        return None
    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not m:
        return None
    tag = m.group(0)
    size = re.search(r'PhysicalSizeX="([^"]+)"', tag)
    if not size:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tag)
    factor = _OME_UNITS.get(unit.group(1) if unit else "µm")
    if factor is None:
        return None
    try:
        return sane_mpp(float(size.group(1)) * factor)
    except ValueError:
        return None


def _prop(props: Mapping, *names: str):
    for name in names:
        v = props.get(name)
        if v is not None and v != "":
            return v
    return None


def _props_mpp(props: Mapping) -> float | None:
    mx = sane_mpp(_prop(props, "openslide.mpp-x", "tiffslide.mpp-x"))
    my = sane_mpp(_prop(props, "openslide.mpp-y", "tiffslide.mpp-y"))
    if mx is None:
        return my
    if my is not None and abs(mx - my) > 0.02 * mx:
        warnings.warn(f"pixel is not square ({mx} x {my} µm); using the mean", stacklevel=3)
        return (mx + my) / 2
    return mx


def _props_bounds(props: Mapping, width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the ``bounds-*`` rectangle, or the whole level 0."""
    def num(name):
        v = _prop(props, f"openslide.bounds-{name}", f"tiffslide.bounds-{name}")
        try:
            return None if v is None else int(round(float(v)))
        except (TypeError, ValueError):
            return None

    bx, by = num("x") or 0, num("y") or 0
    bw, bh = num("width"), num("height")
    bw = width - bx if bw is None else bw
    bh = height - by if bh is None else bh
    if not (0 <= bx < width and 0 <= by < height and 0 < bw and 0 < bh):
        return 0, 0, width, height
    return bx, by, min(bw, width - bx), min(bh, height - by)


def _pil_mpp(info: Mapping) -> float | None:
    dpi = info.get("dpi")
    try:
        return sane_mpp(25400.0 / float(dpi[0])) if dpi else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


# --------------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------------

class Slide:
    """An image or whole slide, read in QuPath's full-resolution pixel coordinates.

    Build one with :func:`open_slide` (files) or :meth:`Slide.from_array` (arrays).

    Attributes
    ----------
    path
        The file, or ``None`` for an in-memory image.
    width, height
        Size in QuPath's full-resolution pixels (after the ``openslide.bounds-*`` crop).
    mpp
        Pixel size in µm/px (the ``mpp`` argument, else the file's, else ``None``).
    mpp_source
        ``"argument"``, ``"file"`` or ``None``.
    offset
        ``(x, y)`` of QuPath's (0, 0) in the file's level-0 pixels (the bounds offset).
    properties
        The file's metadata (tiffslide properties, PIL info) as a dict.
    """

    def __init__(self, backend: _Backend, *, properties: Mapping | None = None,
                 mpp: float | None = None, file_mpp: float | None = None,
                 path: str | Path | None = None) -> None:
        self._backend = backend
        self.path = None if path is None else Path(path)
        self.properties = dict(properties or {})
        self.level_dims = list(backend.level_dims)
        w0, h0 = self.level_dims[0]
        bx, by, bw, bh = _props_bounds(self.properties, w0, h0)
        self.offset = (bx, by)
        self.width, self.height = bw, bh
        if mpp is not None:
            m = float(mpp)
            if not (math.isfinite(m) and m > 0):
                raise QpcellError(f"pixel size {mpp!r} µm is not positive", self.path)
            self.mpp, self.mpp_source = m, "argument"
        else:
            m = file_mpp if file_mpp is not None else _props_mpp(self.properties)
            self.mpp, self.mpp_source = (m, "file") if m is not None else (None, None)
        # per-axis downsample of each level, from the level sizes themselves
        self._ds = [(w0 / w, h0 / h) for w, h in self.level_dims]

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_array(cls, array: np.ndarray, *, mpp: float | None = None,
                   properties: Mapping | None = None, name: str | None = None) -> Slide:
        """A slide over an in-memory image (any dtype / channel count, as :func:`open_slide`).

        ``properties`` may carry ``openslide.bounds-x/-y/-width/-height`` (to test offsets).
        """
        return cls(_ArrayBackend(array), properties=properties, mpp=mpp, path=name)

    def assume_mpp(self, mpp: float | None, source: str = "assumed") -> bool:
        """Take ``mpp`` (µm/px) as the pixel size when the slide has none; True if it did."""
        if self.mpp is not None or mpp is None:
            return False
        self.mpp, self.mpp_source = float(mpp), source
        return True

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({self.path}, {self.width}x{self.height}, mpp={self.mpp}, "
                f"levels={len(self.level_dims)}, offset={self.offset})")

    # geometry -------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dims)

    def scale_for(self, mpp: float | None) -> float:
        """Full-resolution pixels per output pixel at ``mpp`` (1.0 when ``mpp`` is None)."""
        if mpp is None:
            return 1.0
        if self.mpp is None:
            raise QpcellError("the image's pixel size is unknown; pass its µm per pixel (mpp)",
                              self.path)
        if not (math.isfinite(mpp) and mpp > 0):
            raise QpcellError(f"pixel size {mpp!r} µm is not positive", self.path)
        return float(mpp) / self.mpp

    def grid_size(self, mpp: float | None) -> tuple[int, int]:
        """(width, height) of the whole image on the output grid at ``mpp``."""
        s = self.scale_for(mpp)
        return max(1, round(self.width / s)), max(1, round(self.height / s))

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample is at most ``scale`` (0.1% tolerance)."""
        best = 0
        for lvl, (dx, dy) in enumerate(self._ds):
            if max(dx, dy) <= scale * 1.001 and max(dx, dy) >= max(self._ds[best]):
                best = lvl
        return best

    # reading --------------------------------------------------------------------------------
    def read(self, x: float, y: float, w: float, h: float, *, mpp: float | None = None
             ) -> np.ndarray:
        """RGB uint8 pixels of the region ``(x, y, w, h)`` (full-resolution px) at ``mpp``.

        The result has ``round(h / s)`` rows and ``round(w / s)`` columns
        (``s = mpp / self.mpp``; ``mpp=None`` reads full resolution). Outside the image: white.
        """
        s = self.scale_for(mpp)
        ow, oh = max(1, round(w / s)), max(1, round(h / s))
        cx = x + (np.arange(ow) + 0.5) * s
        cy = y + (np.arange(oh) + 0.5) * s
        return self._sample(cx, cy, s)

    def read_grid(self, col: int, row: int, w: int, h: int, *, mpp: float | None = None
                  ) -> np.ndarray:
        """Pixels ``[col, col+w) × [row, row+h)`` of the image's own grid at ``mpp``.

        The grid is anchored at the image's (0, 0); grid pixel ``(r, c)`` is centred on the
        full-resolution index coordinate ``((c + 0.5)·s − 0.5, (r + 0.5)·s − 0.5)``. Reading a
        big grid region in tiles gives bit-for-bit the pixels of one read.
        """
        s = self.scale_for(mpp)
        cx = (np.arange(col, col + int(w)) + 0.5) * s
        cy = (np.arange(row, row + int(h)) + 0.5) * s
        return self._sample(cx, cy, s)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """The whole image, longest side at most ``max_size`` px (never enlarged).

        Returns ``(array, scale)`` with ``scale`` = thumbnail pixels per full-resolution pixel
        (multiply a full-resolution coordinate by ``scale`` to land on the thumbnail).
        """
        s = max(1.0, max(self.width, self.height) / float(max_size))
        ow, oh = max(1, round(self.width / s)), max(1, round(self.height / s))
        cx = (np.arange(ow) + 0.5) * s
        cy = (np.arange(oh) + 0.5) * s
        return self._sample(cx, cy, s), 1.0 / s

    def full_image(self) -> np.ndarray:
        """The whole image at full resolution (small images only)."""
        return self.read(0, 0, self.width, self.height)

    # internals ------------------------------------------------------------------------------
    def _level_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level pixels [x0, x1) × [y0, y1), white outside the (bounds-cropped) image."""
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        dx, dy = self._ds[level]
        lw, lh = self.level_dims[level]
        ox, oy = self.offset
        # the image rectangle in this level's pixels
        ix0 = max(0, math.floor(ox / dx + 1e-9))
        iy0 = max(0, math.floor(oy / dy + 1e-9))
        ix1 = min(lw, math.ceil((ox + self.width) / dx - 1e-9))
        iy1 = min(lh, math.ceil((oy + self.height) / dy - 1e-9))
        rx0, ry0, rx1, ry1 = max(x0, ix0), max(y0, iy0), min(x1, ix1), min(y1, iy1)
        if rx1 > rx0 and ry1 > ry0:
            px = self._backend.read_level(level, rx0, ry0, rx1 - rx0, ry1 - ry0)
            out[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] = px
        return out

    def _sample(self, cx: np.ndarray, cy: np.ndarray, s: float) -> np.ndarray:
        """Output pixels centred on continuous full-res coords ``cx`` (columns) × ``cy`` (rows)."""
        ox, oy = self.offset
        level = self.best_level(s)
        dx, dy = self._ds[level]
        # level index coordinates of every output centre
        lx = (cx + ox) / dx - 0.5
        ly = (cy + oy) / dy - 0.5
        rx, ry = s / dx, s / dy
        exact_x = abs(rx - 1.0) < 1e-9 and np.all(lx == np.round(lx))
        exact_y = abs(ry - 1.0) < 1e-9 and np.all(ly == np.round(ly))
        if exact_x and exact_y and len(lx) and len(ly):
            # no resampling: a straight copy of level pixels (pixel-exact)
            x0, y0 = int(round(lx[0])), int(round(ly[0]))
            return self._level_region(level, x0, y0, x0 + len(lx), y0 + len(ly))
        # a big remaining downsample is first reduced by whole-pixel block means (aligned to
        # the level's own grid, so tiles still agree exactly), then blurred and interpolated
        kx = int(rx // 2) if rx >= 4 else 1
        ky = int(ry // 2) if ry >= 4 else 1
        sig_x, sig_y = max(0.0, (rx / kx - 1) / 2), max(0.0, (ry / ky - 1) / 2)
        mx, my = int(4.0 * sig_x + 0.5) + 1, int(4.0 * sig_y + 0.5) + 1
        out = np.empty((len(ly), len(lx), 3), dtype=np.uint8)
        # output blocks whose level footprint stays near _BLOCK px a side
        bw = max(1, int(_BLOCK / max(rx, 1.0)) - 2 * mx - 2)
        bh = max(1, int(_BLOCK / max(ry, 1.0)) - 2 * my - 2)
        for j0 in range(0, len(ly), bh):
            yy = ly[j0:j0 + bh]
            for i0 in range(0, len(lx), bw):
                xx = lx[i0:i0 + bw]
                out[j0:j0 + len(yy), i0:i0 + len(xx)] = self._resample_block(
                    level, xx, yy, (kx, ky), (sig_x, sig_y), (mx, my))
        return out

    def _resample_block(self, level, lx, ly, k, sigma, margin) -> np.ndarray:
        """Level index coords ``lx`` x ``ly`` -> pixels: block means by ``k``, Gaussian blur
        ``sigma`` and linear interpolation, on a crop ``margin`` (reduced) px wider."""
        (kx, ky), (sig_x, sig_y), (mx, my) = k, sigma, margin
        ux = (lx - (kx - 1) / 2) / kx  # coordinates on the block-reduced grid
        uy = (ly - (ky - 1) / 2) / ky
        u0, v0 = math.floor(ux.min()) - mx, math.floor(uy.min()) - my
        u1, v1 = math.floor(ux.max()) + 2 + mx, math.floor(uy.max()) + 2 + my
        a = self._level_region(level, u0 * kx, v0 * ky, u1 * kx, v1 * ky).astype(np.float32)
        if kx > 1 or ky > 1:
            a = a.reshape(v1 - v0, ky, u1 - u0, kx, 3).mean(axis=(1, 3), dtype=np.float32)
        if sig_x > 0 or sig_y > 0:
            a = ndimage.gaussian_filter(a, sigma=(sig_y, sig_x, 0), mode="nearest", truncate=4.0)
        # separable linear interpolation
        fx = ux - u0
        ix = np.clip(np.floor(fx).astype(np.int64), 0, a.shape[1] - 2)
        wx = (fx - ix).astype(np.float32)[None, :, None]
        a = a[:, ix] * (1 - wx) + a[:, ix + 1] * wx
        fy = uy - v0
        iy = np.clip(np.floor(fy).astype(np.int64), 0, a.shape[0] - 2)
        wy = (fy - iy).astype(np.float32)[:, None, None]
        a = a[iy] * (1 - wy) + a[iy + 1] * wy
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# opening files
# --------------------------------------------------------------------------------------------

def _open_pil(path: Path, mpp: float | None) -> Slide:
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the user's own scan, not an untrusted download
    try:
        with Image.open(path) as im:
            im.load()
            info = dict(im.info)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            elif im.mode == "1":
                im = im.convert("L")
            arr = np.asarray(im)
    except OSError as err:
        raise QpcellError(f"cannot read the image: {err}", path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if im.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    check_pixels(arr, path)
    props = {k: v for k, v in info.items() if isinstance(v, str | int | float | tuple)}
    return Slide(_ArrayBackend(arr), properties=props, mpp=mpp, file_mpp=_pil_mpp(info),
                 path=path)


def _tiff_tag_mpp(page) -> float | None:
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        num, den = page.tags["XResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    if not num or not den:
        return None
    factor = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    return None if factor is None else sane_mpp(factor * den / num)


def _open_tifffile(path: Path, mpp: float | None) -> Slide:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        arr = series.asarray()
        file_mpp = _ome_mpp(tf.ome_metadata) if tf.is_ome else None
        if file_mpp is None:
            file_mpp = _tiff_tag_mpp(tf.pages[0])
        axes = series.axes
    arr = np.squeeze(arr)
    # planes first (CYX, or QYX where tifffile cannot tell): a small first axis is channels
    if arr.ndim == 3 and axes.endswith("YX") and arr.shape[0] < min(arr.shape[1:]) and \
            arr.shape[0] <= 64:
        arr = np.moveaxis(arr, 0, -1)  # CYX -> YXC
    if arr.ndim == 4:  # e.g. Z or T stacks: first plane
        arr = arr[0]
    check_pixels(arr, path)
    return Slide(_ArrayBackend(arr), mpp=mpp, file_mpp=file_mpp, path=path)


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open an image or whole slide for reading.

    Parameters
    ----------
    path
        PNG / JPEG / BMP (read whole into memory), or TIFF-family files: Aperio SVS, generic
        tiled / pyramidal TIFF, OME-TIFF (read lazily through tiffslide; plain strip TIFFs it
        cannot handle are read whole with tifffile).
    mpp
        Pixel size in µm/px; overrides the file's value when given.

    Returns
    -------
    Slide
        A context manager; close it (or use ``with``) to release the file.

    Raises
    ------
    QpcellError
        The file is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise QpcellError("image file not found", path)
    name = path.name.lower()
    if name.endswith(_TIFF_SUFFIXES):
        try:
            backend = _TiffSlideBackend(path)
        except QpcellError:
            raise
        except Exception as first:  # noqa: BLE001 - fall back to tifffile, then report
            try:
                return _open_tifffile(path, mpp)
            except QpcellError:
                raise
            except Exception as err:  # noqa: BLE001
                raise QpcellError(f"cannot read the image ({type(first).__name__}: {first}; "
                                  f"{type(err).__name__}: {err})", path) from None
        props = backend.properties
        file_mpp = _ome_mpp(backend.ome_xml) or _props_mpp(props)
        return Slide(backend, properties=props, mpp=mpp, file_mpp=file_mpp, path=path)
    if name.endswith(_PLAIN_SUFFIXES):
        return _open_pil(path, mpp)
    raise QpcellError("not an image format qpcell reads (PNG, JPEG, TIFF, SVS, OME-TIFF); "
                      "convert it to OME-TIFF first (e.g. QuPath: File > Export images)", path)


__all__ = ["Slide", "open_slide", "check_pixels", "to_full_res", "from_full_res", "sane_mpp",
           "MPP_RANGE"]
