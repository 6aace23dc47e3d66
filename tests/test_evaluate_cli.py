"""``qpcell evaluate`` on small synthetic GeoJSON projects and on EndoNuke."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from qpcell.io.geojson import write_detections, write_points
from qpcell.io.project import write_project
from qpcell.points import AnnotatedImage, Detections, make_classes

CLASSES = make_classes(["tumour", "immune"])


def truth(name: str, xy, labels, regions=None, mpp=None) -> AnnotatedImage:
    return AnnotatedImage(name, None, np.asarray(xy, float), np.asarray(labels), CLASSES,
                          regions=regions, mpp=mpp)


def detections(xy, labels, classes=CLASSES) -> Detections:
    n = len(xy)
    return Detections(np.asarray(xy, float).reshape(-1, 2), np.asarray(labels, np.int64),
                      np.full(n, 0.9, np.float32), np.full((n, len(classes)), 0.5, np.float32),
                      classes)


@pytest.fixture
def small(tmp_path) -> tuple[Path, Path]:
    """GT project (2 images, mpp 0.5) and a predictions folder (write_detections)."""
    gt = [truth("a", [[10, 10], [30, 10], [50, 10], [70, 10]], [0, 0, 1, 1], mpp=0.5),
          truth("b", [[10, 10], [40, 40]], [0, 1], mpp=0.5)]
    gt_dir = write_project(tmp_path / "gt", gt)
    pred_dir = tmp_path / "pred"
    write_detections(pred_dir / "a.geojson",
                     detections([[11, 10], [31, 10], [51, 10], [200, 200]], [0, 1, 1, 0]))
    write_detections(pred_dir / "b.geojson", detections([[10, 12], [40, 41]], [0, 1]))
    (pred_dir / "predictions.json").write_text("{}")  # what `qpcell predict` also writes
    return pred_dir, gt_dir


def test_evaluate_tables_json_and_sweep_plot(cli, small, tmp_path):
    pred, gt = small
    out = tmp_path / "scores.json"
    png = tmp_path / "sweep.png"
    code, stdout, stderr = cli("evaluate", pred, gt, "--radius", "3", "--json", out,
                               "--radius-sweep", "0.5,1,2,3,4", "--sweep-png", png)
    assert code == 0, stderr
    assert "3 px = 1.5 µm at 0.5 µm/px" in stdout
    for word in ("Detection", "Classification", "weighted", "accuracy", "F_c", "totalF1",
                 "meanF1", "Radius sweep", "tumour", "immune"):
        assert word in stdout, word
    data = json.loads(out.read_text())
    assert data["radius_px"] == 3 and data["radius_um"] == pytest.approx(1.5)
    assert data["mpp"] == 0.5
    assert data["detection"] == {"tp": 5, "fp": 1, "fn": 1, "precision": pytest.approx(5 / 6),
                                 "recall": pytest.approx(5 / 6), "f1": pytest.approx(5 / 6)}
    assert data["classification"]["confusion"]["matrix"] == [[2, 1], [0, 2]]
    assert data["inputs"]["images"] == ["a", "b"]
    assert [r["radius_px"] for r in data["radius_sweep"]] == [0.5, 1, 2, 3, 4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left nothing behind


def test_radius_in_micrometres(cli, small, tmp_path):
    pred, gt = small
    out = tmp_path / "s.json"
    code, stdout, stderr = cli("evaluate", pred, gt, "--radius", "0.75", "--radius-unit", "um",
                               "--json", out)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["radius_px"] == pytest.approx(1.5) and data["radius_um"] == pytest.approx(0.75)
    assert data["detection"]["tp"] == 4  # the 2 px pair no longer matches
    # an explicit --mpp wins over metadata.json
    code, _, stderr = cli("evaluate", pred, gt, "-r", "1", "--radius-unit", "um",
                          "--mpp", "0.25", "--json", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["radius_px"] == pytest.approx(4)


def test_micrometres_without_pixel_size_is_an_error(cli, tmp_path):
    write_points(tmp_path / "gt.geojson", truth("x", [[1, 1]], [0]))
    write_detections(tmp_path / "p.geojson", detections([[1, 1]], [0]))
    code, _, stderr = cli("evaluate", tmp_path / "p.geojson", tmp_path / "gt.geojson",
                          "-r", "2", "--radius-unit", "um")
    assert code == 1 and "--mpp" in stderr and len(stderr.strip().splitlines()) == 1


def test_single_files_regions_and_missing_and_extra_images(cli, tmp_path):
    # two single files are paired whatever their names; GT regions restrict both sides
    gt = truth("slide", [[5, 5], [50, 50]], [0, 0], regions=[box(0, 0, 20, 20)])
    write_points(tmp_path / "slide.geojson", gt)
    write_detections(tmp_path / "other_name.geojson", detections([[6, 5], [80, 80]], [0, 1]))
    out = tmp_path / "s.json"
    code, stdout, stderr = cli("evaluate", tmp_path / "other_name.geojson",
                               tmp_path / "slide.geojson", "-r", "3", "--json", out)
    assert code == 0, stderr
    assert "annotated regions" in stdout and "pixel size unknown" in stdout
    data = json.loads(out.read_text())
    assert (data["detection"]["tp"], data["detection"]["fp"], data["detection"]["fn"]) == (1, 0, 0)
    assert data["n_true_outside_regions"] == 1 and data["n_pred_outside_regions"] == 1
    assert data["radius_um"] is None

    # folders: GT image without predictions -> all FN + warning; extra prediction -> ignored
    gt_dir = write_project(tmp_path / "gt", [truth("a", [[1, 1]], [0]),
                                             truth("b", [[5, 5], [9, 9]], [1, 1])])
    pred_dir = tmp_path / "pred"
    write_detections(pred_dir / "a.geojson", detections([[1, 1]], [0]))
    write_detections(pred_dir / "zzz.geojson", detections([[1, 1]], [0]))
    code, stdout, stderr = cli("evaluate", pred_dir, gt_dir, "-r", "2", "--json", out)
    assert code == 0, stderr
    assert "no prediction for 1 ground-truth image (b)" in stderr
    assert "without ground truth ignored (zzz)" in stderr
    data = json.loads(out.read_text())
    assert (data["detection"]["tp"], data["detection"]["fn"]) == (1, 2)
    assert data["inputs"]["images_without_predictions"] == ["b"]


def test_classes_are_matched_by_name(cli, tmp_path):
    gt_dir = write_project(tmp_path / "gt", [truth("a", [[10, 10], [30, 30]], [0, 1])])
    # the predictions list the classes in the other order and add one GT does not have
    other = make_classes(["immune", "necrosis", "tumour"])
    pred_dir = tmp_path / "pred"
    write_detections(pred_dir / "a.geojson",
                     detections([[10, 11], [30, 31], [90, 90]], [2, 0, 1], other))
    out = tmp_path / "s.json"
    code, stdout, stderr = cli("evaluate", pred_dir, gt_dir, "-r", "3", "--json", out)
    assert code == 0, stderr
    assert "absent from the ground truth: necrosis" in stdout
    data = json.loads(out.read_text())
    assert data["class_names"] == ["tumour", "immune", "necrosis"]
    assert data["classification"]["accuracy"] == 1.0
    assert data["class_aware"][2]["fp"] == 1 and data["class_aware"][2]["total_f1"] == 0.0
    # --classes picks and orders classes; other cells are left out on both sides
    code, stdout, stderr = cli("evaluate", pred_dir, gt_dir, "-r", "3", "--json", out,
                               "--classes", "immune")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["class_names"] == ["immune"] and data["detection"]["tp"] == 1
    assert data["n_pred"] == 1 and data["n_true"] == 1
    code, _, stderr = cli("evaluate", pred_dir, gt_dir, "-r", "3", "--classes", "nope")
    assert code == 1 and "nope" in stderr


@pytest.mark.parametrize("case", ["missing", "empty", "no-common", "bad-radius", "png-no-sweep",
                                  "bad-sweep", "bad-unit", "not-geojson"])
def test_bad_input_is_one_line(cli, small, tmp_path, case):
    pred, gt = small
    args = [pred, gt, "-r", "3"]
    if case == "missing":
        args[0] = tmp_path / "nope"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[0] = tmp_path / "empty"
    elif case == "no-common":
        other = tmp_path / "other"
        write_detections(other / "zzz.geojson", detections([[1, 1]], [0]))
        args[0] = other
    elif case == "bad-radius":
        args[3] = "-1"
    elif case == "png-no-sweep":
        args += ["--sweep-png", tmp_path / "x.png"]
    elif case == "bad-sweep":
        args += ["--radius-sweep", "1,two"]
    elif case == "bad-unit":
        args += ["--radius-unit", "inch"]
    elif case == "not-geojson":
        (tmp_path / "x.csv").write_text("1,2,3\n")
        args[0] = tmp_path / "x.csv"
    code, stdout, stderr = cli("evaluate", *args)
    assert code == 1, (stdout, stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- EndoNuke

ENDONUKE_SUBSET = 40  # images: keeps the import to a fraction of a second


def _import_endonuke(cli, endonuke: Path, tmp_path: Path) -> Path:
    """A GeoJSON project of a subset of EndoNuke, written by `qpcell import`."""
    sub = tmp_path / "endonuke-subset"
    (sub / "labels").mkdir(parents=True)
    (sub / "images").mkdir()
    stems = sorted(p.stem for p in (endonuke / "labels").glob("*.txt"))[:ENDONUKE_SUBSET]
    for s in stems:
        (sub / "labels" / f"{s}.txt").symlink_to(endonuke / "labels" / f"{s}.txt")
        (sub / "images" / f"{s}.png").symlink_to(endonuke / "images" / f"{s}.png")
    if (endonuke / "classes.txt").exists():
        (sub / "classes.txt").symlink_to(endonuke / "classes.txt")
    out = tmp_path / "project"
    t0 = time.perf_counter()
    code, stdout, stderr = cli("import", sub, "--images", sub / "images", "--out", out)
    assert code == 0, stderr
    assert time.perf_counter() - t0 < 30
    assert len(list(out.glob("*.geojson"))) == len(stems)
    return out


def _jitter_project(src: Path, dst: Path, length: float, seed: int = 0) -> None:
    """Copy of a GeoJSON project with every point moved by exactly ``length`` px."""
    from qpcell.io.project import read_project

    rng = np.random.default_rng(seed)
    project = read_project(src)
    moved = []
    for img in project.images:
        angle = rng.uniform(0, 2 * np.pi, len(img))
        xy = img.xy + length * np.c_[np.cos(angle), np.sin(angle)]
        moved.append(AnnotatedImage(img.name, None, xy, img.labels, img.classes,
                                    regions=img.regions, mpp=img.mpp))
    write_project(dst, moved)


def test_endonuke_against_itself_and_jittered(cli, endonuke, tmp_path):
    project = _import_endonuke(cli, endonuke, tmp_path)
    out = tmp_path / "self.json"
    code, stdout, stderr = cli("evaluate", project, project, "-r", "6", "--json", out)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["n_true"] > 1000
    assert data["detection"]["f1"] == 1.0
    assert data["classification"]["accuracy"] == 1.0
    assert all(c["total_f1"] == 1.0 and c["mean_f1"] == 1.0 for c in data["class_aware"])

    jittered = tmp_path / "jittered"
    _jitter_project(project, jittered, 1.0)
    code, _, stderr = cli("evaluate", jittered, project, "-r", "6", "--json", out,
                          "--radius-sweep", "0.5,1.5,3,6", "--sweep-png", tmp_path / "s.png")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["detection"]["f1"] == 1.0
    assert data["mean_match_distance_px"] == pytest.approx(1.0)
    sweep = {r["radius_px"]: r["detection"]["f1"] for r in data["radius_sweep"]}
    assert sweep[0.5] < 1.0 and sweep[1.5] == 1.0 and sweep[6] == 1.0
    code, _, stderr = cli("evaluate", jittered, project, "-r", "0.5", "--json", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["detection"]["f1"] < 1.0
