"""``qpcell doctor``: the environment report, and the Java-free report on QuPath projects."""

from __future__ import annotations

import shutil

import pytest

from qpcell import __version__
from qpcell.cli import doctor
from qpcell.io.qupath import find_qupath_installation

SAMPLES = {
    "orion-cirb__QuPath_Foci": ("0.4.0", 44),
    "josenimo__06_QuPath_Annotation_to_AnnData/TestData(MCMICROExemplar001)/Test_QuPath_Project":
        ("0.4.1", 1),
    "AndrewZhang419__QuPath": ("0.5.1", 3),
    "CosciaLab__Qupath_to_LMD/demo_Qupath_project": ("0.6.0", 1),
    "smith6jt-cop__SpleenFollicleCounterQP": ("0.7.0", 14),
}


@pytest.fixture
def wide(monkeypatch):
    """A wide console, so that table cells are not folded in the captured output."""
    from qpcell.cli import _app

    monkeypatch.setattr(_app.console, "_width", 250)
    monkeypatch.setattr(doctor.console, "_width", 250)


def test_environment_report(cli, wide):
    code, out, err = cli("doctor")
    assert code == 0, err
    for word in ("python", "qpcell", __version__, "torch", "device", "paquo", "QuPath", "java"):
        assert word in out
    if not find_qupath_installation().found:
        assert "not found" in out and "PAQUO_QUPATH_DIR" in out


def test_checks_are_plain_data():
    checks = doctor.environment_checks()
    names = [c.name for c in checks]
    assert names[:3] == ["python", "qpcell", "platform"]
    assert {"torch", "device", "paquo", "QuPath", "java"} <= set(names)
    assert all(isinstance(c.value, str) and c.value for c in checks)


def test_java_check_without_java(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    check = doctor.java_check()
    assert check.value == "not on PATH" and check.ok and "QuPath brings its own Java" in check.hint


def test_java_check_with_java():
    if shutil.which("java") is None:
        pytest.skip("no java on PATH here")
    check = doctor.java_check()
    assert check.ok and "version" in check.value


@pytest.mark.parametrize("rel", sorted(SAMPLES))
def test_project_report_on_every_sample(cli, wide, qupath_samples, rel):
    version, n_images = SAMPLES[rel]
    code, out, err = cli("doctor", qupath_samples / rel / "project.qpproj")
    assert code == 0, err
    assert f"written by QuPath {version}; {n_images} image(s)" in out
    assert "missing" in out  # the images are on the authors' computers
    assert "--image-root" in out
    # issue 14: a project of a QuPath newer than those tested says so
    newer = f"written by QuPath {version}, newer than qpcell is tested with (0.4-0.6)"
    assert (newer in out) == version.startswith("0.7"), out


def test_project_report_details(cli, wide, qupath_samples, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(qupath_samples / "AndrewZhang419__QuPath", root)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("MTA3-8_GPC3 (2).svs", "MTA3-3_GPC3.svs"):
        (slides / name).write_bytes(b"x")
    code, out, err = cli("doctor", root, "--image-root", f"/Users/shuningliu/Downloads={slides}")
    assert code == 0, err
    assert "MTA3-8_GPC3 (2).svs" in out and "101591 x 62506" in out and "0.2532" in out
    assert f"found {slides / 'MTA3-8_GPC3 (2).svs'}" in out
    assert "8 annotations, 13370 cells" in out
    assert "1 of 3 image file(s) not found" in out  # MTA3-1 lives elsewhere
    assert "1 image(s) without a pixel size" in out
    for name in ("Tumor", "Positive", "Negative", "#c80000"):
        assert name in out


def test_project_report_errors(cli, tmp_path):
    code, out, err = cli("doctor", tmp_path)
    assert code == 1 and "no project.qpproj" in err


def test_gpu_is_reported(monkeypatch):
    """The CUDA branch, faked (this machine may have no GPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    checks = {c.name: c for c in doctor.torch_checks()}
    assert "cuda" in checks["device"].value and "NVIDIA H100" in checks["device"].value
    assert checks["device"].hint == ""
