"""QuPath GeoJSON in and out, for files written by QuPath 0.2 to 0.6.

Reading accepts every layout QuPath has written:

* top level: a ``FeatureCollection``, a bare ``Feature``, a JSON array of features
  (0.2 scripts, 0.3+ exports without FEATURE_COLLECTION) or a bare geometry (a ROI);
* object type: ``properties.objectType`` (0.4+), ``properties.object_type`` (0.3),
  ``properties.type``, or the Java class name in ``id`` (0.2: ``"PathAnnotationObject"``,
  ``"PathDetectionObject"``, ``"PathCellObject"``, ``"PathTileObject"``); a feature with
  none of these is an annotation, as QuPath reads it;
* classification: ``{name, color: [r, g, b(, a)]}``, ``{name, colorRGB: packed signed
  ARGB int}``, ``{names: [...], color}`` (derived class), nested ``parentClass`` (legacy
  derived class) or a bare string; derived classes are named as QuPath shows them, the
  names joined with ``": "`` (``"Tumor: Positive"``);
* measurements: a dict ``name -> number`` or a list of ``{name, value}``.

What becomes what (:class:`QuPathObjects`):

* ``Point`` / ``MultiPoint`` annotations -> cell points with their class (``None`` when
  the annotation has no class);
* unclassified ``Polygon`` / ``MultiPolygon`` annotations (holes kept) -> annotated regions;
* detections and cells -> centroids (cells: the nucleus when ``nucleusGeometry`` is there),
  with class and measurements;
* everything else (classified area annotations, lines, tiles, TMA cores, unknown types)
  -> one line in ``set_aside`` saying what it was and why it was not used.

Writing produces what QuPath 0.4-0.6 imports (File > Import objects, or drag and drop):
lowercase ``objectType``, a UUID ``id``, a classification that always has ``color``, and
measurements as a dict of finite numbers. Every write is atomic.

Coordinates are (x, y) in full-resolution pixels, as QuPath stores them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry import shape as to_shape
from shapely.geometry.base import BaseGeometry

from qpcell.errors import QpcellError
from qpcell.io.atomic import atomic_write_text
from qpcell.points import RGB, AnnotatedImage, CellClass, Detections, default_color

__all__ = [
    "DEFAULT_MPP",
    "CONFLICTS",
    "DUPLICATE_TOLERANCE_PX",
    "QPCELL_SCORE",
    "QuPathObjects",
    "detections_to_features",
    "drop_duplicate_points",
    "parse_classification",
    "parse_color",
    "parse_geojson",
    "points_to_features",
    "probability_key",
    "read_geojson",
    "resolve_source",
    "SOURCES",
    "to_annotated_image",
    "to_detections",
    "write_detections",
    "write_points",
]

QPCELL_SCORE = "qpcell: score"
"""Measurement name of qpcell's detection score; a detection is qpcell's iff it has it."""

DEFAULT_MPP = 0.44
"""Pixel size (µm/px) assumed for circle radii when the image's pixel size is unknown (20x)."""

DUPLICATE_TOLERANCE_PX = 1e-6
#: The largest coordinate (pixels) qpcell accepts: QuPath's image sizes are 32-bit integers,
#: so anything beyond is a corrupt or mis-scaled file, not a cell.
MAX_COORDINATE_PX = 2.0 ** 31
"""Two points closer than this (pixels) are the same point."""

CIRCLE_VERTICES = 16
"""Vertices of the circle polygon written for each detection (even: antipodal pairs)."""


def probability_key(class_name: str) -> str:
    """Measurement name under which qpcell writes the probability of ``class_name``."""
    return f"qpcell: p({class_name})"


# QuPath's object types, by every name they have been written under.
_OBJECT_TYPES = {
    "annotation": "annotation",
    "detection": "detection",
    "cell": "cell",
    "tile": "tile",
    "tma_core": "tma_core",
    "tmacore": "tma_core",
    "root": "root",
    "pathannotationobject": "annotation",
    "pathdetectionobject": "detection",
    "pathcellobject": "cell",
    "pathtileobject": "tile",
    "tmacoreobject": "tma_core",
    "pathrootobject": "root",
}
_GEOMETRY_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                   "MultiPolygon", "GeometryCollection"}


