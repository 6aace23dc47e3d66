"""``qpcell annotate-back`` without QuPath: the pure logic (which objects are qpcell's, class
mapping, matching files to images, backups) and the paquo-backed writer driven through fake
paquo objects that implement the few paquo methods qpcell calls (duck typing)."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import shape

from qpcell import annotate
from qpcell.annotate import (
    annotate_back,
    backup_project_data,
    is_qpcell_feature,
    map_classes,
    match_predictions,
    plan_replacement,
    prediction_files,
    read_prediction,
)
from qpcell.errors import QpcellError
from qpcell.io import paquo as qp
from qpcell.io.geojson import QPCELL_SCORE, probability_key, write_detections
from qpcell.io.paquo import PaquoWriter
from qpcell.io.qupath_project import read_project_info, uri_to_path
from qpcell.points import CellClass, Detections

ANDREW = "AndrewZhang419__QuPath"


# ------------------------------------------------------------------ fake paquo objects

class FakeColor:
    """paquo.colors.QuPathColor: ``to_rgb()``."""

    def __init__(self, rgb):
        self.rgb = tuple(rgb)

    def to_rgb(self):
        return self.rgb


class FakePathClass:
    """paquo.classes.QuPathPathClass(name, color=...): ``name``, ``id``, ``color``."""

    def __init__(self, name, color=None):
        self.name = self.id = name
        self.color = None if color is None else FakeColor(color)


class FakeObject:
    """A paquo path object: ``measurements`` (a mapping), ``roi``, ``path_class``."""

    def __init__(self, feature):
        self.feature = feature
        props = feature.get("properties", {})
        self.kind = props.get("objectType", "annotation")
        self.measurements = dict(props.get("measurements") or {})
        cls = props.get("classification")
        self.path_class = None if not cls else FakePathClass(cls["name"], cls.get("color"))
        self.roi = shape(feature["geometry"])
        self.parent = None


class FakeDetections:
    """``hierarchy.detections``: iterable, ``-=`` removes in one call."""

    def __init__(self, hierarchy):
        self._h = hierarchy

    def __iter__(self):
        return iter(list(self._h._detections))

    def __len__(self):
        return len(self._h._detections)

    def __isub__(self, objects):
        objects = list(objects)
        self._h.calls.append(("remove", len(objects), self._h.autoflush))
        ids = {id(o) for o in objects}
        self._h._detections = [d for d in self._h._detections if id(d) not in ids]
        return self


class FakeHierarchy:
    """paquo.hierarchy.QuPathPathObjectHierarchy, as far as qpcell uses it."""

    def __init__(self, annotations=(), detections=()):
        self._annotations = [FakeObject(f) for f in annotations]
        self._detections = [FakeObject(f) for f in detections]
        self.autoflush = True
        self.calls: list = []

    @property
    def detections(self):
        return FakeDetections(self)

    @property
    def annotations(self):
        return list(self._annotations)

    @contextmanager
    def no_autoflush(self):
        self.autoflush = False
        self.calls.append(("no_autoflush",))
        try:
            yield self
        finally:
            self.autoflush = True
            self.calls.append(("flush",))

    def to_geojson(self):
        return [json.loads(json.dumps(a.feature)) for a in self._annotations]

    def load_geojson(self, geojson, *, raise_on_skip=False, fix_invalid=False):
        assert isinstance(geojson, list)
        self.calls.append(("load", len(geojson), self.autoflush))
        # what Java's Gson would accept: plain JSON, no NaN
        text = json.dumps(geojson, allow_nan=False)
        for feature in json.loads(text):
            props = feature["properties"]
            if props.get("objectType") not in ("annotation", "detection", "tile", "cell"):
                if raise_on_skip:
                    raise ValueError("could not convert 1 annotations")
                continue
            obj = FakeObject(feature)
            # insertPathObjects: the object goes inside the smallest annotation containing it
            centre = obj.roi.centroid
            parents = [a for a in self._annotations if a.roi.area and a.roi.contains(centre)]
            obj.parent = min(parents, key=lambda a: a.roi.area) if parents else None
            (self._detections if obj.kind != "annotation" else self._annotations).append(obj)
        return True

    def qpcell_detections(self):
        return [d for d in self._detections if QPCELL_SCORE in d.measurements]


class FakeEntry:
    """paquo.images.QuPathProjectImageEntry, as paquo 0.9 behaves.

    ``uri`` is the image URI the project stores; ``is_readable()`` is whether a file is there;
    ``save()`` writes only then, and otherwise only logs a warning (paquo's
    ``QuPathProjectImageEntry.save``): the changes of an unreachable image are lost.
    """

    def __init__(self, entry_id, name, hierarchy, uri, data_dir=None):
        self.entry_id = entry_id
        self.image_name = name
        self.hierarchy = hierarchy
        self.uri = uri
        self.data_dir = data_dir
        self.saves = 0
        self.lost_saves = 0

    def is_readable(self):
        path = uri_to_path(self.uri)
        return path is not None and Path(path).is_file()

    def save(self):
        if self.is_readable():
            self.saves += 1
            if self.data_dir is not None:  # QuPath rewrites data/<id>/data.qpdata
                self.data_dir.mkdir(parents=True, exist_ok=True)
                (self.data_dir / "data.qpdata").write_bytes(b"saved by the fake %d" % self.saves)
        else:
            self.lost_saves += 1


class FakeProject:
    """paquo.projects.QuPathProject(path, mode=...)."""

    registry: dict = {}

    def __init__(self, path, mode="r"):
        state = FakeProject.registry[str(Path(path))]
        self.path, self.mode = Path(path), mode
        self.images = state["entries"]
        self._classes = state["classes"]
        self.class_sets = state.setdefault("class_sets", [])
        self.saves = state.setdefault("saves", [])
        FakeProject.registry[str(Path(path))]["opened"] = \
            state.get("opened", []) + [mode]

    @property
    def path_classes(self):
        return tuple(self._classes)

    @path_classes.setter
    def path_classes(self, value):
        assert self.mode != "r", "paquo refuses to set classes in read-only mode"
        value = list(value)
        self._classes[:] = value
        self.class_sets.append([c.name for c in value])

    def save(self, images=True):
        assert self.mode != "r"
        self.saves.append(images)

    def update_image_paths(self, *, try_relative=False, uri2uri=None):
        """paquo: every entry whose URI is a key of ``uri2uri`` gets the new URI."""
        assert self.mode != "r"
        for entry in self.images:
            if entry.uri in (uri2uri or {}):
                entry.uri = uri2uri[entry.uri]


# ------------------------------------------------------------------------- fixtures

def _square(x0, y0, x1, y1, cls=None, kind="annotation", measurements=None):
    props = {"objectType": kind}
    if cls:
        props["classification"] = {"name": cls, "color": [9, 9, 9]}
    if measurements is not None:
        props["measurements"] = measurements
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[
        [x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}, "properties": props}


def _cell(x, y, cls="Other", score=None):
    m = {"Nucleus: Area": 30.0}
    if score is not None:
        m = {QPCELL_SCORE: score, probability_key(cls): score}
    return _square(x - 2, y - 2, x + 2, y + 2, cls=cls, kind="detection", measurements=m)


MODEL_CLASSES = (CellClass("Positive", (255, 0, 0)), CellClass("Negative", (0, 0, 255)),
                 CellClass("Mitosis", (0, 200, 0)))


def _detections(n, seed=0, offset=(100.0, 100.0)):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, size=(n, 2)) + np.asarray(offset)
    labels = np.arange(n) % 3
    probs = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    scores = rng.uniform(0.5, 1, size=n).astype(np.float32)
    return Detections(xy, labels, scores, probs, MODEL_CLASSES, None)


@pytest.fixture
def world(qupath_samples, tmp_path):
    """A copy of the 0.5.1 sample project, predictions for two of its images, fake paquo.

    The project's image URIs are rewritten to two stand-in slide files in ``slides`` (the
    third image stays on its author's computer), as paquo needs the files to save.
    """
    root = tmp_path / "project"
    shutil.copytree(qupath_samples / ANDREW, root)
    qpproj = root / "project.qpproj"
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("MTA3-8_GPC3 (2).svs", "MTA3-3_GPC3.svs"):
        (slides / name).write_bytes(b"stand-in")
    for path in [qpproj, *root.glob("data/*/server.json")]:
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("file:/Users/shuningliu/Downloads/",
                                     slides.as_uri() + "/"), encoding="utf-8")
    uris = {img.entry_id: img.uri for img in read_project_info(qpproj).images}
    preds = tmp_path / "predictions"
    preds.mkdir()
    write_detections(preds / "MTA3-8_GPC3 (2).geojson", _detections(30, seed=1))
    write_detections(preds / "MTA3-3_GPC3.geojson", _detections(12, seed=2))
    write_detections(preds / "unrelated slide.geojson", _detections(3, seed=3))
    (preds / "MTA3-8_GPC3 (2).csv").write_text("x,y\n", encoding="utf-8")
    (preds / "predictions.json").write_text(json.dumps({
        "model": "m", "classes": [{"name": c.name, "color": list(c.color)}
                                  for c in MODEL_CLASSES]}), encoding="utf-8")
    h1 = FakeHierarchy(
        annotations=[_square(50, 50, 300, 300), _square(300, 50, 600, 600, cls="Tumor")],
        detections=[_cell(60, 60, score=0.9), _cell(70, 70, score=0.8),
                    _cell(80, 80), _cell(90, 90), _cell(400, 400)])
    h2 = FakeHierarchy()
    h7 = FakeHierarchy()
    entries = [FakeEntry(k, name, h, uris[k], root / "data" / k) for k, name, h in (
        ("1", "MTA3-8_GPC3 (2).svs", h1), ("2", "MTA3-3_GPC3.svs", h2),
        ("7", "MTA3-1_GPC3.svs", h7))]
    classes = [FakePathClass(n, c) for n, c in
               [("Tumor", (200, 0, 0)), ("Positive", (250, 62, 62)), ("Negative", (112, 112, 225))]]
    FakeProject.registry[str(qpproj)] = {"entries": entries, "classes": classes}

    @contextmanager
    def opener(path, mode):
        project = FakeProject(path, mode)
        yield project
        if mode != "r":
            project.save(images=False)

    def writer_factory(project):
        return PaquoWriter(project, path_class_factory=FakePathClass)

    yield dict(root=root, qpproj=qpproj, preds=preds, slides=slides, h1=h1, h2=h2, h7=h7,
               entries=entries, classes=classes, opener=opener, writer_factory=writer_factory,
               state=FakeProject.registry[str(qpproj)])
    FakeProject.registry.pop(str(qpproj), None)


def _run(world, **kwargs):
    kwargs.setdefault("opener", world["opener"])
    kwargs.setdefault("writer_factory", world["writer_factory"])
    return annotate_back(world["preds"], world["qpproj"], **kwargs)


# ------------------------------------------------------------------------- pure parts

def test_is_qpcell_feature():
    assert is_qpcell_feature(_cell(1, 1, score=0.5))
    assert not is_qpcell_feature(_cell(1, 1))
    ann = _square(0, 0, 1, 1, measurements={QPCELL_SCORE: 1.0})
    assert not is_qpcell_feature(ann)  # annotations are never qpcell's
    cell = _cell(1, 1, score=0.5)
    cell["properties"]["objectType"] = "cell"
    assert is_qpcell_feature(cell)
    legacy = {"id": "PathDetectionObject", "geometry": None,
              "properties": {"measurements": [{"name": QPCELL_SCORE, "value": 0.4}]}}
    assert is_qpcell_feature(legacy)
    assert not is_qpcell_feature("junk")


def test_plan_replacement_keeps_everything_else():
    existing = [_cell(0, 0, score=0.9), _cell(1, 1), _square(0, 0, 9, 9), _cell(2, 2, score=0.1)]
    new = [_cell(5, 5, score=0.7)]
    plan = plan_replacement(existing, new)
    assert plan.remove == [0, 3]
    assert plan.keep == [1, 2]
    assert plan.add == new
    with pytest.raises(QpcellError, match="not a qpcell detection"):
        plan_replacement(existing, [_cell(5, 5)])


def test_map_classes():
    project = [CellClass("Positive", (250, 62, 62)), CellClass("negative", (1, 1, 1))]
    mapping = map_classes(MODEL_CLASSES, project)
    assert [(c.name, c.color) for c in mapping.classes] == [
        ("Positive", (250, 62, 62)), ("Negative", (0, 0, 255)), ("Mitosis", (0, 200, 0))]
    assert [c.name for c in mapping.new] == ["Negative", "Mitosis"]
    assert mapping.recoloured == ("Positive",)
    assert len(mapping.notes) == 1 and "'negative'" in mapping.notes[0]


def test_prediction_files_and_reading(world, tmp_path):
    files = prediction_files(world["preds"])
    assert set(files) == {"MTA3-8_GPC3 (2)", "MTA3-3_GPC3", "unrelated slide"}
    det = read_prediction(files["MTA3-3_GPC3"])
    assert len(det) == 12
    assert [c.name for c in det.classes] == ["Positive", "Negative", "Mitosis"]
    original = _detections(12, seed=2)
    assert np.allclose(det.xy, original.xy, atol=1e-5)
    assert np.allclose(det.scores, original.scores, atol=1e-6)
    assert np.allclose(det.class_probs, original.class_probs, atol=1e-6)
    with pytest.raises(QpcellError, match="no <image>.geojson"):
        prediction_files(tmp_path)
    with pytest.raises(QpcellError, match="no such prediction folder"):
        prediction_files(tmp_path / "nope")
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
         "properties": {"objectType": "annotation", "classification": {"name": "A"}}}]}))
    with pytest.raises(QpcellError, match="annotations, not detections"):
        read_prediction(points)
    foreign = tmp_path / "foreign.geojson"
    foreign.write_text(json.dumps({"type": "FeatureCollection", "features": [_cell(1, 1)]}))
    with pytest.raises(QpcellError, match="not written by qpcell predict"):
        read_prediction(foreign)


def test_match_predictions(qupath_samples):
    info = read_project_info(qupath_samples / "smith6jt-cop__SpleenFollicleCounterQP")
    files = {s: Path(f"{s}.geojson") for s in
             ["HDL011_PC33", "HDL018", "HDL052SPLN_2025Aug6_Scan1.er.qptiff - resolution #1",
              "nothing"]}
    matches, unmatched = match_predictions(files, info.images)
    got = {m.stem: m.image.name for m in matches}
    assert got == {
        "HDL011_PC33": "HDL011_PC33.ome.tiff",  # by name
        "HDL018": "HDL018_PC25.ome.tiff",  # by the image file's stem (HDL018.ome.tif)
        "HDL052SPLN_2025Aug6_Scan1.er.qptiff - resolution #1":
            "HDL052SPLN_2025Aug6_Scan1.er.qptiff - resolution #1"}
    assert unmatched == ["nothing"]
    with pytest.raises(QpcellError, match="both fit image"):
        match_predictions({"HDL011_PC33": Path("a.geojson"),
                           "HDL011_PC33.ome.tiff": Path("b.geojson")}, info.images)


def test_match_predictions_ambiguous(qupath_samples):
    info = read_project_info(qupath_samples / "smith6jt-cop__SpleenFollicleCounterQP")
    twins = [info.images[0], info.images[0].__class__(**{**info.images[0].__dict__,
                                                         "entry_id": "99"})]
    with pytest.raises(QpcellError, match="fits several images"):
        match_predictions({"HDL011_PC33": Path("x.geojson")}, twins)


def test_backup_is_complete_and_unique(world):
    root = world["root"]
    dest = backup_project_data(root, ["1", "7"], stamp="20250101-000000")
    assert dest == root / "qpcell-backups" / "20250101-000000"
    assert (dest / "data" / "1" / "server.json").read_bytes() == \
        (root / "data" / "1" / "server.json").read_bytes()
    assert not (dest / "data" / "7").exists()  # entry 7 has no data folder
    assert (dest / "project.qpproj").is_file()
    assert (dest / "classifiers" / "classes.json").is_file()
    again = backup_project_data(root, ["1"], stamp="20250101-000000")
    assert again.name == "20250101-000000-1"
    leftovers = [p for p in (root / "qpcell-backups").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_backup_failure_leaves_nothing(world, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(annotate.shutil, "copytree", broken)
    with pytest.raises(QpcellError, match="backup failed, nothing written: disk full"):
        backup_project_data(world["root"], ["1"], stamp="x")
    assert list((world["root"] / "qpcell-backups").iterdir()) == []


# ------------------------------------------------------------- the paquo-backed writer

def test_annotate_back_writes_replaces_and_keeps(world):
    h1, h2 = world["h1"], world["h2"]
    report = _run(world, stamp="run1")
    assert world["state"]["opened"] == ["r+"]
    by_name = {r.name: r for r in report.results}
    assert set(by_name) == {"MTA3-8_GPC3 (2).svs", "MTA3-3_GPC3.svs"}
    one = by_name["MTA3-8_GPC3 (2).svs"]
    assert (one.added, one.removed, one.kept, one.status) == (30, 2, 3, "written")
    assert one.counts == {"Positive": 10, "Negative": 10, "Mitosis": 10}
    assert report.unmatched == ["unrelated slide"]

    # qpcell's two old cells are gone; the three other detections and annotations stay
    assert len(h1.qpcell_detections()) == 30
    others = [d for d in h1._detections if QPCELL_SCORE not in d.measurements]
    assert len(others) == 3 and len(h1.annotations) == 2
    # one bulk removal and one bulk load per image, inside no_autoflush
    assert h1.calls == [("no_autoflush",), ("remove", 2, False), ("load", 30, False),
                        ("flush",)]
    assert h2.calls == [("no_autoflush",), ("load", 12, False), ("flush",)]
    assert world["entries"][0].saves == 1 and world["entries"][2].saves == 0

    # each cell is created with its class, the project's colour, finite float measurements
    colours = {"Positive": [250, 62, 62], "Negative": [112, 112, 225], "Mitosis": [0, 200, 0]}
    for d in h1.qpcell_detections():
        props = d.feature["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert cls["color"] == colours[cls["name"]]
        m = props["measurements"]
        assert set(m) == {QPCELL_SCORE} | {probability_key(c.name) for c in MODEL_CLASSES}
        assert all(type(v) is float and math.isfinite(v) for v in m.values())
    # circles of 4 µm at the image's 0.2532 µm/px
    ring = np.asarray(h1.qpcell_detections()[0].feature["geometry"]["coordinates"][0])
    radius = np.linalg.norm(ring[:-1] - ring[:-1].mean(axis=0), axis=1)
    assert np.allclose(radius, 4.0 / 0.2532, rtol=1e-3)
    # placed inside the annotation that contains them (QuPath's insertPathObjects)
    inside = [d for d in h1.qpcell_detections()
              if h1._annotations[0].roi.contains(d.roi.centroid)]
    assert inside and all(d.parent is h1._annotations[0] for d in inside)

    # the new class is added with the model's colour, the project's classes are kept
    assert world["state"]["class_sets"] == [["Tumor", "Positive", "Negative", "Mitosis"]]
    assert world["classes"][-1].color.to_rgb() == (0, 200, 0)
    assert [c.name for c in report.new_classes] == ["Mitosis"]
    assert world["state"]["saves"] == [False]  # the project file, not every image
    # the backup holds the data of the images written, taken before writing
    assert (world["root"] / "qpcell-backups" / "run1" / "data" / "1" / "server.json").is_file()
    assert report.backup == world["root"] / "qpcell-backups" / "run1"
    assert report.notes[-1] == annotate.RELOAD_NOTE


def test_annotate_back_is_idempotent(world):
    _run(world, stamp="a")
    first = [d.feature["geometry"] for d in world["h1"].qpcell_detections()]
    report = _run(world, stamp="b")
    one = next(r for r in report.results if r.entry_id == "1")
    assert (one.added, one.removed, one.kept) == (30, 30, 3)
    h1 = world["h1"]
    assert len(h1.qpcell_detections()) == 30
    assert [d.feature["geometry"] for d in h1.qpcell_detections()] == first
    assert len(h1._detections) == 33 and len(h1.annotations) == 2
    # the class is not added twice
    assert world["state"]["class_sets"] == [["Tumor", "Positive", "Negative", "Mitosis"]]


def test_annotate_back_selected_images_and_points(world):
    report = _run(world, images=["MTA3-3_GPC3"], shape="point", stamp="s")
    assert [r.entry_id for r in report.results] == ["2"]
    assert world["h1"].calls == []
    geoms = {d.feature["geometry"]["type"] for d in world["h2"].qpcell_detections()}
    assert geoms == {"Point"}
    assert not (world["root"] / "qpcell-backups" / "s" / "data" / "1").exists()


def test_annotate_back_no_match_is_an_error(world):
    with pytest.raises(QpcellError, match="no prediction file fits a project image"):
        _run(world, images=["MTA3-1_GPC3"])


def test_annotate_back_skips_images_paquo_cannot_save(world):
    (world["slides"] / "MTA3-3_GPC3.svs").unlink()
    report = _run(world, stamp="u")
    skipped = next(r for r in report.results if r.entry_id == "2")
    assert skipped.status.startswith("skipped") and skipped.added == 0
    assert skipped.counts == {}  # no per-class counts for cells that were not written
    assert world["h2"].calls == []
    assert any("relink the image in QuPath" in n and "--image-root" in n for n in report.notes)
    assert not (world["root"] / "qpcell-backups" / "u" / "data" / "2").exists()
    assert [r.entry_id for r in report.written] == ["1"]


def test_moved_images_are_relinked_with_image_root(world, tmp_path):
    """Issue 14, bug 1: --image-root OLD=NEW made paquo's save() a silent no-op."""
    moved = tmp_path / "moved"
    world["slides"].rename(moved)
    with pytest.raises(QpcellError, match="nothing written: none of the 2 matched image"):
        _run(world, stamp="x")  # not found anywhere: an error, not an empty success
    assert world["state"].get("class_sets", []) == []
    assert not (world["root"] / "qpcell-backups" / "x").exists()

    report = _run(world, stamp="m", image_root=[f"{world['slides']}={moved}"])
    assert [r.status for r in report.results] == ["written (relinked)"] * 2
    assert {r.relinked for r in report.results} == {str(moved / "MTA3-8_GPC3 (2).svs"),
                                                    str(moved / "MTA3-3_GPC3.svs")}
    one, two, seven = world["entries"]
    assert (one.saves, one.lost_saves, two.saves, two.lost_saves) == (1, 0, 1, 0)
    assert uri_to_path(one.uri) == moved / "MTA3-8_GPC3 (2).svs"
    assert seven.uri.startswith("file:/Users/")  # not matched: left as it was
    assert len(world["h1"].qpcell_detections()) == 30
    assert sum("relinked in the project" in n for n in report.notes) == 2
    # the backup was taken before the project file changed
    backup = (world["root"] / "qpcell-backups" / "m" / "project.qpproj").read_text()
    assert world["slides"].as_uri() in backup


