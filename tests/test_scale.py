"""The working scale of images without a pixel size: the size of their annotated nuclei."""

import numpy as np
import pytest
from skimage.transform import rescale

from qpcell.errors import QpcellError
from qpcell.scale import NUCLEUS_RADIUS_UM, estimate_mpp, nucleus_radius_px
from qpcell.synthetic import render_image


def resample(rgb: np.ndarray, xy: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image ``factor`` times larger (bilinear) and its points, as a finer scan gives."""
    big = rescale(rgb, factor, order=1, channel_axis=-1, preserve_range=True)
    return np.clip(big + 0.5, 0, 255).astype(np.uint8), (xy + 0.5) * factor - 0.5


def images(n: int, shape=(192, 192), density: float = 1.0, radius: float = 4.5, seed: int = 0):
    out = [render_image(shape, 3, density=density, nucleus_radius_px=radius, rng=seed + i)
           for i in range(n)]
    return [o[0] for o in out], [o[1] for o in out]


@pytest.mark.parametrize("factor", [2.0, 3.0, 1.5])
def test_a_finer_scan_measures_proportionally_larger_nuclei(factor):
    rgbs, pts = images(3)
    base = nucleus_radius_px(rgbs, pts)
    big = [resample(r, p, factor) for r, p in zip(rgbs, pts, strict=True)]
    scaled = nucleus_radius_px([b[0] for b in big], [b[1] for b in big])
    assert scaled / base == pytest.approx(factor, rel=0.15)


def test_estimated_pixel_size_halves_for_a_twice_finer_scan():
    rgbs, pts = images(2)
    mpp1, r1 = estimate_mpp(rgbs, pts)
    big = [resample(r, p, 2.0) for r, p in zip(rgbs, pts, strict=True)]
    mpp2, r2 = estimate_mpp([b[0] for b in big], [b[1] for b in big])
    assert mpp1 == pytest.approx(NUCLEUS_RADIUS_UM / r1)
    assert mpp2 / mpp1 == pytest.approx(0.5, rel=0.15)


def test_blank_images_are_a_clear_error():
    blank = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(QpcellError, match="pass --mpp"):
        nucleus_radius_px([blank], [np.array([[32.0, 32.0]])])
    with pytest.raises(QpcellError, match="no annotated points"):
        nucleus_radius_px([blank], [np.zeros((0, 2))])


def test_endonuke_at_2x_and_3x_within_15_percent(endonuke_images):
    rgbs, pts = endonuke_images
    base = nucleus_radius_px(rgbs, pts)
    for factor in (2, 3):
        big = [resample(r, p, factor) for r, p in zip(rgbs, pts, strict=True)]
        assert nucleus_radius_px([b[0] for b in big], [b[1] for b in big]) / base == \
            pytest.approx(factor, rel=0.15)


def test_endonuke_sparse_and_dense_tiles_measure_alike(endonuke_images):
    """Spacing follows density; nucleus size must not: the sparsest and densest tiles of one
    scan give the same radius."""
    rgbs, pts = endonuke_images
    order = np.argsort([len(p) for p in pts])
    sparse = nucleus_radius_px([rgbs[i] for i in order[:15]], [pts[i] for i in order[:15]])
    dense = nucleus_radius_px([rgbs[i] for i in order[-15:]], [pts[i] for i in order[-15:]])
    assert np.mean([len(pts[i]) for i in order[-15:]]) > 2.5 * np.mean(
        [len(pts[i]) for i in order[:15]])
    assert dense / sparse == pytest.approx(1.0, rel=0.1)


@pytest.fixture
def endonuke_images():
    import os
    from pathlib import Path

    from PIL import Image

    from qpcell.io.project import natural_key

    root = Path(os.environ.get("QPCELL_DATA", Path(__file__).resolve().parents[2] / "shared"
                               / "data")) / "endonuke"
    if not (root / "labels").is_dir():
        pytest.skip(f"EndoNuke is not at {root}")
    stems = sorted((p.stem for p in (root / "labels").glob("*.txt")), key=natural_key)[:60]
    rgbs = [np.asarray(Image.open(root / "images" / f"{s}.png").convert("RGB")) for s in stems]
    pts = [np.loadtxt(root / "labels" / f"{s}.txt", ndmin=2)[:, :2] for s in stems]
    return rgbs, pts