@dataclass
class QuPathObjects:
    """The objects of one QuPath GeoJSON file, as arrays.

    Attributes
    ----------
    point_xy
        ``(N, 2)`` float64 points of ``Point`` / ``MultiPoint`` annotations, (x, y) pixels.
    point_class
        Class name of each point; ``None`` = unclassified.
    regions
        Unclassified area annotations (shapely ``Polygon`` / ``MultiPolygon``, pixels).
    detection_xy
        ``(M, 2)`` float64 centroids of detection and cell objects (cells: of the nucleus
        when the file has one).
    detection_class
        Class name of each detection; ``None`` = unclassified.
    detection_measurements
        Measurements of each detection, ``name -> float`` (may hold NaN, as QuPath writes).
    detection_type
        QuPath object type of each detection: ``"detection"`` or ``"cell"``.
    class_colors
        ``name -> (r, g, b)``: the first colour the file gives each class.
    set_aside
        One line per feature that was not used, saying what it is and why.
    warnings
        Things the user should know about the file (one line each).
    path
        The file read, when there is one.
    """

    point_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_class: list[str | None] = field(default_factory=list)
    regions: list[BaseGeometry] = field(default_factory=list)
    detection_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    detection_class: list[str | None] = field(default_factory=list)
    detection_measurements: list[dict[str, float]] = field(default_factory=list)
    detection_type: list[str] = field(default_factory=list)
    class_colors: dict[str, RGB] = field(default_factory=dict)
    set_aside: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None

    def class_names(self, source: str = "points") -> list[str]:
        """Class names of ``source`` (see :data:`SOURCES`, not ``"auto"``), by first
        appearance."""
        _, names = self.select(source)
        return [n for n in dict.fromkeys(names) if n is not None]

    def select(self, source: str) -> tuple[np.ndarray, list[str | None]]:
        """Positions and class names of the objects ``source`` names (not ``"auto"``):
        ``"points"``, ``"detections"`` (detection and cell objects) or ``"cells"``."""
        if source == "points":
            return self.point_xy, self.point_class
        if source == "cells":
            types = self.detection_type or ["detection"] * len(self.detection_class)
            idx = [i for i, t in enumerate(types) if t == "cell"]
            return (np.asarray(self.detection_xy).reshape(-1, 2)[idx],
                    [self.detection_class[i] for i in idx])
        return self.detection_xy, self.detection_class


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building or parsing large JSON.

    ``json.loads`` of 10^5 features creates millions of containers; without this the
    collector re-scans them again and again (a 5x slowdown). Nothing here makes cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _packed_to_rgb(value: int) -> RGB:
    v = int(value) & 0xFFFFFFFF
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


