"""Faults and bad input, through the command line as a user meets them (issue 17).

Every case asserts the exit code, one line that names the file and the problem, and that
every file the user had is still there, unchanged. Ctrl-C cases run ``python -m qpcell`` in
a subprocess and send it SIGINT; the others use the in-process CLI runner (much faster).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_TRAIN, samples_root

from qpcell.io.geojson import write_points
from qpcell.points import AnnotatedImage, CellClass


# ---------------------------------------------------------------------------- helpers
def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (the user's files), by path."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error(stderr: str, *needles: str) -> str:
    """The single ``error:`` line of ``stderr``; it must hold every needle."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def point_file(path: Path, xy, names, colors=None) -> Path:
    classes = tuple(CellClass(n, (200, 20 * k, 0)) for k, n in enumerate(dict.fromkeys(names)))
    index = {c.name: k for k, c in enumerate(classes)}
    write_points(path, AnnotatedImage(path.stem, None, np.asarray(xy, float).reshape(-1, 2),
                                      np.array([index[n] for n in names]), classes))
    return path


def feature(geometry: dict, object_type: str, name: str | None) -> dict:
    props = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 255]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def square(x: float, y: float, r: float = 3.0) -> dict:
    ring = [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]
    return {"type": "Polygon", "coordinates": [ring]}


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """``python -m qpcell ARGS`` in a subprocess; SIGINT ``presses`` times once a line of
    stdout holds ``after``."""

    def __init__(self, args, after: str, presses: int = 1, cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
        # A suite started in the background (`cmd &`) inherits an ignored SIGINT, and Python
        # then installs no KeyboardInterrupt handler: give the child the default disposition.
        self.proc = subprocess.Popen([sys.executable, "-m", "qpcell", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=cwd, preexec_fn=default_sigint)
        self.lines: list[str] = []
        seen = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if after in line:
                    seen.set()
            seen.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert seen.wait(120), "".join(self.lines)
        for _ in range(presses):
            self.proc.send_signal(signal.SIGINT)
            if presses > 1:
                threading.Event().wait(0.05)
        self.stderr = self.proc.stderr.read()
        self.code = self.proc.wait(120)
        reader.join(10)
        self.stdout = "".join(self.lines)


# ---------------------------------------------------------------- data lost or wrong
def test_evaluate_reads_the_classified_cells_not_three_calibration_points(cli, tmp_path):
    """A QuPath export of classified cells plus unclassified calibration points."""
    cells = [feature(square(20 + 15 * i, 30), "cell", "single_cells") for i in range(6)]
    calib = [feature({"type": "Point", "coordinates": [5 + i, 5]}, "annotation", None)
             for i in range(3)]
    export = tmp_path / "slide.geojson"
    export.write_text(json.dumps({"type": "FeatureCollection", "features": cells + calib}))
    truth = point_file(tmp_path / "truth.geojson", [[20 + 15 * i, 30] for i in range(6)],
                       ["single_cells"] * 6)
    before = snapshot(export, truth)
    code, stdout, stderr = cli("evaluate", export, truth, "--radius", "2")
    assert code == 0, stderr
    assert "predictions: read 6 detection and cell objects" in stdout
    assert re.search(r"│\s+1\.000\s+│\s+1\.000\s+│\s+1\.000\s+│\s+6\s+│", stdout), stdout
    code, stdout, _ = cli("evaluate", export, truth, "--radius", "2", "--read-pred", "points")
    assert code == 0 and "predictions: read 0 point annotations" in stdout
    code, stdout, _ = cli("evaluate", export, truth, "--radius", "2", "--read-pred", "cells")
    assert code == 0 and "read 6 cell objects" in stdout
    assert snapshot(export, truth) == before


def test_evaluate_reads_the_real_qupath_06_cell_export(cli, tmp_path):
    export = (samples_root() / "CosciaLab__Qupath_to_LMD" / "demo_Qupath_project"
              / "Single_cells.geojson")
    if not export.is_file():
        pytest.skip("QuPath sample files not found")
    code, stdout, stderr = cli("evaluate", export, export, "--radius", "1")
    assert code == 0, stderr
    assert "read 121 detection and cell objects" in stdout
    assert "121 true and 121 predicted cells" in stdout


def test_evaluate_accepts_the_point_tables_import_accepts(cli, tmp_path):
    tables = tmp_path / "test"
    tables.mkdir()
    (tables / "a.txt").write_text("10 10 0\n20 30 1\n")
    (tables / "b.txt").write_text("5 5 1\n")
    before = snapshot(tables)
    code, stdout, stderr = cli("evaluate", tables, tables, "--radius", "3")
    assert code == 0, stderr
    assert "read 3 point annotations from 2 files" in stdout
    assert snapshot(tables) == before


def test_ctrl_c_during_predict_overwrite_keeps_the_old_result(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "big.png", np.full((2400, 2400, 3), 200, np.uint8))
    out = tmp_path / "pred"
    out.mkdir()
    old = {"big.geojson": '{"type":"FeatureCollection","features":[]}',
           "big.csv": "x,y,class,score\n", "predictions.json": json.dumps(
               {"model": str(tiny_model.resolve()), "images": {"big": {"n_cells": 0}}})}
    for name, text in old.items():
        (out / name).write_text(text)
    leftover = out / ".big.geojson.abcd1234.tmp"  # what a killed run leaves behind
    leftover.write_bytes(b"x" * 1000)
    before = snapshot(out / "big.geojson", out / "big.csv", out / "predictions.json", images)
    run = Run(["predict", tiny_model, images, "--out", out, "--overwrite", "--device", "cpu",
               "--backend", "torch", "--tile-size", "256"], after="image(s)")
    assert run.code == 130, run.stderr
    assert "interrupted (Ctrl-C)" in run.stderr and "Traceback" not in run.stderr
    assert "removed 1 temporary file" in run.stderr
    assert snapshot(out / "big.geojson", out / "big.csv", out / "predictions.json",
                    images) == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_predict_removes_temporaries_a_killed_run_left(cli, tiny_model, synthetic_project,
                                                       tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / ".synthetic-000.csv.k3j2h1g0.tmp").write_bytes(b"x" * 2_000_000)
    (out / ".notes.txt.k3j2h1g0.tmp").write_bytes(b"mine")  # not qpcell's: left alone
    before = snapshot(synthetic_project)
    code, _, stderr = cli("predict", tiny_model, synthetic_project / "synthetic-000.png",
                          "--out", out, "--device", "cpu", "--backend", "torch")
    assert code == 0, stderr
    assert "removed 1 temporary file(s) (2.0 MB)" in stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".notes.txt.k3j2h1g0.tmp"]
    assert snapshot(synthetic_project) == before


def test_train_refuses_to_overwrite_a_model(cli, tiny_model, synthetic_project, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = snapshot(model, synthetic_project)
    code, _, stderr = cli("train", synthetic_project, "--out", model, "--base", "4",
                          *TINY_TRAIN)
    assert code == 1
    one_error(stderr, str(model), "already holds a trained model", "--resume", "--overwrite")
    assert snapshot(model, synthetic_project) == before
    code, _, stderr = cli("train", synthetic_project, "--out", synthetic_project, *TINY_TRAIN)
    assert code == 1
    one_error(stderr, str(synthetic_project), "not a qpcell model")
    assert snapshot(model, synthetic_project) == before
    code, _, stderr = cli("train", synthetic_project, "--out", model, "--base", "4",
                          "--overwrite", *TINY_TRAIN)
    assert code == 0, stderr
    assert len((model / "train_log.txt").read_text().splitlines()) == 1  # one run's log


def test_resume_checks_classes_and_architecture(cli, tiny_model, synthetic_project, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    project = tmp_path / "project"
    shutil.copytree(synthetic_project, project)
    classes = json.loads((project / "classes.json").read_text())
    classes["pathClasses"].reverse()
    (project / "classes.json").write_text(json.dumps(classes))
    before = snapshot(model, project)
    code, _, stderr = cli("train", project, "--out", model, "--base", "4", "--resume",
                          *TINY_TRAIN[:-4], "--epochs", "2")
    assert code == 1
    one_error(stderr, str(model), "cannot resume", "FOXP3+, CD4+, CD8+", "another order")
    code, _, stderr = cli("train", synthetic_project, "--out", model, "--base", "8",
                          "--resume", *TINY_TRAIN[2:], "--epochs", "2")
    assert code == 1
    line = one_error(stderr, str(model), "cannot resume", "base 4", "base 8")
    assert len(stderr) < 400 and len(line) < 300  # no state_dict dump
    assert snapshot(model, project) == before


def test_written_files_respect_the_umask(cli, tmp_path):
    images = tmp_path / "data"
    images.mkdir()
    write_png(images / "a.png", np.full((32, 32, 3), 128, np.uint8))
    (images / "a.txt").write_text("3 4 0\n")
    old = os.umask(0o027)
    try:
        code, _, stderr = cli("import", images, "--out", tmp_path / "proj")
    finally:
        os.umask(old)
    assert code == 0, stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "proj").iterdir()}
    assert modes == dict.fromkeys(modes, 0o640), modes


@pytest.mark.parametrize("kind", ["plain", "ome", "transparent"])
def test_images_qpcell_cannot_see_are_refused(cli, tiny_model, tmp_path, kind):
    import tifffile

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    if kind == "plain":
        path = folder / "five.tif"
        tifffile.imwrite(path, rng.integers(0, 255, (5, 96, 96), dtype=np.uint8))
        problem = "has 5 channels"
    elif kind == "ome":
        path = folder / "five.ome.tif"
        tifffile.imwrite(path, rng.integers(0, 255, (5, 96, 96), dtype=np.uint8),
                         metadata={"axes": "CYX"})
        problem = "has 5 channels"
    else:
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 255, (64, 64, 3))
        path = write_png(folder / "clear.png", rgba)
        problem = "fully transparent"
    before = snapshot(folder)
    code, _, stderr = cli("predict", tiny_model, path, "--out", tmp_path / "p", "--device",
                          "cpu")
    assert code == 1
    one_error(stderr, str(path), problem)
    assert snapshot(folder) == before


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c["postprocess"].update(threshold=float("nan")), "threshold is nan"),
    (lambda c: c["postprocess"].update(context_weight=2), "context_weight is 2; it must be a "
     "number from 0 to 1"),
    (lambda c: c.update(classes=c["classes"][:2]), "lists 2 classes but the network has 3"),
])
def test_a_bad_model_config_fails_at_load_naming_it(cli, tiny_model, synthetic_project,
                                                    tmp_path, edit, problem):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "pred"
    code, _, stderr = cli("predict", model, synthetic_project, "--out", out, "--device", "cpu")
    assert code == 1
    one_error(stderr, str(model / "config.json"), problem)
    assert not out.exists()


