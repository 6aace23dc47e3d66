"""Read-outs on the annotations of a real QuPath project (QuPath's own Java code, via paquo).

Runs only where paquo finds QuPath (``source /tmp/qp-env.sh`` on the development machine,
see ../shared/qupath-headless/README.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qpcell.io.qupath import find_qupath_installation

QUPATH = find_qupath_installation()
pytestmark = pytest.mark.skipif(not QUPATH.found,
                                reason=f"no QuPath installation found: {QUPATH.detail}")

OUTER = (50, 50, 400, 400)
INNER = (60, 60, 200, 200)


@pytest.fixture
def project(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint, box

    image = tmp_path / "slide.tif"
    tifffile.imwrite(image, np.full((512, 512, 3), 230, np.uint8), photometric="rgb")
    root = tmp_path / "qp"
    tumour = QuPathPathClass("Tumor", color=(200, 0, 0))
    with QuPathProject(root, mode="x") as qp:
        qp.path_classes = [tumour]
        entry = qp.add_image(image, image_type=QuPathImageType.BRIGHTFIELD_H_DAB)
        h = entry.hierarchy
        h.add_annotation(box(*OUTER), measurements={"My score": 7.0})
        h.add_annotation(box(*INNER), path_class=tumour)  # nested in the first
        h.add_annotation(MultiPoint([(300, 300)]), path_class=tumour)  # a point: no area
    return root / "project.qpproj"


def _predictions(folder, seed, hotspot=True):
    """A prediction folder as qpcell predict writes it (cells, positive classes, hotspot)."""
    from qpcell.io.geojson import write_detections
    from qpcell.io.readouts import ReadoutOptions, write_hotspots
    from qpcell.points import CellClass, Detections
    from qpcell.readouts import PositiveRule, find_hotspots

    rng = np.random.default_rng(seed)
    n = 60
    classes = (CellClass("Ki67+", (150, 80, 0)), CellClass("Ki67-", (0, 0, 200)),
               CellClass("Stroma", (0, 150, 0)))
    xy = rng.uniform(20, 480, (n, 2))
    labels = rng.integers(0, 3, n)
    det = Detections(xy, labels, np.full(n, 0.9, np.float32),
                     np.full((n, 3), 0.3, np.float32), classes, mpp=0.5)
    folder.mkdir(parents=True)
    write_detections(folder / "slide.geojson", det)
    rule = PositiveRule(("Ki67+",), ("Ki67-",))
    (folder / "predictions.json").write_text(json.dumps({
        "classes": [{"name": c.name, "color": list(c.color)} for c in classes],
        "readouts": ReadoutOptions(rule, 0.005, 5).to_json(),
        "images": {"slide": {"mpp": 0.5}}}))  # the TIFF itself has no pixel size
    if hotspot:
        spots = find_hotspots(xy, labels, [c.name for c in classes], area=0.005, mpp=0.5,
                              rule=rule, min_cells=5, density_classes=[])
        write_hotspots(folder / "slide.hotspots.json", spots)
    return folder, xy, labels


def _expected(xy, labels, box_):
    x0, y0, x1, y1 = box_
    inside = (xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1)
    n = [int(np.sum(inside & (labels == k))) for k in range(3)]
    return n, 100 * n[0] / (n[0] + n[1])


def _read(qpproj):
    from paquo.projects import QuPathProject

    with QuPathProject(qpproj, mode="r") as qp:
        (entry,) = qp.images
        out = []
        for a in entry.hierarchy.annotations:
            out.append((a.path_class.name if a.path_class else None, a.roi.bounds,
                        dict(a.measurements)))
        return out


def test_annotate_back_puts_readouts_on_annotations_and_replaces_them(project, tmp_path):
    from qpcell.annotate import annotate_back

    preds, xy, labels = _predictions(tmp_path / "p1", seed=0)
    report = annotate_back(preds, project, stamp="t1")
    (result,) = report.results
    assert (result.measured, result.hotspots) == (2, 1)
    annotations = _read(project)
    by_bounds = {b: (c, m) for c, b, m in annotations}
    for box_ in (OUTER, INNER):
        (n_pos, n_neg, n_str), pct = _expected(xy, labels, box_)
        _, m = by_bounds[tuple(float(v) for v in box_)]
        assert m["qpcell: Num Ki67+"] == n_pos and m["qpcell: Num Ki67-"] == n_neg
        assert m["qpcell: Num Stroma"] == n_str
        assert m["qpcell: positive %"] == pytest.approx(pct, rel=1e-5)
        area_mm2 = (box_[2] - box_[0]) * (box_[3] - box_[1]) * 0.25 / 1e6
        assert m["qpcell: Ki67+ per mm^2"] == pytest.approx(n_pos / area_mm2, rel=1e-5)
        assert m["qpcell: Stroma %"] == pytest.approx(100 * n_str / sum((n_pos, n_neg, n_str)),
                                                      rel=1e-5)
    assert by_bounds[tuple(map(float, OUTER))][1]["My score"] == 7.0
    points = [m for c, b, m in annotations if b[0] == b[2]]
    assert points == [{}]  # the point annotation is left alone
    hot = [(b, m) for c, b, m in annotations if c == "qpcell hotspot"]
    assert len(hot) == 1 and "qpcell: positive %" in hot[0][1]

    # a rerun replaces qpcell's measurements and hotspot, nothing else
    preds2, xy2, labels2 = _predictions(tmp_path / "p2", seed=1)
    annotate_back(preds2, project, stamp="t2", positive_classes="Ki67+,Stroma")
    annotations = _read(project)
    by_bounds = {b: (c, m) for c, b, m in annotations}
    (n_pos, n_neg, n_str), _ = _expected(xy2, labels2, OUTER)
    _, m = by_bounds[tuple(map(float, OUTER))]
    assert m["My score"] == 7.0
    assert m["qpcell: Num Ki67+"] == n_pos
    # positive classes given on the command line win over predictions.json
    assert m["qpcell: positive %"] == pytest.approx(100 * (n_pos + n_str) /
                                                    (n_pos + n_neg + n_str), rel=1e-5)
    assert len([c for c, _, _ in annotations if c == "qpcell hotspot"]) == 1
    assert len(annotations) == 4
