"""``qpcell evaluate``: score predicted cells against point annotations."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from qpcell import __version__
from qpcell.cli._app import app, console, err_console
from qpcell.errors import QpcellError
from qpcell.metrics import Report, radius_sweep, score_dataset

GEOJSON_SUFFIXES = (".geojson", ".json")
TABLE_SUFFIXES = (".txt", ".csv", ".tsv")
MAX_WARNINGS = 5


@dataclass
class _Side:
    """One side (predictions or truth): images by stem, with the classes' names and colours."""

    path: Path
    images: dict  # stem -> AnnotatedImage
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    read: str = ""


@dataclass
class _Points:
    xy: np.ndarray
    labels: np.ndarray


def _load_side(path: Path, role: str, read: str = "auto") -> _Side:
    """Read a GeoJSON file, a folder of ``<stem>.geojson`` files (project or predictions), or
    point tables as ``qpcell import`` takes them; ``read`` says which objects are cells."""
    from qpcell.io.geojson import SOURCE_WORDS, read_geojson, to_annotated_image
    from qpcell.io.tables import read_tables

    if not path.exists():
        raise QpcellError(f"{role}: no such file or folder", path)
    try:
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES or (
                path.is_dir() and not _has_geojson(path) and _has_point_tables(path)):
            if read not in ("auto", "points"):
                raise QpcellError(f"point tables hold points, not {read}", path)
            tables = read_tables(path)
            images = {img.name: img for img in tables.images}
            warnings = list(tables.warnings)
        elif path.is_file():
            if path.suffix.lower() not in GEOJSON_SUFFIXES:
                raise QpcellError("expected a GeoJSON file (.geojson), a point table "
                                  "(.txt/.csv) or a folder of either", path)
            img = to_annotated_image(read_geojson(path), path.stem, source=read)
            images = {img.name: img}
            warnings = list(img.metadata.get("warnings", []))
        else:
            from qpcell.io.project import read_project

            if not _has_geojson(path):
                raise QpcellError("holds no <stem>.geojson files and no point tables "
                                  "(.txt/.csv, or a labels/ folder of them)", path)
            project = read_project(path, require_images=False, source=read)
            images = {img.name: img for img in project.images}
            warnings = list(project.warnings)
    except QpcellError as err:
        raise QpcellError(f"{role}: {err.message}", err.path) from None
    colors: dict[str, tuple[int, int, int]] = {}
    for img in images.values():
        for c in img.classes:
            colors.setdefault(c.name, c.color)
    counts: dict[str, int] = {}
    for img in images.values():
        kind = img.metadata.get("source", "points")
        counts[kind] = counts.get(kind, 0) + len(img)
    what = ", ".join(f"{n:,} {SOURCE_WORDS.get(k, k)}" for k, n in counts.items()) or "nothing"
    read_line = (f"{role}: read {what} from {len(images)} file{'s' if len(images) != 1 else ''}"
                 + (" (choose with --read-" + ("gt" if role == "ground truth" else "pred")
                    + " points|detections|cells)" if read == "auto" else ""))
    return _Side(path, images, colors, warnings, read_line)


def _has_geojson(folder: Path) -> bool:
    return any(p.name.lower().endswith(".geojson") and not p.name.startswith(".")
               for p in folder.iterdir())


def _has_point_tables(folder: Path) -> bool:
    from qpcell.io.tables import resolve_dataset

    try:
        resolve_dataset(folder)
    except QpcellError:
        return False
    return True


def _parse_radii(text: str, what: str) -> list[float]:
    try:
        radii = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise QpcellError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise QpcellError(f"{what} {text!r} must list radii >= 0")
    return radii


def _unit(value: str) -> str:
    v = value.strip().lower().replace("µ", "u").replace("μ", "u")
    if v in ("px", "pixel", "pixels"):
        return "px"
    if v in ("um", "micron", "microns", "micrometre", "micrometer"):
        return "um"
    raise QpcellError(f"--radius-unit {value!r} must be 'px' or 'um'")


def _pixel_size(mpp: float | None, gt: _Side, pred: _Side, stems: Sequence[str]) -> float | None:
    """--mpp, else the one pixel size the ground truth (then the predictions) carries."""
    if mpp is not None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise QpcellError(f"--mpp {mpp!r} must be a positive number (µm per pixel)")
        return float(mpp)
    for side in (gt, pred):
        found = {round(side.images[s].mpp, 9) for s in stems
                 if s in side.images and side.images[s].mpp is not None}
        if len(found) == 1:
            return float(found.pop())
        if len(found) > 1:
            raise QpcellError(f"the images have different pixel sizes ({sorted(found)} µm/px); "
                              "give one with --mpp or score them separately", side.path)
    return None


