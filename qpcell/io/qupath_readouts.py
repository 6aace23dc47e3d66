"""Read-outs on QuPath annotations (``qpcell annotate-back``): measurements on every area
annotation, and the hotspot annotations.

Works on a paquo hierarchy (or anything shaped like it: ``annotations`` whose objects have
``roi`` (shapely), ``path_class`` (``.name``) and ``measurements`` (a mutable mapping), a
``-=``-able ``annotations`` proxy and ``load_geojson(features)``).

What a rerun changes: on each area annotation, every measurement named ``qpcell: ...`` is
removed and the new ones are set; all other measurements (the user's, other tools') stay.
Annotations classified ``qpcell hotspot`` are qpcell's: they are replaced. No other
annotation is removed, moved or reclassified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qpcell.errors import QpcellError
from qpcell.io.readouts import HOTSPOT_SUFFIX
from qpcell.readouts import (
    HOTSPOT_CLASS,
    MEASUREMENT_PREFIX,
    PositiveRule,
    qupath_measurements,
    region_readouts,
)

log = logging.getLogger("qpcell")


@dataclass
class ReadoutsWritten:
    """What :func:`write_annotation_readouts` changed on one image."""

    annotations: int = 0
    hotspots_removed: int = 0
    hotspots_added: int = 0


def _class_name(obj: Any) -> str | None:
    pc = getattr(obj, "path_class", None)
    return None if pc is None else getattr(pc, "name", None)


def is_hotspot(obj: Any) -> bool:
    """True for qpcell's hotspot annotations (classified :data:`HOTSPOT_CLASS`)."""
    return _class_name(obj) == HOTSPOT_CLASS


def area_annotations(hierarchy: Any) -> list[Any]:
    """The annotations that get measurements: those with an area, hotspots excluded."""
    out = []
    for a in hierarchy.annotations:
        roi = getattr(a, "roi", None)
        if roi is None or is_hotspot(a):
            continue
        try:
            if roi.is_empty or roi.area <= 0:
                continue
        except Exception as err:  # noqa: BLE001 - odd ROIs: skipped, never fatal
            log.debug("annotation ROI skipped: %s", err)
            continue
        out.append(a)
    return out


def read_hotspot_features(prediction: str | Path) -> list[dict]:
    """The hotspot features next to a prediction file ``<stem>.geojson`` (``[]`` if none)."""
    prediction = Path(prediction)
    path = prediction.with_name(prediction.name.rsplit(".", 1)[0] + HOTSPOT_SUFFIX)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QpcellError(f"not readable: {err}", path) from None
    feats = data.get("features") if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise QpcellError("not a GeoJSON FeatureCollection of hotspots", path)
    return [f for f in feats if isinstance(f, dict)
            and ((f.get("properties") or {}).get("classification") or {}).get("name")
            == HOTSPOT_CLASS]


def set_qpcell_measurements(obj: Any, values: dict[str, float]) -> None:
    """Replace ``obj``'s ``qpcell: ...`` measurements by ``values``; keep all others."""
    m = obj.measurements
    for name in [k for k in m if str(k).startswith(MEASUREMENT_PREFIX)]:
        del m[name]
    for name, value in values.items():
        m[name] = float(value)


def write_annotation_readouts(hierarchy: Any, xy: np.ndarray, labels: np.ndarray,
                              class_names: Sequence[str], *, mpp: float | None,
                              rule: PositiveRule | None,
                              hotspots: Sequence[dict] = ()) -> ReadoutsWritten:
    """Measurements on every area annotation of ``hierarchy`` and qpcell's hotspots.

    ``xy`` / ``labels``: qpcell's cells of the image (full-resolution px, class indices into
    ``class_names``); each annotation counts the cells whose centre lies inside it.
    ``hotspots``: QuPath GeoJSON features (``<stem>.hotspots.json``) replacing earlier
    hotspot annotations; with none given, earlier hotspots are kept.
    """
    done = ReadoutsWritten()
    targets = area_annotations(hierarchy)
    rows = region_readouts(xy, labels, class_names, image_size=(1, 1),
                           regions=[(str(i), a.roi) for i, a in enumerate(targets)],
                           mpp=mpp, rule=rule)[1:]
    for obj, row in zip(targets, rows, strict=True):
        set_qpcell_measurements(obj, qupath_measurements(row))
    done.annotations = len(targets)
    if hotspots:
        old = [a for a in hierarchy.annotations if is_hotspot(a)]
        if old:
            proxy = hierarchy.annotations  # a local name: ``h.annotations -= x`` would setattr
            proxy -= old
        try:
            hierarchy.load_geojson(list(hotspots), raise_on_skip=True)
        except ValueError as err:
            raise QpcellError(f"QuPath rejected the hotspot annotations: {err}") from None
        done.hotspots_removed, done.hotspots_added = len(old), len(hotspots)
    return done


__all__ = ["ReadoutsWritten", "write_annotation_readouts", "read_hotspot_features",
           "area_annotations", "is_hotspot", "set_qpcell_measurements"]
