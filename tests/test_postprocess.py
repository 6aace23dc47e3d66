"""Post-processing on hand-built probability maps (S-DRDIN 2.5 and MTL-IHC peaks)."""

from __future__ import annotations

import numpy as np
import pytest

from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.points import make_classes
from qpcell.postprocess import (
    apply_class_gain,
    box_means,
    cell_centres,
    merge_radius_px,
    neighbour_context,
    postprocess_peaks,
    postprocess_sdrdin,
    squared_distances,
    window_peaks,
)

CLASSES = make_classes(["tumour", "immune"])


def disc(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_two_touching_discs_give_two_cells():
    det = np.zeros((60, 80), np.float32)
    det[disc(det.shape, 30, 30, 8)] = 0.9
    det[disc(det.shape, 46, 30, 8)] = 0.9  # centres 16 px apart: the discs touch
    cfg = PostprocessConfig()
    d = postprocess_sdrdin(det, None, cfg, CLASSES)
    assert len(d) == 2
    order = np.argsort(d.xy[:, 0])
    np.testing.assert_allclose(d.xy[order], [[30, 30], [46, 30]], atol=0.51)
    assert d.labels.tolist() == [0, 0]
    np.testing.assert_allclose(d.class_probs, [[1, 0], [1, 0]])
    np.testing.assert_allclose(d.scores, 0.9, rtol=1e-6)


def test_component_below_min_area_is_dropped():
    det = np.zeros((60, 60), np.float32)
    det[disc(det.shape, 15, 15, 3)] = 1.0  # 29 px < 50
    det[disc(det.shape, 40, 40, 5)] = 1.0  # 81 px
    d = postprocess_sdrdin(det, None, PostprocessConfig(), CLASSES)
    assert d.xy.tolist() == [[40.0, 40.0]]
    d = postprocess_sdrdin(det, None, PostprocessConfig(min_area_px=20), CLASSES)
    assert len(d) == 2


def test_threshold_is_inclusive_and_below_is_background():
    det = np.zeros((40, 40), np.float32)
    det[disc(det.shape, 20, 20, 6)] = 0.5
    assert len(postprocess_sdrdin(det, None, PostprocessConfig(threshold=0.5), CLASSES)) == 1
    assert len(postprocess_sdrdin(det, None, PostprocessConfig(threshold=0.51), CLASSES)) == 0


def test_plateau_gives_one_cell_at_its_centre():
    det = np.zeros((40, 60), np.float32)
    det[15:24, 10:40] = 1.0  # 9 x 30 bar: the distance transform has a flat ridge
    d = postprocess_sdrdin(det, None, PostprocessConfig(peak_window_px=41), CLASSES)
    assert len(d) == 1
    np.testing.assert_allclose(d.xy[0], [24.5, 19.0])


def test_class_is_the_argmax_of_the_box_mean_not_of_the_centre_pixel():
    shape = (100, 100)
    det = np.zeros(shape, np.float32)
    det[disc(shape, 50, 50, 6)] = 1.0
    cls = np.zeros((2,) + shape, np.float32)
    cls[0, 26:75, 26:75] = 0.6  # 49 x 49 box around the cell
    cls[1][disc(shape, 50, 50, 3)] = 1.0  # immune wins at the centre only
    cls[0][disc(shape, 50, 50, 3)] = 0.0
    d = postprocess_sdrdin(det, cls, PostprocessConfig(), CLASSES)
    assert d.labels.tolist() == [0]
    n_centre = int(disc(shape, 50, 50, 3).sum())
    mean0 = 0.6 * (49 * 49 - n_centre) / 49**2
    mean1 = n_centre / 49**2
    np.testing.assert_allclose(d.class_probs[0], np.array([mean0, mean1]) / (mean0 + mean1),
                               rtol=1e-5)
    raw = postprocess_sdrdin(det, cls, PostprocessConfig(), CLASSES, normalize=False)
    np.testing.assert_allclose(raw.class_probs[0], [mean0, mean1], rtol=1e-5)
    # a smaller box only sees the centre: immune
    small = postprocess_sdrdin(det, cls, PostprocessConfig(class_box_px=5), CLASSES)
    assert small.labels.tolist() == [1]


def test_box_clipped_at_the_border_averages_the_pixels_inside():
    shape = (60, 60)
    det = np.zeros(shape, np.float32)
    det[disc(shape, 3, 30, 6)] = 1.0  # a cell cut by the left border
    cls = np.zeros((2,) + shape, np.float32)
    cls[1, :, :28] = 1.0  # inside the clipped box [0, 28) x [6, 55): immune everywhere
    cls[0, :, 28:] = 1.0
    d = postprocess_sdrdin(det, cls, PostprocessConfig(min_area_px=10), CLASSES,
                           normalize=False)
    assert len(d) == 1
    c = int(np.floor(d.xy[0, 0] + 0.5))
    inside = min(60, c + 25) - 0
    np.testing.assert_allclose(d.class_probs[0], [(inside - 28) / inside, 28 / inside],
                               rtol=1e-6)


def test_box_means_match_brute_force():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 37, 53))
    rows = np.array([0, 5, 18, 36, 20])
    cols = np.array([0, 52, 26, 3, 50])
    for box in (1, 4, 7, 15, 49, 50, 200):  # small boxes gather, big ones use a cumsum
        got = box_means(maps, rows, cols, box)
        h = box // 2
        for n, (r, c) in enumerate(zip(rows, cols, strict=True)):
            win = maps[:, max(0, r - h):r + box - h, max(0, c - h):c + box - h]
            np.testing.assert_allclose(got[n], win.mean(axis=(1, 2)), rtol=1e-10)