def test_reimport_into_a_used_folder_is_refused(cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", np.full((32, 32, 3), 128, np.uint8))
    (data / "a.txt").write_text("3 4 0\n")
    out = tmp_path / "proj"
    assert cli("import", data, "--out", out)[0] == 0
    (data / "a.txt").rename(data / "b.txt")  # the next import has other images
    (data / "a.png").rename(data / "b.png")
    before = snapshot(out, data)
    code, _, stderr = cli("import", data, "--out", out)
    assert code == 1
    one_error(stderr, str(out), "already holds", "new --out folder")
    assert snapshot(out, data) == before


def test_one_image_validating_on_itself_gets_a_note(cli, synthetic_project, tmp_path):
    code, _, stderr = cli("train", synthetic_project, "--out", tmp_path / "m", "--images",
                          "synthetic-000", "--base", "4", *TINY_TRAIN)
    assert code == 0, stderr
    assert "note: only one image (synthetic-000)" in stderr and "optimistic" in stderr


# ---------------------------------------------------------- one flaw stops everything
@pytest.mark.parametrize("choice, code, message", [
    ("error", 1, "two points at (14, 455) have different classes"),
    ("drop", 0, "1 spot had points of different classes: all 2 points there dropped"),
    ("first", 0, "1 spot had points of different classes: the first of each kept, 1 dropped"),
])
def test_import_conflicting_points_offers_a_choice(cli, tmp_path, choice, code, message):
    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", np.full((500, 40, 3), 128, np.uint8))
    (data / "a.txt").write_text("14 455 0\n3 4 1\n14 455 1\n20 30 0\n")
    before = snapshot(data)
    out = tmp_path / "proj"
    got, stdout, stderr = cli("import", data, "--out", out, "--on-conflict", choice)
    assert got == code, stderr
    assert message in stderr and str(data / "a.txt") in stderr
    if choice == "error":
        one_error(stderr, "--on-conflict")
        assert not out.exists()
    else:
        assert f"{2 if choice == 'drop' else 3}" in stdout.split("total")[1].split("\n")[0]
    assert snapshot(data) == before


# ------------------------------------------------------------- messages hiding problems
def test_brackets_in_names_and_messages_survive(cli, tmp_path):
    folder = tmp_path / "proj"
    folder.mkdir()
    name = "slide1 [d=2,x=0,y=0,w=96,h=96]"
    write_png(folder / f"{name}.png", np.full((96, 96, 3), 200, np.uint8))
    (folder / f"{name}.geojson").write_text('{"type": "FeatureCollection", "features": [1')
    code, _, stderr = cli("train", folder, "--out", tmp_path / "m", *TINY_TRAIN)
    assert code == 1
    one_error(stderr, f"{name}.geojson", "is not valid JSON")
    bad = tmp_path / "slide[red] 1.geojson"
    bad.write_text("[x, y]")
    code, _, stderr = cli("evaluate", bad, bad, "--radius", "2")
    assert code == 1
    one_error(stderr, "slide[red] 1.geojson")


def test_a_huge_coordinate_is_named_with_its_file(cli, tmp_path):
    bad = tmp_path / "huge.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature({"type": "Point", "coordinates": [1e200, 5]}, "annotation", "A"),
        feature(square(1e200, 5), "detection", "A")]}))
    code, _, stderr = cli("evaluate", bad, bad, "--radius", "2")
    assert code == 1
    one_error(stderr, str(bad), "feature 1", "beyond any image")


