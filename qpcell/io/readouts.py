"""Read-outs to files: ``summary.csv``, the hotspot GeoJSON and the per-image entry of
``predictions.json`` (see :mod:`qpcell.readouts` for the figures themselves).

Per image ``<stem>`` a ``qpcell predict`` folder gains ``<stem>.hotspots.json`` (one QuPath
annotation per hotspot, classified ``qpcell hotspot``, with its figures as measurements; only
with ``--hotspot-mm2``), ``<stem>.measurements.tsv`` (the QuPath measurements of each region,
for ``qpcell-detect.groovy``: ``index``, ``region``, ``measurement``, ``value``; index 0 is the
whole image, 1.. the regions in the order given) and ``<stem>.report.png``; the folder gains
``summary.csv``, one row per image and region, rebuilt from ``predictions.json`` after each
image.
"""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpcell.io.atomic import atomic_write_text
from qpcell.readouts import (
    HOTSPOT_CLASS,
    HOTSPOT_COLOR,
    HOTSPOT_MIN_CELLS,
    Hotspot,
    PositiveRule,
    RegionReadout,
    find_hotspots,
    qupath_measurements,
    region_readouts,
    table_row,
)

SUMMARY_CSV = "summary.csv"
HOTSPOT_SUFFIX = ".hotspots.json"
MEASUREMENTS_SUFFIX = ".measurements.tsv"
REPORT_SUFFIX = ".report.png"
#: Vertices of a hotspot circle written to GeoJSON.
CIRCLE_VERTICES = 72


@dataclass(frozen=True)
class ReadoutOptions:
    """What ``qpcell predict`` reads out besides the cells.

    ``rule``: positive / negative classes (``None``: no positive fraction);
    ``hotspot_mm2``: hotspot circle area in mm² (px² for images without a pixel size;
    ``None``: no hotspots); ``min_cells``: positive + negative cells a positive-fraction
    hotspot must hold; ``report``: write ``<stem>.report.png``.
    """

    rule: PositiveRule | None = None
    hotspot_mm2: float | None = None
    min_cells: int = HOTSPOT_MIN_CELLS
    report: bool = True

    def to_json(self) -> dict:
        return {"positive_classes": list(self.rule.positive) if self.rule else [],
                "negative_classes": list(self.rule.negative) if self.rule else [],
                "hotspot_mm2": self.hotspot_mm2, "hotspot_min_cells": self.min_cells}


def region_names(regions: Sequence[BaseGeometry] | None) -> list[tuple[str, BaseGeometry]]:
    """``("region 1", polygon), ...`` in the order the regions were given."""
    return [(f"region {i}", g) for i, g in enumerate(regions or [], start=1)]


def hotspot_feature(h: Hotspot) -> dict:
    """A QuPath GeoJSON annotation (a polygon circle) of hotspot ``h`` with its figures."""
    t = np.linspace(0, 2 * math.pi, CIRCLE_VERTICES, endpoint=False)
    ring = [[round(h.x + h.radius * math.cos(a), 3), round(h.y + h.radius * math.sin(a), 3)]
            for a in t]
    ring.append(ring[0])
    return {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": f"qpcell {h.label}",
                           "classification": {"name": HOTSPOT_CLASS,
                                              "color": list(HOTSPOT_COLOR)},
                           "measurements": h.measurements()}}


def hotspot_json(h: Hotspot) -> dict:
    """The figures of ``h`` for ``predictions.json``."""
    return {"kind": h.kind, "target": h.target, "label": h.label,
            "x": round(h.x, 2), "y": round(h.y, 2), "radius_px": round(h.radius, 2),
            "area_mm2": h.area_mm2, "counts": h.counts, "cells": h.n_cells,
            "positive_percent": h.positive_percent, "min_cells": h.min_cells,
            "proven_best": h.exact}


def readout_json(r: RegionReadout) -> dict:
    """The figures of region ``r`` for ``predictions.json`` (its QuPath measurements too)."""
    return {"region": r.name, "index": r.index, "area_px2": r.area_px2,
            "area_um2": r.area_um2, "cells": r.n_cells, "counts": r.counts,
            "positive": r.positive if r.rule else None,
            "negative": r.negative if r.rule else None,
            "positive_percent": r.positive_percent,
            "measurements": qupath_measurements(r)}


@dataclass
class ImageReadouts:
    """Every read-out of one image."""

    regions: list[RegionReadout]
    hotspots: list[Hotspot]
    warnings: list[str]

    def to_json(self, name: str) -> dict:
        return {"regions": [readout_json(r) for r in self.regions],
                "hotspots": [hotspot_json(h) for h in self.hotspots],
                "rows": [table_row(name, r) for r in self.regions]}