def test_bad_options_fail_before_anything_is_touched(world):
    """Issue 14, bug 5: the dry run accepted them; the real run failed half-way."""
    for kwargs, message in (({"shape": "square"}, "--shape must be circle or point"),
                            ({"radius_um": -3.0}, "--radius-um -3.0 must be a positive"),
                            ({"radius_um": float("nan")}, "must be a positive")):
        for dry_run in (True, False):
            with pytest.raises(QpcellError, match=message):
                _run(world, dry_run=dry_run, stamp="bad", **kwargs)
    assert "opened" not in world["state"] and not (world["root"] / "qpcell-backups").exists()


def test_dry_run_changes_nothing(world):
    report = _run(world, dry_run=True)
    assert world["state"]["opened"] == ["r"]
    one = next(r for r in report.results if r.entry_id == "1")
    assert (one.added, one.removed, one.kept, one.status) == (30, 2, 3, "dry run")
    assert world["h1"].calls == [] and world["state"].get("class_sets", []) == []
    assert not (world["root"] / "qpcell-backups").exists()
    assert [c.name for c in report.new_classes] == ["Mitosis"]


def test_dry_run_without_qupath_still_reports(world):
    def missing(path, mode):
        raise QpcellError(qp.QUPATH_MISSING)

    report = _run(world, dry_run=True, opener=missing)
    assert all(r.removed is None for r in report.results)
    assert any(qp.QUPATH_MISSING in n for n in report.notes)