def parse_color(value: Any) -> RGB | None:
    """``[r, g, b(, a)]`` or a packed (signed) ARGB int -> RGB; anything else -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value) and float(value).is_integer():
        return _packed_to_rgb(int(value))
    if isinstance(value, list | tuple) and len(value) in (3, 4):
        try:
            rgb = tuple(int(c) for c in value[:3])
        except (TypeError, ValueError):
            return None
        if all(0 <= c <= 255 for c in rgb):
            return rgb  # type: ignore[return-value]
    return None


def parse_classification(obj: Any) -> tuple[str | None, RGB | None]:
    """Class name and colour of a QuPath ``classification`` (any version).

    ``None`` -> ``(None, None)`` (unclassified). A derived class (``names`` list, or nested
    ``parentClass`` in files before 0.4) is named as QuPath shows it, e.g. ``"Tumor: Positive"``.
    A classification without a colour is accepted; its colour is ``None``.

    Raises
    ------
    QpcellError
        If the class name is empty or not text.
    """
    if obj is None:
        return None, None
    if isinstance(obj, str):
        names: list[Any] = [obj]
        color = None
    elif isinstance(obj, dict):
        if "names" in obj and obj["names"] is not None:
            names = obj["names"] if isinstance(obj["names"], list) else [obj["names"]]
        else:
            names, node, depth = [], obj, 0
            while isinstance(node, dict) and depth < 64:
                names.append(node.get("name"))
                node, depth = node.get("parentClass"), depth + 1
            names.reverse()
        color = parse_color(obj["color"]) if "color" in obj else None
        if color is None and "colorRGB" in obj:
            color = parse_color(obj["colorRGB"])
    else:
        raise QpcellError(f"classification {obj!r} is neither an object nor a name")
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise QpcellError("a classification has an empty or non-text class name: "
                          f"{json.dumps(obj)[:120]}")
    return ": ".join(names), color


def _parse_measurements(value: Any) -> dict[str, float]:
    """A dict ``name -> number`` or a list of ``{name, value}`` -> ``dict[str, float]``."""
    if isinstance(value, dict):
        try:  # the common case: every value a number
            if not any(type(v) is bool for v in value.values()):
                return dict(zip(map(str, value.keys()), map(float, value.values()), strict=True))
        except (TypeError, ValueError):
            pass
        items = value.items()
    elif isinstance(value, list):
        items = ((m.get("name"), m.get("value")) for m in value if isinstance(m, dict))
    else:
        return {}
    out: dict[str, float] = {}
    for name, v in items:
        if name is None or isinstance(v, bool):
            continue
        if v is None:
            out[str(name)] = math.nan
        elif isinstance(v, int | float):
            out[str(name)] = float(v)
        elif isinstance(v, str):
            try:
                out[str(name)] = float(v)
            except ValueError:
                continue
    return out


def _object_type(feature: dict, props: dict) -> str:
    for key in ("objectType", "object_type", "type"):
        value = props.get(key)
        if isinstance(value, str) and value:
            return _OBJECT_TYPES.get(value.strip().lower(), value)
    fid = feature.get("id")
    if isinstance(fid, str) and fid.strip().lower() in _OBJECT_TYPES:
        return _OBJECT_TYPES[fid.strip().lower()]
    return "annotation"  # QuPath reads a feature without a type as an annotation


def _points_array(coords: Any, gtype: str) -> np.ndarray:
    """``Point`` / ``MultiPoint`` coordinates -> (K, 2) float64; ValueError if malformed."""
    try:
        arr = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{gtype} coordinates are not numbers") from None
    if gtype == "Point":
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if arr.shape != (1, arr.shape[1]) or arr.shape[1] < 2:
            raise ValueError("Point coordinates are not [x, y]")
    elif arr.size == 0:
        return np.zeros((0, 2))
    elif arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError("MultiPoint coordinates are not a list of [x, y]")
    arr = arr[:, :2]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{gtype} has a NaN, infinite or missing coordinate")
    if not np.all(np.abs(arr) <= MAX_COORDINATE_PX):
        raise ValueError(f"{gtype} has a coordinate beyond any image "
                         f"({np.abs(arr).max():g}; at most {MAX_COORDINATE_PX:.0f} px)")
    return arr


def _polygon_rings(coords: Any, gtype: str) -> list[tuple[Any, int]]:
    """``Polygon`` / ``MultiPolygon`` coordinates -> [(ring, +1 outer / -1 hole)]."""
    polys = [coords] if gtype == "Polygon" else coords
    if not isinstance(polys, list):
        raise ValueError(f"{gtype} coordinates are not a list")
    rings = []
    for poly in polys:
        if not isinstance(poly, list):
            raise ValueError(f"{gtype} coordinates are not a list of rings")
        for k, ring in enumerate(poly):
            if not isinstance(ring, list):
                raise ValueError(f"{gtype} ring is not a list of [x, y]")
            if ring:
                rings.append((ring, 1 if k == 0 else -1))
    return rings


def _ring_vertices(flat: list, rings: list[list]) -> tuple[np.ndarray, int | None]:
    """All ring vertices as one (K, 2) array, and the index of the first bad ring (or None).

    One conversion for the whole file when it is well-formed; ring by ring otherwise, to
    find the ring to blame.
    """
    try:
        pts = np.asarray(flat, dtype=np.float64)
        if pts.ndim == 2 and pts.shape[1] >= 2 and np.all(np.abs(pts[:, :2])
                                                          <= MAX_COORDINATE_PX):
            return pts[:, :2], None
    except (TypeError, ValueError):
        pass
    parts = []
    for r, ring in enumerate(rings):
        try:
            arr = np.asarray(ring, dtype=np.float64)
        except (TypeError, ValueError):
            return np.zeros((0, 2)), r
        if arr.ndim != 2 or arr.shape[1] < 2 or not np.all(np.abs(arr[:, :2])
                                                            <= MAX_COORDINATE_PX):
            return np.zeros((0, 2)), r
        parts.append(arr[:, :2])
    return np.concatenate(parts), None


def _polygon_centroids(pts: np.ndarray, ring_len: np.ndarray, ring_sign: np.ndarray,
                       ring_owner: np.ndarray, n_owner: int) -> np.ndarray:
    """Area centroids of many polygons at once (holes subtracted), like shapely's.

    ``pts`` holds every ring's vertices one after another; ring ``r`` has ``ring_len[r]``
    vertices, is an outer ring (+1) or a hole (-1) and belongs to polygon ``ring_owner[r]``.
    Each ring is shifted to its first vertex first, so large slide coordinates lose no
    precision. A polygon without area gets the mean of its outer vertices.
    """
    starts = np.concatenate([[0], np.cumsum(ring_len)[:-1]])
    ring_of_vertex = np.repeat(np.arange(len(ring_len)), ring_len)
    origin = pts[starts]
    local = pts - origin[ring_of_vertex]
    nxt = np.arange(len(pts)) + 1
    ends = starts + ring_len  # one past the last vertex of each ring
    nxt[ends - 1] = starts  # wrap around (a no-op term for closed rings)
    x0, y0 = local[:, 0], local[:, 1]
    x1, y1 = local[nxt, 0], local[nxt, 1]
    cross = x0 * y1 - x1 * y0
    area2 = np.bincount(ring_of_vertex, cross, minlength=len(ring_len))  # 2 * signed area
    mx = np.bincount(ring_of_vertex, (x0 + x1) * cross, minlength=len(ring_len)) / 3.0
    my = np.bincount(ring_of_vertex, (y0 + y1) * cross, minlength=len(ring_len)) / 3.0
    # moments of the ring about the image origin: local moment + area * ring origin
    mx = mx + area2 * origin[:, 0]
    my = my + area2 * origin[:, 1]
    w = ring_sign * np.sign(area2)  # outer rings add |area|, holes subtract it
    a = np.bincount(ring_owner, w * area2, minlength=n_owner)
    cx = np.bincount(ring_owner, w * mx, minlength=n_owner)
    cy = np.bincount(ring_owner, w * my, minlength=n_owner)
    # fallback for polygons without area: mean vertex of the outer rings
    outer_v = (ring_sign > 0)[ring_of_vertex]
    owner_v = ring_owner[ring_of_vertex]
    nv = np.bincount(owner_v, outer_v.astype(np.float64), minlength=n_owner)
    sx = np.bincount(owner_v, np.where(outer_v, pts[:, 0], 0.0), minlength=n_owner)
    sy = np.bincount(owner_v, np.where(outer_v, pts[:, 1], 0.0), minlength=n_owner)
    scale = np.bincount(owner_v, np.abs(local).sum(axis=1), minlength=n_owner) + 1e-300
    ok = np.abs(a) > 1e-12 * scale * scale
    out = np.empty((n_owner, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 0] = np.where(ok, cx / np.where(ok, a, 1.0), sx / np.maximum(nv, 1))
        out[:, 1] = np.where(ok, cy / np.where(ok, a, 1.0), sy / np.maximum(nv, 1))
    return out


def _region(geom: dict, gtype: str) -> BaseGeometry | None:
    """A polygon annotation's geometry (holes kept), or None if it has no area."""
    for ring, _ in _polygon_rings(geom["coordinates"], gtype):
        if not np.all(np.abs(np.asarray(ring, dtype=np.float64)) <= MAX_COORDINATE_PX):
            raise ValueError("a region has a NaN, infinite, missing or huge (beyond "
                             f"{MAX_COORDINATE_PX:.0f} px) coordinate")
    region = to_shape(geom)
    return None if region.is_empty else region


