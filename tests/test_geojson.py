"""QuPath GeoJSON in and out: every genuine QuPath file, every layout, every bad input."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, shape

from qpcell.errors import QpcellError
from qpcell.io.geojson import (
    DEFAULT_MPP,
    QPCELL_SCORE,
    QuPathObjects,
    detections_to_features,
    parse_classification,
    parse_geojson,
    probability_key,
    read_geojson,
    to_annotated_image,
    to_detections,
    write_detections,
    write_points,
)
from qpcell.points import AnnotatedImage, CellClass, Detections, default_color, make_classes

# --------------------------------------------------------------------------------------
# Every file in ../shared/qupath-samples (see its README.md for what each one holds)
# --------------------------------------------------------------------------------------

GEN = "generated-by-qupath-core"
POINTS_FILES = [f"{GEN}/v0.2.3/qupath-0.2.3_points.geojson",
                f"{GEN}/v0.2.3/qupath-0.2.3_points_featurecollection.geojson",
                f"{GEN}/v0.3.2/qupath-0.3.2_points.geojson",
                f"{GEN}/v0.4.4/qupath-0.4.4_points.geojson",
                f"{GEN}/v0.5.1/qupath-0.5.1_points.geojson"]
MIXED_FILES = [f"{GEN}/v0.2.3/qupath-0.2.3_mixed.geojson",
               f"{GEN}/v0.2.3/qupath-0.2.3_mixed_featurecollection.geojson",
               f"{GEN}/v0.3.2/qupath-0.3.2_mixed.geojson",
               f"{GEN}/v0.4.4/qupath-0.4.4_mixed.geojson",
               f"{GEN}/v0.5.1/qupath-0.5.1_mixed.geojson"]
LMD = "CosciaLab__Qupath_to_LMD"
EXEMPLAR = ("josenimo__06_QuPath_Annotation_to_AnnData/TestData(MCMICROExemplar001)/"
            "Test_QuPath_Project")
CLASSES_DIR = "qupath__qupath/qupath-core/src/test/resources/qupath/lib/objects/classes"

# file -> (points per class (None = unclassified), regions, detections per class, set aside)
OTHER_GEOJSON = {
    f"{LMD}/test_geojson_files/03012023_JN.geojson": ({None: 3}, 0, {}, 3),
    f"{LMD}/test_geojson_files/objects.geojson": ({}, 1, {}, 1),
    f"{LMD}/Cellpose_integration/test_geojson/2023_02_02__CD163_CD31_CDH1.geojson":
        ({None: 3}, 1, {None: 217}, 0),
    f"{LMD}/demo_Qupath_project/Single_cells.geojson":
        ({None: 3}, 0, {"single_cells_demo": 121}, 7),
    f"{LMD}/demo_Qupath_project/TD_01_verysmall_mIF.geojson": ({None: 3}, 0, {}, 6),
    "CosciaLab__openDVP/tests/test_data/io/QuPath_Annotations_wo_calibs.geojson":
        ({"calibpoints": 8}, 0, {}, 43),
    "MannLabs__py-lmd/docs/pages/notebooks/test_data/cellculture_example/"
    "annotated_regions_Qupath.geojson": ({None: 3}, 2, {}, 0),
    f"{EXEMPLAR}/Exemplar001_subset.geojson": ({}, 0, {}, 7),
    "choosehappy__HistoQC/AnnotationModule/geojson_example.json": ({}, 0, {}, 2),
    "choosehappy__HistoQC/AnnotationModule/holed.geojson": ({}, 1, {}, 0),
    "qupath__qupath/qupath-core/src/test/resources/data/polygon.geojson": ({}, 1, {}, 0),
}
# files in the samples folder that are not GeoJSON (tested where they are parsed)
NOT_GEOJSON_NAMES = {"README.md", "project.qpproj", "classes.json", "server.json",
                     "summary.json", "derived-class.json", "derived-class-legacy.json"}

POSITIVE = (200, 50, 50)
NEGATIVE = (112, 112, 225)


def test_every_sample_file_is_covered(qupath_samples: Path) -> None:
    files = {str(p.relative_to(qupath_samples)) for p in qupath_samples.rglob("*") if p.is_file()}
    geojson = set(POINTS_FILES) | set(MIXED_FILES) | set(OTHER_GEOJSON)
    assert geojson <= files
    left = {f for f in files - geojson if Path(f).name not in NOT_GEOJSON_NAMES}
    assert not left, f"sample files no test reads: {sorted(left)}"


@pytest.mark.parametrize("name", POINTS_FILES + MIXED_FILES)
def test_generated_files_points(qupath_samples: Path, name: str) -> None:
    objs = read_geojson(qupath_samples / name)
    # MultiPoint Positive x5, MultiPoint Negative x3, Point Positive x1, unclassified x2
    assert objs.point_class == ["Positive"] * 5 + ["Negative"] * 3 + ["Positive"] + [None] * 2
    np.testing.assert_array_equal(objs.point_xy[:5], [[1021.5, 2040.25], [1048, 2061],
                                                      [1077.75, 2033.5], [1102, 2090],
                                                      [1130.25, 2071.75]])
    np.testing.assert_array_equal(objs.point_xy[5:], [[1210, 2110.5], [1236.5, 2142],
                                                      [1260.25, 2099.75], [1500.5, 2500.5],
                                                      [800, 900], [820, 905]])
    # colorRGB (0.2/0.3, packed signed ARGB) and color [r, g, b] (0.4+) agree
    assert objs.class_colors["Positive"] == POSITIVE
    assert objs.class_colors["Negative"] == NEGATIVE
    assert objs.regions == []
    assert objs.warnings == []


@pytest.mark.parametrize("name", POINTS_FILES)
def test_generated_points_files_hold_only_points(qupath_samples: Path, name: str) -> None:
    objs = read_geojson(qupath_samples / name)
    assert len(objs.detection_xy) == 0 and objs.set_aside == []


@pytest.mark.parametrize("name", MIXED_FILES)
def test_generated_mixed_files(qupath_samples: Path, name: str) -> None:
    objs = read_geojson(qupath_samples / name)
    # 1 detection (Stroma) + 2 cells (Tumor, and the derived class Tumor: Positive)
    assert objs.detection_class == ["Stroma", "Tumor", "Tumor: Positive"]
    stroma = Polygon([(1030, 1985), (1010, 1990), (1015, 2012), (1038, 2005)]).centroid
    np.testing.assert_allclose(objs.detection_xy[0], [stroma.x, stroma.y], atol=1e-9)
    # the cell's point is its nucleus (an ellipse centred on (1118, 2016)), not the cell
    np.testing.assert_allclose(objs.detection_xy[1], [1118, 2016], atol=0.01)
    assert objs.detection_measurements[0] == {"Area px^2": 412.5, "Mean": 0.3125}
    assert objs.detection_measurements[1]["Nucleus: Area"] == 345.5
    assert objs.detection_measurements[2] == {"Nucleus: Area": 282.75, "Cell: Area": 1188.0,
                                              "Nucleus: DAB OD mean": 0.41999998688697815}
    # classified area annotations and the tile are set aside, each with a reason
    assert len(objs.set_aside) == 3
    assert "tumor region" in objs.set_aside[0] and "'Tumor'" in objs.set_aside[0]
    assert "'Tumor: Positive'" in objs.set_aside[1] and "with a class" in objs.set_aside[1]
    assert "tile" in objs.set_aside[2]
    assert objs.class_colors["Tumor"] == (200, 0, 0)
    assert objs.class_colors["Stroma"] == (150, 200, 150)
    assert objs.class_colors["Tumor: Positive"] == POSITIVE


def test_generated_versions_read_identically(qupath_samples: Path) -> None:
    ref = read_geojson(qupath_samples / MIXED_FILES[-1])
    for name in MIXED_FILES[:-1]:
        objs = read_geojson(qupath_samples / name)
        np.testing.assert_array_equal(objs.point_xy, ref.point_xy)
        assert objs.point_class == ref.point_class
        np.testing.assert_allclose(objs.detection_xy, ref.detection_xy, atol=1e-9)
        assert objs.detection_class == ref.detection_class
        assert objs.detection_measurements == ref.detection_measurements
        assert objs.class_colors == ref.class_colors


@pytest.mark.parametrize("name", sorted(OTHER_GEOJSON))
def test_public_qupath_files(qupath_samples: Path, name: str) -> None:
    points, n_regions, detections, n_aside = OTHER_GEOJSON[name]
    objs = read_geojson(qupath_samples / name)
    assert Counter(objs.point_class) == Counter(points)
    assert len(objs.point_xy) == sum(points.values())
    assert len(objs.regions) == n_regions
    assert Counter(objs.detection_class) == Counter(detections)
    assert len(objs.detection_xy) == sum(detections.values())
    assert len(objs.set_aside) == n_aside
    assert all(r.is_valid and r.area > 0 for r in objs.regions)
    assert objs.warnings == []


def test_centroids_match_shapely(qupath_samples: Path) -> None:
    for name in [f"{LMD}/demo_Qupath_project/Single_cells.geojson",
                 f"{LMD}/Cellpose_integration/test_geojson/2023_02_02__CD163_CD31_CDH1.geojson"]:
        data = json.loads((qupath_samples / name).read_text())
        ref = [shape(f["geometry"]).centroid for f in data["features"]
               if f["properties"]["objectType"] in ("detection", "cell")]
        objs = read_geojson(qupath_samples / name)
        np.testing.assert_allclose(objs.detection_xy, [[c.x, c.y] for c in ref], atol=1e-8)


def test_qupath_060_cells_match_summary(qupath_samples: Path) -> None:
    folder = qupath_samples / LMD / "demo_Qupath_project"
    summary = json.loads((folder / "data/1/summary.json").read_text())["hierarchy"]
    objs = read_geojson(folder / "Single_cells.geojson")
    assert len(objs.detection_xy) == summary["objectTypeCounts"]["Cells"] == 121
    assert Counter(objs.detection_class) == Counter(summary["detectionClassificationCounts"])
    assert all(len(m) == 126 for m in objs.detection_measurements)
    assert all(math.isfinite(v) for v in objs.detection_measurements[0].values())
    assert "Cell: Area" in objs.detection_measurements[0]
    # the classified annotations set aside are those summary.json counts
    classes = Counter(s.split("class '")[1].split("'")[0] for s in objs.set_aside)
    expected = dict(summary["annotationClassificationCounts"])
    expected.pop("Unclassified")  # the 3 calibration points
    assert classes == Counter(expected)


def test_exemplar_041_matches_summary(qupath_samples: Path) -> None:
    summary = json.loads((qupath_samples / EXEMPLAR / "data/1/summary.json").read_text())
    objs = read_geojson(qupath_samples / EXEMPLAR / "Exemplar001_subset.geojson")
    assert len(objs.set_aside) == summary["hierarchy"]["objectTypeCounts"]["Annotations"]
    assert set(objs.class_colors) == set(summary["hierarchy"]["annotationClassificationCounts"])
    assert objs.class_colors["Immune_Cluster"] == (55, 46, 21)


def test_histoqc_02_array_with_colorrgb(qupath_samples: Path) -> None:
    objs = read_geojson(qupath_samples / "choosehappy__HistoQC/AnnotationModule/"
                                         "geojson_example.json")
    assert objs.class_colors == {"Tumor": (200, 0, 0), "Invborder": (0, 255, 0)}
    assert all("MultiPolygon" in s for s in objs.set_aside)


def test_bare_feature_with_hole(qupath_samples: Path) -> None:
    objs = read_geojson(qupath_samples / "choosehappy__HistoQC/AnnotationModule/holed.geojson")
    (region,) = objs.regions
    assert isinstance(region, Polygon) and len(region.interiors) == 1
    assert region.area < Polygon(region.exterior).area


def test_bare_geometry_is_a_region(qupath_samples: Path) -> None:
    path = qupath_samples / "qupath__qupath/qupath-core/src/test/resources/data/polygon.geojson"
    objs = read_geojson(path)
    (region,) = objs.regions
    assert region.geom_type == "MultiPolygon"
    assert region.area == pytest.approx(shape(json.loads(path.read_text())).area)


def test_calibration_points_without_class_are_skipped_with_a_warning(
        qupath_samples: Path) -> None:
    path = qupath_samples / LMD / "test_geojson_files/03012023_JN.geojson"
    img = to_annotated_image(read_geojson(path), "jn")
    assert len(img) == 0 and img.classes == ()
    warnings = " ".join(img.metadata["warnings"])
    assert "3 unclassified points skipped" in warnings
    assert "3 objects not used" in warnings


def test_classified_points_become_cells(qupath_samples: Path) -> None:
    path = qupath_samples / "CosciaLab__openDVP/tests/test_data/io/" \
                            "QuPath_Annotations_wo_calibs.geojson"
    img = to_annotated_image(read_geojson(path), "dvp")
    assert img.counts() == {"calibpoints": 8}
    assert img.classes[0].color == (154, 19, 115)


@pytest.mark.parametrize("name,expected", [
    ("derived-class.json", ("First: Second: Third: Fourth", (10, 20, 30))),
    ("derived-class-legacy.json",
     ("First-legacy: Second-legacy: Third-legacy: Fourth-legacy", (1, 2, 3))),
])
def test_derived_class_files(qupath_samples: Path, name: str, expected) -> None:
    data = json.loads((qupath_samples / CLASSES_DIR / name).read_text())
    assert parse_classification(data) == expected


# --------------------------------------------------------------------------------------
# Layouts, written inline
# --------------------------------------------------------------------------------------


def feature(geometry: dict, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": props}


def point(x: float, y: float) -> dict:
    return {"type": "Point", "coordinates": [x, y]}


def square(x: float, y: float, s: float = 10.0) -> dict:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s],
                                                 [x, y + s], [x, y]]]}


def write(tmp_path: Path, data, name: str = "a.geojson") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("classification,expected", [
    ({"name": "Tumor", "color": [200, 0, 0]}, ("Tumor", (200, 0, 0))),
    ({"name": "Tumor", "color": [200, 0, 0, 128]}, ("Tumor", (200, 0, 0))),
    ({"name": "Tumor", "colorRGB": -3670016}, ("Tumor", (200, 0, 0))),
    ({"names": ["Tumor", "Positive"], "color": [200, 50, 50]}, ("Tumor: Positive", POSITIVE)),
    ({"name": "Positive", "colorRGB": -3657166,
      "parentClass": {"name": "Tumor", "colorRGB": -3670016}}, ("Tumor: Positive", POSITIVE)),
    ({"name": "Tumor"}, ("Tumor", None)),
    ("Tumor", ("Tumor", None)),
    (None, (None, None)),
])
def test_classification_forms(classification, expected) -> None:
    assert parse_classification(classification) == expected


@pytest.mark.parametrize("classification", [{"name": ""}, {"name": "  "}, "",
                                            {"names": ["Tumor", ""]}, {"color": [1, 2, 3]}, 5])
def test_empty_class_name_is_an_error(tmp_path: Path, classification) -> None:
    path = write(tmp_path, {"type": "FeatureCollection", "features": [
        feature(point(1, 2), objectType="annotation", classification=classification)]})
    with pytest.raises(QpcellError, match="feature 1") as err:
        read_geojson(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("props,fid,kind", [
    ({"objectType": "detection"}, None, "detection"),
    ({"object_type": "detection"}, None, "detection"),
    ({"type": "detection"}, None, "detection"),
    ({}, "PathDetectionObject", "detection"),
    ({}, "PathCellObject", "detection"),
    ({"objectType": "cell"}, str(uuid.uuid4()), "detection"),
    ({"objectType": "Detection"}, None, "detection"),
    ({}, "PathAnnotationObject", "annotation"),
    ({}, None, "annotation"),
    ({}, str(uuid.uuid4()), "annotation"),
    ({"objectType": "tile"}, None, "aside"),
    ({}, "PathTileObject", "aside"),
    ({"objectType": "tma_core"}, None, "aside"),
    ({"objectType": "spaceship"}, None, "aside"),
])
def test_object_type_forms(props, fid, kind) -> None:
    feat = feature(point(3, 4), classification={"name": "A", "color": [1, 2, 3]}, **props)
    if fid is not None:
        feat["id"] = fid
    objs = parse_geojson([feat])
    got = ("detection" if len(objs.detection_xy) else "annotation" if len(objs.point_xy)
           else "aside")
    assert got == kind
    if kind == "aside":
        assert len(objs.set_aside) == 1


@pytest.mark.parametrize("measurements,expected", [
    ({"a": 1, "b": 2.5}, {"a": 1.0, "b": 2.5}),
    ([{"name": "a", "value": 1}, {"name": "b", "value": 2.5}], {"a": 1.0, "b": 2.5}),
    ([], {}),
    (None, {}),
    ({"a": None}, {"a": math.nan}),
    ({"a": "NaN", "b": "x", "c": True}, {"a": math.nan}),
])
def test_measurement_forms(measurements, expected) -> None:
    objs = parse_geojson([feature(point(3, 4), objectType="detection",
                                  measurements=measurements)])
    got = objs.detection_measurements[0]
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == v or (math.isnan(v) and math.isnan(got[k]))


def test_top_level_forms(tmp_path: Path) -> None:
    feat = feature(point(1, 2), objectType="annotation", classification={"name": "A"})
    for data in ({"type": "FeatureCollection", "features": [feat]}, feat, [feat]):
        objs = read_geojson(write(tmp_path, data))
        assert objs.point_class == ["A"]
    objs = read_geojson(write(tmp_path, {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}))
    assert objs.point_class == [None, None]
    objs = read_geojson(write(tmp_path, {"type": "GeometryCollection", "geometries": []}))
    assert len(objs.set_aside) == 1


def test_detections_and_cells_as_points() -> None:
    nucleus = square(100, 100, 2)
    cell = feature(square(90, 90, 30), objectType="cell", classification={"name": "B"})
    cell["nucleusGeometry"] = nucleus
    objs = parse_geojson([
        feature(square(0, 0), objectType="detection", classification={"name": "A"}),
        cell,
        feature({"type": "MultiPolygon", "coordinates": [square(0, 20)["coordinates"],
                                                         square(40, 20)["coordinates"]]},
                objectType="detection", classification={"name": "A"}),
        feature(point(7, 8), objectType="detection", classification={"name": "A"}),
        feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, objectType="detection"),
    ])
    np.testing.assert_allclose(objs.detection_xy, [[5, 5], [101, 101], [25, 25], [7, 8]])
    assert objs.detection_class == ["A", "B", "A", "A"]
    assert len(objs.set_aside) == 1 and "LineString" in objs.set_aside[0]
    img = to_annotated_image(objs, "x")  # no point annotations: detections
    assert img.metadata["source"] == "detections" and len(img) == 4


def test_polygon_with_hole_centroid_and_region() -> None:
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[5, 0.5], [9.5, 0.5], [9.5, 9.5], [5, 9.5], [5, 0.5]]
    geom = {"type": "Polygon", "coordinates": [outer, hole]}
    objs = parse_geojson([feature(geom, objectType="detection"), feature(geom)])
    c = shape(geom).centroid
    np.testing.assert_allclose(objs.detection_xy[0], [c.x, c.y], atol=1e-12)
    assert objs.regions[0].equals(shape(geom))


def test_large_slide_coordinates_keep_precision() -> None:
    geom = square(98765.4321, 123456.789, 12)
    objs = parse_geojson([feature(geom, objectType="detection")])
    np.testing.assert_allclose(objs.detection_xy[0], [98771.4321, 123462.789], atol=1e-9)


def test_other_geometries_are_set_aside() -> None:
    objs = parse_geojson([
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        feature({"type": "Circle", "coordinates": [1, 2]}),
        feature(None),
        feature(square(0, 0), classification={"name": "Tumor"}),
        {"type": "Topology"},
    ])
    assert len(objs.set_aside) == 5
    assert "LineString annotation" in objs.set_aside[0]
    assert "'Circle'" in objs.set_aside[1]
    assert "no geometry" in objs.set_aside[2]
    assert "with a class" in objs.set_aside[3]
    assert len(objs.point_xy) == len(objs.regions) == len(objs.detection_xy) == 0


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ('{"type": "FeatureCollection", "features": [', "not valid JSON.*line 1"),
    ("", "not valid JSON"),
    ("42", "top level is a int"),
    ('{"foo": 1}', "top-level type is None"),
    ('{"type": "FeatureCollection", "features": {}}', "not a list"),
])
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(QpcellError, match=message) as err:
        read_geojson(path)
    assert err.value.path == path


def test_binary_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "x.geojson"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(QpcellError, match="not a text"):
        read_geojson(path)
    with pytest.raises(QpcellError, match="not found"):
        read_geojson(tmp_path / "missing.geojson")


@pytest.mark.parametrize("data", [{"type": "FeatureCollection", "features": []},
                                  {"type": "FeatureCollection"}, []])
def test_empty_collection_is_empty_with_a_warning(tmp_path: Path, data) -> None:
    objs = read_geojson(write(tmp_path, data))
    assert len(objs.point_xy) == len(objs.detection_xy) == len(objs.regions) == 0
    assert objs.warnings == ["holds no objects (an empty FeatureCollection)"]
    img = to_annotated_image(objs, "a")
    assert len(img) == 0 and any("no objects" in w for w in img.metadata["warnings"])


@pytest.mark.parametrize("geometry", [
    '{"type": "Point", "coordinates": [NaN, 3]}',
    '{"type": "MultiPoint", "coordinates": [[1, 2], [3, Infinity]]}',
    '{"type": "MultiPoint", "coordinates": [[1, 2], [3, null]]}',
    '{"type": "Point", "coordinates": ["a", 3]}',
    '{"type": "MultiPoint", "coordinates": [[1, 2], [3]]}',
])
def test_bad_point_coordinates_name_the_file(tmp_path: Path, geometry: str) -> None:
    good = json.dumps(feature(point(1, 1), classification={"name": "A"}))
    text = (f'{{"type": "FeatureCollection", "features": [{good}, {{"type": "Feature", '
            f'"geometry": {geometry}, "properties": {{"objectType": "annotation"}}}}]}}')
    path = write(tmp_path, text)
    with pytest.raises(QpcellError, match="feature 2") as err:
        read_geojson(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["detection", "annotation"])
def test_nan_in_polygons_names_the_feature(tmp_path: Path, kind: str) -> None:
    bad = ('{"type": "Polygon", "coordinates": [[[0, 0], [5, NaN], [5, 5], [0, 0]]]}')
    text = (f'[{json.dumps(feature(square(0, 0), objectType=kind))}, {{"type": "Feature", '
            f'"geometry": {bad}, "properties": {{"objectType": "{kind}"}}}}]')
    with pytest.raises(QpcellError, match="feature 2.*NaN"):
        read_geojson(write(tmp_path, text))


def test_classification_without_colour_gets_default_or_given() -> None:
    objs = parse_geojson([feature(point(1, 1), classification={"name": "A"}),
                          feature(point(2, 2), classification={"name": "B", "color": [1, 2, 3]})])
    img = to_annotated_image(objs, "x")
    assert img.classes == (CellClass("A", default_color(0)), CellClass("B", (1, 2, 3)))
    given = make_classes(["B", "A"], [(9, 9, 9), (8, 8, 8)])
    img = to_annotated_image(objs, "x", classes=given)
    assert img.classes == given and img.labels.tolist() == [1, 0]


def test_unknown_class_is_an_error() -> None:
    objs = parse_geojson([feature(point(1, 1), classification={"name": "A"})])
    with pytest.raises(QpcellError, match="'A' not in the class list"):
        to_annotated_image(objs, "x", classes=make_classes(["B"]))


def test_out_of_image_points_are_skipped_with_a_warning() -> None:
    objs = parse_geojson([feature({"type": "MultiPoint",
                                   "coordinates": [[1, 1], [-1, 5], [5, 100], [99.5, 0]]},
                                  classification={"name": "A"})])
    img = to_annotated_image(objs, "x", image_size=(100, 50))
    assert img.xy.tolist() == [[1, 1], [99.5, 0]]
    assert any("2 points outside the 100x50 image" in w for w in img.metadata["warnings"])
    assert len(to_annotated_image(objs, "x")) == 4  # size unknown: all kept


def test_duplicate_points_are_kept_once_with_a_warning() -> None:
    objs = parse_geojson([feature({"type": "MultiPoint",
                                   "coordinates": [[1, 1], [5, 5], [1, 1 + 1e-8], [1, 1]]},
                                  classification={"name": "A"})])
    img = to_annotated_image(objs, "x")
    assert img.xy.tolist() == [[1, 1], [5, 5]]
    assert any("2 duplicate points" in w for w in img.metadata["warnings"])


def test_two_classes_at_one_spot_is_an_error() -> None:
    objs = parse_geojson([feature(point(3, 4), classification={"name": "Tumor"}),
                          feature(point(3, 4), classification={"name": "Stroma"})])
    with pytest.raises(QpcellError, match="'Tumor' and 'Stroma'"):
        to_annotated_image(objs, "x")


def test_unclassified_points_skipped_with_a_warning() -> None:
    objs = parse_geojson([feature({"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]}),
                          feature(point(3, 3), classification={"name": "A"})])
    img = to_annotated_image(objs, "x")
    assert img.counts() == {"A": 1}
    assert any("2 unclassified points skipped" in w for w in img.metadata["warnings"])


def test_source_choice() -> None:
    objs = parse_geojson([feature(point(1, 1), classification={"name": "A"}),
                          feature(square(0, 0), objectType="detection",
                                  classification={"name": "B"})])
    assert to_annotated_image(objs, "x").counts() == {"A": 1}
    assert to_annotated_image(objs, "x", source="detections").counts() == {"B": 1}
    assert to_annotated_image(objs, "x", source="points").counts() == {"A": 1}
    assert to_annotated_image(objs, "x", source="cells").counts() == {}  # no cell objects
    with pytest.raises(QpcellError, match="what to read"):
        to_annotated_image(objs, "x", source="bogus")


def test_regions_and_metadata() -> None:
    objs = parse_geojson([feature(square(0, 0, 50)),
                          feature(point(3, 3), classification={"name": "A"})])
    img = to_annotated_image(objs, "x", image="x.png", mpp=0.5)
    assert len(img.regions) == 1 and img.regions[0].area == 2500
    assert img.image == Path("x.png") and img.mpp == 0.5
    assert to_annotated_image(parse_geojson([feature(point(1, 1))]), "y").regions is None


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

CLASSES = make_classes(["stroma", "epithelium", "other"])


def detections(n: int = 50, seed: int = 0, scale: float = 1000.0) -> Detections:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1], n).astype(np.float32)
    return Detections(rng.uniform(0, scale, (n, 2)), probs.argmax(1),
                      rng.uniform(0, 1, n).astype(np.float32), probs, CLASSES)


def strict_json(path: Path):
    def no_constants(name):
        raise AssertionError(f"{name} written to JSON")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_detection_features_are_what_qupath_imports() -> None:
    det = detections(20)
    feats = detections_to_features(det)
    assert len(feats) == 20
    ids = {f["id"] for f in feats}
    assert len(ids) == 20 and all(uuid.UUID(i).version == 4 for i in ids)
    for f, (x, y), label in zip(feats, det.xy, det.labels, strict=True):
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = CLASSES[label]
        assert props["classification"] == {"name": cls.name, "color": list(cls.color)}
        assert set(props["measurements"]) == {QPCELL_SCORE} | {probability_key(c.name)
                                                               for c in CLASSES}
        assert all(type(v) is float for v in props["measurements"].values())
        ring = np.array(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and 16 <= len(ring) - 1 <= 24
        np.testing.assert_array_equal(ring[0], ring[-1])
        r = np.hypot(ring[:, 0] - x, ring[:, 1] - y)
        np.testing.assert_allclose(r, 4.0 / DEFAULT_MPP, atol=1e-3)  # 4 µm at 0.44 µm/px


def test_circle_radius_follows_pixel_size() -> None:
    det = detections(3)
    for mpp, expected in ((0.25, 16.0), (None, 4 / DEFAULT_MPP)):
        ring = np.array(detections_to_features(det, mpp=mpp)[0]["geometry"]["coordinates"][0])
        assert np.hypot(*(ring[0] - det.xy[0])) == pytest.approx(expected, abs=1e-3)
    det.mpp = 0.5  # the detections' own pixel size is used when none is given
    ring = np.array(detections_to_features(det, radius_um=3)[0]["geometry"]["coordinates"][0])
    assert np.hypot(*(ring[0] - det.xy[0])) == pytest.approx(6.0, abs=1e-3)


def test_point_shape_and_offset() -> None:
    det = detections(3)
    feats = detections_to_features(det, shape="point", offset=(100.0, -5.0))
    got = np.array([f["geometry"]["coordinates"] for f in feats])
    np.testing.assert_array_equal(got, det.xy + [100.0, -5.0])
    assert all(f["geometry"]["type"] == "Point" for f in feats)
    with pytest.raises(QpcellError, match="shape"):
        detections_to_features(det, shape="square")


def test_non_finite_measurements_are_left_out() -> None:
    det = detections(3)
    det.class_probs[0, 1] = np.nan
    det.scores[1] = np.inf
    feats = detections_to_features(det)
    assert probability_key("epithelium") not in feats[0]["properties"]["measurements"]
    assert QPCELL_SCORE not in feats[1]["properties"]["measurements"]
    assert len(feats[2]["properties"]["measurements"]) == 4


@pytest.mark.parametrize("shape_", ["circle", "point"])
@pytest.mark.parametrize("scale", [300.0, 150_000.0])
def test_write_detections_reads_back(tmp_path: Path, shape_: str, scale: float) -> None:
    det = detections(200, scale=scale)
    det.xy[0] = [-3.25, 0.0]  # near and beyond the edge too
    path = tmp_path / "pred.geojson"
    write_detections(path, det, shape=shape_)
    strict_json(path)
    objs = read_geojson(path)
    np.testing.assert_allclose(objs.detection_xy, det.xy, rtol=0, atol=1e-6)
    assert objs.detection_class == [CLASSES[k].name for k in det.labels]
    for m, s, p in zip(objs.detection_measurements, det.scores, det.class_probs, strict=True):
        assert m == {QPCELL_SCORE: float(s), **{probability_key(c.name): float(v)
                                                for c, v in zip(CLASSES, p, strict=True)}}
    back = to_detections(objs, CLASSES)
    np.testing.assert_array_equal(back.labels, det.labels)
    np.testing.assert_array_equal(back.scores, det.scores)
    np.testing.assert_array_equal(back.class_probs, det.class_probs)
    assert objs.class_colors == {c.name: c.color for c in CLASSES}
    assert [p.name for p in tmp_path.iterdir()] == ["pred.geojson"]  # no temp file left


def test_write_empty_detections(tmp_path: Path) -> None:
    path = tmp_path / "empty.geojson"
    write_detections(path, Detections.empty(CLASSES))
    assert strict_json(path) == {"type": "FeatureCollection", "features": []}


def test_write_points_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, (300, 2))
    labels = np.sort(rng.integers(0, 2, 300))  # grouped by class: the order read back
    region = Polygon([(0, 0), (400, 0), (400, 400), (0, 400)], [[(10, 10), (20, 10), (20, 20)]])
    img = AnnotatedImage("t", None, xy, labels, CLASSES, regions=[region])
    path = tmp_path / "t.geojson"
    write_points(path, img)
    data = strict_json(path)
    kinds = [(f["geometry"]["type"], f["properties"].get("classification", {}).get("name"))
             for f in data["features"]]
    assert kinds == [("MultiPoint", "stroma"), ("MultiPoint", "epithelium"), ("Polygon", None)]
    assert all(f["properties"]["objectType"] == "annotation" for f in data["features"])
    back = to_annotated_image(read_geojson(path), "t", classes=CLASSES)
    np.testing.assert_array_equal(back.xy, img.xy)
    np.testing.assert_array_equal(back.labels, img.labels)
    assert len(back.regions) == 1 and back.regions[0].equals(region)


def test_write_points_single_point_is_a_point(tmp_path: Path) -> None:
    img = AnnotatedImage("t", None, [[1.5, 2.5]], [2], CLASSES)
    write_points(tmp_path / "t.geojson", img)
    (feat,) = strict_json(tmp_path / "t.geojson")["features"]
    assert feat["geometry"] == {"type": "Point", "coordinates": [1.5, 2.5]}
    assert feat["properties"]["classification"]["name"] == "other"


def test_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.geojson"
    path.write_text("old")
    import qpcell.io.atomic as atomic

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_points(path, AnnotatedImage("t", None, [[1, 2]], [0], CLASSES))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.geojson"]


def test_100k_points_are_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 100_000
    img = AnnotatedImage("big", None, rng.uniform(0, 80_000, (n, 2)),
                         np.sort(rng.integers(0, 3, n)), CLASSES)
    to_annotated_image(QuPathObjects(point_xy=np.zeros((2, 2)) + [[0, 0], [1, 1]],
                                     point_class=["a", "a"]), "warm-up")  # imports scipy
    start = time.perf_counter()
    write_points(tmp_path / "big.geojson", img)
    back = to_annotated_image(read_geojson(tmp_path / "big.geojson"), "big", classes=CLASSES)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(back.xy, img.xy)
    assert elapsed < 4.0, f"100,000 points took {elapsed:.1f} s to write and read"


def test_many_copies_of_one_point_stay_cheap() -> None:
    objs = QuPathObjects(point_xy=np.full((50_000, 2), 7.0), point_class=["A"] * 50_000)
    start = time.perf_counter()
    img = to_annotated_image(objs, "x")
    assert time.perf_counter() - start < 3.0
    assert img.xy.tolist() == [[7.0, 7.0]]
    assert any("49999 duplicate points" in w for w in img.metadata["warnings"])
