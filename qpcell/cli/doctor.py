"""``qpcell doctor``: what qpcell finds on this machine, or in a QuPath project (Java-free)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from qpcell import __version__
from qpcell.cli._app import app, console


@dataclass(frozen=True)
class Check:
    """One line of the environment report: what, what was found, whether it is fine."""

    name: str
    value: str
    ok: bool = True
    hint: str = ""


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_checks() -> list[Check]:
    """torch version and the device qpcell would use."""
    try:
        import torch
    except ImportError as err:
        return [Check("torch", f"not importable ({err})", False,
                      "run scripts/bootstrap.sh or pip install torch")]
    out = [Check("torch", torch.__version__)]
    try:
        from qpcell.device import describe, pick_device

        device = describe(pick_device(None))
    except Exception as err:  # noqa: BLE001 - report, never crash the doctor
        device = f"unknown ({err})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        extra = f"; CUDA {torch.version.cuda}; GPUs: {', '.join(names)}"
        hint = ""
    else:
        mps = getattr(torch.backends, "mps", None)
        has_mps = bool(mps is not None and mps.is_available())
        extra = "; Apple MPS" if has_mps else ""
        hint = "" if has_mps else "no GPU: training runs on the CPU (slow but works)"
    out.append(Check("device", f"{device}{extra}", True, hint))
    try:
        from qpcell.device import cpu_has_bf16
        from qpcell.inference import resolve_backend

        backend = resolve_backend("fast", torch.device("cpu"))
        bf16 = "native bf16 (AVX512-BF16/AMX)" if cpu_has_bf16() else "no native bf16"
        out.append(Check("CPU inference", f"{backend} ({bf16})"))
    except Exception as err:  # noqa: BLE001 - report, never crash the doctor
        out.append(Check("CPU inference", f"unknown ({err})", False))
    return out


def java_check() -> Check:
    """``java -version`` (QuPath ships its own Java; this is only informative)."""
    java = shutil.which("java")
    java_home = os.environ.get("JAVA_HOME")
    if java is None and java_home:
        candidate = Path(java_home) / "bin" / ("java.exe" if os.name == "nt" else "java")
        java = str(candidate) if candidate.is_file() else None
    if java is None:
        return Check("java", "not on PATH", True,
                     "not needed: QuPath brings its own Java (paquo uses QuPath's)")
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check("java", f"{java}: does not run ({err})", True)
    text = (proc.stderr or proc.stdout).strip().splitlines()
    first = text[0] if text else f"exit code {proc.returncode}"
    return Check("java", f"{first} ({java})", proc.returncode == 0)


def qupath_checks() -> list[Check]:
    """paquo and the QuPath installation it would use (no JVM is started)."""
    from qpcell.io.paquo import find_qupath_installation

    paquo = _version_of("paquo")
    if paquo is None:
        return [Check("paquo", "not installed", True,
                      "only for annotate-back and reading QuPath projects directly: "
                      "pip install 'qpcell[qupath]'")]
    out = [Check("paquo", paquo)]
    found = find_qupath_installation()
    if found.found:
        version = f"QuPath {found.version}" if found.version else "QuPath (version unknown)"
        out.append(Check("QuPath", f"{version} at {found.path} (via {found.source})"))
    else:
        out.append(Check("QuPath", f"not found ({found.detail})", False,
                         "install QuPath 0.4-0.6 and set PAQUO_QUPATH_DIR to its folder, e.g. "
                         "python -m paquo get_qupath --install-path ~/Applications 0.5.1; "
                         "or use the Groovy scripts in groovy/ from inside QuPath"))
    return out


def environment_checks() -> list[Check]:
    """Everything ``qpcell doctor`` reports without a project."""
    checks = [
        Check("python", f"{platform.python_version()} ({sys.executable})"),
        Check("qpcell", __version__),
        Check("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
    ]
    checks += torch_checks()
    for dist in ("numpy", "tiffslide", "shapely"):
        v = _version_of(dist)
        checks.append(Check(dist, v or "not installed", v is not None,
                            "" if v else f"pip install {dist}"))
    checks += qupath_checks()
    checks.append(java_check())
    return checks


def _print_checks(checks: list[Check]) -> None:
    table = Table(title="qpcell doctor", title_justify="left")
    table.add_column("")
    table.add_column("found")
    table.add_column("")
    for c in checks:
        mark = "[green]ok[/]" if c.ok else "[red]missing[/]"
        table.add_row(c.name, c.value + (f"\n[dim]{c.hint}[/]" if c.hint else ""), mark)
    console.print(table, highlight=False)


def _summary_counts(summary) -> str:
    if not summary:
        return "-"
    hierarchy = summary.get("hierarchy") or {}
    counts = hierarchy.get("objectTypeCounts") or {}
    parts = [f"{v} {k.lower()}" for k, v in counts.items() if k != "Root objects" and v]
    return ", ".join(parts) or "no objects"


def _fmt_size(img) -> str:
    return f"{img.width} x {img.height}" if img.width and img.height else "?"


def report_project(path: Path, image_root: list[str]) -> bool:
    """Print what the project files say; True when every image file was found."""
    from qpcell.annotate import rgb_hex
    from qpcell.io.qupath_project import read_project_info

    info = read_project_info(path, image_root=image_root or None)
    console.print(f"[bold]QuPath project[/] {escape(str(info.path))}", highlight=False)
    console.print(f"written by QuPath {info.version or '(version not recorded, before 0.2)'}; "
                  f"{len(info.images)} image(s), {len(info.classes)} class(es)",
                  highlight=False)
    table = Table(title="Images", title_justify="left")
    for col in ("id", "name", "size (px)", "µm/px", "server", "image file", "objects"):
        table.add_column(col, overflow="fold")
    for img in info.images:
        if img.exists:
            where = f"[green]found[/] {escape(str(img.path))}"
        elif img.path is not None:
            where = f"[red]missing[/] {escape(str(img.path))}"
        elif img.original_path is not None:
            where = (f"[red]missing[/] {escape(str(img.original_path))} (a path on another "
                     "computer)")
        else:
            where = f"[red]not a local file[/] {escape(str(img.uri or '-'))}"
        mpp = f"{img.mpp:.4g}" if img.mpp else "[yellow]unknown[/]"
        server = (img.server or "?").replace("ServerBuilder", "")
        table.add_row(img.entry_id, escape(img.name), _fmt_size(img), mpp, server, where,
                      _summary_counts(img.summary))
    console.print(table, highlight=False)
    if info.classes:
        classes = Table(title="Classes (classifiers/classes.json)", title_justify="left")
        classes.add_column("class")
        classes.add_column("colour")
        for c in info.classes:
            hexa = rgb_hex(c.color)
            classes.add_row(escape(c.name), f"[{hexa}]■[/] {hexa}")
        console.print(classes, highlight=False)

    problems: list[str] = []
    missing = [i for i in info.images if not i.exists]
    if missing:
        problems.append(f"{len(missing)} of {len(info.images)} image file(s) not found here: "
                        "pass --image-root OLD=NEW (the part of the path to replace) to "
                        "qpcell doctor / train / annotate-back, or relink them in QuPath")
    no_mpp = [i for i in info.images if not i.mpp]
    if no_mpp:
        problems.append(f"{len(no_mpp)} image(s) without a pixel size: set it in QuPath "
                        "(Image tab > Pixel width/height) or pass --mpp to train/predict")
    no_data = [i for i in info.images if not i.has_data]
    if no_data:
        problems.append(f"{len(no_data)} image(s) have no saved objects (data/<id>/data.qpdata"
                        " absent): nothing annotated there yet, or the data folder was not "
                        "copied with the project")
    if not (info.root / "classifiers" / "classes.json").is_file():
        problems.append("no classifiers/classes.json: class colours come from the annotations")
    problems += list(info.warnings)
    for p in problems:
        console.print(f"note: {escape(p)}", highlight=False, soft_wrap=True)
    if not problems:
        console.print("[green]everything the project refers to is here[/]")
    report_points(info.path, image_root, shown=info.warnings)
    return not missing


def report_points(path: Path, image_root: list[str], shown: tuple[str, ...] = ()) -> None:
    """Print the point annotations per image and class, read through QuPath when paquo
    finds it (the objects are in QuPath's own file format); else say how to read them.
    Notes already in ``shown`` are not repeated."""
    from qpcell.errors import QpcellError
    from qpcell.io.paquo import find_qupath_installation, read_qupath_project

    found = find_qupath_installation()
    if not found.found:
        console.print("Reading the annotations themselves needs QuPath (found through paquo) "
                      "or the Groovy export (groovy/qpcell-train.groovy).", highlight=False)
        return
    notes: list[str] = []
    try:
        classes, images = read_qupath_project(path, image_root=image_root or None,
                                              require_files=False, notes=notes)
    except QpcellError as err:
        console.print(f"note: the annotations could not be read through QuPath: {err}",
                      highlight=False, soft_wrap=True)
        return
    where = f"read through QuPath {found.version or ''} (paquo)".replace("  ", " ")
    if not images:
        console.print(f"no point annotations in the project ({where})", highlight=False)
        return
    table = Table(title=f"Point annotations per class ({where})", title_justify="left")
    table.add_column("image", overflow="fold")
    for c in classes:
        table.add_column(c.name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("regions", justify="right")
    totals = dict.fromkeys((c.name for c in classes), 0)
    for img in images:
        counts = img.counts()
        for name, k in counts.items():
            totals[name] = totals.get(name, 0) + k
        table.add_row(str(img.metadata.get("qupath_name", img.name)),
                      *(str(counts.get(c.name, 0)) for c in classes), str(len(img.xy)),
                      str(len(img.regions or [])) if img.regions is not None else "whole")
    table.add_row("[bold]all[/]", *(str(totals[c.name]) for c in classes),
                  str(sum(totals.values())), "")
    console.print(table, highlight=False)
    for note in dict.fromkeys(n for n in notes if n not in shown):
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


@app.command("doctor")
def doctor_command(
    project: Annotated[Path | None, typer.Argument(
        help="Optional QuPath project (project.qpproj or its folder) to check.")] = None,
    image_root: Annotated[list[str] | None, typer.Option(
        "--image-root", help="OLD=NEW prefix to remap moved images (repeatable).")] = None,
) -> None:
    """Check the installation (Python, torch, GPU, paquo, QuPath, Java).

    With a QuPath project: what it holds (images, sizes, pixel sizes, whether
    each image file is here, classes) and what is missing, without QuPath;
    where paquo finds QuPath, also the point annotations per image and class.
    """
    if project is None:
        _print_checks(environment_checks())
        return
    report_project(project, image_root or [])