def _repair(region: BaseGeometry) -> BaseGeometry:
    """The polygonal part of ``shapely.make_valid(region)``."""
    from shapely import make_valid

    fixed = make_valid(region)
    polys = [p for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, Polygon | MultiPolygon)
             for p in getattr(g, "geoms", [g])]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QpcellError("file not found", path) from None
    except UnicodeDecodeError:
        raise QpcellError("is not a text (UTF-8) file, so not GeoJSON", path) from None
    except OSError as err:
        raise QpcellError(f"cannot be read: {err.strerror or err}", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise QpcellError(f"is not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}", path) from None
    except RecursionError:
        raise QpcellError("is not valid JSON: nested too deeply", path) from None


def _top_level_features(data: Any, path: Path | None) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection":
            feats = data.get("features")
            if feats is None:
                return []
            if not isinstance(feats, list):
                raise QpcellError("the FeatureCollection's 'features' is not a list", path)
            return feats
        if kind == "Feature":
            return [data]
        if kind in _GEOMETRY_TYPES:  # a bare geometry: a ROI without properties
            return [{"type": "Feature", "geometry": data, "properties": {}}]
        raise QpcellError(f"is not QuPath GeoJSON: top-level type is {kind!r}, expected a "
                          "FeatureCollection, a Feature, a list of features or a geometry",
                          path)
    raise QpcellError(f"is not QuPath GeoJSON: the top level is a {type(data).__name__}", path)


def read_geojson(path: str | Path) -> QuPathObjects:
    """Read a QuPath GeoJSON file (QuPath 0.2 to 0.6) into arrays.

    Parameters
    ----------
    path
        A ``.geojson`` / ``.json`` file exported by QuPath (or written by qpcell).

    Returns
    -------
    QuPathObjects
        Points, regions and detections; features it does not use are listed in
        ``set_aside``. An empty file (no features) gives an empty result and a warning.

    Raises
    ------
    QpcellError
        Naming the file, if it is not JSON, not GeoJSON, or a feature is malformed (for
        example a point with a NaN coordinate).

    Examples
    --------
    >>> objs = read_geojson("slide.geojson")          # doctest: +SKIP
    >>> objs.point_xy.shape, set(objs.point_class)    # doctest: +SKIP
    ((11, 2), {'Positive', 'Negative', None})
    """
    path = Path(path)
    with _gc_paused():
        return parse_geojson(_load_json(path), path=path)


def _describe(i: int, otype: str, gtype: str | None, props: dict, cname: str | None) -> str:
    """``feature 5 (annotation Polygon 'tumor region', class 'Tumor')``."""
    label = f"{otype} {gtype or 'without geometry'}"
    if isinstance(props.get("name"), str):
        label += f" {props['name']!r}"
    if cname is not None:
        label += f", class {cname!r}"
    return f"feature {i + 1} ({label})"


def _class_key(obj: Any) -> tuple | None:
    """A hashable copy of a flat classification dict (None for nested or odd ones)."""
    if type(obj) is str:
        return (obj,)
    if type(obj) is not dict:
        return None
    key = []
    for k, v in obj.items():
        if type(v) is list:
            v = tuple(v)
        elif type(v) is dict:
            return None
        key.append((k, v))
    try:
        hash(key := tuple(key))
    except TypeError:
        return None
    return key


_ASIDE_TYPES = {"tile": "a tile is not a cell", "tma_core": "a TMA core is not a cell",
                "root": "the root object is not a cell"}


def parse_geojson(data: Any, *, path: str | Path | None = None) -> QuPathObjects:
    """:func:`read_geojson` on already-parsed JSON (``path`` only names it in messages)."""
    path = None if path is None else Path(path)
    features = _top_level_features(data, path)
    objs = QuPathObjects(path=path)
    if not features:
        objs.warnings.append("holds no objects (an empty FeatureCollection)")
        return objs

    point_parts: list[np.ndarray] = []
    point_class: list[str | None] = []
    # detections: polygons go through the vectorised centroid, points are direct
    det_class: list[str | None] = []
    det_type: list[str] = []
    det_meas: list[dict[str, float]] = []
    det_direct: dict[int, np.ndarray] = {}
    det_feature: list[int] = []  # feature index of each detection
    flat: list = []
    ring_list: list[list] = []
    ring_len: list[int] = []
    ring_sign: list[int] = []
    ring_owner: list[int] = []
    colors = objs.class_colors
    seen_class: dict[tuple, str | None] = {}  # classification dicts already parsed, by content

    def fail(i: int, message: str) -> QpcellError:
        return QpcellError(f"feature {i + 1}: {message}", path)

    for i, feat in enumerate(features):
        if type(feat) is not dict or feat.get("type", "Feature") != "Feature":
            kind = feat.get("type") if isinstance(feat, dict) else type(feat).__name__
            objs.set_aside.append(f"feature {i + 1}: not a GeoJSON Feature ({kind})")
            continue
        props = feat.get("properties") or {}
        if type(props) is not dict:
            raise fail(i, "'properties' is not an object")
        otype = _object_type(feat, props)
        cobj = props.get("classification")
        if cobj is None:
            cname = None
        else:
            # features of one class repeat the same small dict: parse each content once
            key = _class_key(cobj)
            if key is not None and key in seen_class:
                cname = seen_class[key]
            else:
                try:
                    cname, color = parse_classification(cobj)
                except QpcellError as err:
                    raise fail(i, err.message) from None
                if key is not None:
                    seen_class[key] = cname
                if cname is not None and color is not None:
                    colors.setdefault(cname, color)
        geom = feat.get("geometry")
        if otype == "cell" and type(feat.get("nucleusGeometry")) is dict:
            geom = feat["nucleusGeometry"]
        gtype = geom.get("type") if type(geom) is dict else None

        if otype not in ("annotation", "detection", "cell"):
            reason = _ASIDE_TYPES.get(otype, f"unknown object type {otype!r}")
        elif gtype is None:
            reason = "it has no geometry"
        elif gtype not in _GEOMETRY_TYPES:
            reason = f"geometry type {gtype!r} is not GeoJSON"
        elif geom.get("coordinates") is None and gtype != "GeometryCollection":
            reason = "its geometry has no coordinates"
        else:
            reason = None
        if reason is not None:
            objs.set_aside.append(f"{_describe(i, otype, gtype, props, cname)}: {reason}")
            continue
        coords = geom.get("coordinates")
        try:
            if otype == "annotation":
                if gtype in ("Point", "MultiPoint"):
                    pts = _points_array(coords, gtype)
                    point_parts.append(pts)
                    point_class.extend([cname] * len(pts))
                    continue
                if gtype in ("Polygon", "MultiPolygon"):
                    if cname is not None:
                        reason = ("an area annotation with a class is neither cell points nor an "
                                  "unclassified annotated region")
                    else:
                        region = _region(geom, gtype)
                        if region is None:
                            reason = "the region has no area"
                        else:
                            if not region.is_valid:
                                region = _repair(region)
                                objs.warnings.append(f"feature {i + 1}: the region's outline "
                                                     "crosses itself; it was repaired")
                            objs.regions.append(region)
                            continue
                else:
                    reason = f"a {gtype} annotation is neither cell points nor a region"
            else:  # detection or cell
                d = len(det_class)
                if gtype in ("Polygon", "MultiPolygon"):
                    rings = _polygon_rings(coords, gtype)
                    if rings:
                        for ring, sign in rings:
                            flat.extend(ring)
                            ring_list.append(ring)
                            ring_len.append(len(ring))
                            ring_sign.append(sign)
                            ring_owner.append(d)
                    else:
                        reason = "its outline is empty"
                elif gtype in ("Point", "MultiPoint"):
                    pts = _points_array(coords, gtype)
                    if len(pts):
                        det_direct[d] = pts.mean(axis=0)
                    else:
                        reason = "it has no points"
                else:
                    reason = f"a {gtype} {otype} has no area to take a centre from"
                if reason is None:
                    det_class.append(cname)
                    det_type.append(otype)
                    det_feature.append(i)
                    det_meas.append(_parse_measurements(props.get("measurements")))
                    continue
        except ValueError as err:
            raise fail(i, str(err)) from None
        except (TypeError, AttributeError, IndexError, KeyError) as err:
            raise fail(i, f"malformed {gtype} geometry ({err})") from None
        objs.set_aside.append(f"{_describe(i, otype, gtype, props, cname)}: {reason}")

    if point_parts:
        objs.point_xy = np.concatenate(point_parts)
        objs.point_class = point_class
    if det_class:
        xy = np.zeros((len(det_class), 2))
        if ring_len:
            owner = np.asarray(ring_owner, dtype=np.intp)
            pts, bad = _ring_vertices(flat, ring_list)
            if bad is not None:
                raise fail(det_feature[ring_owner[bad]],
                           "an outline has a NaN, infinite, missing, malformed or huge "
                           f"(beyond {MAX_COORDINATE_PX:.0f} px) coordinate")
            cen = _polygon_centroids(pts, np.asarray(ring_len, dtype=np.intp),
                                     np.asarray(ring_sign, dtype=np.float64), owner,
                                     len(det_class))
            has_poly = np.zeros(len(det_class), bool)
            has_poly[owner] = True
            xy[has_poly] = cen[has_poly]
        for d, c in det_direct.items():
            xy[d] = c
        objs.detection_xy = xy
        objs.detection_class = det_class
        objs.detection_type = det_type
        objs.detection_measurements = det_meas
    return objs


# ------------------------------------------------------------------ to qpcell's types


#: What to do with points of different classes at one spot (``qpcell import --on-conflict``).
CONFLICTS = ("error", "drop", "first")


def drop_duplicate_points(xy: np.ndarray, names: Sequence[str], *, where: str = "",
                          tolerance: float = DUPLICATE_TOLERANCE_PX, conflicts: str = "error"
                          ) -> tuple[np.ndarray, list[str]]:
    """Find points annotated twice.

    Points closer than ``tolerance`` pixels are one spot. Points of the same class at one
    spot are one point: all but the first are dropped, with one warning. Points of
    *different* classes at one spot are a contradiction: ``conflicts`` says what happens.

    Parameters
    ----------
    xy
        ``(N, 2)`` points, pixels.
    names
        Class name of each point.
    where
        Names the file or image in messages.
    conflicts
        ``"error"`` (raise, naming the first such spot), ``"drop"`` (drop every point at
        such spots) or ``"first"`` (keep the first point in file order), each with a warning
        that counts the spots and points affected.

    Returns
    -------
    keep, warnings
        A boolean mask of the points to keep, and the warnings (at most two lines).

    Raises
    ------
    QpcellError
        With ``conflicts="error"``, if two points at one spot have different classes.
    """
    if conflicts not in CONFLICTS:
        raise QpcellError(f"on a conflict: choose from {', '.join(CONFLICTS)}, not "
                          f"{conflicts!r}")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    keep = np.ones(len(xy), dtype=bool)
    if len(xy) < 2:
        return keep, []
    from scipy.spatial import cKDTree

    prefix = f"{where}: " if where else ""
    labels = np.asarray(names, dtype=object)
    # identical positions first (the common case, and linear however many there are) ...
    _, first, inverse = np.unique(xy, axis=0, return_index=True, return_inverse=True)
    spot = inverse.reshape(-1)
    # ... then distinct positions closer than the tolerance join one spot
    pairs = cKDTree(xy[first]).query_pairs(tolerance, output_type="ndarray")
    if len(pairs):
        parent = np.arange(len(first))

        def root(k: int) -> int:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for a, b in pairs:
            ra, rb = root(int(a)), root(int(b))
            parent[max(ra, rb)] = min(ra, rb)
        spot = np.array([root(int(k)) for k in range(len(first))])[spot]
    if len(np.unique(spot)) == len(xy):
        return keep, []
    _, label_id = np.unique(labels.astype(str), return_inverse=True)
    spot_label = np.unique(np.stack([spot, label_id.reshape(-1)], axis=1), axis=0)
    n_labels = np.bincount(spot_label[:, 0], minlength=int(spot.max()) + 1)
    conflict = n_labels[spot] > 1  # per point: its spot holds more than one class
    order = np.lexsort((np.arange(len(xy)), spot))  # by spot, then file order
    is_first = np.ones(len(xy), dtype=bool)
    is_first[order[1:]] = spot[order[1:]] != spot[order[:-1]]
    warnings = []
    if conflict.any():
        bad = np.flatnonzero(conflict)
        n_spots = len(np.unique(spot[bad]))
        a = int(bad[0])
        b = int(next(i for i in bad if spot[i] == spot[a] and labels[i] != labels[a]))
        x, y = xy[a]
        if conflicts == "error":
            raise QpcellError(f"{prefix}two points at ({x:g}, {y:g}) have different classes "
                              f"{labels[a]!r} and {labels[b]!r}; keep one of them "
                              f"({n_spots} spot{'s' if n_spots > 1 else ''} like this; "
                              "`qpcell import --on-conflict drop` or `first` decides for you)")
        if conflicts == "drop":
            keep[bad] = False
            warnings.append(f"{prefix}{n_spots} spot{'s' if n_spots > 1 else ''} had points "
                            f"of different classes: all {len(bad)} points there dropped, e.g. "
                            f"({x:g}, {y:g}) {labels[a]!r} and {labels[b]!r}")
        else:
            keep[bad] = is_first[bad]
            warnings.append(f"{prefix}{n_spots} spot{'s' if n_spots > 1 else ''} had points "
                            f"of different classes: the first of each kept, "
                            f"{len(bad) - int(is_first[bad].sum())} dropped, e.g. "
                            f"({x:g}, {y:g}) {labels[a]!r} kept, {labels[b]!r} dropped")
    same = ~conflict & ~is_first
    if same.any():
        keep[same] = False
        k = int(np.flatnonzero(same)[0])
        n = int(same.sum())
        x, y = xy[k]
        warnings.insert(0, f"{prefix}{n} duplicate point{'s' if n > 1 else ''} (same class, "
                           f"same position) kept once, e.g. ({x:g}, {y:g}) {names[k]!r}")
    return keep, warnings


#: What :func:`to_annotated_image` can read from a file as cells.
SOURCES = ("auto", "points", "detections", "cells")

#: How each source is named to the user.
SOURCE_WORDS = {"points": "point annotations", "detections": "detection and cell objects",
                "cells": "cell objects"}


def resolve_source(objs: QuPathObjects, source: str) -> str:
    """``"points"``, ``"detections"`` or ``"cells"``: what ``source`` means for ``objs``.

    ``"auto"`` reads the objects that carry the classes: point annotations when any point
    has a class, else detection and cell objects when any of them has one; with no class
    anywhere, points when there are any, else detections. So a QuPath export of classified
    cells plus a few unclassified calibration points reads the cells.
    """
    if source not in SOURCES:
        raise QpcellError(f"what to read must be one of {', '.join(SOURCES)}, not {source!r}")
    if source != "auto":
        return source
    if any(c is not None for c in objs.point_class):
        return "points"
    if any(c is not None for c in objs.detection_class):
        return "detections"
    return "points" if len(objs.point_xy) or not len(objs.detection_xy) else "detections"


def to_annotated_image(objs: QuPathObjects, name: str, *,
                       classes: Sequence[CellClass] | None = None, source: str = "auto",
                       image: str | Path | None = None, mpp: float | None = None,
                       image_size: tuple[int, int] | None = None,
                       conflicts: str = "error") -> AnnotatedImage:
    """Turn the objects of one file into an :class:`~qpcell.points.AnnotatedImage`.

    Parameters
    ----------
    objs
        From :func:`read_geojson`.
    name
        The image's short name (usually the file stem).
    classes
        The class list to map names onto (a name not in it is an error); ``None`` = the
        classes in order of first appearance, coloured as in the file (or by
        :func:`~qpcell.points.default_color`).
    source
        ``"points"`` (point annotations), ``"detections"`` (centroids of detection and cell
        objects), ``"cells"`` (cell objects only) or ``"auto"`` (the kind that carries the
        classes, see :func:`resolve_source`); ``metadata["source"]`` says which was read.
    image, mpp
        Stored on the result.
    image_size
        ``(width, height)`` in pixels, when known: points outside ``0 <= x < width``,
        ``0 <= y < height`` are skipped with a warning.
    conflicts
        Points of different classes at one spot: ``"error"``, ``"drop"`` or ``"first"``
        (see :func:`drop_duplicate_points`).

    Unclassified points are skipped with a warning; duplicate points are kept once with a
    warning (see :func:`drop_duplicate_points`). Every warning, the file's own included, is
    in ``result.metadata["warnings"]``; ``metadata["set_aside"]`` lists unused features.

    Raises
    ------
    QpcellError
        For a class name not in ``classes`` or two classes at one spot.
    """
    where = str(objs.path) if objs.path is not None else name
    source = resolve_source(objs, source)
    warnings = [f"{where}: {w}" for w in objs.warnings]
    xy, names = objs.select(source)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if objs.set_aside:
        n = len(objs.set_aside)
        warnings.append(f"{where}: {n} object{'s' if n > 1 else ''} not used as cells or "
                        f"regions, e.g. {objs.set_aside[0]}")

    keep = np.fromiter((c is not None for c in names), dtype=bool, count=len(names))
    if not keep.all():
        n = int((~keep).sum())
        warnings.append(f"{where}: {n} unclassified {source[:-1]}{'s' if n > 1 else ''} "
                        "skipped (give them a class in QuPath to use them)")
    other = {"points": "detections", "detections": "points", "cells": "points"}[source]
    other_xy, other_names = objs.select(other)
    n_other = sum(c is not None for c in other_names)
    if n_other:
        warnings.append(f"{where}: read the {SOURCE_WORDS[source]}; {n_other} classified "
                        f"{SOURCE_WORDS[other]} in the file were not read")
    if image_size is not None and len(xy):
        w, h = image_size
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        out = keep & ~inside
        if out.any():
            n = int(out.sum())
            x, y = xy[np.flatnonzero(out)[0]]
            warnings.append(f"{where}: {n} point{'s' if n > 1 else ''} outside the "
                            f"{w}x{h} image skipped, e.g. ({x:g}, {y:g})")
            keep &= inside
    idx = np.flatnonzero(keep)
    xy = xy[idx]
    kept_names = [names[i] for i in idx]

    if classes is None:
        order = list(dict.fromkeys(kept_names))
        cell_classes = tuple(CellClass(n, objs.class_colors.get(n) or default_color(k))
                             for k, n in enumerate(order))
    else:
        cell_classes = tuple(classes)
    index = {c.name: k for k, c in enumerate(cell_classes)}
    unknown = [n for n in dict.fromkeys(kept_names) if n not in index]
    if unknown:
        raise QpcellError(f"class{'es' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} not in the class list "
                          f"({', '.join(c.name for c in cell_classes) or 'empty'})",
                          objs.path)
    labels = np.fromiter((index[n] for n in kept_names), dtype=np.int64, count=len(kept_names))
    dedup, dup_warnings = drop_duplicate_points(xy, kept_names, where=where,
                                                conflicts=conflicts)
    if not dedup.all():
        xy, labels = xy[dedup], labels[dedup]
    warnings += dup_warnings

    metadata = {"warnings": warnings, "set_aside": list(objs.set_aside), "source": source}
    if objs.path is not None:
        metadata["annotations"] = str(objs.path)
    return AnnotatedImage(name=name, image=None if image is None else Path(image), xy=xy,
                          labels=labels, classes=cell_classes,
                          regions=list(objs.regions) or None, mpp=mpp, metadata=metadata)


def to_detections(objs: QuPathObjects, classes: Sequence[CellClass] | None = None, *,
                  mpp: float | None = None) -> Detections:
    """Read detections back (e.g. qpcell's own predictions) as :class:`Detections`.

    Scores come from the ``QPCELL_SCORE`` measurement (1.0 when absent) and class
    probabilities from :func:`probability_key` measurements (0.0 when absent).
    Unclassified detections are dropped. ``classes=None``: in order of first appearance.
    """
    named = [i for i, c in enumerate(objs.detection_class) if c is not None]
    names = [objs.detection_class[i] for i in named]
    if classes is None:
        classes = tuple(CellClass(n, objs.class_colors.get(n) or default_color(k))
                        for k, n in enumerate(dict.fromkeys(names)))
    classes = tuple(classes)
    index = {c.name: k for k, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise QpcellError(f"detection classes {unknown} not in the class list", objs.path)
    meas = [objs.detection_measurements[i] for i in named]
    scores = np.array([m.get(QPCELL_SCORE, 1.0) for m in meas], dtype=np.float32)
    keys = [probability_key(c.name) for c in classes]
    probs = np.array([[m.get(k, 0.0) for k in keys] for m in meas],
                     dtype=np.float32).reshape(len(named), len(classes))
    return Detections(objs.detection_xy[named] if named else np.zeros((0, 2)),
                      np.array([index[n] for n in names], dtype=np.int64), scores, probs,
                      classes, mpp)


# --------------------------------------------------------------------------- writing


def _classification(c: CellClass) -> dict:
    return {"name": c.name, "color": [int(v) for v in c.color]}


def _uuids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def _dump(features: list[dict]) -> str:
    try:
        return json.dumps({"type": "FeatureCollection", "features": features},
                          allow_nan=False, separators=(",", ":"))
    except ValueError as err:  # a NaN slipped through: never write JSON QuPath rejects
        raise QpcellError(f"cannot write GeoJSON: {err}") from None


def _circle_offsets(radius_px: float, n: int = CIRCLE_VERTICES) -> np.ndarray:
    """Vertex offsets of a circle, in antipodal pairs so the centroid is exactly the centre."""
    half = n // 2
    t = np.arange(half) * (2 * np.pi / n)
    first = np.round(np.stack([np.cos(t), np.sin(t)], axis=1) * radius_px, 4)
    return np.concatenate([first, -first])


def detections_to_features(det: Detections, *, shape: str = "circle", radius_um: float = 4.0,
                           mpp: float | None = None, offset: tuple[float, float] = (0.0, 0.0)
                           ) -> list[dict]:
    """QuPath 0.4-0.6 detection Features for ``det``.

    Parameters
    ----------
    det
        The detections; ``det.xy`` in pixels of the image the features are for.
    shape
        ``"circle"``: a closed 16-vertex polygon of radius ``radius_um`` around each centre
        (its centroid is the centre to 1e-7 px); ``"point"``: a ``Point`` geometry.
    radius_um
        Circle radius in µm (default 4 µm, a typical nucleus).
    mpp
        Pixel size in µm/px used for the radius; ``None`` = ``det.mpp``, and when that is
        unknown too, 0.44 µm/px (20x) is assumed, so the default circle is 9.1 px.
    offset
        ``(dx, dy)`` pixels added to every centre (e.g. a region's origin in the slide).

    Each feature has ``objectType: "detection"``, a random UUID ``id``, a classification
    ``{name, color}`` and measurements ``{QPCELL_SCORE: score, probability_key(c): p, ...}``
    holding only finite values.
    """
    if shape not in ("circle", "point"):
        raise QpcellError(f"detection shape must be 'circle' or 'point', not {shape!r}")
    n = len(det)
    if n == 0:
        return []
    centre = det.xy + np.asarray(offset, dtype=np.float64).reshape(1, 2)
    if not np.all(np.isfinite(centre)):
        raise QpcellError("a detection has a NaN or infinite coordinate")
    if shape == "point":
        geoms = [{"type": "Point", "coordinates": c} for c in centre.tolist()]
    else:
        px = mpp if mpp is not None else (det.mpp if det.mpp is not None else DEFAULT_MPP)
        if not (radius_um > 0 and px > 0):
            raise QpcellError(f"circle radius {radius_um} µm at {px} µm/px is not positive")
        offs = _circle_offsets(radius_um / px)
        rings = np.round(np.round(centre, 7)[:, None, :] + offs[None], 7)
        rings = np.concatenate([rings, rings[:, :1]], axis=1).tolist()
        geoms = [{"type": "Polygon", "coordinates": [r]} for r in rings]
    keys = [QPCELL_SCORE] + [probability_key(c.name) for c in det.classes]
    values = np.concatenate([det.scores.reshape(-1, 1), det.class_probs], axis=1)
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    all_finite = finite.all(axis=1)
    rows = values.tolist()
    cls_dicts = [_classification(c) for c in det.classes]
    labels = det.labels.tolist()
    ids = _uuids(n)
    feats = []
    for k in range(n):
        row = rows[k]
        if all_finite[k]:
            meas = dict(zip(keys, row, strict=True))
        else:
            meas = {key: v for key, v, ok in zip(keys, row, finite[k], strict=True) if ok}
        feats.append({"type": "Feature", "id": ids[k], "geometry": geoms[k],
                      "properties": {"objectType": "detection",
                                     "classification": cls_dicts[labels[k]],
                                     "measurements": meas}})
    return feats


def write_detections(path: str | Path, det: Detections, **kwargs) -> None:
    """Write ``det`` atomically as a QuPath FeatureCollection.

    Keyword arguments as for :func:`detections_to_features`.
    """
    with _gc_paused():
        text = _dump(detections_to_features(det, **kwargs))
    atomic_write_text(path, text)


def points_to_features(img: AnnotatedImage) -> list[dict]:
    """Point annotations of ``img``, one ``MultiPoint`` annotation per class (``Point`` for
    a class with one cell), then its regions as unclassified polygon annotations."""
    feats = []
    if len(img):
        order = np.argsort(img.labels, kind="stable")
        bounds = np.searchsorted(img.labels[order], np.arange(len(img.classes) + 1))
        for k, c in enumerate(img.classes):
            pts = img.xy[order[bounds[k]:bounds[k + 1]]]
            if not len(pts):
                continue
            geom = ({"type": "Point", "coordinates": pts[0].tolist()} if len(pts) == 1 else
                    {"type": "MultiPoint", "coordinates": pts.tolist()})
            feats.append({"type": "Feature", "id": str(uuid.uuid4()), "geometry": geom,
                          "properties": {"objectType": "annotation",
                                         "classification": _classification(c)}})
    for region in img.regions or []:
        if not isinstance(region, Polygon | MultiPolygon):
            raise QpcellError(f"image {img.name!r}: a region is a {region.geom_type}, "
                              "not a polygon")
        feats.append({"type": "Feature", "id": str(uuid.uuid4()),
                      "geometry": mapping(region),
                      "properties": {"objectType": "annotation"}})
    return feats


def write_points(path: str | Path, img: AnnotatedImage) -> None:
    """Write the annotation file of a GeoJSON project atomically: ``img``'s points as one
    ``MultiPoint`` annotation per class, plus its regions as unclassified polygons.

    Coordinates are written at full precision, so reading the file back gives the same
    points exactly, grouped by class in the order of ``img.classes``.
    """
    with _gc_paused():
        text = _dump(points_to_features(img))
    atomic_write_text(path, text)