def test_disk_full_names_the_file(cli, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", np.full((32, 32, 3), 128, np.uint8))
    (data / "a.txt").write_text("3 4 0\n")
    before = snapshot(data)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qpcell.io.atomic.os.fsync", full)
    code, _, stderr = cli("import", data, "--out", tmp_path / "proj")
    assert code == 1
    one_error(stderr, str(tmp_path / "proj"), "no space left")
    assert snapshot(data) == before
    assert not list((tmp_path / "proj").glob(".*.tmp"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that apply (not root)")
def test_a_read_only_output_folder_names_the_file(cli, tiny_model, synthetic_project,
                                                  tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, stderr = cli("predict", tiny_model, synthetic_project, "--out", out,
                              "--device", "cpu")
    finally:
        out.chmod(0o755)
    assert code == 1
    one_error(stderr, str(out), "no permission")


def test_a_qupath_measurement_table_is_recognised(cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", np.full((32, 32, 3), 128, np.uint8))
    (data / "a.tsv").write_text("Image\tName\tClass\tParent\tROI\tCentroid X µm\tCentroid Y µm\n"
                                "a.png\tPathCellObject\tTumor\tRoot\tPolygon\t1.5\t2.5\n")
    code, _, stderr = cli("import", data, "--out", tmp_path / "proj")
    assert code == 1
    one_error(stderr, str(data / "a.tsv"), "QuPath measurement table", "GeoJSON")


@pytest.mark.parametrize("args, option", [
    (["train", "x", "--out", "y", "--epochs", "abc"], "--epochs"),
    (["predict", "m", "x", "--out", "y", "--batch-size", "1.5"], "--batch-size"),
])
def test_usage_errors_name_the_option_and_exit_2(cli, args, option):
    code, _, stderr = cli(*args)
    assert code == 2
    assert option in stderr and "Traceback" not in stderr


# ------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_twice_in_train_says_what_was_kept(synthetic_project, tmp_path):
    """Real SIGINTs: the first stops training, the second comes 50 ms later, while the state
    is saved or (on a fast machine) while the process exits: either way the exit code is 130."""
    model = tmp_path / "model"
    before = snapshot(synthetic_project)
    run = Run(["train", synthetic_project, "--out", model, "--base", "4", "--epochs", "50",
               *TINY_TRAIN[2:]], after="epoch   1", presses=2)
    assert run.code == 130, run.stderr
    assert "error" not in run.stderr and "Exception ignored" not in run.stderr
    assert "Traceback" not in run.stderr
    assert "the best model so far (epoch 1" in run.stderr and "--resume" in run.stderr
    assert str(model) in run.stderr
    assert (model / "config.json").is_file() and (model / "resume.pt").is_file()
    assert snapshot(synthetic_project) == before


def test_ctrl_c_in_demo_does_not_suggest_resume(cli, tmp_path, monkeypatch):
    """Ctrl-C arrives during the first training batch (injected where the key press lands)."""
    from qpcell.cli.train import RichCallbacks

    def press(self, epoch, step, loss, progress=None, seconds_left=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(RichCallbacks, "on_batch", press)
    code, _, stderr = cli("demo", "--out", tmp_path / "demo", "--train-images", "2",
                          "--test-images", "1", "--base", "4", "--minutes", "0.2", "--device",
                          "cpu")
    assert code == 130, stderr
    assert "--resume" not in stderr and "error" not in stderr
    assert "run `qpcell demo" in stderr and "cannot be resumed" in stderr
