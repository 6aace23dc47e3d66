"""The per-image report ``<stem>.report.png``: the image with its regions and hotspots, a
density map per class, and the read-out table (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpcell.io.atomic import atomic_write_bytes
from qpcell.points import CellClass
from qpcell.readouts import Hotspot, RegionReadout, density_map

#: Density maps have about this many bins along the image's longer side ...
MAP_BINS = 80
#: ... but bins are never smaller than this many µm (px when the pixel size is unknown).
MIN_BIN_UM = 50.0
#: At most this many class density maps are drawn.
MAX_MAPS = 6


def _outlines(geom: BaseGeometry):
    polys = getattr(geom, "geoms", [geom])
    for p in polys:
        if hasattr(p, "exterior"):
            yield np.asarray(p.exterior.coords)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _table(readouts: Sequence[RegionReadout], classes: Sequence[CellClass]
           ) -> tuple[list[str], list[list[str]]]:
    has_mpp = readouts[0].mpp is not None
    head = ["region", "area mm²" if has_mpp else "area px²", "cells"]
    head += [f"{c.name}\nn (%)" for c in classes]
    if has_mpp:
        head.append("cells/mm²")
    if readouts[0].rule is not None:
        head.append("positive %")
    rows = []
    for r in readouts:
        area = r.area_mm2 if has_mpp else r.area_px2
        row = [r.name, _fmt(area, 3 if has_mpp else 0), f"{r.n_cells:,}"]
        for c in classes:
            pct = r.percent(c.name)
            row.append(f"{r.counts.get(c.name, 0):,} ({_fmt(pct)})")
        if has_mpp:
            row.append(_fmt(r.density_mm2(), 0))
        if r.rule is not None:
            row.append(_fmt(r.positive_percent))
        rows.append(row)
    return head, rows


def render_report(thumbnail: np.ndarray, *, title: str,
                  xy: np.ndarray, labels: np.ndarray, classes: Sequence[CellClass],
                  readouts: Sequence[RegionReadout],
                  regions: Sequence[tuple[str, BaseGeometry]] = (),
                  hotspots: Sequence[Hotspot] = (), image_size: tuple[int, int],
                  mpp: float | None, dpi: int = 110) -> bytes:
    """The report as PNG bytes.

    ``thumbnail`` is the whole image at any scale (drawn over ``image_size`` px); ``xy`` /
    ``labels`` the cells (full-resolution px, class indices); ``regions`` the
    ``(name, polygon)`` pairs read out, ``readouts`` their figures (whole image first).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    shown = [c for c in classes][:MAX_MAPS]
    n_panels = 1 + len(shown)
    cols = min(n_panels, 4)
    map_rows = math.ceil(n_panels / cols)
    n_rows_table = len(readouts) + 1
    table_h = 0.35 * n_rows_table + 0.6
    fig_w = 4.2 * cols
    fig = plt.figure(figsize=(fig_w, 3.9 * map_rows + table_h + 0.6), dpi=dpi)
    grid = fig.add_gridspec(map_rows + 1, cols,
                            height_ratios=[3.9] * map_rows + [table_h])
    fig.suptitle(title, fontsize=13, fontweight="bold", x=0.01, ha="left")
    w, h = image_size
    extent = (0, w, h, 0)

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(thumbnail, extent=extent, interpolation="antialiased")
    for name, geom in regions:
        for ring in _outlines(geom):
            ax.plot(ring[:, 0], ring[:, 1], color="#00a0ff", lw=1.4)
        c = geom.representative_point()
        ax.text(c.x, c.y, name, color="white", fontsize=9,
                ha="center", va="center", fontweight="bold",
                bbox={"facecolor": "#00a0ff", "alpha": 0.8, "pad": 1.5, "lw": 0})
    for hs in hotspots:
        main = hs.kind == "positive"
        ax.add_patch(Circle((hs.x, hs.y), hs.radius, fill=False, lw=2.2 if main else 1.0,
                            ls="-" if main else "--",
                            color="#ffc800" if main else "#ff5050"))
    legend = ["image"] + (["regions (blue)"] if regions else [])
    if any(h.kind == "positive" for h in hotspots):
        legend.append("positive % hotspot (yellow)")
    if any(h.kind == "density" for h in hotspots):
        legend.append("density hotspots (red, dashed)")
    ax.set_title(",\n".join([", ".join(legend[:2])] + legend[2:]), fontsize=9)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])

    bin_um = max(max(w, h) * (mpp or 1.0) / MAP_BINS, MIN_BIN_UM)
    bin_px = bin_um / (mpp or 1.0)
    maps = density_map(xy, labels, len(classes), size=(w, h), bin_px=bin_px, mpp=mpp)
    unit = "cells/mm²" if mpp is not None else f"cells per {bin_px:.0f} px bin"
    for i, c in enumerate(shown, start=1):
        k = list(classes).index(c)
        ax = fig.add_subplot(grid[i // cols, i % cols])
        m = maps[k]
        im = ax.imshow(m, extent=(0, m.shape[1] * bin_px, m.shape[0] * bin_px, 0),
                       cmap="magma", vmin=0, vmax=max(float(m.max()), 1.0),
                       interpolation="nearest")
        for hs in hotspots:
            if hs.kind == "density" and hs.target == c.name:
                ax.add_patch(Circle((hs.x, hs.y), hs.radius, fill=False, lw=1.2,
                                    color="#00e0ff"))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        rgb = tuple(v / 255 for v in c.color)
        densest = any(hs.kind == "density" and hs.target == c.name for hs in hotspots)
        ax.set_title(f"{c.name}: {readouts[0].counts.get(c.name, 0):,} cells"
                     + (", densest circle (cyan)" if densest else ""), fontsize=10)
        ax.text(0.0, 1.02, "■", transform=ax.transAxes, color=rgb, fontsize=14,
                va="bottom")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(unit, fontsize=7)

    ax = fig.add_subplot(grid[map_rows, :])
    ax.axis("off")
    head, rows = _table(readouts, classes)
    main = next((hs for hs in hotspots if hs.kind == "positive"), None)
    if main is not None:
        area = f"{main.area_mm2:g} mm²" if main.area_mm2 is not None else \
            f"{main.area_px2:,.0f} px²"
        rows.append(["hotspot", area, f"{main.n_cells:,}"] +
                    [f"{main.counts.get(c.name, 0):,}" for c in classes] +
                    ([_fmt(main.density_mm2(), 0)] if mpp is not None else []) +
                    [_fmt(main.positive_percent)])
    table = ax.table(cellText=rows, colLabels=head, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.35)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(fontweight="bold")
            cell.set_height(cell.get_height() * 1.6)
    if readouts[0].rule is not None:
        ax.set_title(f"positive % = {readouts[0].rule.describe()}", fontsize=9, loc="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def plot_count_agreement(agreement, path: str | Path, *, title: str = "",
                         class_colors: dict | None = None, dpi: int = 120) -> Path:
    """Scatter of predicted vs true cells per image for each class, and for the positive
    fraction (when there is one) a scatter and a Bland-Altman plot, to a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = len(agreement.counts) + (2 if agreement.positive is not None else 0)
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.8 * rows), dpi=dpi,
                             squeeze=False)
    flat = list(axes.ravel())

    def scatter(ax, a, color, unit):
        lim = max(float(np.max(a.true, initial=0)), float(np.max(a.pred, initial=0)), 1) * 1.05
        ax.plot([0, lim], [0, lim], color="0.6", lw=1, ls="--")
        ax.scatter(a.true, a.pred, s=14, color=color, alpha=0.7, lw=0)
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_xlabel(f"true {unit}")
        ax.set_ylabel(f"predicted {unit}")
        r = "-" if a.r is None else f"{a.r:.3f}"
        ax.set_title(f"{a.name}: MAE {a.mae:.2f}, r {r}" if a.n else a.name, fontsize=10)

    colors = class_colors or {}
    for ax, (name, a) in zip(flat, agreement.counts.items(), strict=False):
        rgb = colors.get(name)
        scatter(ax, a, tuple(v / 255 for v in rgb) if rgb else "C0", "cells per image")
    if agreement.positive is not None:
        a = agreement.positive
        ax = flat[len(agreement.counts)]
        scatter(ax, a, "black", "positive %")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax = flat[len(agreement.counts) + 1]
        mean = (a.true + a.pred) / 2
        diff = a.pred - a.true
        ax.scatter(mean, diff, s=14, color="black", alpha=0.7, lw=0)
        if a.n:
            ax.axhline(a.bias, color="C3", lw=1.2, label=f"bias {a.bias:+.2f}")
        if a.loa is not None:
            for v in a.loa:
                ax.axhline(v, color="C3", lw=1, ls="--")
            ax.set_title(f"Bland-Altman: limits {a.loa[0]:+.1f} to {a.loa[1]:+.1f}",
                         fontsize=10)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("mean of true and predicted positive %")
        ax.set_ylabel("predicted - true (points)")
        if a.n:
            ax.legend(fontsize=8, loc="upper right")
    for ax in flat[panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_report(path: str | Path, **kwargs) -> Path:
    """:func:`render_report` to ``path``, atomically."""
    atomic_write_bytes(path, render_report(**kwargs))
    return Path(path)


__all__ = ["render_report", "write_report", "plot_count_agreement"]