def test_scaled_config_finds_the_same_cells_at_twice_the_resolution():
    cfg = PostprocessConfig()
    fine = cfg.scaled(cfg.mpp / 2)
    assert (fine.min_area_px, fine.peak_window_px, fine.class_box_px) == (200.0, 31, 99)
    assert merge_radius_px(fine) == 4
    centres = np.array([[20, 20], [45, 22], [70, 60], [25, 75]], float)
    radii = np.array([6, 7, 5, 3.5])
    lo = np.zeros((100, 100), np.float32)
    hi = np.zeros((200, 200), np.float32)
    for (x, y), r in zip(centres, radii, strict=True):
        lo[disc(lo.shape, x, y, r)] = 1
        hi[disc(hi.shape, 2 * x + 0.5, 2 * y + 0.5, 2 * r)] = 1
    a = cell_centres(lo, cfg)
    b = cell_centres(hi, fine)
    assert len(a) == len(b) == 3  # the small disc is below the minimum area at both scales
    np.testing.assert_allclose(np.sort((b - 0.5) / 2, axis=0), np.sort(a, axis=0), atol=0.5)
    # at the fine resolution, the coarse config would keep the small discs too
    assert len(cell_centres(hi, cfg)) == 4


def test_neighbour_context_is_the_mean_of_the_cells_around():
    rng = np.random.default_rng(4)
    xy = np.concatenate([rng.uniform(0, 100, (299, 2)), [[500.0, 500.0]]])  # one far away
    probs = rng.dirichlet(np.ones(3), 300)
    got = neighbour_context(xy, probs, radius_px=9.0, weight=0.3)
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    near = (d <= 9.0) & ~np.eye(300, dtype=bool)
    assert near[:299].any(axis=1).mean() > 0.9 and not near[299].any()
    for i in range(300):
        want = probs[i] if not near[i].any() else 0.7 * probs[i] + 0.3 * probs[near[i]].mean(0)
        np.testing.assert_allclose(got[i], want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    np.testing.assert_array_equal(got[299], probs[299])  # a lonely cell keeps its own
    np.testing.assert_array_equal(neighbour_context(xy, probs, 9.0, 0.0), probs)
    np.testing.assert_array_equal(neighbour_context(xy, probs, 0.0, 0.5), probs)
    with pytest.raises(QpcellError, match="from 0 to 1"):
        neighbour_context(xy, probs, 9.0, 1.5)


def test_context_mixes_before_the_gains_and_changes_only_classes():
    det = np.zeros((60, 120), np.float32)
    cls = np.zeros((2, 60, 120), np.float32)
    for x, p in ((15, 0.9), (30, 0.45), (45, 0.8), (100, 0.3)):  # three close, one far
        det[disc(det.shape, x, 30, 5)] = 1
        cls[0][disc(det.shape, x, 30, 5)] = p
        cls[1][disc(det.shape, x, 30, 5)] = 1 - p
    base = PostprocessConfig(min_area_px=10, peak_window_px=7, class_box_px=3)
    plain = postprocess_sdrdin(det, cls, base, CLASSES)
    assert plain.labels.tolist() == [0, 1, 0, 1]
    mixed = postprocess_sdrdin(det, cls, PostprocessConfig(
        min_area_px=10, peak_window_px=7, class_box_px=3, context_radius_px=16,
        context_weight=0.5), CLASSES)
    np.testing.assert_array_equal(mixed.xy, plain.xy)
    np.testing.assert_array_equal(mixed.scores, plain.scores)
    assert mixed.labels.tolist() == [0, 0, 0, 1]  # the middle cell joins its neighbours
    np.testing.assert_allclose(mixed.class_probs[1, 0], 0.5 * 0.45 + 0.5 * (0.9 + 0.8) / 2,
                               rtol=1e-6)
    gained = postprocess_sdrdin(det, cls, PostprocessConfig(
        min_area_px=10, peak_window_px=7, class_box_px=3, context_radius_px=16,
        context_weight=0.5, class_gain=(1.0, 3.0)), CLASSES)
    np.testing.assert_allclose(gained.class_probs, apply_class_gain(mixed.class_probs,
                                                                    (1.0, 3.0)), rtol=1e-6)


def test_context_radius_scales_and_widens_the_reach():
    cfg = PostprocessConfig(class_box_px=9, peak_window_px=15, context_radius_px=22.5)
    assert cfg.reach_px == 8  # no weight: no context, no wider reach
    on = PostprocessConfig(class_box_px=9, peak_window_px=15, context_radius_px=22.5,
                           context_weight=0.5)
    assert on.reach_px == 8 + 23
    assert on.scaled(on.mpp / 2).context_radius_px == 45.0


@pytest.mark.parametrize("window", [3, 7, 15, 31])
def test_window_peaks_match_skimage_per_component(window):
    from scipy import ndimage
    from skimage.feature import peak_local_max

    rng = np.random.default_rng(window)
    yy, xx = np.mgrid[:160, :200]
    det = np.zeros((160, 200))
    for x, y, s in zip(rng.uniform(0, 200, 70), rng.uniform(0, 160, 70), rng.uniform(2, 8, 70),
                       strict=True):
        det = np.maximum(det, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)))
    comp, n = ndimage.label(det > 0.4, structure=np.ones((3, 3)))
    comp[np.isin(comp, np.nonzero(np.bincount(comp.ravel()) < 12)[0])] = 0  # drop specks
    dist = ndimage.distance_transform_edt(comp > 0)
    rows, cols = window_peaks(dist, comp, window)
    ref = peak_local_max(dist, footprint=np.ones((window, window), bool), min_distance=1,
                         labels=comp, threshold_abs=0.0, exclude_border=False)
    assert n > 20
    got = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == sorted(map(tuple, ref.tolist()))


