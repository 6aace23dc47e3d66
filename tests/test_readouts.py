"""Read-outs per region and hotspots (qpcell.readouts), checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from qpcell.errors import QpcellError
from qpcell.readouts import (
    PositiveRule,
    _grid,
    find_hotspots,
    positive_rule,
    qupath_measurements,
    region_readouts,
    table_row,
)

NAMES = ["pos", "neg", "other"]


def test_region_readouts_count_by_centre_with_nested_regions():
    xy = np.array([[5, 5], [15, 5], [50, 50], [55, 52], [90, 90], [10, 10.5]])
    labels = np.array([0, 1, 0, 2, 1, 1])
    outer = box(0, 0, 60, 60)
    inner = box(0, 0, 12, 12)
    holed = Polygon([(40, 40), (70, 40), (70, 70), (40, 70)],
                    [[(49, 49), (52, 49), (52, 52), (49, 52)]])
    rows = region_readouts(xy, labels, NAMES, image_size=(100, 200),
                           regions=[("outer", outer), ("inner", inner), ("holed", holed)],
                           mpp=0.5, rule=PositiveRule(("pos",), ("neg",)))
    image, o, i, h = rows
    assert image.name == "image" and image.area_px2 == 100 * 200
    assert image.counts == {"pos": 2, "neg": 3, "other": 1}
    assert o.counts == {"pos": 2, "neg": 2, "other": 1}  # the inner cells count here too
    assert i.counts == {"pos": 1, "neg": 1, "other": 0}
    assert h.counts == {"pos": 0, "neg": 0, "other": 1}  # (50, 50) lies in the hole
    assert o.area_um2 == pytest.approx(3600 * 0.25)
    assert o.positive_percent == pytest.approx(50.0)
    assert image.positive_percent == pytest.approx(40.0)
    assert i.density_mm2("pos") == pytest.approx(1 / (144 * 0.25 / 1e6))
    assert o.percent("other") == pytest.approx(20.0)
    assert h.positive_percent is None  # no positive or negative cell


def test_rule_against_all_other_classes_and_errors():
    rule = positive_rule(NAMES, "pos")
    assert rule.negatives(NAMES) == ("neg", "other")
    assert rule.fraction({"pos": 1, "neg": 1, "other": 2}) == pytest.approx(0.25)
    assert positive_rule(NAMES, None) is None
    with pytest.raises(QpcellError, match="'Ki67' is not one of"):
        positive_rule(NAMES, "Ki67")
    with pytest.raises(QpcellError, match="both positive and negative"):
        positive_rule(NAMES, "pos", "pos,neg")
    with pytest.raises(QpcellError, match="every class"):
        positive_rule(NAMES, NAMES)


def test_measurements_and_csv_row_without_pixel_size():
    r = region_readouts([[1, 1], [2, 2]], [0, 1], NAMES, image_size=(10, 10), mpp=None,
                        rule=PositiveRule(("pos",)))[0]
    m = qupath_measurements(r)
    assert m["qpcell: Num pos"] == 1.0 and m["qpcell: pos %"] == 50.0
    assert m["qpcell: positive %"] == 50.0
    assert not any("mm^2" in k for k in m)  # no density without a pixel size
    assert all(k.startswith("qpcell: ") for k in m)
    row = table_row("img", r)
    assert row["area_um2"] == "" and row["area_px2"] == 100.0 and row["positive %"] == 50.0


def _brute(xy, labels, centres, radius, n_classes):
    d2 = ((centres[:, None, :] - xy[None]) ** 2).sum(-1)
    inside = d2 <= radius ** 2
    return np.stack([(inside & (labels == k)[None]).sum(1) for k in range(n_classes)])


@pytest.mark.parametrize("seed", range(6))
def test_hotspots_match_brute_force_on_the_same_grid(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(300, 1500))
    xy = rng.uniform(0, 400, size=(n, 2))
    blob = rng.uniform(100, 300, size=2)  # a denser, more positive patch
    extra = blob + rng.normal(size=(n // 3, 2)) * 30
    xy = np.concatenate([xy, extra])
    labels = np.concatenate([rng.choice(3, size=n, p=[0.2, 0.5, 0.3]),
                             rng.choice(3, size=len(extra), p=[0.6, 0.3, 0.1])])
    area = float(rng.uniform(2000, 12000))  # px², no pixel size
    min_cells = int(rng.integers(5, 60))
    rule = PositiveRule(("pos",), ("neg",))
    bins = int(rng.integers(4, 16))
    spots = find_hotspots(xy, labels, NAMES, area=area, mpp=None, rule=rule,
                          min_cells=min_cells, bins_per_radius=bins)
    radius = math.sqrt(area / math.pi)
    grid = _grid(xy, labels, 3, radius, bins)
    centres = grid.centres(np.arange(grid.shape[0] * grid.shape[1]))
    counts = _brute(xy, labels, centres, radius, 3)
    p, q = counts[0], counts[1]
    ok = p + q >= min_cells
    by_kind = {(s.kind, s.target): s for s in spots}
    if ok.any():
        best = (p[ok] / (p[ok] + q[ok])).max()
        s = by_kind[("positive", None)]
        assert s.exact and s.positive_percent == pytest.approx(100 * best)
        assert s.checked < len(centres)  # fewer circles counted than brute force
    else:
        assert ("positive", None) not in by_kind
    for k, name in enumerate(NAMES):
        s = by_kind[("density", name)]
        assert s.exact and s.counts[name] == counts[k].max()
    for s in spots:  # the figures are exact counts of the reported circle
        again = _brute(xy, labels, np.array([[s.x, s.y]]), s.radius, 3)[:, 0]
        assert [s.counts[n] for n in NAMES] == again.tolist()


def test_hotspot_area_in_mm2_and_minimum_cells():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, size=(3000, 2))
    labels = rng.choice(2, size=3000).astype(np.int64)
    xy[:40] = 1000 + rng.normal(size=(40, 2)) * 5  # a tiny all-positive cluster
    labels[:40] = 0
    spots = find_hotspots(xy, labels, ["pos", "neg"], area=0.1, mpp=0.5,
                          rule=PositiveRule(("pos",)), min_cells=100)
    pos = spots[0]
    assert pos.kind == "positive" and pos.area_mm2 == pytest.approx(0.1)
    assert pos.radius == pytest.approx(math.sqrt(0.1e6 / 0.25 / math.pi))
    assert pos.counts["pos"] + pos.counts["neg"] >= 100
    assert pos.positive_percent < 100  # the 40-cell cluster alone is too small
    assert pos.measurements()["qpcell: positive %"] == pytest.approx(pos.positive_percent)
    none = find_hotspots(xy, labels, ["pos", "neg"], area=0.1, mpp=0.5,
                         rule=PositiveRule(("pos",)), min_cells=10**6)
    assert [s.kind for s in none] == ["density", "density"]
