"""Prediction outputs besides GeoJSON: a CSV table, an overlay picture and a JSON summary.

Every writer is atomic (a temporary file renamed into place): a reader, or a run that was
interrupted, never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from qpcell.io.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from qpcell.points import Detections

#: Overlays are drawn only for images up to this many pixels (a PNG of a slide is useless).
OVERLAY_MAX_PIXELS = 4_000_000
#: Radius of the overlay circles in µm (pixels at 0.44 µm/px when the pixel size is unknown).
OVERLAY_RADIUS_UM = 3.0


def probability_column(class_name: str) -> str:
    """CSV column holding the probability of ``class_name``."""
    return f"p_{class_name}"


def csv_columns(det: Detections) -> list[str]:
    """Column names of :func:`write_csv` for these detections."""
    cols = ["x", "y", "class", "score"] + [probability_column(c.name) for c in det.classes]
    if det.mpp is not None:
        cols += ["x_um", "y_um"]
    return cols


def write_csv(path: str | Path, det: Detections) -> None:
    """One row per cell: ``x, y`` (full-resolution px), ``class`` (name), ``score``, one
    ``p_<class>`` column per class, and ``x_um, y_um`` when ``det.mpp`` is known.

    Floats are written with 3 (coordinates) or 4 (probabilities) decimals.
    """
    names = np.array([c.name for c in det.classes], dtype=object)
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_columns(det))
        if not len(det):
            return
        cols = [np.char.mod("%.3f", det.xy[:, 0]), np.char.mod("%.3f", det.xy[:, 1]),
                names[det.labels], np.char.mod("%.4f", det.scores)]
        cols += [np.char.mod("%.4f", det.class_probs[:, k]) for k in range(len(det.classes))]
        if det.mpp is not None:
            cols += [np.char.mod("%.3f", det.xy[:, 0] * det.mpp),
                     np.char.mod("%.3f", det.xy[:, 1] * det.mpp)]
        writer.writerows(zip(*cols, strict=True))


def overlay_radius_px(mpp: float | None) -> float:
    """Circle radius in image pixels for the overlay."""
    return max(2.0, OVERLAY_RADIUS_UM / (mpp if mpp else 0.44))


def render_overlay(image: np.ndarray, det: Detections, *, radius_px: float | None = None
                   ) -> np.ndarray:
    """``image`` (H, W, 3 uint8) with a circle in its class colour around every cell."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(image[:, :, :3]))
    draw = ImageDraw.Draw(im)
    r = overlay_radius_px(det.mpp) if radius_px is None else float(radius_px)
    width = max(1, round(r / 4))
    colors = [c.color for c in det.classes]
    for (x, y), k in zip(det.xy.tolist(), det.labels.tolist(), strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colors[k], width=width)
    return np.asarray(im)


def write_overlay(path: str | Path, image: np.ndarray, det: Detections, *,
                  radius_px: float | None = None) -> None:
    """Write :func:`render_overlay` as a PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render_overlay(image, det, radius_px=radius_px)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON (paths as strings, NaN as null), atomically."""
    atomic_write_text(path, json.dumps(_json_ready(data), indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when the file is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = ["write_csv", "csv_columns", "probability_column", "render_overlay", "write_overlay",
           "overlay_radius_px", "write_json", "read_json", "OVERLAY_MAX_PIXELS"]