def test_qupath_rejecting_objects_is_an_error(world):
    class Strict(FakeHierarchy):
        def load_geojson(self, geojson, *, raise_on_skip=False, fix_invalid=False):
            raise ValueError("could not convert 30 annotations")

    world["entries"][0].hierarchy = Strict()
    with pytest.raises(QpcellError, match="QuPath rejected detections"):
        _run(world, images=["MTA3-8_GPC3 (2)"], stamp="r")


# ------------------------------------------------------------------------------- CLI

@pytest.fixture
def paquo_faked(world, monkeypatch):
    """``import paquo.projects`` replaced by FakeProject (the real opener and writer run)."""
    monkeypatch.setattr(qp, "import_paquo_project_class", lambda: FakeProject)
    monkeypatch.setattr(qp, "PaquoWriter",
                        lambda project: PaquoWriter(project, path_class_factory=FakePathClass))
    return world


def test_cli_annotate_back(paquo_faked, cli):
    world = paquo_faked
    code, out, err = cli("annotate-back", world["preds"], world["qpproj"])
    assert code == 0, err
    assert "MTA3-8" in out and "Mitosis" in out and "added" in out
    assert "QuPath must reload the project" in out
    assert "qpcell-backups" in out
    assert len(world["h1"].qpcell_detections()) == 30
    assert world["state"]["saves"] == [False]  # open_paquo_project saved the project file

    code, out, err = cli("annotate-back", world["preds"], world["root"], "--dry-run",
                         "--images", "MTA3-8_GPC3 (2),MTA3-3_GPC3")
    assert code == 0, err
    assert "dry run" in out and "nothing was written" in out


