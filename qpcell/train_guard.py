"""Guards of a training run: what may be written where, and whether a resume fits.

Three checks, each a plain function the trainer and the command line call once:

* :func:`prepare_model_folder`: ``--out`` must be new or empty, unless the run resumes the
  model there (``resume``) or replaces it (``overwrite``); a model is never overwritten, and
  its log never mixed with another run's, by accident.
* :func:`check_resume_state`: a resume state continues only the run it was written by: same
  classes in the same order, same architecture. Otherwise one line says what differs.
* :func:`training_notes`: what the user should know about the data before a long run
  (one image validates on itself).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from qpcell.ensemble import MEMBERS_DIR
from qpcell.errors import QpcellError
from qpcell.points import AnnotatedImage, CellClass

#: Files a training run writes into its model folder (and each part's sub-folder).
RUN_FILES = ("config.json", "weights.safetensors", "resume.pt", "train_log.txt")
#: Sub-folders a run writes: pipeline parts, MTL-IHC's prior model, kept epochs.
RUN_FOLDERS = ("detection", "classification", "prior", "epochs")
#: Files of an earlier run that ``overwrite`` removes before training (the new run replaces
#: the model itself when it writes its model).
STALE_FILES = ("resume.pt", "train_log.txt")
_EPOCH_DIR = re.compile(r"^epoch-\d+$")
_MEMBER_DIR = re.compile(r"^member-\d+$")


def _run_files(folder: Path) -> list[Path]:
    """The training-run files in ``folder`` and its run sub-folders."""
    found = [folder / n for n in RUN_FILES if (folder / n).is_file()]
    for sub in RUN_FOLDERS:
        if (folder / sub).is_dir():
            found += [folder / sub / n for n in RUN_FILES if (folder / sub / n).is_file()]
            found += [p for p in (folder / sub).iterdir() if _EPOCH_DIR.match(p.name)]
    members = folder / MEMBERS_DIR  # an ensemble's members: each a run folder of its own
    if members.is_dir() and any(_run_files(p) for p in members.iterdir()
                                if _MEMBER_DIR.match(p.name)):
        found.append(members)
    return found


def prepare_model_folder(out: str | Path, *, resume: bool = False,
                         overwrite: bool = False) -> None:
    """Decide whether a training run may write the model folder ``out``.

    A new or empty folder is fine. A folder holding a model (or an interrupted run) needs
    ``resume`` (continue it) or ``overwrite`` (replace it: the old resume state, log and
    kept epochs are removed now, the model files when the new run writes its model).
    A folder holding anything else is never written into.

    Raises
    ------
    QpcellError
        Naming ``out`` and what to do, when the folder may not be written.
    """
    out = Path(out)
    if resume and overwrite:
        raise QpcellError("give --resume (continue the run in --out) or --overwrite (replace "
                          "it), not both")
    if out.exists() and not out.is_dir():
        raise QpcellError("is a file; --out names the model folder to write", out)
    if not out.is_dir():
        return
    held = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not held:
        return
    run = _run_files(out)
    if not run:
        names = ", ".join(sorted(p.name for p in held)[:3])
        raise QpcellError(f"holds files that are not a qpcell model ({names}"
                          f"{', ...' if len(held) > 3 else ''}); choose a new or empty --out "
                          "folder", out)
    if resume:
        return
    if not overwrite:
        what = ("a trained model" if (out / "config.json").is_file()
                else "an unfinished training run")
        raise QpcellError(f"already holds {what} ({', '.join(p.name for p in run[:3])}); "
                          "--resume continues it, --overwrite replaces it, or choose another "
                          "--out", out)
    for path in run:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name in STALE_FILES:
            path.unlink()


def _spec_text(spec: Mapping | None) -> str:
    if not spec:
        return "an unknown architecture"
    extras = ", ".join(f"{k} {spec[k]}" for k in ("base", "backbone", "n_classes") if k in spec)
    return f"{spec.get('name', '?')}" + (f" ({extras})" if extras else "")


def check_resume_state(state: Mapping, model: torch.nn.Module,
                       classes: Sequence[CellClass], folder: str | Path) -> None:
    """Refuse to resume a run whose classes or architecture differ from this one.

    Parameters
    ----------
    state
        The resume state (``resume.pt``, loaded with ``weights_only=True``).
    model
        The model this run built (its ``state_dict`` must match the saved one exactly).
    classes
        This run's class list, in order; the saved run's is read from ``folder``'s
        ``config.json`` (or from ``state["classes"]`` when a state carries it).
    folder
        The model folder being resumed.

    Raises
    ------
    QpcellError
        One line naming ``folder`` and what differs.
    """
    import json

    folder = Path(folder)
    config: dict = {}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    saved = state.get("classes") or [c.get("name") for c in config.get("classes") or []
                                     if isinstance(c, dict)]
    names = [c.name for c in classes]
    if saved and list(saved) != names:
        how = ("in another order" if sorted(saved) == sorted(names) else "other classes")
        raise QpcellError(f"cannot resume: that run was trained on {', '.join(saved)} and this "
                          f"data gives {', '.join(names)} ({how}); restore the class list "
                          "(classes.json), or start afresh with --overwrite", folder)
    old = state.get("model") or {}
    new = model.state_dict()
    differs = set(old) != set(new) or any(
        tuple(old[k].shape) != tuple(new[k].shape) for k in new if k in old)
    if differs:
        spec = getattr(model, "spec", None)
        raise QpcellError(f"cannot resume: that run trained {_spec_text(config.get('model'))}, "
                          f"this command builds {_spec_text(spec() if spec else None)}; "
                          "resume with the same --model and --base, or start afresh with "
                          "--overwrite", folder)


def training_notes(images: Sequence[AnnotatedImage], val_names: Sequence[str] | None = None
                   ) -> list[str]:
    """Lines the user should read before training on ``images``."""
    notes = []
    if len(images) == 1 and not val_names:
        notes.append(f"only one image ({images[0].name}): it is used for training and for "
                     "validation, so the validation scores and the tuned threshold are "
                     "optimistic; annotate a second image to validate on")
    return notes
