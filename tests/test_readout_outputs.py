"""Read-outs in a prediction folder: summary.csv, predictions.json, hotspots, report PNG."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box
from test_predict import CLASSES, predictor, synthetic_image

from qpcell.io.geojson import read_geojson
from qpcell.io.readouts import ReadoutOptions
from qpcell.predict import PredictionJob, predict_to_folder
from qpcell.readouts import HOTSPOT_CLASS, PositiveRule


@pytest.fixture
def job(tmp_path) -> PredictionJob:
    img, _, _ = synthetic_image(300, 400, 60, seed=3)
    path = tmp_path / "slide.png"
    Image.fromarray(img).save(path)
    regions = [box(0, 0, 200, 300), box(20, 20, 120, 120)]  # the second inside the first
    return PredictionJob("slide", path, regions, mpp=0.5)


def test_predict_writes_region_figures_hotspots_and_report(job, tmp_path):
    out = tmp_path / "out"
    options = ReadoutOptions(PositiveRule(("tumour",)), hotspot_mm2=0.002, min_cells=5)
    res = predict_to_folder([job], predictor(mpp=0.5), out, tile_size=256, readouts=options)[0]
    cells = read_geojson(out / "slide.geojson")
    xy = cells.detection_xy
    names = np.array(cells.detection_class)
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["region"] for r in rows] == ["image", "region 1", "region 2"]
    for row, (x0, y0, x1, y1) in zip(rows[1:], [(0, 0, 200, 300), (20, 20, 120, 120)],
                                     strict=True):
        inside = (xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1)
        n_t = int(np.sum(inside & (names == "tumour")))
        n_i = int(np.sum(inside & (names == "immune")))
        assert (int(row["tumour"]), int(row["immune"])) == (n_t, n_i)
        assert float(row["area_um2"]) == pytest.approx((x1 - x0) * (y1 - y0) * 0.25)
        assert float(row["positive %"]) == pytest.approx(100 * n_t / (n_t + n_i), abs=1e-3)
        assert float(row["tumour per mm2"]) == pytest.approx(
            n_t / ((x1 - x0) * (y1 - y0) * 0.25 / 1e6), rel=1e-4)
    assert int(rows[0]["cells"]) == len(xy) == res.n_cells > 10
    summary = json.loads((out / "predictions.json").read_text())
    entry = summary["images"]["slide"]["readouts"]
    assert entry["regions"][1]["measurements"]["qpcell: Num tumour"] == float(rows[1]["tumour"])
    assert summary["readouts"]["positive_classes"] == ["tumour"]
    tsv = [ln.split("\t") for ln in (out / "slide.measurements.tsv").read_text().splitlines()]
    assert tsv[0] == ["index", "region", "measurement", "value"]
    assert ["2", "region 2", "qpcell: Num tumour", repr(float(rows[2]["tumour"]))] in tsv
    # hotspots: QuPath annotations of the right class and size, with their figures
    spots = json.loads((out / "slide.hotspots.json").read_text())["features"]
    kinds = [h["kind"] for h in entry["hotspots"]]
    assert kinds[0] == "positive" and len(spots) == len(kinds)
    first = spots[0]["properties"]
    assert first["classification"]["name"] == HOTSPOT_CLASS
    assert first["measurements"]["qpcell: positive %"] == pytest.approx(
        entry["hotspots"][0]["positive_percent"])
    ring = np.array(spots[0]["geometry"]["coordinates"][0])
    r = np.hypot(*(ring - [entry["hotspots"][0]["x"], entry["hotspots"][0]["y"]]).T)
    assert r == pytest.approx(np.sqrt(0.002e6 / 0.25 / np.pi), rel=1e-3)
    assert len(read_geojson(out / "slide.hotspots.json").regions) == 0  # classified
    with Image.open(out / "slide.report.png") as im:
        assert im.size[0] > 800 and im.size[1] > 500
    assert res.readouts["hotspots"][0]["positive_percent"] >= float(rows[0]["positive %"])


def test_without_options_no_hotspots_and_rerun_keeps_rows(job, tmp_path):
    out = tmp_path / "out"
    job.regions = None
    predict_to_folder([job], predictor(mpp=0.5), out, tile_size=256,
                      readouts=ReadoutOptions(report=False))
    assert not (out / "slide.hotspots.json").exists()
    assert not (out / "slide.report.png").exists()
    first = (out / "summary.csv").read_text()
    assert "positive" not in first.splitlines()[0] and len(first.splitlines()) == 2
    other = PredictionJob("other", job.image, None, 0.5)
    predict_to_folder([job, other], predictor(mpp=0.5), out, tile_size=256,
                      readouts=ReadoutOptions(report=False))
    lines = (out / "summary.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["slide", "other"]
    assert lines[1] == first.splitlines()[1]
    assert CLASSES[0].name in lines[0]