def test_touching_cells_stay_apart_and_specks_go():
    det = np.zeros((40, 60), np.float32)
    det[disc(det.shape, 15, 20, 7)] = 1
    det[disc(det.shape, 31, 20, 7)] = 1  # touching: two maxima 16 px apart -> 2 cells
    det[disc(det.shape, 50, 20, 1)] = 1  # 5 px: too small
    cfg = PostprocessConfig(min_area_px=6)
    assert len(cell_centres(det, cfg)) == 2


def test_empty_and_bad_maps():
    det = np.zeros((32, 32), np.float32)
    d = postprocess_sdrdin(det, np.zeros((2, 32, 32), np.float32), PostprocessConfig(), CLASSES)
    assert len(d) == 0 and d.class_probs.shape == (0, 2)
    with pytest.raises(QpcellError):
        postprocess_sdrdin(det, np.zeros((3, 32, 32)), PostprocessConfig(), CLASSES)
    with pytest.raises(QpcellError):
        postprocess_sdrdin(det, np.zeros((2, 31, 32)), PostprocessConfig(), CLASSES)
    with pytest.raises(QpcellError):
        postprocess_sdrdin(det[None], None, PostprocessConfig(), CLASSES)


def test_many_cells_found_once_each():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:256, :256]
    det = np.zeros((256, 256), np.float32)
    pts = []
    while len(pts) < 60:
        p = rng.uniform(8, 248, 2)
        if all(np.hypot(*(p - q)) > 20 for q in pts):
            pts.append(p)
    for x, y in pts:
        det = np.maximum(det, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.5**2)))
    found = cell_centres(det, PostprocessConfig())
    assert len(found) == 60
    dist = np.hypot(*(found[:, None] - np.array(pts)[None]).transpose(2, 0, 1)).min(axis=1)
    assert dist.max() < 1.0


