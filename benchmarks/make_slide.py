"""Write a big pyramidal OME-TIFF tiled from real pixels, for speed and memory benchmarks.

The image is a mosaic of EndoNuke tiles (200 x 200 px RGB(A) PNGs, ``../shared/data``), each
placed with a pseudo-random choice of tile and one of the 8 flips/rotations, at a stated pixel
size (default 0.44 µm/px, the S-DRDIN scale). The file is JPEG-compressed, tiled 256 x 256,
with a pyramid (sub-IFDs, each level half the previous) down to about 1,000 px, and carries
its pixel size in OME metadata, so ``qpcell.io.slides.open_slide`` reads it like a scanner's
slide. Real third-party pixels: write it under a git-ignored folder (``.cache/`` or ``/tmp``),
never into the repository.

``--period`` repeats the mosaic every ``period`` px (a multiple of 200): identical TIFF tiles
are then encoded once, so a 60,000 px slide takes seconds, not minutes.

Example::

    .venv/bin/python benchmarks/make_slide.py --size 20000 --out .cache/bench/endonuke-20k.ome.tif
    .venv/bin/python benchmarks/make_slide.py --size 60000 --period 12800 \
        --out .cache/bench/endonuke-60k.ome.tif
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CELL = 200  # EndoNuke tile side (px)
TILE = 256  # TIFF tile side (px)
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_tiles(folder: Path) -> np.ndarray:
    """``(N, 200, 200, 3)`` uint8 RGB of every PNG in ``folder`` (alpha composited on white)."""
    from PIL import Image

    tiles = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        if rgba.shape[:2] != (CELL, CELL):
            continue
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        tiles.append(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    if not tiles:
        raise SystemExit(f"no {CELL} x {CELL} PNG tiles in {folder}")
    return np.stack(tiles)


class Mosaic:
    """A virtual image of ``size`` x ``size`` px made of 200 px cells of real pixels.

    Cell ``(i, j)`` shows tile ``hash(i, j) % N`` under one of the 8 dihedral transforms;
    with ``period`` (px, a multiple of 200) the cell indices wrap, so the image repeats.
    """

    def __init__(self, tiles: np.ndarray, size: int, period: int = 0, seed: int = 0) -> None:
        if period % CELL:
            raise SystemExit(f"--period must be a multiple of {CELL}")
        self.size, self.period = int(size), int(period)
        # the 8 orientations of every tile, precomputed: (N, 8, 200, 200, 3)
        self.variants = np.stack([np.stack([np.rot90(t if k < 4 else t[:, ::-1], k % 4)
                                            for k in range(8)]) for t in tiles])
        n_cells = -(-self.size // CELL) if not period else period // CELL
        rng = np.random.default_rng(seed)
        self.choice = rng.integers(0, len(tiles), size=(n_cells, n_cells))
        self.orient = rng.integers(0, 8, size=(n_cells, n_cells))

    def region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels ``[x0, x0+w) x [y0, y0+h)``; white beyond the image."""
        out = np.full((h, w, 3), 255, np.uint8)
        n = self.choice.shape[0]
        for ci in range(y0 // CELL, (min(y0 + h, self.size) - 1) // CELL + 1):
            for cj in range(x0 // CELL, (min(x0 + w, self.size) - 1) // CELL + 1):
                ty0, tx0 = ci * CELL, cj * CELL
                ya, yb = max(y0, ty0), min(y0 + h, ty0 + CELL, self.size)
                xa, xb = max(x0, tx0), min(x0 + w, tx0 + CELL, self.size)
                if ya >= yb or xa >= xb:
                    continue
                a, b = ci % n, cj % n
                src = self.variants[self.choice[a, b], self.orient[a, b]]
                out[ya - y0:yb - y0, xa - x0:xb - x0] = src[ya - ty0:yb - ty0, xa - tx0:xb - tx0]
        return out

    def level_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """TIFF tile ``(tx, ty)`` of pyramid ``level`` (2**level block means of level 0)."""
        f = 2 ** level
        a = self.region(tx * TILE * f, ty * TILE * f, TILE * f, TILE * f)
        if f == 1:
            return a
        m = a.reshape(TILE, f, TILE, f, 3).mean(axis=(1, 3), dtype=np.float32)
        return np.rint(m).astype(np.uint8)


def _encoded_tiles(mosaic: Mosaic, level: int, quality: int) -> Iterator[bytes]:
    """JPEG bytes of every tile of ``level`` in row-major order (repeats encoded once)."""
    from imagecodecs import jpeg8_encode

    side = -(-mosaic.size // 2 ** level)
    n = -(-side // TILE)
    period = mosaic.period // 2 ** level if mosaic.period else 0
    cache: dict[tuple[int, int], bytes] = {}
    for ty in range(n):
        for tx in range(n):
            # tiles cut by the image's edge are never repeats: they are white beyond it
            edge = (tx + 1) * TILE > side or (ty + 1) * TILE > side
            key = ((tx * TILE) % period, (ty * TILE) % period) if period and not edge else None
            if key is not None and key in cache:
                yield cache[key]
                continue
            tile = mosaic.level_tile(level, tx, ty)
            if edge:  # pixels past the level's edge: white (JPEG tiles are always full size)
                tile[max(0, side - ty * TILE):] = 255
                tile[:, max(0, side - tx * TILE):] = 255
            data = jpeg8_encode(tile, level=quality)
            if key is not None:
                cache[key] = data
            yield data


def write_slide(out: Path, mosaic: Mosaic, mpp: float, quality: int = 90,
                min_side: int = 1000) -> Path:
    """Write ``mosaic`` as a tiled, JPEG-compressed, pyramidal OME-TIFF at ``mpp`` µm/px."""
    import tifffile

    levels = 1
    while -(-mosaic.size // 2 ** levels) >= min_side:
        levels += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    opts = {"tile": (TILE, TILE), "compression": "jpeg", "photometric": "rgb",
            "dtype": np.uint8}
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for level in range(levels):
            side = -(-mosaic.size // 2 ** level)
            kw = {"subifds": levels - 1, "metadata": meta} if level == 0 else {
                "subfiletype": 1, "metadata": None}
            tif.write(_encoded_tiles(mosaic, level, quality), shape=(side, side, 3), **opts,
                      **kw)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="side in px (default 20000)")
    ap.add_argument("--out", type=Path, default=Path(".cache/bench/endonuke-20k.ome.tif"))
    ap.add_argument("--images", type=Path, default=None,
                    help="folder of 200 x 200 PNG tiles (default: $QPCELL_DATA or "
                         "../shared/data, endonuke/images)")
    ap.add_argument("--mpp", type=float, default=0.44, help="pixel size in µm (default 0.44)")
    ap.add_argument("--period", type=int, default=0,
                    help="repeat the mosaic every PERIOD px (multiple of 200; 0 = never)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    images = args.images or (Path(os.environ.get("QPCELL_DATA", DEFAULT_DATA))
                             / "endonuke" / "images")
    t0 = time.perf_counter()
    mosaic = Mosaic(load_tiles(images), args.size, args.period, args.seed)
    write_slide(args.out, mosaic, args.mpp, args.quality)
    mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out}: {args.size} x {args.size} px at {args.mpp} µm/px, {mb:.0f} MB, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
