"""Reading and writing a real QuPath project through paquo (QuPath's own Java code).

These run only where paquo finds a QuPath installation (PAQUO_QUPATH_DIR, .paquo.toml or
paquo's default folders; ``qpcell doctor`` shows what it finds); in CI they must run (see
the ``real_qupath`` fixture). Elsewhere the same code paths run against fakes in
test_annotate.py and test_qupath_project.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("real_qupath")

POSITIVE = [(100.0, 120.0), (140.0, 160.0), (200.0, 210.0), (260.0, 300.0)]
NEGATIVE = [(320.0, 330.0), (350.0, 90.0)]


@pytest.fixture
def project(tmp_path):
    """A QuPath project made by QuPath: one image, point annotations, a region, a detection."""
    tifffile = pytest.importorskip("tifffile")
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint, box

    images = tmp_path / "images"
    images.mkdir()
    image = images / "slide 1.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(image, rng.integers(0, 255, (512, 512, 3), dtype=np.uint8),
                     photometric="rgb")
    root = tmp_path / "qp"
    positive = QuPathPathClass("Positive", color=(250, 62, 62))
    negative = QuPathPathClass("Negative", color=(112, 112, 225))
    with QuPathProject(root, mode="x") as qp:
        qp.path_classes = [positive, negative]
        entry = qp.add_image(image, image_type=QuPathImageType.BRIGHTFIELD_H_DAB)
        h = entry.hierarchy
        h.add_annotation(MultiPoint(POSITIVE), path_class=positive)
        h.add_annotation(MultiPoint(NEGATIVE), path_class=negative)
        h.add_annotation(box(50, 50, 400, 400))  # unclassified: the annotated region
        h.add_detection(box(10, 10, 14, 14), measurements={"Nucleus: Area": 16.0})
    return root / "project.qpproj", image


def _predictions(folder, n=20, seed=0):
    from qpcell.io.geojson import write_detections
    from qpcell.points import CellClass, Detections

    rng = np.random.default_rng(seed)
    classes = (CellClass("Positive", (255, 0, 0)), CellClass("Mitosis", (0, 200, 0)))
    det = Detections(rng.uniform(60, 390, (n, 2)), np.arange(n) % 2,
                     rng.uniform(0.5, 1, n).astype(np.float32),
                     rng.uniform(0, 1, (n, 2)).astype(np.float32), classes)
    folder.mkdir(parents=True, exist_ok=True)
    write_detections(folder / "slide 1.geojson", det)
    return folder


def test_read_points_regions_and_classes(project):
    from qpcell.io.qupath import read_qupath_project

    qpproj, image = project
    notes: list[str] = []
    classes, images = read_qupath_project(qpproj, notes=notes)
    assert [(c.name, c.color) for c in classes] == [("Positive", (250, 62, 62)),
                                                   ("Negative", (112, 112, 225))]
    (img,) = images
    assert img.image == image
    assert img.counts() == {"Positive": len(POSITIVE), "Negative": len(NEGATIVE)}
    assert np.allclose(sorted(map(tuple, img.xy)), sorted(POSITIVE + NEGATIVE))
    assert img.regions is not None and len(img.regions) == 1
    assert img.regions[0].bounds == (50.0, 50.0, 400.0, 400.0)


def test_annotate_back_real_project(project, tmp_path):
    from paquo.projects import QuPathProject

    from qpcell.annotate import annotate_back
    from qpcell.io.geojson import QPCELL_SCORE, probability_key

    qpproj, _ = project
    preds = _predictions(tmp_path / "preds")
    report = annotate_back(preds, qpproj, stamp="t1")
    (result,) = report.results
    assert (result.added, result.removed, result.kept) == (20, 0, 1)
    assert (qpproj.parent / "qpcell-backups" / "t1" / "data").is_dir()

    def read_back():
        with QuPathProject(qpproj, mode="r") as qp:
            names = [pc.name for pc in qp.path_classes]
            (entry,) = qp.images
            dets = list(entry.hierarchy.detections)
            ours = [d for d in dets if QPCELL_SCORE in d.measurements]
            others = [d for d in dets if QPCELL_SCORE not in d.measurements]
            info = [(d.path_class.name, dict(d.measurements),
                     d.parent.path_class if d.parent is not None else "root",
                     d.parent.roi.area if d.parent is not None and d.parent.roi is not None
                     else None) for d in ours]
            return names, len(ours), len(others), info

    names, n_ours, n_others, info = read_back()
    assert names == ["Positive", "Negative", "Mitosis"]  # the new class was added
    assert (n_ours, n_others) == (20, 1)
    for cls, measurements, _parent_class, parent_area in info:
        assert cls in ("Positive", "Mitosis")
        assert set(measurements) == {QPCELL_SCORE, probability_key("Positive"),
                                     probability_key("Mitosis")}
        # inside the unclassified region annotation (350 x 350 px), not the root
        assert parent_area == pytest.approx(350 * 350)

    # rerunning replaces qpcell's detections only
    report = annotate_back(_predictions(tmp_path / "preds2", n=7, seed=1), qpproj, stamp="t2")
    (result,) = report.results
    assert (result.added, result.removed, result.kept) == (7, 20, 1)
    names, n_ours, n_others, _ = read_back()
    assert (n_ours, n_others) == (7, 1) and names.count("Mitosis") == 1


def test_dry_run_counts_with_paquo(project, tmp_path):
    from qpcell.annotate import annotate_back

    qpproj, _ = project
    report = annotate_back(_predictions(tmp_path / "preds"), qpproj, dry_run=True)
    (result,) = report.results
    assert (result.added, result.removed, result.kept) == (20, 0, 1)
    assert not (qpproj.parent / "qpcell-backups").exists()