def read_out(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
             image_size: tuple[int, int], regions: Sequence[BaseGeometry] | None,
             mpp: float | None, options: ReadoutOptions) -> ImageReadouts:
    """Region read-outs and (with ``options.hotspot_mm2``) hotspots of one image."""
    warns: list[str] = []
    rows = region_readouts(xy, labels, class_names, image_size=image_size,
                           regions=region_names(regions), mpp=mpp, rule=options.rule)
    spots: list[Hotspot] = []
    if options.hotspot_mm2 is not None and len(xy):
        if mpp is None:
            warns.append(f"pixel size unknown: the hotspot area {options.hotspot_mm2} is "
                         "taken in px²")
        spots = find_hotspots(xy, labels, class_names, area=options.hotspot_mm2, mpp=mpp,
                              rule=options.rule, min_cells=options.min_cells)
        if options.rule is not None and not any(h.kind == "positive" for h in spots):
            warns.append(f"no positive-fraction hotspot: no circle of the hotspot area holds "
                         f"{options.min_cells} positive + negative cells")
    return ImageReadouts(rows, spots, warns)


def write_hotspots(path: str | Path, spots: Sequence[Hotspot]) -> None:
    """The hotspots as QuPath GeoJSON annotations (a FeatureCollection), atomically."""
    data = {"type": "FeatureCollection", "features": [hotspot_feature(h) for h in spots]}
    atomic_write_text(path, json.dumps(data, allow_nan=False) + "\n")


def write_measurements_tsv(path: str | Path, rows: Sequence[RegionReadout]) -> None:
    """The QuPath measurements of each region as tab-separated lines, atomically."""
    lines = ["index\tregion\tmeasurement\tvalue"]
    for r in rows:
        name = " ".join(r.name.split())  # no tabs or newlines inside a field
        lines += [f"{r.index}\t{name}\t{k}\t{v!r}" for k, v in qupath_measurements(r).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_summary_csv(path: str | Path, images: Mapping[str, Mapping]) -> int:
    """``summary.csv`` from the ``images`` of ``predictions.json``: one row per image and
    region (images predicted before read-outs existed have none). Returns the row count."""
    rows = [row for entry in images.values()
            for row in (entry.get("readouts") or {}).get("rows", [])]
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return len(rows)


def image_readouts(out: Path, job, slide, classes: Sequence, cells_xy: Sequence[np.ndarray],
                   cells_class: Sequence[np.ndarray], options: ReadoutOptions,
                   written: dict[str, Path]) -> dict:
    """Read out one predicted image into the folder ``out`` (what ``predict_to_folder`` calls).

    ``job`` is the ``PredictionJob`` (``name``, ``regions``), ``slide`` the open image,
    ``cells_xy`` / ``cells_class`` its cells in pieces. Writes ``<stem>.hotspots.json``
    (or removes a stale one) and ``<stem>.report.png``, adding them to ``written``. Returns
    the ``readouts`` entry of ``predictions.json`` with a ``warnings`` list to pop.
    """
    xy = (np.concatenate(cells_xy).astype(np.float64) if cells_xy else np.zeros((0, 2)))
    labels = (np.concatenate(cells_class).astype(np.int64) if cells_class
              else np.zeros(0, np.int64))
    names = [c.name for c in classes]
    size = (slide.width, slide.height)
    result = read_out(xy, labels, names, image_size=size, regions=job.regions,
                      mpp=slide.mpp, options=options)
    write_measurements_tsv(out / f"{job.name}{MEASUREMENTS_SUFFIX}", result.regions)
    written["measurements"] = out / f"{job.name}{MEASUREMENTS_SUFFIX}"
    hot_path = out / f"{job.name}{HOTSPOT_SUFFIX}"
    if result.hotspots:
        write_hotspots(hot_path, result.hotspots)
        written["hotspots"] = hot_path
    else:
        hot_path.unlink(missing_ok=True)
    report_path = out / f"{job.name}{REPORT_SUFFIX}"
    if options.report:
        from qpcell.report import write_report

        thumb, _ = slide.thumbnail(1024)
        write_report(report_path, thumbnail=thumb, title=job.name, xy=xy, labels=labels,
                     classes=classes, readouts=result.regions,
                     regions=region_names(job.regions), hotspots=result.hotspots,
                     image_size=size, mpp=slide.mpp)
        written["report"] = report_path
    else:
        report_path.unlink(missing_ok=True)
    entry = result.to_json(job.name)
    entry["warnings"] = result.warnings
    return entry


__all__ = ["ReadoutOptions", "image_readouts", "ImageReadouts", "read_out", "region_names",
           "hotspot_feature",
           "write_hotspots", "write_summary_csv", "write_measurements_tsv", "SUMMARY_CSV",
           "HOTSPOT_SUFFIX", "MEASUREMENTS_SUFFIX",
           "REPORT_SUFFIX"]
