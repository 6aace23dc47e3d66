"""Tiled prediction over images and slides, and the prediction output folder.

The "model" here is a fake map function computed pixel by pixel from the tile itself (dark =
cell, red vs blue = class), so tiling, halos, offsets and resampling are exercised for real
while the expected result (one whole-image pass) is known exactly.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from qpcell.config import PostprocessConfig
from qpcell.errors import QpcellError
from qpcell.io.geojson import QPCELL_SCORE, probability_key, read_geojson
from qpcell.io.outputs import csv_columns
from qpcell.io.project import write_project
from qpcell.io.slides import Slide, open_slide, to_full_res
from qpcell.points import AnnotatedImage, make_classes
from qpcell.postprocess import postprocess_sdrdin
from qpcell.predict import (
    PredictionJob,
    Predictor,
    collect_jobs,
    default_halo,
    plan_tiles,
    predict_slide,
    predict_to_folder,
)

CLASSES = make_classes(["tumour", "immune"], [(200, 40, 40), (40, 40, 220)])
BACKGROUND = np.array([245, 240, 245], np.float32)
COLOURS = np.array([[170, 70, 40], [50, 60, 170]], np.float32)  # brown tumour, blue immune
CFG = PostprocessConfig()


def synthetic_image(h: int, w: int, n: int, seed: int = 0, sigma: float = 5.0,
                    min_gap: float = 14.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB image with ``n`` Gaussian cells; returns (image, xy, labels)."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    tries = 0
    while len(pts) < n and tries < 100_000:
        tries += 1
        p = rng.uniform([4, 4], [w - 4, h - 4])
        if not pts or np.min(np.hypot(*(np.array(pts) - p).T)) > min_gap:
            pts.append(p)
    xy = np.array(pts)
    labels = rng.integers(0, 2, len(xy))
    g = np.zeros((h, w), np.float32)
    col = np.zeros((h, w, 3), np.float32)
    r = int(4 * sigma)
    for (x, y), k in zip(xy, labels, strict=True):
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        b = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
        win = b > g[y0:y1, x0:x1]
        g[y0:y1, x0:x1][win] = b[win]
        col[y0:y1, x0:x1][win] = COLOURS[k]
    img = BACKGROUND * (1 - g[..., None]) + col * g[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), xy, labels


def fake_maps(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise maps: det = darkness, class = red vs blue (times det)."""
    t = tiles.astype(np.float32)
    det = np.clip((BACKGROUND.mean() - t.mean(axis=-1)) / 120.0, 0, 1)
    red = 1 / (1 + np.exp(-(t[..., 0] - t[..., 2]) / 20.0))
    cls = np.stack([det * red, det * (1 - red)], axis=1)
    return det.astype(np.float32), cls.astype(np.float32)


def fake_post(cfg: PostprocessConfig = CFG):
    return lambda det, cls: postprocess_sdrdin(det, cls, cfg, CLASSES)


def whole_image_cells(slide: Slide, mpp: float | None, cfg: PostprocessConfig = CFG):
    """The reference: one pass over the whole image on the model's grid."""
    read_mpp = mpp if slide.mpp is not None else None
    gw, gh = slide.grid_size(read_mpp)
    px = slide.read_grid(0, 0, gw, gh, mpp=read_mpp)
    det, cls = fake_maps(px[None])
    d = postprocess_sdrdin(det[0], cls[0], cfg, CLASSES)
    return to_full_res(d.xy, slide.scale_for(read_mpp)), d


def sort_cells(xy, *arrays):
    order = np.lexsort((xy[:, 0], xy[:, 1]))
    return (xy[order],) + tuple(a[order] for a in arrays)