def _remap(img, index: dict[str, int]) -> tuple[_Points, int]:
    """Labels of ``img`` as indices into the evaluated class list; cells of other classes are
    dropped (their number is returned)."""
    lut = np.array([index.get(c.name, -1) for c in img.classes] or [-1], dtype=np.int64)
    lab = lut[img.labels] if len(img.labels) else np.zeros(0, np.int64)
    keep = lab >= 0
    return _Points(img.xy[keep], lab[keep]), int((~keep).sum())


def _some(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names, comma-separated, with "..." when there are more."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _radius_text(radius_px: float, mpp: float | None) -> str:
    if mpp is None:
        return f"{radius_px:g} px (pixel size unknown)"
    return f"{radius_px:g} px = {radius_px * mpp:.3g} µm at {mpp:g} µm/px"


def render_report(rep: Report, mpp: float | None) -> list[Table]:
    """Rich tables of one report: detection, classification, class-aware scores."""
    radius = _radius_text(rep.radius, mpp)
    det = Table(title=f"Detection, matching radius {radius}", title_justify="left")
    for col in ("precision", "recall", "F1", "TP", "FP", "FN", "mean distance"):
        det.add_column(col, justify="right")
    d = rep.detection
    det.add_row(_fmt(d.precision), _fmt(d.recall), f"[bold]{_fmt(d.f1)}[/]", str(d.tp),
                str(d.fp), str(d.fn), f"{rep.mean_distance:.2f} px")

    c = rep.classification
    cls = Table(title=f"Classification of the {c.n_matched} matched pairs",
                title_justify="left", caption="support = matched pairs of that true class; "
                "F_c = HoVer-Net type score; detection recall = share of the class's true "
                "cells matched", caption_justify="left")
    cls.add_column("class")
    for col in ("precision", "recall", "F1", "support", "F_c", "detection recall"):
        cls.add_column(col, justify="right")
    for k, s in enumerate(c.per_class):
        cls.add_row(escape(s.name), _fmt(s.precision), _fmt(s.recall), _fmt(s.f1), str(s.support),
                    _fmt(s.fc), _fmt(c.detection_recall[k]))
    cls.add_section()
    cls.add_row("[bold]weighted[/]", _fmt(c.weighted_precision), _fmt(c.weighted_recall),
                f"[bold]{_fmt(c.weighted_f1)}[/]", str(c.n_matched), "", "")
    cls.add_row("[bold]accuracy[/]", "", "", _fmt(c.accuracy), str(c.n_matched), "", "")

    aware = Table(title="Class-aware matching (paper 003: predicted k against true k only)",
                  title_justify="left", caption="totalF1: counts pooled over images; meanF1: "
                  "mean of per-image F1 over the images that have class k on either side",
                  caption_justify="left")
    aware.add_column("class")
    for col in ("precision", "recall", "totalF1", "meanF1", "images", "TP", "FP", "FN"):
        aware.add_column(col, justify="right")
    for s in rep.class_aware:
        aware.add_row(escape(s.name), _fmt(s.total_precision), _fmt(s.total_recall),
                      f"[bold]{_fmt(s.total_f1)}[/]", _fmt(s.mean_f1), str(s.n_images),
                      str(s.tp), str(s.fp), str(s.fn))
    return [det, cls, aware]


def _sweep_table(reports: Sequence[Report], mpp: float | None) -> Table:
    table = Table(title="Radius sweep: detection F1; per class totalF1 / meanF1",
                  title_justify="left")
    table.add_column("r px", justify="right", no_wrap=True)
    if mpp is not None:
        table.add_column("r µm", justify="right", no_wrap=True)
    table.add_column("detection", justify="right", no_wrap=True)
    for name in reports[0].class_names:
        table.add_column(escape(name), justify="right", no_wrap=True)
    for rep in reports:
        row = [f"{rep.radius:g}"] + ([f"{rep.radius * mpp:.3g}"] if mpp is not None else [])
        row.append(_fmt(rep.detection.f1))
        row += [f"{_fmt(s.total_f1)} / {_fmt(s.mean_f1)}" for s in rep.class_aware]
        table.add_row(*row)
    return table


def _warn(lines: Sequence[str], what: str) -> None:
    for line in lines[:MAX_WARNINGS]:
        err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if len(lines) > MAX_WARNINGS:
        err_console.print(f"[yellow]warning:[/] ... and {len(lines) - MAX_WARNINGS} more {what}",
                          highlight=False)


_HELP = (
    "Score predictions against point annotations.\n\n"
    "Detection (precision, recall, F1), classification of the matched cells (per class, "
    "weighted, accuracy, HoVer-Net F_c) and paper 003's class-aware totalF1 / meanF1, at one "
    "matching radius and optionally over a radius sweep.\n\n"
    "Images are paired by file stem. Matching is one-to-one and maximises the number of pairs "
    "within the radius (distance only breaks ties); counts are pooled over images. "
    "Unclassified polygon annotations in the ground truth mark the annotated regions: cells "
    "outside them are ignored on both sides."
)


def _count_agreement(pairs, names, stems, regions, positive, negative):
    """Per-image counts and positive % of predictions vs truth (:mod:`qpcell.readouts`)."""
    from qpcell.readouts import count_agreement, positive_rule

    rule = positive_rule(names, positive, negative)
    return count_agreement([(p.xy, p.labels, t.xy, t.labels) for p, t in pairs], names,
                           stems, regions=regions, rule=rule)


def _agreement_table(agreement) -> Table:
    """Per-image count agreement: MAE, bias, limits of agreement, Pearson r."""
    table = Table(title=f"Counts per image, predicted vs true ({len(agreement.images)} images)",
                  title_justify="left")
    for col in ("per image", "true", "pred", "MAE", "bias", "95% limits", "r"):
        table.add_column(col, justify="left" if col == "per image" else "right",
                         no_wrap=col != "per image")

    def add(label, a, digits):
        if not a.n:
            table.add_row(label, *("-" for _ in range(6)))
            return
        loa = "-" if a.loa is None else f"{a.loa[0]:+.{digits}f}..{a.loa[1]:+.{digits}f}"
        table.add_row(label, f"{a.true.mean():.{digits}f}", f"{a.pred.mean():.{digits}f}",
                      f"{a.mae:.{digits}f}", f"{a.bias:+.{digits}f}", loa,
                      "-" if a.r is None else f"{a.r:.3f}")

    for name, a in agreement.counts.items():
        add(f"{escape(name)} cells", a, 1)
    if agreement.positive is not None:
        add("positive %", agreement.positive, 2)
        table.caption = (f"true, pred: means over the images; positive % = "
                         f"{escape(agreement.rule.describe())}, errors in points")
    return table


@app.command("evaluate", help=_HELP)
def evaluate_command(
    pred: Annotated[Path, typer.Argument(
        help="Predictions: a GeoJSON file, a `qpcell predict` output folder or a GeoJSON "
             "project (<stem>.geojson files).")],
    gt: Annotated[Path, typer.Argument(
        help="Ground truth: a GeoJSON file or a GeoJSON project folder (point annotations; "
             "unclassified polygons = annotated regions).")],
    radius: Annotated[float, typer.Option(
        "--radius", "-r", help="Matching radius: a prediction at most this far from an "
        "annotation can match it (S-DRDIN: 10 px at 0.44 µm/px = 4.4 µm).")],
    radius_unit: Annotated[str, typer.Option(
        "--radius-unit", help="Unit of --radius and --radius-sweep: px or um.")] = "px",
    mpp: Annotated[float | None, typer.Option(
        "--mpp", help="Pixel size in µm/px (default: from the projects' metadata.json, if "
        "any).")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write every score to this JSON file.")] = None,
    sweep: Annotated[str | None, typer.Option(
        "--radius-sweep", help="Comma-separated radii (in --radius-unit) to score too, "
        "e.g. 2,4,6,8,10.")] = None,
    sweep_png: Annotated[Path | None, typer.Option(
        "--sweep-png", help="Plot F1 against radius (needs --radius-sweep) to this PNG, like "
        "paper 003's Fig. 3.")] = None,
    classes: Annotated[str | None, typer.Option(
        "--classes", help="Comma-separated class names to score, in this order; cells of "
        "other classes are left out on both sides (default: every class).")] = None,
    read_pred: Annotated[str, typer.Option(
        "--read-pred", help="Which objects of the prediction files are cells: points "
        "(point annotations), detections (detection and cell objects), cells (cell objects "
        "only) or auto (the kind that carries the classes).")] = "auto",
    read_gt: Annotated[str, typer.Option(
        "--read-gt", help="Which objects of the ground-truth files are cells (as "
        "--read-pred).")] = "auto",
    positive_classes: Annotated[str | None, typer.Option(
        "--positive-classes", help="Classes counted positive (comma-separated): compares "
        "the per-image positive % (e.g. the Ki67 index) of predictions and truth.")] = None,
    negative_classes: Annotated[str | None, typer.Option(
        "--negative-classes", help="Classes counted negative (default: all others).")] = None,
    counts_png: Annotated[Path | None, typer.Option(
        "--counts-png", help="Plot per-image predicted vs true counts (and positive %, with "
        "a Bland-Altman plot) to this PNG.")] = None,
) -> None:
    """``qpcell evaluate``: see ``_HELP``."""
    unit = _unit(radius_unit)
    radii_sweep = _parse_radii(sweep, "--radius-sweep") if sweep else []
    if sweep_png is not None and not radii_sweep:
        raise QpcellError("--sweep-png needs --radius-sweep (the radii to plot)")
    if not (math.isfinite(radius) and radius >= 0):
        raise QpcellError(f"--radius {radius!r} must be a number >= 0")

    from qpcell.io.geojson import SOURCES

    for option, value in (("--read-pred", read_pred), ("--read-gt", read_gt)):
        if value not in SOURCES:
            raise QpcellError(f"{option} {value!r}: choose from {', '.join(SOURCES)}")
    gt_side = _load_side(gt, "ground truth", read_gt)
    pred_side = _load_side(pred, "predictions", read_pred)

    # pair images by stem (two single files are paired whatever their names)
    if gt.is_file() and pred.is_file():
        (g_name,) = gt_side.images
        (p_img,) = pred_side.images.values()
        pred_side.images = {g_name: p_img}
    from qpcell.io.project import natural_key

    stems = sorted(gt_side.images, key=natural_key)
    common = [s for s in stems if s in pred_side.images]
    if not common:
        raise QpcellError(f"no image names in common between {pred} "
                          f"({_some(sorted(pred_side.images, key=natural_key))}) and {gt} "
                          f"({_some(stems)}): files are paired by name")
    extra = sorted((s for s in pred_side.images if s not in gt_side.images), key=natural_key)
    missing = [s for s in stems if s not in pred_side.images]
    notes: list[str] = []
    if missing:
        _warn([f"no prediction for {len(missing)} ground-truth image"
               f"{'s' if len(missing) > 1 else ''} ({_some(missing)}): all their cells "
               "count as missed"], "")
    if extra:
        _warn([f"{len(extra)} prediction file{'s' if len(extra) > 1 else ''} without ground "
               f"truth ignored ({_some(extra)})"],
              "")
    _warn(gt_side.warnings, "warnings about the ground truth")
    _warn(pred_side.warnings, "warnings about the predictions")

    # classes by name: ground truth first, then classes only the predictions have
    gt_names = list(dict.fromkeys(c.name for s in stems for c in gt_side.images[s].classes))
    pred_names = list(dict.fromkeys(c.name for s in common
                                    for c in pred_side.images[s].classes))
    gt_counts: dict[str, int] = {}
    for s in stems:
        for name, n in gt_side.images[s].counts().items():
            gt_counts[name] = gt_counts.get(name, 0) + n
    only_pred = [n for n in pred_names if not gt_counts.get(n)]
    if classes:
        names = list(dict.fromkeys(n.strip() for n in classes.split(",") if n.strip()))
        unknown = [n for n in names if n not in gt_names and n not in pred_names]
        if unknown:
            found = gt_names + [n for n in pred_names if n not in gt_names]
            raise QpcellError(f"--classes: {', '.join(map(repr, unknown))} occur in neither "
                              f"side (classes found: {', '.join(found) or 'none'})")
    else:
        names = gt_names + [n for n in pred_names if n not in gt_names]
    if not names:
        raise QpcellError("no classified cells on either side: nothing to score", gt)
    only_pred = [n for n in only_pred if n in names]
    if only_pred:
        notes.append(f"predicted class{'es' if len(only_pred) > 1 else ''} absent from the "
                     f"ground truth: {', '.join(only_pred)} (all such predictions are false "
                     "positives in class-aware scores)")
    index = {n: k for k, n in enumerate(names)}

    pairs, regions, dropped = [], [], [0, 0]
    for s in stems:
        truth, n_t = _remap(gt_side.images[s], index)
        if s in pred_side.images:
            prediction, n_p = _remap(pred_side.images[s], index)
        else:
            prediction, n_p = _Points(np.zeros((0, 2)), np.zeros(0, np.int64)), 0
        dropped[0] += n_p
        dropped[1] += n_t
        pairs.append((prediction, truth))
        regions.append(gt_side.images[s].regions or None)
    if classes and any(dropped):
        notes.append(f"--classes left out {dropped[0]} predicted and {dropped[1]} true cells "
                     "of other classes")

    pixel = _pixel_size(mpp, gt_side, pred_side, stems)
    if unit == "um" and pixel is None:
        raise QpcellError("--radius-unit um needs the pixel size: give --mpp (µm per pixel)")
    to_px = (1.0 / pixel) if unit == "um" else 1.0
    radius_px = radius * to_px
    rep = score_dataset(pairs, names, radius_px, regions=regions, names=stems)
    n_regions = sum(r is not None for r in regions)
    if n_regions:
        notes.append(f"annotated regions: {n_regions} of {len(stems)} ground-truth images have "
                     "unclassified polygon annotations, used as the annotated regions; cells "
                     f"outside them are ignored ({rep.n_pred_outside} predicted, "
                     f"{rep.n_true_outside} true)")

    console.print(f"[bold]qpcell evaluate[/]  predictions {escape(str(pred))}  ground truth "
                  f"{escape(str(gt))}", highlight=False, soft_wrap=True)
    for side in (pred_side, gt_side):
        console.print(escape(side.read), highlight=False, soft_wrap=True)
    console.print(f"{len(stems)} images ({len(common)} with predictions), {rep.n_true} true "
                  f"and {rep.n_pred} predicted cells; classes: {escape(', '.join(names))}; "
                  f"matching radius {_radius_text(radius_px, pixel)}", highlight=False)
    for line in notes:
        console.print(f"note: {escape(line)}", highlight=False, soft_wrap=True)
    for table in render_report(rep, pixel):
        console.print(table)

    agreement = _count_agreement(pairs, names, stems, regions, positive_classes,
                                 negative_classes)
    console.print(_agreement_table(agreement))
    if counts_png is not None:
        from qpcell.report import plot_count_agreement

        plot_count_agreement(agreement, counts_png,
                             title=f"{pred.name} vs {gt.name}: per-image counts",
                             class_colors={n: gt_side.colors.get(n) or pred_side.colors.get(n)
                                           for n in names})
        console.print(f"count agreement plot: {escape(str(counts_png))}", highlight=False,
                      soft_wrap=True)

    reports: list[Report] = []
    if radii_sweep:
        reports = radius_sweep(pairs, names, [r * to_px for r in radii_sweep],
                               regions=regions, names=stems)
        console.print(_sweep_table(reports, pixel))
        if sweep_png is not None:
            from qpcell.plots import plot_radius_sweep

            plot_radius_sweep(reports, sweep_png, mpp=pixel,
                              class_colors={n: gt_side.colors.get(n) or pred_side.colors.get(n)
                                            for n in names},
                              title=f"{pred.name} vs {gt.name}: F1 against matching radius")
            console.print(f"radius sweep plot: {escape(str(sweep_png))}", highlight=False,
                          soft_wrap=True)

    if json_out is not None:
        from qpcell.io.atomic import atomic_write_text

        data = rep.to_dict()
        data.update({
            "radius_um": radius_px * pixel if pixel is not None else None,
            "mpp": pixel,
            "inputs": {"predictions": str(pred), "ground_truth": str(gt), "images": stems,
                       "images_without_predictions": missing,
                       "predictions_without_ground_truth": extra,
                       "images_with_regions": n_regions},
            "notes": notes,
            "qpcell_version": __version__,
        })
        data["counts"] = agreement.to_dict()
        if reports:
            data["radius_sweep"] = [
                dict(r.to_dict(), radius_um=r.radius * pixel if pixel is not None else None)
                for r in reports]
        atomic_write_text(json_out, json.dumps(data, indent=1, allow_nan=False))
        console.print(f"scores written to {escape(str(json_out))}", highlight=False,
                      soft_wrap=True)
