"""Reading QuPath projects: the Java-free reader on every real project file in
shared/qupath-samples, URI and colour handling, image remapping, the paquo-backed reader with
a fake paquo project, and the one-line error when QuPath is missing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pytest

from qpcell.errors import QpcellError
from qpcell.io import qupath as qp
from qpcell.io.qupath import (
    QUPATH_MISSING,
    argb_to_rgb,
    image_stem,
    is_qupath_project,
    read_path_classes,
    read_project_info,
    read_qupath_project,
    rgb_to_argb,
    select_images,
    uri_to_path,
)

JOSE = ("josenimo__06_QuPath_Annotation_to_AnnData/TestData(MCMICROExemplar001)/"
        "Test_QuPath_Project")

# What shared/qupath-samples/README.md states about each project.
PROJECTS = {
    "orion-cirb__QuPath_Foci": dict(version="0.4.0", images=44, classes=10),
    JOSE: dict(version="0.4.1", images=1, classes=3),
    "AndrewZhang419__QuPath": dict(version="0.5.1", images=3, classes=9),
    "CosciaLab__Qupath_to_LMD/demo_Qupath_project": dict(version="0.6.0", images=1, classes=126),
    "smith6jt-cop__SpleenFollicleCounterQP": dict(version="0.7.0", images=14, classes=7),
}


def _project(samples: Path, rel: str) -> Path:
    return samples / rel / "project.qpproj"


def test_every_sample_project_file_is_covered(qupath_samples):
    found = {str(p.parent.relative_to(qupath_samples))
             for p in qupath_samples.rglob("project.qpproj")}
    assert found == set(PROJECTS)


@pytest.mark.parametrize("rel", sorted(PROJECTS))
def test_sample_projects_image_and_class_counts(qupath_samples, rel):
    expected = PROJECTS[rel]
    info = read_project_info(_project(qupath_samples, rel))
    assert info.version == expected["version"]
    assert len(info.images) == expected["images"]
    assert len(info.classes) == expected["classes"]
    newer = () if not info.version.startswith("0.7") else (
        "the project was written by QuPath 0.7.0, newer than qpcell is tested with (0.4-0.6): "
        "check what qpcell reads from it, and report a problem if something is missing",)
    assert info.warnings == newer
    for img in info.images:
        assert img.name and img.entry_id
        assert img.uri.startswith("file:")
        assert img.original_path is not None
        assert not img.exists  # the images are on the authors' computers
    # the folder works as well as the file, and both are recognised as projects
    assert read_project_info(_project(qupath_samples, rel).parent).images == info.images
    assert is_qupath_project(_project(qupath_samples, rel))
    assert is_qupath_project(_project(qupath_samples, rel).parent)


def test_v040_compact_server_json_without_builder_type(qupath_samples):
    info = read_project_info(_project(qupath_samples, "orion-cirb__QuPath_Foci"))
    img = info.image("242")
    assert img.name == "381_P14_C1ql1-570_Cbln1-633_GFP-520_n2_1_w4CSU-6420000.tif"
    assert (img.width, img.height) == (2048, 2048)
    assert img.mpp is None  # calibrated in "px": no pixel size
    assert img.server == "BioFormatsServerBuilder"
    assert img.summary["hierarchy"]["annotationClassificationCounts"] == {
        "Training": 16, "Unclassified": 1047}
    assert img.original_path == PurePosixPath(
        "/home/phm/Images/TrainingFoci/RNA/Images/"
        "381_P14_C1ql1-570_Cbln1-633_GFP-520_n2_1_w4CSU-6420000.tif")
    assert [c.name for c in info.classes][:3] == ["Tumor", "Stroma", "Immune cells"]
    assert info.classes[0].color == (200, 0, 0)  # -3670016


def test_v041_windows_uri_with_escapes(qupath_samples):
    rel = JOSE
    img = read_project_info(_project(qupath_samples, rel)).images[0]
    assert isinstance(img.original_path, PureWindowsPath)
    assert img.original_path.drive == "C:"
    assert "Test Data (MCMICRO Exemplar 001)" in img.original_path.parts
    assert img.original_path.name == "Exemplar001_subset.tif"
    assert img.mpp == pytest.approx(0.6500002275000796)
    assert (img.width, img.height) == (1833, 957)
    assert img.server == "ImageJServerBuilder"
    assert img.summary["hierarchy"]["objectTypeCounts"]["Annotations"] == 7
    assert img.path is None or not img.path.exists()  # a Windows path on Linux: never a guess


def test_v051_wrapped_server_json_and_entry_without_metadata(qupath_samples):
    info = read_project_info(_project(qupath_samples, "AndrewZhang419__QuPath"))
    by_id = {i.entry_id: i for i in info.images}
    assert set(by_id) == {"1", "2", "7"}
    one = by_id["1"]
    assert one.name == "MTA3-8_GPC3 (2).svs"
    assert one.stem == "MTA3-8_GPC3 (2)"
    assert one.original_path == PurePosixPath("/Users/shuningliu/Downloads/MTA3-8_GPC3 (2).svs")
    assert one.mpp == pytest.approx(0.2532)
    assert (one.width, one.height) == (101591, 62506)
    assert one.server == "OpenslideServerBuilder"
    counts = one.summary["hierarchy"]["detectionClassificationCounts"]
    assert counts == {"Negative": 12887, "Unclassified": 211, "Positive": 272}
    seven = by_id["7"]  # the project stores no metadata for it and it has no data folder
    assert (seven.width, seven.height, seven.mpp) == (None, None, None)
    assert seven.summary is None and not seven.has_data
    assert [c.name for c in info.classes] == ["Tumor", "Stroma", "Immune cells", "Necrosis",
                                              "Other", "Region*", "Ignore*", "Positive",
                                              "Negative"]


def test_v060_pretty_server_json(qupath_samples):
    rel = "CosciaLab__Qupath_to_LMD/demo_Qupath_project"
    info = read_project_info(_project(qupath_samples, rel))
    img = info.images[0]
    assert img.name == "TD_01_verysmall_mIF.ome.tif"
    assert img.stem == "TD_01_verysmall_mIF"
    assert (img.width, img.height) == (1000, 1000)
    assert img.mpp == pytest.approx(0.34571008852182383)
    assert img.summary["hierarchy"]["objectTypeCounts"] == {
        "Root objects": 1, "Annotations": 10, "Cells": 121}
    assert info.classes[0].name == "single_cells_demo"
    assert info.classes[0].color == (255, 0, 255)  # -65281


def test_v070_entries_with_tags(qupath_samples):
    info = read_project_info(_project(qupath_samples, "smith6jt-cop__SpleenFollicleCounterQP"))
    names = [i.name for i in info.images]
    assert "HDL052SPLN_2025Aug6_Scan1.er.qptiff - resolution #1" in names
    first = info.images[0]
    assert first.name == "HDL011_PC33.ome.tiff" and first.stem == "HDL011_PC33"
    assert first.original_path.name == "HDL011.ome.tiff"  # the file name differs from the name
    assert first.mpp == pytest.approx(0.5077663810243286)
    assert all(i.summary is None for i in info.images)  # no data folder in the sample
    assert [c.name for c in info.classes][:2] == ["Ignore*", "Follicle"]


# ------------------------------------------------------------------- names, URIs, colours

@pytest.mark.parametrize("uri, expected", [
    ("file:/home/me/a%20b.svs", PurePosixPath("/home/me/a b.svs")),
    ("file:///home/me/x.tif", PurePosixPath("/home/me/x.tif")),
    ("file:/Users/x/MTA3-8_GPC3%20(2).svs", PurePosixPath("/Users/x/MTA3-8_GPC3 (2).svs")),
    ("file:/C:/Users/me/Test%20Data/a.tif", PureWindowsPath("C:/Users/me/Test Data/a.tif")),
    ("file:///D:/slides/b.ndpi", PureWindowsPath("D:/slides/b.ndpi")),
    ("file://server/share/dir/c.svs", PureWindowsPath("//server/share/dir/c.svs")),
    ("file:////server/share/dir/c.svs", PureWindowsPath("//server/share/dir/c.svs")),
    ("file:/home/me/%C3%A9t%C3%A9.tif", PurePosixPath("/home/me/été.tif")),
])
def test_uri_to_path(uri, expected):
    got = uri_to_path(uri)
    assert type(got) is type(expected)
    assert got == expected


@pytest.mark.parametrize("uri", [None, "", "https://omero.example.org/webclient/?show=image-1",
                                 "omero://host/image/3"])
def test_uri_to_path_non_file(uri):
    assert uri_to_path(uri) is None


@pytest.mark.parametrize("name, stem", [
    ("MTA3-8_GPC3 (2).svs", "MTA3-8_GPC3 (2)"),
    ("HDL011_PC33.ome.tiff", "HDL011_PC33"),
    ("a.OME.TIF", "a"),
    ("slide.tif", "slide"),
    ("slide.qptiff - resolution #1", "slide.qptiff - resolution #1"),
    ("series: 1/2", "series_ 1_2"),
    ("name.", "name"),
    ("...svs", "image"),
])
def test_image_stem(name, stem):
    assert image_stem(name) == stem


@pytest.mark.parametrize("packed, rgb", [(-3670016, (200, 0, 0)), (-16711936, (0, 255, 0)),
                                         (-65281, (255, 0, 255)), (-1, (255, 255, 255)),
                                         (-16777216, (0, 0, 0))])
def test_packed_argb_colours(packed, rgb):
    assert argb_to_rgb(packed) == rgb
    assert rgb_to_argb(rgb) == packed


def test_colour_lists_and_junk():
    assert argb_to_rgb([10, 20, 30]) == (10, 20, 30)
    assert argb_to_rgb([10, 20, 30, 128]) == (10, 20, 30)
    assert argb_to_rgb(None) is None
    assert argb_to_rgb(True) is None
    assert argb_to_rgb([1, 2]) is None
    assert argb_to_rgb([300, 0, 0]) is None


def test_classes_json_duplicates_and_missing_names(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"pathClasses": [
        {"name": "Tumor", "color": -3670016}, {"name": "Tumor", "color": -1},
        {"color": -1}, {"names": ["Tumor", "Positive"], "color": [1, 2, 3]},
        {"name": "NoColour"}]}), encoding="utf-8")
    classes, warnings = read_path_classes(path)
    assert [c.name for c in classes] == ["Tumor", "Tumor: Positive", "NoColour"]
    assert classes[0].color == (200, 0, 0) and classes[1].color == (1, 2, 3)
    assert len(warnings) == 2


def test_broken_project_files_are_one_line_errors(tmp_path):
    with pytest.raises(QpcellError, match="no project.qpproj"):
        read_project_info(tmp_path)
    (tmp_path / "project.qpproj").write_text("{not json", encoding="utf-8")
    with pytest.raises(QpcellError, match="not valid JSON"):
        read_project_info(tmp_path)
    (tmp_path / "project.qpproj").write_text('{"images": 3}', encoding="utf-8")
    with pytest.raises(QpcellError, match="not a QuPath project"):
        read_project_info(tmp_path)
    with pytest.raises(QpcellError, match="no such file"):
        read_project_info(tmp_path / "missing.qpproj")
    assert not is_qupath_project(tmp_path / "missing.qpproj")


# ------------------------------------------------------------------------ finding images

def _copy_project(samples: Path, rel: str, dest: Path) -> Path:
    shutil.copytree(samples / rel, dest)
    return dest / "project.qpproj"


def test_image_root_remaps_posix_paths(qupath_samples, tmp_path):
    qpproj = _copy_project(qupath_samples, "AndrewZhang419__QuPath", tmp_path / "proj")
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "MTA3-8_GPC3 (2).svs").write_bytes(b"fake")
    info = read_project_info(qpproj, image_root=[f"/Users/shuningliu/Downloads={slides}"])
    one = info.image("1")
    assert one.exists and one.path == slides / "MTA3-8_GPC3 (2).svs"
    two = info.image("2")  # remapped but absent: the remapped path says where we looked
    assert not two.exists and two.path == slides / "MTA3-3_GPC3.svs"
    # the longest matching prefix wins; a dict works as well as OLD=NEW strings
    info = read_project_info(qpproj, image_root={"/Users": str(tmp_path / "nowhere"),
                                                 "/Users/shuningliu/Downloads": str(slides)})
    assert info.image("1").exists


def test_image_root_remaps_windows_paths_case_insensitively(qupath_samples, tmp_path):
    rel = JOSE
    qpproj = _copy_project(qupath_samples, rel, tmp_path / "proj")
    target = (tmp_path / "data" / "9_Qupath_to_AnnData" / "QuPath_Annotation_to_AnnData"
              / "Test Data (MCMICRO Exemplar 001)" / "registration")
    target.mkdir(parents=True)
    (target / "Exemplar001_subset.tif").write_bytes(b"fake")
    root = f"c:\\users\\JNIMOCA\\Jose_BI\\Projects---Repositories={tmp_path / 'data'}"
    img = read_project_info(qpproj, image_root=[root]).images[0]
    assert img.exists and img.path == target / "Exemplar001_subset.tif"


def test_images_moved_together_with_the_project_are_found(qupath_samples, tmp_path):
    # smith6jt: project /home/smith6jt/SpleenFollicleCounterQP, images in its Images/ folder
    qpproj = _copy_project(qupath_samples, "smith6jt-cop__SpleenFollicleCounterQP",
                           tmp_path / "Spleen")
    (tmp_path / "Spleen" / "Images").mkdir()
    (tmp_path / "Spleen" / "Images" / "HDL011.ome.tiff").write_bytes(b"fake")
    info = read_project_info(qpproj)
    assert info.images[0].exists
    assert info.images[0].path == tmp_path / "Spleen" / "Images" / "HDL011.ome.tiff"
    assert not info.images[1].exists
    # the Windows project too: the image sits in ../registration next to the project folder
    rel = JOSE
    qpproj = _copy_project(qupath_samples, rel, tmp_path / "TD" / "Test_QuPath_Project")
    (tmp_path / "TD" / "registration").mkdir()
    (tmp_path / "TD" / "registration" / "Exemplar001_subset.tif").write_bytes(b"fake")
    assert read_project_info(qpproj).images[0].exists


def test_bad_image_root():
    with pytest.raises(QpcellError, match="OLD=NEW"):
        qp.parse_image_root(["no-equals-sign"])
    assert qp.parse_image_root(None) == []
    assert qp.parse_image_root(["a=b=c"]) == [("a", "b=c")]


def test_select_images(qupath_samples):
    info = read_project_info(_project(qupath_samples, "AndrewZhang419__QuPath"))
    assert [i.entry_id for i in select_images(info.images, None)] == ["1", "2", "7"]
    picked = select_images(info.images, ["MTA3-3_GPC3", "MTA3-8_GPC3 (2).svs", "7"])
    assert [i.entry_id for i in picked] == ["2", "1", "7"]
    with pytest.raises(QpcellError, match="no image named 'nope'"):
        select_images(info.images, ["nope"])


# ------------------------------------------------------------- through paquo (faked)

class _Hierarchy:
    def __init__(self, features):
        self.features = features

    def to_geojson(self):
        return json.loads(json.dumps(self.features))


class _Entry:
    def __init__(self, entry_id, name, features):
        self.entry_id = entry_id
        self.image_name = name
        self.hierarchy = _Hierarchy(features)


class _Colour:
    def __init__(self, rgb):
        self.rgb = rgb

    def to_rgb(self):
        return self.rgb


class _PathClass:
    def __init__(self, name, color):
        self.name = self.id = name
        self.color = _Colour(color)


class _Project:
    def __init__(self, entries, classes):
        self.images = entries
        self.path_classes = [_PathClass(n, c) for n, c in classes]


def _opener(project):
    from contextlib import contextmanager

    calls = []

    @contextmanager
    def opener(path, mode):
        calls.append((Path(path), mode))
        yield project

    opener.calls = calls
    return opener


def _points_features(samples: Path) -> list[dict]:
    data = json.loads((samples / "generated-by-qupath-core/v0.5.1/qupath-0.5.1_points.geojson")
                      .read_text(encoding="utf-8"))
    return data["features"]


def _region_feature(x0, y0, x1, y1, cls=None):
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [1, 2, 3]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[
        [x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}, "properties": props}


def test_read_qupath_project_through_a_paquo_like_project(qupath_samples, tmp_path):
    qpproj = _copy_project(qupath_samples, "AndrewZhang419__QuPath", tmp_path / "proj")
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("MTA3-8_GPC3 (2).svs", "MTA3-3_GPC3.svs"):
        (slides / name).write_bytes(b"fake")
    points = _points_features(qupath_samples)
    region = _region_feature(700, 800, 1600, 2600)
    tumour = _region_feature(0, 0, 10, 10, cls="Tumor")
    project = _Project(
        [_Entry("1", "MTA3-8_GPC3 (2).svs", points + [region, tumour]),
         _Entry("2", "MTA3-3_GPC3.svs", [region]),  # no points: skipped with a note
         _Entry("7", "MTA3-1_GPC3.svs", points)],  # not selected below
        [("Tumor", (200, 0, 0)), ("Negative", (112, 112, 225)), ("Positive", (250, 62, 62))])
    opener = _opener(project)
    notes: list[str] = []
    classes, images = read_qupath_project(
        qpproj, images=["MTA3-8_GPC3 (2)", "MTA3-3_GPC3"],
        image_root=[f"/Users/shuningliu/Downloads={slides}"], notes=notes, opener=opener)
    assert opener.calls == [(qpproj, "r")]
    # classes: those the points use, in the project's order and colours
    assert [(c.name, c.color) for c in classes] == [("Negative", (112, 112, 225)),
                                                   ("Positive", (250, 62, 62))]
    assert len(images) == 1
    img = images[0]
    assert img.name == "MTA3-8_GPC3 (2)"
    assert img.image == slides / "MTA3-8_GPC3 (2).svs"
    assert img.mpp == pytest.approx(0.2532)
    # 5 + 1 Positive and 3 Negative points; the 2 unclassified points are skipped
    assert img.counts() == {"Negative": 3, "Positive": 6}
    assert np.allclose(img.xy[0], [1021.5, 2040.25])
    assert img.regions is not None and len(img.regions) == 1  # only the unclassified area
    assert img.metadata["qupath_entry_id"] == "1"
    assert any("no point annotations" in n and "MTA3-3_GPC3" in n for n in notes)
    assert any("unclassified" in n for n in notes)


def test_read_qupath_project_lists_missing_image_files(qupath_samples, tmp_path):
    qpproj = _copy_project(qupath_samples, "AndrewZhang419__QuPath", tmp_path / "proj")
    points = _points_features(qupath_samples)
    project = _Project([_Entry("1", "MTA3-8_GPC3 (2).svs", points),
                        _Entry("2", "MTA3-3_GPC3.svs", points)], [])
    with pytest.raises(QpcellError) as err:
        read_qupath_project(qpproj, opener=_opener(project))
    message = str(err.value)
    assert "2 image file(s) not found" in message
    assert "MTA3-8_GPC3 (2).svs" in message and "MTA3-3_GPC3.svs" in message
    assert "--image-root" in message and "\n" not in message
    # without require_files the images come back without a file
    classes, images = read_qupath_project(qpproj, opener=_opener(project), require_files=False)
    assert len(images) == 2 and all(i.image is None for i in images)
    assert [c.name for c in classes] == ["Positive", "Negative"]  # order of appearance


# ------------------------------------------------------------------- QuPath missing

def _qupath_installed() -> bool:
    return qp.find_qupath_installation().found


@pytest.mark.skipif(_qupath_installed(), reason="a QuPath installation is present here")
def test_missing_qupath_is_one_clear_line():
    with pytest.raises(QpcellError) as err:
        qp.import_paquo_project_class()
    assert str(err.value) == QUPATH_MISSING
    install = qp.find_qupath_installation()
    assert not install.found and "no valid qupath installation" in install.detail


def test_broken_paquo_import_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "paquo.projects", None)
    with pytest.raises(QpcellError, match="paquo cannot be imported"):
        qp.import_paquo_project_class()


def test_missing_paquo_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "paquo", None)
    with pytest.raises(QpcellError, match="paquo is not installed"):
        qp.import_paquo_project_class()


@pytest.mark.skipif(_qupath_installed(), reason="a QuPath installation is present here")
def test_read_qupath_project_without_qupath(qupath_samples):
    with pytest.raises(QpcellError) as err:
        read_qupath_project(_project(qupath_samples, "AndrewZhang419__QuPath"))
    assert str(err.value) == QUPATH_MISSING


def test_jvm_start_failures_become_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "paquo.projects":
            raise RuntimeError("JVM DLL not found: /opt/QuPath/lib/runtime/lib/server/libjvm.so")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(QpcellError, match="QuPath's Java could not start"):
        qp.import_paquo_project_class()


def test_read_qupath_export_without_classes_json(tmp_path):
    from qpcell.io.qupath import read_qupath_export

    export = tmp_path / "qpcell"
    export.mkdir()
    index = {"format": "qpcell-qupath-export", "version": 1, "images": {}}
    for k in range(2):
        image = tmp_path / f"img {k}.png"
        image.write_bytes(b"x")
        features = [{"type": "Feature",
                     "geometry": {"type": "MultiPoint",
                                  "coordinates": [[k + 1, 2 + j], [3 + j, 4 + k]]},
                     "properties": {"objectType": "annotation",
                                    "classification": {"name": name, "color": [k, 2, 3]}}}
                    for j, name in enumerate(("B", "A"))]
        (export / f"img {k}.geojson").write_text(json.dumps(
            {"type": "FeatureCollection", "features": features}), encoding="utf-8")
        index["images"][f"img {k}"] = {"name": image.name, "image": f"../{image.name}",
                                       "mpp": 0.25}
    (export / "images.json").write_text(json.dumps(index), encoding="utf-8")
    assert qp.is_qupath_export(export) and not qp.is_qupath_export(tmp_path)
    classes, images = read_qupath_export(export, images=["img 1"])
    assert [c.name for c in classes] == ["B", "A"]  # each class once, by first appearance
    (img,) = images
    assert img.image.resolve() == tmp_path / "img 1.png"  # relative to images.json
    assert img.mpp == 0.25 and img.counts() == {"B": 2, "A": 2}
    with pytest.raises(QpcellError, match="not in images.json"):
        read_qupath_export(export, images=["img 7"])
