"""Window sampling and the patch dataset: exact windows, crops, padding and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely.geometry import box

from qpcell.errors import QpcellError
from qpcell.masks import circle_masks
from qpcell.patches import (
    PAD_VALUE,
    PatchDataset,
    count_points_in_windows,
    grid_starts,
    sample_windows,
    stack_windows,
)


def test_grid_starts():
    np.testing.assert_array_equal(grid_starts(500, 224, 120), [0, 120, 240, 276])
    np.testing.assert_array_equal(grid_starts(344, 224, 120), [0, 120])
    np.testing.assert_array_equal(grid_starts(224, 224, 120), [0])
    np.testing.assert_array_equal(grid_starts(100, 224, 120), [0])


def test_count_points_half_open():
    xy = np.array([[0.0, 0.0], [9.99, 5.0], [10.0, 5.0]])
    np.testing.assert_array_equal(count_points_in_windows(xy, [0, 10, 5], [0, 0, 0], 10),
                                  [2, 1, 2])


# image 344 x 464 -> x0 in {0, 120, 240}, y0 in {0, 120}: 6 windows
HW = (344, 464)
XY = np.array([[10.0, 10.0],     # only in window (0, 0)
               [230.0, 130.0]])  # in (120, 0) and (120, 120)


def test_sample_windows_exact():
    w = sample_windows(HW, XY, size=224, stride=120, background_fraction=0.0, rng=0)
    np.testing.assert_array_equal(w, [[0, 0], [120, 0], [120, 120]])
    w = sample_windows(HW, XY, size=224, stride=120, background_fraction=1.0, rng=0)
    assert len(w) == 6
    w = sample_windows(HW, XY, size=224, stride=120, background_fraction=1 / 3, rng=0)
    assert len(w) == 4  # the 3 with points + round(3 / 3) background window
    bg = {tuple(r) for r in w} - {(0, 0), (120, 0), (120, 120)}
    assert bg <= {(240, 0), (0, 120), (240, 120)} and len(bg) == 1
    again = sample_windows(HW, XY, size=224, stride=120, background_fraction=1 / 3, rng=0)
    np.testing.assert_array_equal(w, again)


def test_sample_windows_regions():
    region = box(300, 200, 400, 300)  # overlaps x0 in {120, 240}, both rows
    w = sample_windows(HW, XY, regions=[region], background_fraction=1.0, rng=0)
    np.testing.assert_array_equal(w, [[120, 0], [240, 0], [120, 120], [240, 120]])
    # a region that only touches the right edge of the first column of windows
    w = sample_windows(HW, XY, regions=[box(224, 0, 230, 10)], background_fraction=1.0, rng=0)
    np.testing.assert_array_equal(w, [[120, 0]])
    assert sample_windows(HW, XY, regions=[], rng=0).shape == (0, 2)


def test_small_image_gets_one_window():
    w = sample_windows((50, 80), np.zeros((0, 2)), size=224, background_fraction=1.0, rng=0)
    np.testing.assert_array_equal(w, [[0, 0]])


def test_stack_windows():
    s = stack_windows([np.array([[0, 0], [5, 6]]), np.zeros((0, 2)), np.array([[1, 2]])])
    np.testing.assert_array_equal(s, [[0, 0, 0], [0, 5, 6], [2, 1, 2]])


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 200, (h, w, 3), dtype=np.uint8)


def test_patch_exact_crop_and_targets():
    img = _image(64, 64)
    ds = PatchDataset([img], [(np.array([[20.0, 10.0], [60.0, 60.0]]), np.array([1, 0]))],
                      [(0, 8, 4)], n_classes=2, size=32, flips=False)
    x, t = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), img[4:36, 8:40].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert set(t) == {"cls", "det"}
    assert t["cls"].shape == (3, 32, 32) and t["det"].shape == (1, 32, 32)
    assert t["det"].sum() == 13 and t["det"][0, 6, 12] == 1  # (20, 10) - (8, 4) = (12, 6)
    assert t["cls"][1].sum() == 13 and t["cls"][0].sum() == 0


def test_disc_cut_by_patch_edge_is_drawn():
    img = _image(64, 64)
    ds = PatchDataset([img], [(np.array([[32.0, 10.0]]), np.array([0]))],
                      [(0, 0, 0)], n_classes=1, size=32, flips=False)
    _, t = ds[0]
    # point on the first column right of the patch: 4 of its 13 disc pixels are inside
    np.testing.assert_array_equal(np.argwhere(t["det"][0].numpy()),
                                  [[9, 31], [10, 30], [10, 31], [11, 31]])


def test_small_image_is_padded_white_with_background_targets():
    img = _image(20, 30)
    ds = PatchDataset([img], [(np.array([[29.0, 19.0]]), np.array([0]))], [(0, 0, 0)],
                      n_classes=1, size=32, flips=False,
                      extra_maps=[np.ones((2, 20, 30), np.float32)], extra_key="prior")
    x, t = ds[0]
    np.testing.assert_allclose(x[:, :20, :30].numpy(), img.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert torch.all(x[:, 20:, :] == PAD_VALUE / 255.0) and torch.all(x[:, :, 30:] == 1.0)
    det = t["det"][0]
    assert det[19, 29] == 1 and det[:20, :30].sum() == 6  # a quarter disc: corner of the image
    assert det[20:, :].sum() == 0 and det[:, 30:].sum() == 0  # padding is background
    assert torch.all(t["cls"][1][20:, :] == 1) and torch.all(t["cls"][1][:, 30:] == 1)
    prior = t["prior"]
    assert prior.shape == (2, 32, 32)
    assert torch.all(prior[:, :20, :30] == 1) and prior.sum() == 2 * 20 * 30


def _dihedral(a, k, flip):
    a = torch.rot90(a, k, dims=(-2, -1))
    return torch.flip(a, dims=(-1,)) if flip else a


def test_augmentation_is_shared_and_reproducible():
    img = _image(48, 48, seed=5)
    xy = np.array([[5.0, 7.0], [30.0, 12.0], [12.0, 40.0], [20.0, 20.0]])
    points = [(xy, np.array([0, 1, 0, 1]))]
    windows = [(0, 8, 0), (0, 0, 16), (0, 16, 16), (0, 0, 0)] * 4
    kw = dict(n_classes=2, size=32, extra_maps=[np.random.default_rng(1).random((1, 48, 48))])
    plain = PatchDataset([img], points, windows, flips=False, **kw)
    ds = PatchDataset([img], points, windows, rotate90=True, seed=3, **kw)
    ds2 = PatchDataset([img], points, windows, rotate90=True, seed=3, **kw)
    transforms = set()
    for i in range(len(ds)):
        x0, t0 = plain[i]
        x, t = ds[i]
        # find the one dihedral transform that maps the plain crop onto the augmented one ...
        found = [(k, f) for k in range(4) for f in (False, True)
                 if torch.equal(_dihedral(x0, k, f), x)]
        assert len(found) == 1
        k, f = found[0]
        transforms.add(found[0])
        # ... and check that it maps every target in the same way
        for key in ("cls", "det", "prior"):
            assert torch.equal(_dihedral(t0[key], k, f), t[key]), key
        x2, t2 = ds2[i]
        assert torch.equal(x, x2) and all(torch.equal(t[key], t2[key]) for key in t)
    assert len(transforms) > 3
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], ds2[i][0]) for i in range(len(ds)))


def test_custom_target_fn_gets_rng():
    calls = []

    def fn(xy, labels, shape, rng):
        calls.append(rng.random())
        return {"circles": circle_masks(xy, labels, 2, shape, radius_px=1.0)}

    img = _image(40, 40)
    ds = PatchDataset([img], [(np.array([[4.0, 4.0]]), np.array([1]))], [(0, 0, 0)], size=32,
                      target_fn=fn, flips=False, seed=1)
    _, t = ds[0]
    assert set(t) == {"circles"} and t["circles"].shape == (2, 32, 32)
    assert t["circles"][1].sum() == 5 and t["circles"][0].sum() == 0
    ds[0]
    assert calls[0] == calls[1]  # the same item draws the same numbers


def test_bad_dataset_input():
    img = _image(40, 40)
    with pytest.raises(QpcellError, match="n_classes"):
        PatchDataset([img], [(np.zeros((0, 2)), [])], [(0, 0, 0)])
    with pytest.raises(QpcellError, match="image index"):
        PatchDataset([img], [(np.zeros((0, 2)), [])], [(1, 0, 0)], n_classes=2)


def test_worker_processes_give_the_same_batches():
    from torch.utils.data import DataLoader

    img = _image(48, 48, seed=2)
    xy = np.array([[5.0, 7.0], [30.0, 12.0], [20.0, 20.0]])
    windows = [(0, 8, 0), (0, 0, 16), (0, 16, 16), (0, 0, 0)] * 2
    ds = PatchDataset([img], [(xy, np.array([0, 1, 1]))], windows, n_classes=2, size=32,
                      rotate90=True, seed=7)
    serial = list(DataLoader(ds, batch_size=4, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=4, num_workers=2))
    for (xa, ta), (xb, tb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta["cls"], tb["cls"])


def test_cell_windows_hold_a_cell_in_their_middle_half():
    from qpcell.patches import cell_windows

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (200, 2))
    labels = rng.integers(0, 2, 200)
    wins = cell_windows([(300, 300)], [(xy, labels)], 500, size=64, background_share=0.0,
                        rng=1)
    assert wins.shape == (500, 3) and (wins[:, 0] == 0).all()
    assert (wins[:, 1:] >= 0).all() and (wins[:, 1:] <= 300 - 64).all()
    inside = count_points_in_windows(xy, wins[:, 1], wins[:, 2], 64)
    assert (inside >= 1).all()


def test_cell_windows_draw_rare_classes_more_with_balance_and_some_background():
    from qpcell.patches import cell_windows

    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 980, (1000, 2))
    labels = np.where(np.arange(1000) < 20, 1, 0)  # 2% of class 1
    rare = xy[labels == 1]

    def rare_share(balance: float) -> float:
        wins = cell_windows([(1000, 1000)], [(xy, labels)], 4000, size=32,
                            background_share=0.0, class_balance=balance, rng=2)
        return float(np.mean(count_points_in_windows(rare, wins[:, 1], wins[:, 2], 32) > 0))

    assert rare_share(1.0) > 3 * rare_share(0.0)
    wins = cell_windows([(1000, 1000), (10, 10)], [(xy, labels), (np.zeros((0, 2)),
                        np.zeros(0, int))], 4000, size=32, background_share=0.5, rng=3)
    empty = count_points_in_windows(xy, wins[:, 1], wins[:, 2], 32) == 0
    assert 0.05 < empty.mean() < 0.6  # uniform windows sometimes miss every cell


def test_stain_jitter_changes_colours_mildly_and_reproducibly():
    from qpcell.augment import stain_jitter
    from qpcell.synthetic import render_image

    rgb = render_image((64, 64), 3, rng=0)[0]
    assert stain_jitter(rgb, np.random.default_rng(0), 0.0) is rgb
    a = stain_jitter(rgb, np.random.default_rng(5), 1.0)
    b = stain_jitter(rgb, np.random.default_rng(5), 1.0)
    assert a.dtype == np.uint8 and a.shape == rgb.shape
    assert np.array_equal(a, b)
    diff = np.abs(a.astype(int) - rgb.astype(int))
    assert diff.mean() > 0.5  # it does change the image
    assert diff.mean() < 30  # but keeps it recognisable
    c = stain_jitter(rgb, np.random.default_rng(6), 1.0)
    assert not np.array_equal(a, c)


def _centroid(mask: torch.Tensor) -> np.ndarray:
    rows, cols = np.nonzero(mask.numpy())
    return np.array([cols.mean(), rows.mean()])


def test_scale_jitter_moves_points_with_the_pixels():
    # two dark dots 40 px apart on white; their target discs must follow them at every scale
    img = np.full((96, 96, 3), 255, np.uint8)
    xy = np.array([[28.0, 48.0], [68.0, 48.0]])
    for x, y in xy.astype(int):
        img[y - 2:y + 3, x - 2:x + 3] = 0
    ds = PatchDataset([img], [(xy, np.array([0, 1]))], [(0, 16, 16)] * 40, n_classes=2,
                      size=64, flips=False, scale_jitter=0.2)
    gaps = []
    for i in range(len(ds)):
        x, t = ds[i]
        dark = x.mean(dim=0) < 0.5
        left, right = dark.clone(), dark.clone()
        left[:, 32:], right[:, :32] = False, False
        for part, k in ((left, 1), (right, 2)):  # cls channel k - 1: the dot's class
            np.testing.assert_allclose(_centroid(part), _centroid(t["cls"][k - 1]), atol=1.0)
        gaps.append(_centroid(t["cls"][1])[0] - _centroid(t["cls"][0])[0])
        # the discs keep their radius (2 px: about 13 pixels) in patch pixels at every scale
        assert all(9 <= int(t["cls"][k].sum()) <= 16 for k in (0, 1))
    gaps = np.array(gaps)
    assert gaps.min() >= 40 / 1.2 - 1 and gaps.max() <= 40 * 1.2 + 1  # within 1/(1+j)..1+j
    assert gaps.max() - gaps.min() > 8  # and the scale does vary


def test_scale_jitter_falls_back_on_small_images_and_checks_its_value():
    img = _image(40, 40)
    pts = [(np.array([[20.0, 20.0]]), np.array([0]))]
    plain = PatchDataset([img], pts, [(0, 0, 0)], n_classes=1, size=32, flips=False)
    # every square of 32 / f > 40 px does not fit: those items are read as without jitter
    ds = PatchDataset([img], pts, [(0, 0, 0)] * 30, n_classes=1, size=32, flips=False,
                      scale_jitter=1.0)
    same = sum(torch.equal(ds[i][0], plain[0][0]) for i in range(len(ds)))
    assert 0 < same < len(ds)
    # dense extra maps (MTL-IHC's prior) are resized with the pixels
    ramp = np.tile(np.arange(40, dtype=np.float32), (40, 1))[None]  # the map = column index
    ds = PatchDataset([img], pts, [(0, 4, 4)] * 10, n_classes=1, size=32, flips=False,
                      scale_jitter=0.2, extra_maps=[ramp], extra_key="prior")
    for i in range(len(ds)):
        prior = ds[i][1]["prior"][0].numpy()
        assert prior.shape == (32, 32)
        step = np.diff(prior[16, 2:-2]).mean()  # image columns per patch column, 1 / f
        assert 1 / 1.2 - 0.02 <= step <= 1.2 + 0.02
    with pytest.raises(QpcellError, match="scale_jitter"):
        PatchDataset([img], pts, [(0, 0, 0)], n_classes=1, size=32, scale_jitter=-0.1)
