"""The QuPath round trip against real QuPath code, as a new user runs it.

A QuPath project with classified point annotations (made through paquo) -> a model trained
on it -> cells written back -> a rerun replaces them -> the user's own objects unchanged: by
``groovy/qpcell-train.groovy`` and ``qpcell-detect.groovy`` run headless by QuPath's own
scripting (``../shared/qupath-headless/run-script``), and by ``qpcell train project.qpproj``
and ``qpcell annotate-back``. Each bug of issue 14 found this way has its test here.

Needs paquo with a QuPath (``PAQUO_QUPATH_DIR``; ``scripts/test`` and ``.ci/run`` set up
QuPath 0.5.1's core from ``../shared/qupath-headless``); skipped without, failed in CI.
Training is a few steps on two 128x128 images: the cells found are few but real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN, skip_or_fail_in_ci

from qpcell.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = (*TINY_TRAIN, "--base", "4")
PREDICT_OPTIONS = ("--device", "cpu", "--backend", "torch")
REGION = (4.0, 4.0, 124.0, 124.0)  # the unclassified area annotation of every image
USER_CELL = (1.0, 1.0, 3.0, 3.0)  # a detection of the user's own, outside the region

pytestmark = pytest.mark.usefixtures("real_qupath")


# ------------------------------------------------------------------------------- helpers

def write_images(folder: Path, seed: int, names: list[str] | None = None, n: int = 2):
    """Synthetic 128x128 PNGs (two classes) in ``folder``; ``[(png, AnnotatedImage)]``."""
    from PIL import Image

    from qpcell.synthetic import synthetic_dataset

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, (ann, pixels) in enumerate(synthetic_dataset(n, (128, 128), 2, seed=seed)):
        png = folder / (names[k] if names else f"{ann.name}.png")
        Image.fromarray(pixels).save(png)
        out.append((png, ann))
    return out


def make_project(root: Path, images, *, points: bool = True) -> Path:
    """A QuPath project made by QuPath: per image, point annotations of each class, one
    unclassified region and one detection of the user's own."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint, box

    with QuPathProject(root, mode="x") as qp:
        classes = [QuPathPathClass(c.name, color=c.color) for c in images[0][1].classes]
        qp.path_classes = classes
        for png, ann in images:
            entry = qp.add_image(png, image_type=QuPathImageType.BRIGHTFIELD_H_DAB,
                                 allow_duplicates=True)
            h = entry.hierarchy
            for k, pc in enumerate(classes):
                xy = ann.xy[ann.labels == k]
                if points and len(xy):
                    h.add_annotation(MultiPoint([tuple(p) for p in xy]), path_class=pc)
            h.add_annotation(box(*REGION))
            h.add_detection(box(*USER_CELL), measurements={"Nucleus: Area": 4.0})
    return root / "project.qpproj"


def is_hotspot(feature: dict) -> bool:
    """A hotspot annotation qpcell's read-outs added (issue 15), not the user's."""
    cls = (feature.get("properties") or {}).get("classification") or {}
    return cls.get("name") == "qpcell hotspot"


def users_part(feature: dict) -> dict:
    """The feature without the ``qpcell: ...`` read-out measurements qpcell puts on area
    annotations (issue 15): what the user made must stay exactly as it was."""
    props = dict(feature.get("properties") or {})
    meas = {k: v for k, v in (props.get("measurements") or {}).items()
            if not k.startswith("qpcell: ")}
    if meas:
        props["measurements"] = meas
    else:
        props.pop("measurements", None)
    return {**feature, "properties": props}



def read_objects(qpproj: Path) -> list[dict]:
    """Per image: its annotations (GeoJSON), qpcell's cells and the other detections."""
    from paquo.projects import QuPathProject

    from qpcell.io.geojson import QPCELL_SCORE

    out = []
    with QuPathProject(qpproj, mode="r") as qp:
        for entry in qp.images:
            h = entry.hierarchy
            annotations = sorted(json.dumps(users_part(f), sort_keys=True)
                                 for f in h.to_geojson() if not is_hotspot(f))
            ours, others = [], []
            for d in h.detections:
                if QPCELL_SCORE in d.measurements:
                    c = d.roi.centroid
                    ours.append((round(c.x, 2), round(c.y, 2), d.path_class.name))
                else:
                    others.append(tuple(round(v, 2) for v in d.roi.bounds))
            out.append({"id": str(entry.entry_id), "name": entry.image_name, "uri": entry.uri,
                        "annotations": annotations, "ours": sorted(ours),
                        "others": sorted(others)})
    return out


def files_of(root: Path) -> dict[str, bytes]:
    """Every file of a project folder, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def qpcell(*args) -> int:
    """``qpcell ARGS`` in this process; the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project of two annotated images and a model trained by ``qpcell train
    project.qpproj`` (points read through QuPath)."""
    root = tmp_path_factory.mktemp("trained")
    images = write_images(root / "images", seed=3)
    qpproj = make_project(root / "project", images)
    model = root / "model"
    assert qpcell("train", qpproj, "--out", model, *TINY) == 0
    return {"root": root, "images": images, "qpproj": qpproj, "model": model}


def fresh_project(trained, folder: Path) -> Path:
    """The trained project's images, copied to ``folder/images``, in a new project."""
    (folder / "images").mkdir(parents=True)
    copies = [(Path(shutil.copy2(png, folder / "images" / png.name)), ann)
              for png, ann in trained["images"]]
    return make_project(folder / "project", copies)