def test_peaks_per_class_merge_keeps_the_higher():
    shape = (60, 60)
    yy, xx = np.mgrid[: shape[0], : shape[1]]

    def bump(x, y, h):
        return h * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))

    cls = np.zeros((2,) + shape, np.float32)
    cls[0] = bump(10, 10, 0.9) + bump(40, 40, 0.6)
    cls[1] = bump(42, 41, 0.8) + bump(10, 45, 0.7) + bump(50, 10, 0.3)  # 0.3: below threshold
    d = postprocess_peaks(cls, threshold=0.5, min_distance_px=5, classes=CLASSES)
    got = sorted(zip(d.xy.tolist(), d.labels.tolist(),
                     [round(float(v), 3) for v in d.scores], strict=True))
    assert got == [([10.0, 10.0], 0, 0.9), ([10.0, 45.0], 1, 0.7), ([42.0, 41.0], 1, 0.8)]
    k = [i for i, xy in enumerate(d.xy.tolist()) if xy == [42.0, 41.0]]
    p = cls[:, 41, 42]
    np.testing.assert_allclose(d.class_probs[k[0]], p / p.sum(), rtol=1e-5)
    # far apart peaks of different classes both stay
    far = postprocess_peaks(cls, threshold=0.5, min_distance_px=2, classes=CLASSES)
    assert len(far) == 4


def test_peaks_empty():
    d = postprocess_peaks(np.zeros((2, 20, 20)), threshold=0.5, min_distance_px=3,
                          classes=CLASSES)
    assert len(d) == 0


def blobs(shape, n, seed, sigma=(2.0, 7.0)):
    """A detection-like map: ``n`` Gaussian bumps of random size, some overlapping."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    det = np.zeros(shape)
    for x, y, s in zip(rng.uniform(-5, shape[1] + 5, n), rng.uniform(-5, shape[0] + 5, n),
                       rng.uniform(*sigma, n), strict=True):
        det = np.maximum(det, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)))
    return det.astype(np.float32)


def test_squared_distances_are_scipys_distance_transform_squared():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    masks = [blobs((90, 120), 40, seed) > t for seed, t in ((1, 0.2), (2, 0.5), (3, 0.05))]
    masks += [rng.random((40, 55)) < 0.9, rng.random((33, 20)) < 0.5,
              np.ones((20, 30), bool), np.zeros((20, 30), bool)]
    tall = np.zeros((50, 40), bool)
    tall[:, 10:30] = True  # columns with no background at all: found sideways
    tall[5, 0] = True
    one = np.zeros((9, 9), bool)
    one[4, 4] = True
    masks += [tall, one, ~one]
    for fg in masks:
        rows, cols = np.nonzero(fg)
        got = squared_distances(fg, rows, cols)
        ref = ndimage.distance_transform_edt(fg)[rows, cols]
        assert got.dtype == np.int64
        np.testing.assert_array_equal(np.sqrt(got), ref)  # bit for bit


def reference_cell_centres(det, cfg):
    """S-DRDIN 2.5 the plain way: scipy's distance transform, skimage's per-component peaks,
    then the same grouping of maxima whose discs touch."""
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree
    from skimage.feature import peak_local_max

    comp, n = ndimage.label(det >= cfg.threshold, structure=np.ones((3, 3)))
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    comp[(areas < cfg.min_area_px)[comp]] = 0
    if not comp.any():
        return np.zeros((0, 2))
    dist = ndimage.distance_transform_edt(comp > 0)
    w = cfg.peak_window_px
    pk = peak_local_max(dist, footprint=np.ones((w, w), bool), labels=comp, min_distance=1,
                        threshold_abs=0.0, exclude_border=False)
    pk = pk[np.lexsort((pk[:, 1], pk[:, 0]))]  # raster order
    pr, pc = pk[:, 0], pk[:, 1]
    pts = np.column_stack([pc, pr]).astype(float)
    pairs = cKDTree(pts).query_pairs(r=2 * merge_radius_px(cfg) + 1 + 1e-9,
                                     output_type="ndarray")
    pairs = pairs[comp[pr[pairs[:, 0]], pc[pairs[:, 0]]] == comp[pr[pairs[:, 1]], pc[pairs[:, 1]]]]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), (len(pts),) * 2)
    _, group = connected_components(graph, directed=False)
    firsts = {}
    for i, g in enumerate(group):
        firsts.setdefault(g, i)
    out = []
    for g in sorted(firsts, key=firsts.get):
        out.append(pts[group == g].mean(axis=0))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_centres_match_the_plain_implementation(seed):
    det = blobs((130, 170), 60, seed)
    configs = [PostprocessConfig(threshold=t, min_area_px=a, peak_window_px=w)
               for t, a, w in ((0.5, 50, 15), (0.1, 0, 15), (0.3, 10, 7), (0.2, 0, 31),
                               (0.6, 2, 3))]
    for cfg in configs:
        got = cell_centres(det, cfg)
        ref = reference_cell_centres(det, cfg)
        assert len(got) > 5
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
