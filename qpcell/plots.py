"""Figures written to files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from qpcell.io.atomic import atomic_write_bytes
from qpcell.metrics import Report


def plot_radius_sweep(reports: Sequence[Report], path: str | Path, *, mpp: float | None = None,
                      class_colors: Mapping[str, Sequence[int]] | None = None,
                      title: str | None = None, dpi: int = 150) -> Path:
    """Draw F1 against the matching radius, like paper 003's Fig. 3, to a PNG file.

    Left panel: totalF1 (pooled over images) of every class with class-aware matching,
    and the class-agnostic detection F1 (black, dashed). Right panel: meanF1 (mean over
    images of the per-image F1) of every class.

    Parameters
    ----------
    reports
        One :class:`~qpcell.metrics.Report` per radius (from
        :func:`~qpcell.metrics.radius_sweep`), all with the same classes.
    path
        The PNG file to write (atomically; parent folders are created).
    mpp
        Pixel size in µm per pixel; when given, a second x axis shows the radius in µm.
    class_colors
        RGB colour (0-255) per class name, e.g. the QuPath class colours.
    title
        Figure title; a default names the number of images.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not reports:
        raise ValueError("no reports to plot")
    reports = sorted(reports, key=lambda r: r.radius)
    radii = [r.radius for r in reports]
    names = reports[0].class_names
    colors = dict(class_colors or {})

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_total, ax_mean = fig.subplots(1, 2, sharey=True)
    ax_total.plot(radii, [r.detection.f1 for r in reports], "k--", marker="o", ms=3,
                  label="detection F1 (all classes)")
    for k, name in enumerate(names):
        rgb = colors.get(name)
        color = tuple(c / 255 for c in rgb) if rgb is not None else None
        total = [r.class_aware[k].total_f1 for r in reports]
        mean = [r.class_aware[k].mean_f1 for r in reports]
        ax_total.plot(radii, total, marker="o", ms=3, color=color, label=name)
        ax_mean.plot(radii, mean, marker="o", ms=3, color=color, label=name)
    for ax, what in ((ax_total, "totalF1 (pooled over images)"),
                     (ax_mean, "meanF1 (mean of per-image F1)")):
        ax.set_title(what)
        ax.set_xlabel("matching radius r (px)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if mpp:
            sec = ax.secondary_xaxis("top", functions=(lambda x: x * mpp, lambda x: x / mpp))
            sec.set_xlabel(f"r (µm at {mpp:g} µm/px)")
    ax_total.set_ylabel("F1")
    ax_total.legend(loc="lower right", fontsize="small")
    fig.suptitle(title or f"F1 against matching radius ({reports[0].n_images} images)")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