# ------------------------------------------------------------- qpcell train + annotate-back

def test_train_project_then_annotate_back_and_rerun(trained, tmp_path, cli):
    config = json.loads((trained["model"] / "config.json").read_text())
    assert [c["name"] for c in config["classes"]] == [c.name for c in
                                                    trained["images"][0][1].classes]
    qpproj = fresh_project(trained, tmp_path)
    before = read_objects(qpproj)
    code, out, err = cli("annotate-back", "--model", trained["model"], qpproj)
    assert code == 0, err
    after = read_objects(qpproj)
    assert (qpproj.parent / "qpcell-backups").is_dir()
    for b, a in zip(before, after, strict=True):
        assert a["annotations"] == b["annotations"]  # the user's annotations, unchanged
        assert a["others"] == b["others"] == [USER_CELL]  # and the user's own detection
        assert b["ours"] == [] and len(a["ours"]) > 0
        assert all(0 <= x < 128 and 0 <= y < 128 for x, y, _ in a["ours"])
    code, out, err = cli("annotate-back", "--model", trained["model"], qpproj)
    assert code == 0, err
    again = read_objects(qpproj)
    assert [a["ours"] for a in again] == [a["ours"] for a in after]  # replaced, not added
    assert [a["annotations"] for a in again] == [b["annotations"] for b in before]
    assert [a["others"] for a in again] == [[USER_CELL]] * 2


def test_moved_images_are_relinked(trained, tmp_path, cli):
    """Bug 1: ``--image-root OLD=NEW`` wrote nothing and exited 0."""
    qpproj = fresh_project(trained, tmp_path)
    old, new = tmp_path / "images", tmp_path / "moved"
    old.rename(new)
    stored = files_of(qpproj.parent)["project.qpproj"]
    code, out, err = cli("annotate-back", "--model", trained["model"], qpproj,
                         "--image-root", f"{old}={new}")
    assert code == 0, err
    after = read_objects(qpproj)
    assert all(len(a["ours"]) > 0 for a in after)
    assert all(a["uri"].startswith(new.as_uri()) for a in after), [a["uri"] for a in after]
    assert "relinked in the project" in out
    (backup,) = (qpproj.parent / "qpcell-backups").iterdir()
    assert (backup / "project.qpproj").read_bytes() == stored
    # where the files are not found at all: an error (not exit 0), nothing changed
    gone = fresh_project(trained, tmp_path / "second")
    shutil.rmtree(tmp_path / "second" / "images")
    before = files_of(gone.parent)
    code, out, err = cli("annotate-back", qpproj.parent / "qpcell" / "predictions", gone)
    assert code == 1 and "nothing written" in err
    assert files_of(gone.parent) == before


def test_a_prediction_is_not_reused_for_another_image_of_the_same_name(trained, tmp_path, cli):
    """Bug 2: two entries named 1010.png; the second got the first one's cells."""
    a = write_images(tmp_path / "dirA", seed=11, names=["1010.png"], n=1)
    b = write_images(tmp_path / "dirB", seed=12, names=["1010.png"], n=1)
    qpproj = make_project(tmp_path / "project", a + b, points=False)
    for entry_id in ("1", "2"):
        code, out, err = cli("annotate-back", "--model", trained["model"], qpproj,
                             "--images", entry_id)
        assert code == 0, err
    code, out, err = cli("predict", trained["model"], b[0][0], "--out", tmp_path / "ref",
                         "--regions", "none", *PREDICT_OPTIONS[:2])
    assert code == 0, err
    ref = json.loads((tmp_path / "ref" / "predictions.json").read_text())
    objects = {o["id"]: o for o in read_objects(qpproj)}
    assert len(objects["2"]["ours"]) == ref["images"]["1010"]["n_cells"] > 0
    assert objects["1"]["ours"] != objects["2"]["ours"]


