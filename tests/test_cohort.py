"""Cohorts on Dask: a two-worker local cluster gives exactly the single-process outputs.

A tiny S-DRDIN is trained here (it must find cells for the comparison to mean anything); the
slides are three synthetic PNGs and a pyramidal OME-TIFF big enough to be split into blocks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qpcell.config import PatchConfig, TrainConfig
from qpcell.errors import QpcellError
from qpcell.io.geojson import read_geojson
from qpcell.predict import PredictionJob, TilePlan, collect_jobs

distributed = pytest.importorskip("distributed", reason="Dask distributed is not installed")

TILE = 128  # 64 px cores inside the 32 px halo: a 256 x 320 slide has 20 tiles
BLOCK = 6  # -> the slide is cut into 3 blocks (of 8, 8 and 4 tiles with batch size 4)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread here, as on each of the two workers: on a busy two-core machine more
    threads only contend (training took 7x longer with two under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny S-DRDIN trained for 20 steps: enough to find cells in the synthetic images."""
    from qpcell.synthetic import synthetic_classes, write_synthetic_project
    from qpcell.train import train

    root = tmp_path_factory.mktemp("cohort")
    anns = write_synthetic_project(root / "project", 3, (128, 128), 3, seed=5)
    train(anns, synthetic_classes(3), root / "model", model_kwargs={"base": 4}, model_mpp=None,
          train_cfg=replace(TrainConfig(), epochs=1, lr=3e-3),
          patch_cfg=replace(PatchConfig(), size=64, stride=32), max_steps_per_epoch=20,
          device="cpu")
    return root / "model"