def test_cli_annotate_back_errors(world, cli, tmp_path):
    code, out, err = cli("annotate-back", tmp_path / "none", world["qpproj"])
    assert code == 1 and "no such prediction folder" in err
    code, out, err = cli("annotate-back", world["preds"], tmp_path)
    assert code == 1 and "no project.qpproj" in err


@pytest.mark.skipif(qp.find_qupath_installation().found,
                    reason="a QuPath installation is present here")
def test_cli_annotate_back_without_qupath(world, cli):
    code, out, err = cli("annotate-back", world["preds"], world["qpproj"])
    assert code == 1
    assert qp.QUPATH_MISSING in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not (world["root"] / "qpcell-backups").exists()
    # a dry run needs no QuPath
    code, out, err = cli("annotate-back", world["preds"], world["qpproj"], "--dry-run")
    assert code == 0 and "QuPath not found" in out


def test_a_failed_write_leaves_the_project_as_it_was(world):
    """Issue 14: the image written before the failing one is restored from the backup."""
    class Strict(FakeHierarchy):
        def load_geojson(self, geojson, *, raise_on_skip=False, fix_invalid=False):
            raise ValueError("could not convert 30 annotations")

    root = world["root"]
    before = {p.relative_to(root).as_posix(): p.read_bytes()
              for p in root.rglob("*") if p.is_file()}
    world["entries"][0].hierarchy = Strict()
    with pytest.raises(QpcellError, match="QuPath rejected detections.*nothing changed"):
        _run(world, stamp="f")
    assert world["entries"][1].saves == 1  # MTA3-3 was written first, then put back
    after = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in root.rglob("*") if p.is_file() and "qpcell-backups" not in p.parts}
    assert after == before
    assert world["state"].get("saves", []) == []  # the project file was not saved


def test_other_tools_detections_are_kept(world):
    h1 = world["h1"]
    other = FakeObject(_cell(10, 10, cls="X"))
    other.measurements = {"score": 1.0, "qpcell: something else": 2.0}
    h1._detections.append(other)
    _run(world, images=["MTA3-8_GPC3 (2)"], stamp="t")
    assert other in h1._detections


def test_version_note():
    assert annotate.version_note("0.6.0", "0.4.1").startswith("the project was made with "
                                                              "QuPath 0.4.1")
    assert annotate.version_note("0.5.1", "0.5.0") is None
    assert annotate.version_note("0.4.3", "0.6.0") is None
    assert annotate.version_note(None, "0.4.0") is None
