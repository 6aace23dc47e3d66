"""Dynamic masks (paper 003, section 2.2): random polygons around points."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree

from qpcell.dynamic_masks import dynamic_masks, polygon_area, random_polygons, rasterise_polygons
from qpcell.errors import QpcellError

RADIUS = (2.0, 7.0)
VERTICES = (3, 9)


def grid_points(n_side: int, step: float = 20.0, seed: int = 0) -> np.ndarray:
    """Points on a grid (polygons cannot touch), with sub-pixel offsets."""
    rng = np.random.default_rng(seed)
    g = step * (np.arange(n_side) + 1)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    return xy + rng.uniform(-0.5, 0.5, xy.shape)


def test_polygon_distribution():
    verts, counts = random_polygons(2000, radius_px=RADIUS, vertices=VERTICES, rng=1)
    assert counts.min() == 3 and counts.max() == 9
    radii = np.hypot(verts[..., 0], verts[..., 1])
    assert radii.min() >= RADIUS[0] - 1e-9 and radii.max() <= RADIUS[1] + 1e-9
    # sizes vary from polygon to polygon, not only from vertex to vertex
    mean_r = np.array([r[:c].mean() for r, c in zip(radii, counts, strict=True)])
    assert mean_r.std() > 1.0
    # consecutive vertices are less than pi apart: star-shaped around the centre
    ang = np.arctan2(verts[..., 1], verts[..., 0])
    for a, c in zip(ang[:200], counts[:200], strict=True):
        gaps = np.diff(np.unwrap(np.append(a[:c], a[0] + 2 * np.pi)))
        assert np.all(gaps > 0) and np.all(gaps < np.pi)


def test_area_matches_polygons_and_radius_range():
    xy = grid_points(30)
    verts, counts = random_polygons(len(xy), radius_px=RADIUS, vertices=VERTICES, rng=2)
    mask = rasterise_polygons(xy, np.zeros(len(xy), int), 1, (640, 640), verts, counts)[0]
    # attribute every pixel to the nearest point (polygons are 20 px apart, radius <= 7)
    rows, cols = np.nonzero(mask)
    _, who = cKDTree(xy).query(np.column_stack([cols, rows]))
    pixel_area = np.bincount(who, minlength=len(xy))
    exact = polygon_area(verts, counts)
    # rasterised area = exact area on average (pixel-centre sampling is unbiased)
    assert abs(pixel_area.sum() / exact.sum() - 1) < 0.02
    # every polygon lies between the smallest triangle (sum of the sines of its sector
    # angles >= 2.02 with the angular jitter) and the largest disc
    assert exact.min() >= 0.5 * 2.0 * RADIUS[0] ** 2
    assert exact.max() <= np.pi * RADIUS[1] ** 2
    assert pixel_area.max() <= np.pi * (RADIUS[1] + 0.75) ** 2
    assert pixel_area.min() >= 1  # every polygon covers at least its centre pixel
    # the mean area sits inside the range spanned by the radius distribution
    assert np.pi * RADIUS[0] ** 2 < pixel_area.mean() < np.pi * RADIUS[1] ** 2 / 2


def test_polygons_are_centred_on_their_points():
    xy = grid_points(30, seed=3)
    m = dynamic_masks(xy, np.zeros(len(xy), int), 1, (640, 640), rng=4)[0]
    rows, cols = np.nonzero(m)
    _, who = cKDTree(xy).query(np.column_stack([cols, rows]))
    n = np.bincount(who, minlength=len(xy))
    cx = np.bincount(who, weights=cols, minlength=len(xy)) / n
    cy = np.bincount(who, weights=rows, minlength=len(xy)) / n
    off = np.column_stack([cx, cy]) - xy
    assert np.hypot(*off.T).mean() < 1.0  # within ~1 px on average
    assert np.all(np.abs(off.mean(axis=0)) < 0.25)  # no systematic shift
    assert m[np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)].all()


def test_rasterisation_matches_exact_point_in_polygon():
    xy = grid_points(12, seed=5)
    verts, counts = random_polygons(len(xy), rng=6)
    m = rasterise_polygons(xy, np.zeros(len(xy), int), 1, (260, 260), verts, counts)[0]
    yy, xx = np.mgrid[0:260, 0:260]
    want = np.zeros((260, 260), bool)
    polys = [shapely.Polygon(v[:c] + p) for v, c, p in zip(verts, counts, xy, strict=True)]
    for poly in polys:
        want |= shapely.contains_xy(poly, xx, yy)
    differ = np.argwhere(want != m.astype(bool))
    # only pixel centres lying on an edge may differ
    union = shapely.union_all(polys)
    for r, c in differ:
        assert union.boundary.distance(shapely.Point(c, r)) < 1e-6


def test_classes_borders_and_empty():
    xy = np.array([[5.0, 5.0], [20.0, 20.0], [-3.0, 12.0], [100.0, 100.0]])
    labels = np.array([0, 2, 1, 1])
    m = dynamic_masks(xy, labels, 3, (32, 32), rng=0)
    assert m.shape == (3, 32, 32) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert m[0, 5, 5] == 1 and m[2, 20, 20] == 1
    assert m[0, 20, 20] == 0 and m[2, 5, 5] == 0
    # a point outside the mask still draws the part of its polygon inside (if it reaches)
    assert m[1].sum() <= np.pi * 49
    empty = dynamic_masks(np.zeros((0, 2)), np.zeros(0, int), 2, (8, 8), rng=0)
    assert empty.shape == (2, 8, 8) and not empty.any()
    with pytest.raises(QpcellError):
        dynamic_masks(xy, labels, 2, (32, 32), rng=0)  # label 2 with 2 classes
    with pytest.raises(QpcellError):
        dynamic_masks(xy, labels, 3, (32, 32), radius_px=(0.0, 1.0))
    with pytest.raises(QpcellError):
        dynamic_masks(xy, labels, 3, (32, 32), vertices=(2, 5))


def test_different_every_call_and_reproducible():
    xy = grid_points(5, seed=7)
    lab = np.zeros(len(xy), int)
    rng = np.random.default_rng(11)
    a = dynamic_masks(xy, lab, 1, (120, 120), rng=rng)
    b = dynamic_masks(xy, lab, 1, (120, 120), rng=rng)
    assert not np.array_equal(a, b)  # a new polygon every call (every iteration)
    again = np.random.default_rng(11)
    assert np.array_equal(a, dynamic_masks(xy, lab, 1, (120, 120), rng=again))
    assert np.array_equal(b, dynamic_masks(xy, lab, 1, (120, 120), rng=again))
    assert np.array_equal(dynamic_masks(xy, lab, 1, (120, 120), rng=3),
                          dynamic_masks(xy, lab, 1, (120, 120), rng=3))


def test_scaled_radius_scales_area():
    xy = grid_points(20, step=40.0)
    lab = np.zeros(len(xy), int)
    small = dynamic_masks(xy, lab, 1, (840, 840), radius_px=RADIUS, rng=0).sum()
    big = dynamic_masks(xy, lab, 1, (840, 840), radius_px=(4.0, 14.0), rng=0).sum()
    assert 3.6 < big / small < 4.4