@pytest.fixture(scope="module")
def slides(model) -> Path:
    """Three PNGs and a two-level pyramidal OME-TIFF (0.44 µm/px), no annotations."""
    import tifffile

    from qpcell.synthetic import render_image

    folder = model.parent / "slides"
    folder.mkdir()
    for png in sorted((model.parent / "project").glob("*.png")):
        shutil.copy(png, folder)
    img, _, _ = render_image((256, 320), 3, rng=7)
    meta = {"axes": "YXS", "PhysicalSizeX": 0.44, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.44, "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(folder / "big.ome.tif", ome=True) as tw:
        opts = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
        tw.write(img, subifds=1, metadata=meta, **opts)
        tw.write(img[::2, ::2].copy(), subfiletype=1, **opts)
    return folder


@pytest.fixture(scope="module")
def reference(model, slides) -> Path:
    """The single-process run: ``qpcell.predict.predict_to_folder``."""
    from qpcell.checkpoint import load_model
    from qpcell.predict import Predictor, predict_to_folder

    out = model.parent / "reference"
    predictor = Predictor.from_bundle(load_model(model, device="cpu"), name=str(model.resolve()))
    results = predict_to_folder(collect_jobs(slides), predictor, out, tile_size=TILE)
    assert all(r.n_cells > 0 for r in results), "the tiny model must find cells"
    return out


@pytest.fixture(scope="module")
def client():
    """A local cluster of two worker processes with one thread each."""
    from qpcell.cohort import cohort_client

    try:
        ctx = cohort_client(workers=2, threads_per_worker=1, processes=True)
        dask_client = ctx.__enter__()
    except Exception as err:  # noqa: BLE001 - any failure to start means: cannot test here
        pytest.skip(f"a local Dask cluster cannot start here: {type(err).__name__}: {err}")
    yield dask_client
    ctx.__exit__(None, None, None)


def assert_same_cells(a: Path, b: Path) -> None:
    """Same cells, same classes, same scores and probabilities (to 1e-6) in two GeoJSONs."""
    x, y = read_geojson(a), read_geojson(b)
    assert len(x.detection_xy) == len(y.detection_xy) > 0
    np.testing.assert_allclose(x.detection_xy, y.detection_xy, atol=1e-6)
    assert x.detection_class == y.detection_class
    for mx, my in zip(x.detection_measurements, y.detection_measurements, strict=True):
        assert mx.keys() == my.keys()
        np.testing.assert_allclose([mx[k] for k in mx], [my[k] for k in mx], atol=1e-6)


def csv_rows(out: Path) -> tuple[str, list[str]]:
    """``summary.csv``: its header and its rows in any order (images finish in any order)."""
    header, *rows = (out / "summary.csv").read_text().splitlines()
    return header, sorted(rows)


def summary_images(out: Path) -> dict:
    images = json.loads((out / "predictions.json").read_text())["images"]
    return {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in images.items()}


# ------------------------------------------------------------------------------ on the cluster

def test_two_workers_give_the_single_process_result(client, model, slides, reference, tmp_path):
    from qpcell.cohort import CohortOptions, predict_cohort

    events = []
    out = tmp_path / "out"
    outcome = predict_cohort(collect_jobs(slides), model, out, client,
                             options=CohortOptions(tile_size=TILE, block_tiles=BLOCK),
                             on_event=events.append)
    assert not outcome.failures
    assert [r.name for r in outcome.results] == ["big", "synthetic-000", "synthetic-001",
                                                 "synthetic-002"]
    split = [e for e in events if e.kind == "split"]
    assert [(e.name, e.blocks) for e in split] == [("big", 3)]
    assert sorted(e.name for e in events if e.kind == "done") == sorted(
        r.name for r in outcome.results)
    for r in outcome.results:
        assert_same_cells(reference / f"{r.name}.geojson", out / f"{r.name}.geojson")
        assert r.outputs["geojson"] == out / f"{r.name}.geojson"
    assert summary_images(out) == summary_images(reference)
    ref = json.loads((reference / "predictions.json").read_text())
    got = json.loads((out / "predictions.json").read_text())
    assert {k: v for k, v in got.items() if k != "images"} == \
        {k: v for k, v in ref.items() if k != "images"}
    assert csv_rows(out) == csv_rows(reference)
    assert (out / "big.report.png").is_file() and (out / "big.measurements.tsv").is_file()
    assert (out / "synthetic-000.overlay.png").is_file()
    assert not list(out.glob(".*.tmp"))  # every write was atomic


def test_positive_percent_and_hotspots_match_the_single_process_run(client, model, slides,
                                                                   tmp_path):
    from qpcell.checkpoint import load_model
    from qpcell.cohort import CohortOptions, predict_cohort
    from qpcell.io.readouts import ReadoutOptions
    from qpcell.predict import Predictor, predict_to_folder
    from qpcell.readouts import PositiveRule

    bundle = load_model(model, device="cpu")
    names = [c.name for c in bundle.classes]
    readouts = ReadoutOptions(PositiveRule((names[0],), ()), hotspot_mm2=400.0, min_cells=1,
                              report=False)
    jobs = collect_jobs(slides)
    ref = tmp_path / "ref"
    predict_to_folder(jobs, Predictor.from_bundle(bundle, name=str(model.resolve())), ref,
                      tile_size=TILE, readouts=readouts)
    out = tmp_path / "out"
    outcome = predict_cohort(collect_jobs(slides), model, out, client,
                             options=CohortOptions(tile_size=TILE, block_tiles=BLOCK,
                                                   readouts=readouts))
    assert not outcome.failures
    got = {r.name: r.readouts for r in outcome.results}
    assert any(h["kind"] == "positive" for h in got["big"]["hotspots"])
    assert summary_images(out) == summary_images(ref)
    assert csv_rows(out) == csv_rows(ref)
    assert (out / "big.hotspots.json").read_bytes() != b""
    assert not (out / "big.report.png").exists()


def test_finished_images_are_skipped_and_an_unfinished_one_is_redone(client, model, slides,
                                                                      tmp_path):
    from qpcell.cohort import CohortOptions, predict_cohort

    out = tmp_path / "out"
    jobs = [j for j in collect_jobs(slides) if j.name != "big"]
    options = CohortOptions(tile_size=TILE)
    predict_cohort(jobs, model, out, client, options=options)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.geojson")}
    (out / "synthetic-001.geojson").unlink()  # as if interrupted before its marker
    events = []
    outcome = predict_cohort(jobs, model, out, client, options=options, on_event=events.append)
    assert [(e.kind, e.name) for e in events if e.kind != "done"] == [
        ("skip", "synthetic-000"), ("skip", "synthetic-002")]
    assert [e.name for e in events if e.kind == "done"] == ["synthetic-001"]
    assert [r.skipped for r in outcome.results] == [True, False, True]
    assert outcome.results[0].counts == json.loads(
        (out / "predictions.json").read_text())["images"]["synthetic-000"]["counts"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.geojson")}
    assert after["synthetic-000.geojson"] == before["synthetic-000.geojson"]
    assert set(after) == set(before)


def test_cli_on_an_existing_scheduler(cli, client, model, slides, reference, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("synthetic-000.png", "synthetic-001.png"):
        shutil.copy(slides / name, folder)
    out = tmp_path / "out"
    code, stdout, stderr = cli("predict", model, folder, "--out", out, "--tile-size", TILE,
                               "--scheduler", client.scheduler.address, "--batch-size", 2,
                               "--block-tiles", 2)
    assert code == 0, stderr
    assert "synthetic-000: 2 blocks of tiles" in stdout and "Cells found" in stdout
    for name in ("synthetic-000", "synthetic-001"):
        assert_same_cells(reference / f"{name}.geojson", out / f"{name}.geojson")


def test_a_corrupt_image_is_reported_and_the_others_are_written(cli, model, slides, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("synthetic-000.png", "synthetic-001.png"):
        shutil.copy(slides / name, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    out = tmp_path / "out"
    code, stdout, stderr = cli("predict", model, folder, "--out", out, "--tile-size", TILE,
                               "--dask-workers", 2, "--retries", 1)
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 image(s) failed (first: broken: ")
    assert "broken.png" in last and "Traceback" not in stderr
    assert "failed:" in stdout.split("Cells found")[1]  # the table lists it
    assert sorted(p.name for p in out.glob("*.geojson")) == ["synthetic-000.geojson",
                                                             "synthetic-001.geojson"]
    summary = json.loads((out / "predictions.json").read_text())
    assert sorted(summary["images"]) == ["synthetic-000", "synthetic-001"]


# ------------------------------------------------------------------------------ without one

def _plan(n: int) -> TilePlan:
    cores = np.array([[64 * i, 0, 64 * i + 64, 64] for i in range(n)], np.int64)
    return TilePlan(1.0, None, (64 * n, 64), 128, 32, cores, n)


def test_blocks_keep_the_raster_order_and_whole_batches():
    from qpcell.cohort import split_plan

    plan = _plan(42)
    blocks = split_plan(plan, 6, batch_size=4)
    assert [len(b) for b in blocks] == [8, 8, 8, 8, 8, 2]
    np.testing.assert_array_equal(np.concatenate([b.cores for b in blocks]), plan.cores)
    assert all(b.halo == plan.halo and b.tile == plan.tile for b in blocks)
    assert len(split_plan(plan, 100)) == 1
    with pytest.raises(QpcellError):
        split_plan(plan, 0)


def test_torch_threads_share_the_cores_among_dask_threads(monkeypatch):
    import qpcell.cohort as cohort

    monkeypatch.setattr(cohort, "usable_cores", lambda: 16)
    monkeypatch.setattr(cohort, "_worker", lambda: ("10.0.0.1", 0, 2))
    assert cohort.worker_threads(None, {"10.0.0.1": 8}) == 2  # 4 workers x 2 threads
    assert cohort.worker_threads(None, {"10.0.0.2": 8}) == 8  # host unknown: its own threads
    assert cohort.worker_threads(3, {"10.0.0.1": 8}) == 3
    monkeypatch.setattr(cohort, "_worker", lambda: ("10.0.0.1", 0, 1))
    assert cohort.worker_threads(None, {"10.0.0.1": 40}) == 1


def test_a_worker_loads_the_model_once_and_again_when_it_changes(model, tmp_path):
    from qpcell.checkpoint import WEIGHTS
    from qpcell.cohort import load_predictor

    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    first = load_predictor(copy, "cpu")
    assert load_predictor(copy, "cpu") is first
    assert first.name == str(copy.resolve())
    weights = copy / WEIGHTS
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_predictor(copy, "cpu") is not first


def test_cluster_options_are_checked(cli, model, slides, tmp_path):
    from qpcell.cli.predict import ClusterArgs
    from qpcell.cohort import DEFAULT_BLOCK_TILES, cohort_client

    assert ClusterArgs().block_tiles == DEFAULT_BLOCK_TILES
    code, _, stderr = cli("predict", model, slides, "--out", tmp_path / "o", "--dask-workers",
                          2, "--scheduler", "tcp://127.0.0.1:9")
    assert code == 1 and "not both" in stderr and len(stderr.strip().splitlines()) == 1
    with pytest.raises(QpcellError, match="cannot reach the Dask scheduler"):
        with cohort_client(scheduler="tcp://127.0.0.1:9", timeout=1):
            pass
    with pytest.raises(QpcellError, match="either"):
        with cohort_client():
            pass


def test_duplicate_names_are_refused_before_anything_runs(model, tmp_path):
    from qpcell.cohort import predict_cohort

    jobs = [PredictionJob("a", tmp_path / "a.png"), PredictionJob("a", tmp_path / "b.png")]
    with pytest.raises(QpcellError, match="several images are named 'a'"):
        predict_cohort(jobs, model, tmp_path / "out", client=None)