class CountingMaps:
    """fake_maps that counts tiles and can fail on the n-th call."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.tiles = 0
        self.fail_on = fail_on

    def __call__(self, tiles):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash in the model")
        self.tiles += len(tiles)
        return fake_maps(tiles)


@pytest.fixture(scope="module")
def scene():
    return synthetic_image(700, 900, 200, seed=1)


# ---------------------------------------------------------------------------- tiling

def test_tiled_equals_whole_image(scene):
    img, truth, _ = scene
    slide = Slide.from_array(img)
    ref_xy, ref = whole_image_cells(slide, None)
    assert 180 <= len(ref) <= 200
    maps = CountingMaps()
    got = predict_slide(slide, maps, fake_post(), mpp=None, tile_size=256,
                        reach_px=CFG.reach_px, batch_size=3)
    assert maps.tiles == 4 * 5 and maps.calls == 7  # 192 px cores over 900 x 700
    a = sort_cells(ref_xy, ref.labels, ref.class_probs, ref.scores)
    b = sort_cells(got.xy, got.labels, got.class_probs, got.scores)
    assert len(got) == len(ref)
    np.testing.assert_allclose(b[0], a[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(b[1], a[1])
    np.testing.assert_allclose(b[2], a[2], atol=1e-6)
    np.testing.assert_array_equal(b[3], a[3])
    # and the cells are the real ones
    d = np.hypot(*(got.xy[:, None] - truth[None]).transpose(2, 0, 1)).min(axis=1)
    assert np.median(d) < 0.5


def test_tiled_equals_whole_image_with_neighbour_context(scene):
    img, _, _ = scene
    slide = Slide.from_array(img)
    cfg = PostprocessConfig(context_radius_px=40.0, context_weight=0.5)
    ref_xy, ref = whole_image_cells(slide, None, cfg)
    _, plain = whole_image_cells(slide, None)
    assert np.abs(ref.class_probs - plain.class_probs).max() > 0.05  # the context counts
    got = predict_slide(slide, fake_maps, fake_post(cfg), mpp=None, tile_size=256,
                        reach_px=cfg.reach_px, batch_size=3)
    a = sort_cells(ref_xy, ref.labels, ref.class_probs)
    b = sort_cells(got.xy, got.labels, got.class_probs)
    assert len(got) == len(ref)
    np.testing.assert_allclose(b[0], a[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(b[1], a[1])
    np.testing.assert_allclose(b[2], a[2], atol=1e-6)
    # a halo that covers the classes' boxes but not the neighbours changes cells at the cores'
    # edges
    short = predict_slide(slide, fake_maps, fake_post(cfg), mpp=None, tile_size=256,
                          reach_px=CFG.reach_px, batch_size=3)
    c = sort_cells(short.xy, short.class_probs)
    assert np.abs(c[1] - a[2]).max() > 1e-3


def test_tiled_equals_whole_image_when_resampled(scene):
    img, _, _ = scene
    big = np.asarray(Image.fromarray(img).resize((1800, 1400), Image.BICUBIC))
    slide = Slide.from_array(big, mpp=0.22)  # model at 0.44: 2x down
    ref_xy, ref = whole_image_cells(slide, 0.44)
    got = predict_slide(slide, fake_maps, fake_post(), mpp=0.44, tile_size=256,
                        reach_px=CFG.reach_px)
    assert got.mpp == 0.22
    a = sort_cells(ref_xy, ref.labels)
    b = sort_cells(got.xy, got.labels)
    assert len(got) == len(ref) > 150
    np.testing.assert_allclose(b[0], a[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(b[1], a[1])


def test_halo_and_plan():
    assert default_halo(0.44, 25) == 32
    assert default_halo(0.22, 25) == 64  # 32 px at 0.44 = 64 px at 0.22
    assert default_halo(0.44, 49) == 56
    slide = Slide.from_array(np.full((200, 200, 3), 255, np.uint8))
    plan = plan_tiles(slide, mpp=None, tile_size=512, reach_px=25)
    assert plan.tile == 272 and len(plan) == 1  # small image: one smaller tile
    with pytest.raises(QpcellError, match="tile size"):
        plan_tiles(Slide.from_array(np.zeros((2000, 2000, 3), np.uint8)), mpp=None,
                   tile_size=64, reach_px=25)


def test_regions_restrict_tiles_and_cells(scene):
    img, _, _ = scene
    slide = Slide.from_array(img)
    ref_xy, ref = whole_image_cells(slide, None)
    region = shapely.Polygon([(50, 60), (400, 80), (380, 330), (70, 300)])
    maps = CountingMaps()
    got = predict_slide(slide, maps, fake_post(), mpp=None, tile_size=256,
                        reach_px=CFG.reach_px, regions=[region])
    inside = shapely.contains_xy(region, ref_xy[:, 0], ref_xy[:, 1])
    assert 0 < inside.sum() < len(ref)
    assert maps.tiles == 6  # cores [0,192)+[192,384)+[384,576) x [0,192)+[192,384)
    a = sort_cells(ref_xy[inside], ref.labels[inside])
    b = sort_cells(got.xy, got.labels)
    np.testing.assert_allclose(b[0], a[0], atol=1e-6)
    np.testing.assert_array_equal(b[1], a[1])
    # an empty region list predicts nothing
    none = predict_slide(slide, maps, fake_post(), mpp=None, tile_size=256, regions=[],
                         classes=CLASSES)
    assert len(none) == 0


def test_bounds_offset_moves_cells_to_qupath_coordinates(scene):
    img, _, _ = scene
    framed = np.full((760, 1000, 3), 30, np.uint8)  # dark frame: would be "cells" if read
    framed[40:740, 70:970] = img
    props = {"openslide.bounds-x": "70", "openslide.bounds-y": "40",
             "openslide.bounds-width": "900", "openslide.bounds-height": "700"}
    slide = Slide.from_array(framed, properties=props)
    ref_xy, ref = whole_image_cells(Slide.from_array(img), None)
    got = predict_slide(slide, fake_maps, fake_post(), mpp=None, tile_size=256,
                        reach_px=CFG.reach_px)
    a = sort_cells(ref_xy, ref.labels)
    b = sort_cells(got.xy, got.labels)
    np.testing.assert_allclose(b[0], a[0], atol=1e-6)
    np.testing.assert_array_equal(b[1], a[1])


def test_tissue_detection_skips_empty_tiles():
    img, _, _ = synthetic_image(600, 700, 60, seed=4)
    big = np.full((2400, 2400, 3), 248, np.uint8)  # 5.8 Mpx of glass
    big[1000:1600, 1200:1900] = img
    big[1000:1600, 1200:1900] = np.minimum(big[1000:1600, 1200:1900], 218)  # faint tissue
    slide = Slide.from_array(big)
    maps = CountingMaps()
    got = predict_slide(slide, maps, fake_post(), mpp=None, tile_size=512,
                        reach_px=CFG.reach_px, batch_size=8)
    plan = plan_tiles(slide, mpp=None, tile_size=512, reach_px=CFG.reach_px)
    assert plan.n_total == 36 and maps.tiles == len(plan) < 12
    full = predict_slide(slide, fake_maps, fake_post(), mpp=None, tile_size=512,
                         reach_px=CFG.reach_px, tissue=False)
    assert len(got) == len(full) > 50


def test_errors_from_the_map_function_propagate(scene):
    img, _, _ = scene
    with pytest.raises(RuntimeError, match="simulated"):
        predict_slide(Slide.from_array(img), CountingMaps(fail_on=2), fake_post(), mpp=None,
                      tile_size=256)
    with pytest.raises(QpcellError, match="shape"):
        predict_slide(Slide.from_array(img), lambda t: (t[..., 0][:, :10], None), fake_post(),
                      mpp=None, tile_size=256)


# ---------------------------------------------------------------------------- output folder

def predictor(maps=fake_maps, mpp=None) -> Predictor:
    return Predictor(maps, fake_post(), CLASSES, mpp, CFG.reach_px, name="fake-model")


@pytest.fixture
def images(tmp_path) -> list[PredictionJob]:
    jobs = []
    for i, (h, w) in enumerate([(300, 400), (256, 330)]):
        img, _, _ = synthetic_image(h, w, 40, seed=10 + i)
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
        jobs.append(PredictionJob(f"img{i}", path))
    return jobs


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_output_folder_formats(images, tmp_path):
    out = tmp_path / "out"
    results = predict_to_folder(images, predictor(), out, tile_size=256)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"img{i}.{ext}" for i in (0, 1)
         for ext in ("geojson", "csv", "overlay.png", "report.png", "measurements.tsv")]
        + ["predictions.json", "summary.csv"])
    with open_slide(images[0].image) as s:
        direct = predict_slide(s, fake_maps, fake_post(), mpp=None, tile_size=256,
                               reach_px=CFG.reach_px)
    assert results[0].counts == direct.counts() and results[0].n_cells == len(direct) > 20
    # GeoJSON through qpcell's own reader
    objs = read_geojson(out / "img0.geojson")
    np.testing.assert_allclose(objs.detection_xy, direct.xy, atol=1e-5)
    assert objs.detection_class == [CLASSES[k].name for k in direct.labels]
    m = objs.detection_measurements[0]
    assert set(m) == {QPCELL_SCORE} | {probability_key(c.name) for c in CLASSES}
    # CSV
    with open(out / "img0.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == csv_columns(direct) == ["x", "y", "class", "score", "p_tumour", "p_immune"]
    assert len(rows) == len(direct) + 1
    np.testing.assert_allclose(np.array([r[:2] for r in rows[1:]], float), direct.xy, atol=1e-3)
    # overlay
    with Image.open(out / "img0.overlay.png") as im:
        assert im.size == (400, 300)
        ov = np.asarray(im.convert("RGB"))
    assert (np.all(ov == CLASSES[0].color, axis=-1)).any()
    # summary
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"] == "fake-model"
    assert [c["name"] for c in summary["classes"]] == ["tumour", "immune"]
    assert summary["images"]["img0"]["counts"] == direct.counts()
    assert summary["images"]["img1"]["mpp"] is None


@pytest.mark.parametrize("mpp", [None, 0.5])
def test_streamed_outputs_equal_the_one_shot_writers(images, tmp_path, mpp):
    """The CSV and GeoJSON written tile by tile are those of write_csv / write_detections
    for all the cells at once (GeoJSON ids are random UUIDs: compared without them)."""
    from qpcell.io.geojson import write_detections
    from qpcell.io.outputs import write_csv

    job = PredictionJob(images[0].name, images[0].image, mpp=mpp)
    predict_to_folder([job], predictor(mpp=mpp), tmp_path / "o", tile_size=256, batch_size=2)
    with open_slide(job.image, mpp=mpp) as s:
        direct = predict_slide(s, fake_maps, fake_post(), mpp=mpp, tile_size=256,
                               reach_px=CFG.reach_px)
    assert len(direct) > 20
    write_csv(tmp_path / "ref.csv", direct)
    write_detections(tmp_path / "ref.geojson", direct, mpp=direct.mpp)
    assert (tmp_path / "o" / "img0.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()

    def without_ids(path):
        data = json.loads(path.read_text(encoding="utf-8"))
        for f in data["features"]:
            assert len(f.pop("id")) == 36
        return data

    assert without_ids(tmp_path / "o" / "img0.geojson") == without_ids(tmp_path / "ref.geojson")


def test_empty_image_writes_valid_empty_outputs(tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 240, 3), 245, np.uint8)).save(path)
    res = predict_to_folder([PredictionJob("blank", path)], predictor(), tmp_path / "o",
                            tile_size=256)
    assert res[0].n_cells == 0 and res[0].counts == {"tumour": 0, "immune": 0}
    data = json.loads((tmp_path / "o" / "blank.geojson").read_text(encoding="utf-8"))
    assert data == {"type": "FeatureCollection", "features": []}
    assert (tmp_path / "o" / "blank.csv").read_text(encoding="utf-8").splitlines() == [
        "x,y,class,score,p_tumour,p_immune"]


def test_csv_has_micrometres_when_pixel_size_known(images, tmp_path):
    job = PredictionJob(images[0].name, images[0].image, mpp=0.5)
    predict_to_folder([job], predictor(mpp=0.5), tmp_path / "o", tile_size=256)
    with open(tmp_path / "o" / "img0.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][-2:] == ["x_um", "y_um"]
    x, x_um = float(rows[1][0]), float(rows[1][-2])
    assert x_um == pytest.approx(x * 0.5, abs=2e-3)


def test_rerun_skips_and_overwrite_redoes(images, tmp_path):
    out = tmp_path / "out"
    first = predict_to_folder(images, predictor(), out, tile_size=256)
    before = snapshot(out)
    maps = CountingMaps()
    events = []
    again = predict_to_folder(images, predictor(maps), out, tile_size=256, on_event=events.append)
    assert maps.calls == 0 and all(r.skipped for r in again)
    assert [r.counts for r in again] == [r.counts for r in first]
    assert [e.kind for e in events] == ["skip", "skip"]
    assert snapshot(out) == before
    # without predictions.json nothing says which image and model made the files: redone
    (out / "predictions.json").unlink()
    again = predict_to_folder(images, predictor(maps), out, tile_size=256)
    assert [r.counts for r in again] == [r.counts for r in first] and maps.calls == 3
    maps.calls = 0
    # --overwrite predicts again and rewrites every file
    before = snapshot(out)
    events = []
    redo = predict_to_folder(images, predictor(maps), out, tile_size=256, overwrite=True,
                             on_event=events.append)
    assert maps.calls == 3 and not any(r.skipped for r in redo)  # 6 + 4 tiles, batches of 4
    after = snapshot(out)
    assert all(after[k] != before[k] for k in before if k != "predictions.json")
    assert [e.kind for e in events] == (["start"] + ["tiles"] * 3 + ["done"]
                                        + ["start"] + ["tiles"] * 2 + ["done"])
    assert [(e.done, e.total) for e in events if e.kind == "tiles"] == [
        (0, 6), (4, 6), (6, 6), (0, 4), (4, 4)]
    # another model's folder is refused without --overwrite
    other = Predictor(fake_maps, fake_post(), CLASSES, None, name="other-model")
    with pytest.raises(QpcellError, match="another model"):
        predict_to_folder(images, other, out)


def test_a_result_is_reused_only_for_the_same_file_and_model(images, tmp_path):
    """Issue 14: another image of the same name, or a model retrained into the same folder,
    must not get the cells predicted before."""
    out = tmp_path / "out"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    (model / "weights.safetensors").write_bytes(b"weights 1")

    def named(maps=fake_maps):
        return Predictor(maps, fake_post(), CLASSES, None, CFG.reach_px, name=str(model))

    first = predict_to_folder(images[:1], named(), out, tile_size=256)
    maps = CountingMaps()
    assert predict_to_folder(images[:1], named(maps), out, tile_size=256)[0].skipped
    assert maps.calls == 0
    # dirB/img0.png: another image of the same name
    other = tmp_path / "dirB" / "img0.png"
    other.parent.mkdir()
    other.write_bytes(images[1].image.read_bytes())
    res = predict_to_folder([PredictionJob("img0", other)], named(maps), out, tile_size=256)
    assert not res[0].skipped and maps.calls > 0
    assert res[0].counts != first[0].counts
    recorded = json.loads((out / "predictions.json").read_text())["images"]["img0"]
    assert recorded["image"] == str(other) and recorded["source"]["path"] == str(other.resolve())
    # the same file, the model retrained into the same folder
    maps.calls = 0
    assert predict_to_folder([PredictionJob("img0", other)], named(maps), out,
                             tile_size=256)[0].skipped
    (model / "weights.safetensors").write_bytes(b"weights 2")
    res = predict_to_folder([PredictionJob("img0", other)], named(maps), out, tile_size=256)
    assert not res[0].skipped and maps.calls > 0
    # the same file and model, asked at another pixel size
    maps.calls = 0
    res = predict_to_folder([PredictionJob("img0", other, mpp=0.5)], named(maps), out,
                            tile_size=256)
    assert not res[0].skipped and maps.calls > 0
    maps.calls = 0
    assert predict_to_folder([PredictionJob("img0", other, mpp=0.5)], named(maps), out,
                             tile_size=256)[0].skipped and maps.calls == 0
    # the same path, the file changed
    other.write_bytes(images[0].image.read_bytes())
    res = predict_to_folder([PredictionJob("img0", other)], named(maps), out, tile_size=256)
    assert not res[0].skipped and maps.calls > 0 and res[0].counts == first[0].counts


def test_interrupted_run_leaves_no_half_written_file(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    maps = CountingMaps(fail_on=3)  # the first image is 2 calls: the second image fails
    with pytest.raises(RuntimeError, match="simulated"):
        predict_to_folder(images, predictor(maps), out, tile_size=256)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["img0.csv", "img0.geojson", "img0.measurements.tsv", "img0.overlay.png",
                     "img0.report.png", "predictions.json", "summary.csv"]
    assert list(json.loads((out / "predictions.json").read_text())["images"]) == ["img0"]
    # a crash while the GeoJSON is being written: no GeoJSON, no temporary file
    import qpcell.predict as pr

    def broken_features(det, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pr, "detections_to_features", broken_features)
    with pytest.raises(OSError, match="disk full"):
        predict_to_folder(images, predictor(), out, tile_size=256)
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in names)
    assert "img1.geojson" not in names
    monkeypatch.undo()
    # the next run finishes the job: img0 skipped, img1 predicted
    res = predict_to_folder(images, predictor(), out, tile_size=256)
    assert [r.skipped for r in res] == [True, False]
    assert (out / "img1.geojson").is_file()


def test_collect_jobs_file_folder_and_project(images, tmp_path):
    jobs = collect_jobs(images[0].image)
    assert [(j.name, j.regions) for j in jobs] == [("img0", None)]
    jobs = collect_jobs(images[0].image.parent, mpp=0.3)
    assert [j.name for j in jobs] == ["img0", "img1"] and {j.mpp for j in jobs} == {0.3}
    # a GeoJSON project with a region on img0 and only points on img1
    region = shapely.box(10, 10, 200, 150)
    anns = [AnnotatedImage("img0", images[0].image, [[20.0, 20.0]], [0], CLASSES,
                           regions=[region]),
            AnnotatedImage("img1", images[1].image, [[30.0, 30.0]], [1], CLASSES)]
    proj = write_project(tmp_path / "proj", anns)
    jobs = collect_jobs(proj)
    assert [j.name for j in jobs] == ["img0", "img1"]
    assert jobs[0].regions is not None and jobs[0].regions[0].equals(region)
    assert jobs[1].regions is None
    assert all(j.regions is None for j in collect_jobs(proj, regions="none"))
    res = predict_to_folder(jobs, predictor(), tmp_path / "out", tile_size=256)
    xy = read_geojson(tmp_path / "out" / "img0.geojson").detection_xy
    assert len(xy) == res[0].n_cells > 0
    assert shapely.contains_xy(region, xy[:, 0], xy[:, 1]).all()
    with pytest.raises(QpcellError):
        collect_jobs(tmp_path / "missing")
    with pytest.raises(QpcellError):
        collect_jobs(images[0].image, regions="some")


def test_overlay_skipped_for_large_images(images, tmp_path):
    res = predict_to_folder(images[:1], predictor(), tmp_path / "o", tile_size=256,
                            overlay_max_pixels=1000)
    assert not (tmp_path / "o" / "img0.overlay.png").exists()
    assert any("no overlay" in w for w in res[0].warnings)
    assert os.path.exists(tmp_path / "o" / "img0.geojson")


def test_cells_found_table_names_every_column(images, tmp_path, capsys, monkeypatch):
    """Issue 14: the last column (time, or why an image was not predicted) had no name."""
    from qpcell.cli import _app
    from qpcell.cli.predict import _print_table

    monkeypatch.setattr(_app.console, "_width", 200)
    out = tmp_path / "out"
    results = predict_to_folder(images[:1], predictor(), out, tile_size=256)
    results += predict_to_folder(images[:1], predictor(), out, tile_size=256)
    _print_table(out, CLASSES, results)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "image" in line and "total" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == [
        "image", "tumour", "immune", "total", "status"]
    assert any("skipped (exists)" in line for line in lines)