def test_annotate_back_mpp_option(trained, tmp_path, cli):
    """Bug 3: the warning said "pass --mpp", which annotate-back did not have."""
    model = tmp_path / "model-0.5"
    shutil.copytree(trained["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["mpp"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    qpproj = fresh_project(trained, tmp_path)
    out_dir = tmp_path / "preds"
    code, out, err = cli("annotate-back", "--model", model, qpproj, "--out", out_dir,
                         "--dry-run")
    assert code == 0, err
    assert "pixel size unknown" in err and "pass --mpp to set it" in err
    code, out, err = cli("annotate-back", "--model", model, qpproj, "--out", out_dir,
                         "--dry-run", "--mpp", "0.5")
    assert code == 0, err
    assert "pass --mpp" not in err
    summary = json.loads((out_dir / "predictions.json").read_text())
    assert {e["mpp"] for e in summary["images"].values()} == {0.5}
    code, out, err = cli("annotate-back", out_dir, qpproj, "--mpp", "0.5")
    assert code == 1 and "--mpp is for --model" in err


def test_bad_options_leave_the_project_as_it_was(trained, tmp_path, cli):
    """Bug 5: --dry-run accepted them; the real run failed after the backup and new classes."""
    from qpcell.io.geojson import write_detections
    from qpcell.points import CellClass, Detections

    qpproj = fresh_project(trained, tmp_path)
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(0)
    det = Detections(rng.uniform(10, 110, (6, 2)), np.arange(6) % 2,
                     np.full(6, 0.9, np.float32), np.full((6, 2), 0.5, np.float32),
                     (CellClass("CD8+", (1, 2, 3)), CellClass("Mitosis", (0, 200, 0))))
    write_detections(preds / "synthetic-000.geojson", det)
    before = files_of(qpproj.parent)
    for args, message in ((("--dry-run", "--shape", "square"), "--shape must be"),
                          (("--shape", "square"), "--shape must be"),
                          (("--dry-run", "--radius-um", "-3"), "--radius-um -3.0 must be"),
                          (("--radius-um", "-3"), "--radius-um -3.0 must be")):
        code, out, err = cli("annotate-back", preds, qpproj, *args)
        assert code == 1 and message in err, (args, err)
        assert files_of(qpproj.parent) == before
    code, out, err = cli("annotate-back", preds, qpproj)
    assert code == 0, err
    assert files_of(qpproj.parent) != before  # the same run with good options writes


def test_doctor_counts_points_through_qupath(trained, cli, monkeypatch):
    """Bug 6: doctor said QuPath was needed although it was found, and counted no points."""
    from qpcell.cli import _app, doctor

    monkeypatch.setattr(_app.console, "_width", 200)
    monkeypatch.setattr(doctor.console, "_width", 200)
    code, out, err = cli("doctor", trained["qpproj"])
    assert code == 0, err
    assert "needs QuPath" not in out
    assert "Point annotations per class" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    for png, ann in trained["images"]:
        counts = ann.counts()
        assert rows[png.name][:3] == [str(counts[c.name]) for c in ann.classes] + [
            str(len(ann.xy))]


# ----------------------------------------------------------------- the Groovy scripts

def run_script(runner: Path, qpproj: Path, image: str, script: str, **settings) -> str:
    """``run-script PROJECT IMAGE SCRIPT NAME=VALUE...``: QuPath runs the script headless."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    args = [f"{k}={v}" for k, v in settings.items()]
    proc = subprocess.run([str(runner), str(qpproj), image, str(REPO / "groovy" / script),
                           *args], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def groovy_list(items) -> str:
    return "[" + ",".join(json.dumps(str(i)) for i in items) + "]"


def test_groovy_scripts_export_train_detect_and_rerun(qupath_script_runner, tmp_path):
    program = Path(sys.executable).with_name("qpcell")
    if not program.is_file():
        skip_or_fail_in_ci(f"no qpcell program beside {sys.executable}")
    qpproj = make_project(tmp_path / "project", write_images(tmp_path / "images", seed=3))
    before = read_objects(qpproj)
    model = tmp_path / "model"
    log = run_script(qupath_script_runner, qpproj, "synthetic-000.png", "qpcell-train.groovy",
                     QPCELL=program, MODEL=model, TRAIN_OPTIONS=groovy_list(TINY))
    assert "exported 2 image(s)" in log and (model / "weights.safetensors").is_file()
    index = json.loads((qpproj.parent / "qpcell" / "images.json").read_text())
    assert sorted(index["images"]) == ["synthetic-000", "synthetic-001"]
    assert read_objects(qpproj) == before  # exporting and training change nothing

    settings = {"QPCELL": program, "MODEL": model,
                "PREDICT_OPTIONS": groovy_list(PREDICT_OPTIONS)}
    log = run_script(qupath_script_runner, qpproj, "synthetic-000.png",
                     "qpcell-detect.groovy", **settings)
    first, other = read_objects(qpproj)
    n = len(first["ours"])
    assert n > 0 and f"{n} cells added, 0 earlier qpcell cells replaced" in log
    x0, y0, x1, y1 = REGION
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y, _ in first["ours"])
    assert {c for _, _, c in first["ours"]} <= {"CD8+", "CD4+"}
    assert first["annotations"] == before[0]["annotations"]
    assert first["others"] == [USER_CELL]
    assert other == before[1]  # the other image is untouched

    log = run_script(qupath_script_runner, qpproj, "synthetic-000.png",
                     "qpcell-detect.groovy", **settings)
    assert f"{n} cells added, {n} earlier qpcell cells replaced" in log
    again, other = read_objects(qpproj)
    assert again["ours"] == first["ours"]  # replaced, not duplicated
    assert again["annotations"] == before[0]["annotations"]
    assert again["others"] == [USER_CELL] and other == before[1]
