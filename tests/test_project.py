"""The GeoJSON project folder: images + <stem>.geojson + classes.json + metadata.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Polygon

from qpcell.errors import QpcellError
from qpcell.io.geojson import read_geojson, write_detections, write_points
from qpcell.io.project import (
    IMAGE_SUFFIXES,
    find_image,
    image_size,
    read_classes_json,
    read_project,
    split_image_name,
    write_classes_json,
    write_project,
)
from qpcell.points import AnnotatedImage, CellClass, Detections, make_classes

CLASSES = make_classes(["stroma", "epithelium", "other"])

# classes.json files written by QuPath 0.4.0, 0.4.1, 0.5.1, 0.6.0 and 0.7.0
SAMPLE_CLASSES = {
    "orion-cirb__QuPath_Foci/classifiers/classes.json": 10,
    "josenimo__06_QuPath_Annotation_to_AnnData/TestData(MCMICROExemplar001)/"
    "Test_QuPath_Project/classifiers/classes.json": 3,
    "AndrewZhang419__QuPath/classifiers/classes.json": 9,
    "CosciaLab__Qupath_to_LMD/demo_Qupath_project/classifiers/classes.json": 126,
    "smith6jt-cop__SpleenFollicleCounterQP/classifiers/classes.json": 7,
}


def png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    Image.new("RGB", size, (200, 180, 190)).save(path)
    return path


def annotated(tmp_path: Path, name: str, n: int = 30, seed: int = 0, size=(64, 48),
              classes=CLASSES, **kwargs) -> AnnotatedImage:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1, (n, 2)) * size
    labels = np.sort(rng.integers(0, len(classes), n))
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    return AnnotatedImage(name, png(src / f"{name}.png", size), xy, labels, classes, **kwargs)


def assert_same(a: AnnotatedImage, b: AnnotatedImage) -> None:
    assert a.name == b.name
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.classes == b.classes
    assert a.mpp == b.mpp


# --------------------------------------------------------------------------------------
# Names and classes.json
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("a.png", ("a", ".png")), ("A.PNG", ("A", ".PNG")), ("slide.ome.tif", ("slide", ".ome.tif")),
    ("slide.ome.tiff", ("slide", ".ome.tiff")), ("x.y.svs", ("x.y", ".svs")),
    ("s.mrxs", ("s", ".mrxs")), ("s.bif", ("s", ".bif")), ("a.geojson", None), (".png", None),
])
def test_split_image_name(name: str, expected) -> None:
    assert split_image_name(name) == expected


def test_image_suffixes() -> None:
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ome.tif",
                                   ".ome.tiff", ".ndpi", ".mrxs", ".scn", ".vsi", ".bif"}


def test_find_image(tmp_path: Path) -> None:
    (tmp_path / "slide.ome.tif").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "slide.geojson").write_text("[]")
    assert find_image(tmp_path, "slide") == tmp_path / "slide.ome.tif"
    assert find_image(tmp_path, "b") == tmp_path / "b.JPG"
    assert find_image(tmp_path, "c") is None
    assert find_image(tmp_path / "nowhere", "c") is None
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(QpcellError, match="more than one image"):
        find_image(tmp_path, "b")


def test_image_size(tmp_path: Path) -> None:
    assert image_size(png(tmp_path / "a.png", (31, 17))) == (31, 17)
    (tmp_path / "broken.png").write_bytes(b"nope")
    assert image_size(tmp_path / "broken.png") is None
    (tmp_path / "s.svs").write_bytes(b"")
    assert image_size(tmp_path / "s.svs") is None


@pytest.mark.parametrize("name", sorted(SAMPLE_CLASSES))
def test_read_qupath_classes_json(qupath_samples: Path, name: str) -> None:
    classes = read_classes_json(qupath_samples / name)
    assert len(classes) == SAMPLE_CLASSES[name]
    raw = json.loads((qupath_samples / name).read_text())["pathClasses"]
    assert [c.name for c in classes] == [r["name"] for r in raw]
    for c, r in zip(classes, raw, strict=True):  # packed signed ARGB int -> RGB
        v = r["color"] & 0xFFFFFFFF
        assert c.color == ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def test_qupath_default_class_colours(qupath_samples: Path) -> None:
    classes = read_classes_json(qupath_samples / "orion-cirb__QuPath_Foci/classifiers/classes.json")
    colors = {c.name: c.color for c in classes}
    assert colors["Tumor"] == (200, 0, 0)
    assert colors["Positive"] == (250, 62, 62)
    assert colors["Negative"] == (112, 112, 225)


def test_classes_json_round_trip(tmp_path: Path) -> None:
    classes = make_classes(["Tumor", "Stroma", "a: b"], [(200, 0, 0), (150, 200, 150), None])
    write_classes_json(tmp_path / "classes.json", classes)
    raw = json.loads((tmp_path / "classes.json").read_text())
    assert raw["pathClasses"][0] == {"name": "Tumor", "color": -3670016}  # what QuPath writes
    assert raw["pathClasses"][1]["color"] == -6895466
    assert read_classes_json(tmp_path / "classes.json") == classes


@pytest.mark.parametrize("data,message", [
    ({"pathClasses": [{"name": "A"}, {"name": "A"}]}, "listed twice"),
    ({"pathClasses": [{"name": ""}]}, "empty"),
    ({"classes": []}, "not a QuPath class list"),
])
def test_bad_classes_json(tmp_path: Path, data, message: str) -> None:
    (tmp_path / "classes.json").write_text(json.dumps(data))
    with pytest.raises(QpcellError, match=message):
        read_classes_json(tmp_path / "classes.json")
    (tmp_path / "classes.json").write_text("{")
    with pytest.raises(QpcellError, match="not valid JSON"):
        read_classes_json(tmp_path / "classes.json")


def test_classes_json_rgb_list_and_missing_colour(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(
        {"pathClasses": [{"name": "A", "color": [1, 2, 3]}, {"name": "B"}]}))
    a, b = read_classes_json(tmp_path / "c.json")
    assert a.color == (1, 2, 3) and isinstance(b.color, tuple)


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path: Path) -> None:
    region = Polygon([(0, 0), (40, 0), (40, 40), (0, 40)])
    images = [annotated(tmp_path, "img10", seed=1, mpp=0.5),
              annotated(tmp_path, "img2", seed=2, mpp=0.5, regions=[region])]
    root = write_project(tmp_path / "proj", images)
    assert root == tmp_path / "proj"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["classes.json", "img10.geojson", "img10.png", "img2.geojson", "img2.png",
                     "metadata.json"]
    assert not (root / "img2.png").is_symlink()
    project = read_project(root)
    assert project.classes == CLASSES
    assert [i.name for i in project.images] == ["img2", "img10"]  # natural order
    by_name = {i.name: i for i in project.images}
    for img in images:
        assert_same(img, by_name[img.name])
        assert by_name[img.name].image == root / f"{img.name}.png"
    assert by_name["img2"].regions[0].equals(region)
    assert by_name["img10"].regions is None
    assert project.warnings == []
    assert json.loads((root / "metadata.json").read_text())["mpp"] == 0.5


def test_link_images_and_per_image_mpp(tmp_path: Path) -> None:
    images = [annotated(tmp_path, "a", mpp=0.25), annotated(tmp_path, "b", seed=3)]
    root = write_project(tmp_path / "proj", images, copy_images=False)
    assert (root / "a.png").is_symlink()
    assert (root / "a.png").resolve() == images[0].image.resolve()
    project = read_project(root)
    assert [i.mpp for i in project.images] == [0.25, None]
    # writing again over the same folder is fine
    write_project(root, images, copy_images=False)
    assert read_project(root).images[0].mpp == 0.25


def test_image_already_in_the_folder(tmp_path: Path) -> None:
    img = annotated(tmp_path, "a")
    write_project(tmp_path / "src", [img])  # the image is already there under its name
    assert_same(read_project(tmp_path / "src").images[0], img)


def test_ome_tif_and_other_suffixes(tmp_path: Path) -> None:
    src = tmp_path / "slide.ome.tif"
    src.write_bytes(b"not read")
    img = AnnotatedImage("slide", src, [[10.0, 20.0], [30.0, 40.0]], [0, 1], CLASSES[:2])
    root = write_project(tmp_path / "proj", [img])
    assert (root / "slide.ome.tif").is_file()
    (back,) = read_project(root).images
    assert back.image == root / "slide.ome.tif"
    assert_same(img, back)


def test_classes_json_sets_order_and_colours(tmp_path: Path) -> None:
    images = [annotated(tmp_path, "a")]
    root = write_project(tmp_path / "proj", images)
    reordered = (CellClass("other", (1, 1, 1)), CellClass("stroma", (2, 2, 2)),
                 CellClass("epithelium", (3, 3, 3)))
    write_classes_json(root / "classes.json", reordered)
    project = read_project(root)
    assert project.classes == reordered
    (img,) = project.images
    names = [reordered[k].name for k in img.labels]
    assert names == [CLASSES[k].name for k in images[0].labels]


def test_classes_json_missing_and_extra_classes(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    write_classes_json(root / "classes.json", make_classes(["stroma", "unused", "other"]))
    project = read_project(root)
    assert [c.name for c in project.classes] == ["stroma", "other", "epithelium"]
    text = " ".join(project.warnings)
    assert "'epithelium' used in the annotations but not listed" in text
    assert "'unused'" in text and "left out" in text


def test_no_classes_json_first_appearance(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    (root / "classes.json").unlink()
    project = read_project(root)
    assert [c.name for c in project.classes] == ["stroma", "epithelium", "other"]
    assert project.classes == CLASSES  # colours come from the GeoJSON


def test_explicit_classes(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    with pytest.raises(QpcellError, match="not in the class list"):
        read_project(root, classes=make_classes(["stroma"]))
    bigger = make_classes(["x", "stroma", "epithelium", "other"])
    assert read_project(root, classes=bigger).classes == bigger


def test_qupath_points_file_in_a_project(tmp_path: Path, qupath_samples: Path) -> None:
    for version in ("v0.2.3/qupath-0.2.3_points.geojson", "v0.4.4/qupath-0.4.4_points.geojson"):
        root = tmp_path / version.split("/")[0]
        root.mkdir()
        shutil.copy(qupath_samples / "generated-by-qupath-core" / version, root / "s.geojson")
        (root / "s.svs").write_bytes(b"")
        project = read_project(root)
        (img,) = project.images
        assert img.counts() == {"Positive": 6, "Negative": 3}
        assert [c.color for c in project.classes] == [(200, 50, 50), (112, 112, 225)]
        assert any("2 unclassified points skipped" in w for w in project.warnings)


def test_prediction_folder_without_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 40).astype(np.float32)
    det = Detections(rng.uniform(0, 100, (40, 2)), probs.argmax(1), np.ones(40), probs, CLASSES)
    write_detections(tmp_path / "p.geojson", det)
    with pytest.raises(QpcellError, match="without an image"):
        read_project(tmp_path)
    project = read_project(tmp_path, require_images=False, classes=CLASSES)
    (img,) = project.images
    assert img.image is None and img.metadata["source"] == "detections"
    np.testing.assert_allclose(img.xy, det.xy, atol=1e-6)
    np.testing.assert_array_equal(img.labels, det.labels)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_unpaired_files_are_listed(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a"), annotated(tmp_path, "b")])
    (root / "a.png").unlink()
    png(root / "c.png")
    with pytest.raises(QpcellError) as err:
        read_project(root)
    message = str(err.value)
    assert "a.geojson" in message and "without an image" in message
    assert "c.png" in message and "without a .geojson" in message
    project = read_project(root, require_images=False)
    assert [i.name for i in project.images] == ["a", "b"]
    assert project.images[0].image is None


def test_not_a_project(tmp_path: Path) -> None:
    with pytest.raises(QpcellError, match="not a folder"):
        read_project(tmp_path / "nothing")
    png(tmp_path / "a.png")
    with pytest.raises(QpcellError, match="no <image name>.geojson"):
        read_project(tmp_path)


def test_malformed_geojson_in_a_project_names_the_file(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    (root / "a.geojson").write_text('{"type": "FeatureCollection", "features": [}')
    with pytest.raises(QpcellError, match="not valid JSON") as err:
        read_project(root)
    assert err.value.path == root / "a.geojson"


def test_empty_geojson_in_a_project(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a"), annotated(tmp_path, "b")])
    (root / "b.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    project = read_project(root)
    assert len(project.images[1]) == 0
    assert any("b.geojson" in w and "no objects" in w for w in project.warnings)


def test_points_outside_the_image_are_skipped(tmp_path: Path) -> None:
    img = AnnotatedImage("a", png(tmp_path / "a.png", (50, 40)), [[10, 10], [60, 10], [10, 45]],
                         [0, 0, 1], CLASSES)
    root = write_project(tmp_path / "proj", [img])
    (back,) = read_project(root).images
    assert back.xy.tolist() == [[10, 10]]
    assert any("2 points outside the 50x40 image" in w for w in back.metadata["warnings"])


def test_nan_point_in_a_project_names_the_file(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    (root / "a.geojson").write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
        '{"type": "Point", "coordinates": [NaN, 1]}, "properties": {"classification": '
        '{"name": "stroma"}}}]}')
    with pytest.raises(QpcellError, match="NaN") as err:
        read_project(root)
    assert err.value.path == root / "a.geojson"


def test_conflicting_classes_in_a_project(tmp_path: Path) -> None:
    img = AnnotatedImage("a", png(tmp_path / "a.png"), [[5, 5], [5, 5]], [0, 1], CLASSES)
    root = write_project(tmp_path / "proj", [img])
    with pytest.raises(QpcellError, match="'stroma' and 'epithelium'"):
        read_project(root)


@pytest.mark.parametrize("meta,message", [({"mpp": -1}, "not a positive"),
                                          ({"images": {"a": {"mpp": "x"}}}, "not a positive"),
                                          ([], "expected")])
def test_bad_metadata(tmp_path: Path, meta, message: str) -> None:
    root = write_project(tmp_path / "proj", [annotated(tmp_path, "a")])
    (root / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(QpcellError, match=message):
        read_project(root)


def test_write_project_errors(tmp_path: Path) -> None:
    a = annotated(tmp_path, "a")
    with pytest.raises(QpcellError, match="not unique"):
        write_project(tmp_path / "p", [a, a])
    missing = AnnotatedImage("m", tmp_path / "missing.png", [[1, 1]], [0], CLASSES)
    with pytest.raises(QpcellError, match="not found"):
        write_project(tmp_path / "p", [missing])
    (tmp_path / "x.bmp").write_bytes(b"")
    odd = AnnotatedImage("x", tmp_path / "x.bmp", [[1, 1]], [0], CLASSES)
    with pytest.raises(QpcellError, match="not an image type"):
        write_project(tmp_path / "p", [odd])
    bad_name = AnnotatedImage("../x", None, [[1, 1]], [0], CLASSES)
    with pytest.raises(QpcellError, match="file name"):
        write_project(tmp_path / "p", [bad_name])


def test_write_project_merges_class_lists(tmp_path: Path) -> None:
    a = annotated(tmp_path, "a", classes=make_classes(["x", "y"]))
    b = annotated(tmp_path, "b", classes=make_classes(["y", "z"]), seed=4)
    root = write_project(tmp_path / "p", [a, b])
    assert [c.name for c in read_classes_json(root / "classes.json")] == ["x", "y", "z"]
    project = read_project(root)
    for orig, back in zip([a, b], project.images, strict=True):
        assert [orig.classes[k].name for k in orig.labels] == \
               [project.classes[k].name for k in back.labels]


def test_image_without_points_round_trips(tmp_path: Path) -> None:
    img = AnnotatedImage("e", png(tmp_path / "e.png"), np.zeros((0, 2)), [], CLASSES)
    root = write_project(tmp_path / "p", [img, annotated(tmp_path, "f")])
    assert json.loads((root / "e.geojson").read_text())["features"] == []
    assert len(read_project(root).images[0]) == 0
    assert read_geojson(root / "e.geojson").warnings


def test_write_points_files_are_whole(tmp_path: Path) -> None:
    # no temporary files are left behind by the atomic writes
    write_project(tmp_path / "p", [annotated(tmp_path, "a")])
    write_points(tmp_path / "p" / "a.geojson", annotated(tmp_path, "a", seed=9))
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]
