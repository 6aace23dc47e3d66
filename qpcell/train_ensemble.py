"""Training an ensemble: :func:`qpcell.train.train` once per member, then the ensemble folder.

Member ``k`` (1-based) trains with seed ``seed + k - 1``. The first member trains in ``OUT``
itself, as a single model does; only when a second member is due do its files move to
``OUT/members/member-1``, beside the members that follow, and ``OUT/config.json`` then
describes the ensemble. With a time budget the first member gets the whole budget and ends
early only at its step cap; another member starts while the budget left holds about one more
(:func:`qpcell.ensemble.another_member`). A ledger (``OUT/members/ensemble.json``) records each
member's seed, budget and time, so that ``--resume`` continues the member that was
interrupted and then decides on the next ones as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from qpcell.checkpoint import read_config, save_ensemble
from qpcell.config import PostprocessConfig, TrainConfig, from_dict, to_dict
from qpcell.distributed import env_ranks
from qpcell.ensemble import MEMBERS_DIR, another_member, combined_postprocess, member_name
from qpcell.errors import QpcellError
from qpcell.io.atomic import atomic_write_text
from qpcell.points import AnnotatedImage, CellClass
from qpcell.train import (
    RESUME,
    TrainCallbacks,
    TrainingInterrupted,
    TrainResult,
    read_state,
    train,
)
from qpcell.train_guard import RUN_FILES
from qpcell.views import DEFAULT_VIEWS

LEDGER = "ensemble.json"


def _read_ledger(folder: Path) -> dict:
    path = folder / LEDGER
    if not path.exists():
        raise QpcellError("nothing to resume (no ensemble.json)", folder)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QpcellError(f"cannot read the ensemble's ledger ({err})", path) from None


def _write_ledger(folder: Path, ledger: dict) -> None:
    atomic_write_text(folder / LEDGER, json.dumps(ledger, indent=2))


def write_ensemble(out: Path, members: Sequence[Path]) -> Path:
    """Write ``out/config.json`` for the finished model folders ``members`` (inside ``out``):
    their classes, scale and mask, and the combined post-processing
    (:func:`qpcell.ensemble.combined_postprocess`)."""
    configs = [read_config(m) for m in members]
    first = configs[0]
    views = {c.get("views", DEFAULT_VIEWS) for c in configs}
    if len(views) > 1:  # settings tuned on other maps cannot be combined
        raise QpcellError(f"the members were tuned for different test-time views "
                          f"({', '.join(sorted(views))})", out)
    post = combined_postprocess([from_dict(PostprocessConfig, c["postprocess"])
                                 for c in configs])
    meta = {k: first[k] for k in ("classes", "mpp", "mask", "postprocess_kind")}
    meta["views"] = views.pop()
    meta["postprocess"] = to_dict(post)
    meta["training"] = {"members": [c.get("training") or {} for c in configs],
                        "source_mpp": (first.get("training") or {}).get("source_mpp")}
    return save_ensemble(out, members, meta)


def train_ensemble(images: Sequence[AnnotatedImage], classes: Sequence[CellClass],
                   out: str | Path, *, members: int | None, max_members: int,
                   train_cfg: TrainConfig, resume: bool = False,
                   callbacks_for: Callable[[int], TrainCallbacks | None] = lambda k: None,
                   on_note: Callable[[str], None] = lambda text: None,
                   **train_kwargs) -> list[TrainResult]:
    """Train an ensemble's members (the first in ``out`` itself, see the module notes) and,
    when there is more than one, describe the ensemble in ``out/config.json``.

    Parameters
    ----------
    members
        How many members; ``None``: as many as the time budget holds, at most
        ``max_members`` (one without a time budget, and one under torchrun).
    train_cfg
        Each member's settings; its ``seed`` is the first member's, its ``time_budget_s``
        (seconds) the whole ensemble's.
    resume
        Continue the interrupted run in ``out`` (its ledger says where it stopped).
    callbacks_for
        Progress callbacks for member ``k`` (1-based).
    train_kwargs
        Passed on to :func:`qpcell.train.train` (model, scale, recipe parts, device, ...).

    Returns
    -------
    The :class:`qpcell.train.TrainResult` of each member trained (or resumed) by this call,
    in order.
    """
    out = Path(out)
    folder = out / MEMBERS_DIR
    budget_s = train_cfg.time_budget_s
    if members is not None and members < 1:
        raise QpcellError(f"--members {members}: give at least 1 (or 'auto')")
    limit = members or (max_members if budget_s else 1)
    if env_ranks()[1] > 1:  # under torchrun the ranks would have to agree on every member
        if limit > 1 and members is not None:
            raise QpcellError(f"--members {members}: an ensemble trains in one process; under "
                              "torchrun give --members 1 (or auto, which trains one model)")
        limit = 1
    if resume and (folder / LEDGER).exists():
        ledger = _read_ledger(folder)
    else:  # a new run, or one interrupted in its first member (which trains in out)
        first = {"folder": ".", "seed": train_cfg.seed, "seconds": None,
                 "budget_s": budget_s if members is None or budget_s is None
                 else budget_s / limit}
        ledger = {"budget_s": budget_s, "members": [first]}
    results: list[TrainResult] = []
    for k in range(1, limit + 1):
        if k > len(ledger["members"]):
            entry = _next_member(ledger, k, members, limit, train_cfg)
            if entry is None:
                break
            if k == 2:
                _move_first_member(out, folder)
                ledger["members"][0]["folder"] = f"{MEMBERS_DIR}/{member_name(1)}"
            ledger["members"].append(entry)
            on_note(f"member {k} of the ensemble (seed {entry['seed']}, "
                    + (f"{entry['budget_s'] / 60:.1f} min): the step cap ended the members "
                       "before it early" if members is None else f"of {limit})"))
        entry = ledger["members"][k - 1]
        if entry["seconds"] is not None:  # finished before the run was interrupted
            continue
        if k > 1:
            folder.mkdir(parents=True, exist_ok=True)
            _write_ledger(folder, ledger)
        sub = out / entry["folder"]
        again = resume and (sub / RESUME).exists()
        earlier = float(read_state(sub).get("elapsed", 0.0)) if again else 0.0
        start = time.perf_counter()
        cfg = replace(train_cfg, seed=int(entry["seed"]), time_budget_s=entry["budget_s"])
        try:
            results.append(train(images, classes, sub, train_cfg=cfg, resume=again,
                                 callbacks=callbacks_for(k), **train_kwargs))
        except TrainingInterrupted as err:
            if k == 1:
                raise
            done = [out / m["folder"] for m in ledger["members"] if m["seconds"] is not None]
            write_ensemble(out, done)
            raise TrainingInterrupted(
                f"interrupted in member {k} of the ensemble; the {len(done)} finished "
                f"member(s) are kept in {out}, ready to use; continue with --resume",
                err.path) from None
        entry["seconds"] = earlier + time.perf_counter() - start
        if k > 1:
            _write_ledger(folder, ledger)
    if len(ledger["members"]) > 1:
        write_ensemble(out, [out / m["folder"] for m in ledger["members"]])
    return results


def _move_first_member(out: Path, folder: Path) -> None:
    """Move the first member's files from ``out`` to ``folder/member-1`` (renames)."""
    sub = folder / member_name(1)
    sub.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_FILES, "epochs"):
        if (out / name).exists():
            os.replace(out / name, sub / name)


def _next_member(ledger: dict, k: int, members: int | None, limit: int,
                 train_cfg: TrainConfig) -> dict | None:
    """The ledger entry of member ``k`` >= 2 (its folder, seed and seconds of budget), or
    None when the budget left does not hold it. ``members`` None (auto): the budget left goes to the
    next member while it holds about one more (:func:`qpcell.ensemble.another_member`); a
    number: the budget left is shared evenly among the members still to train."""
    budget_s = ledger["budget_s"]
    member_budget = budget_s
    if budget_s is not None:
        spent = [m["seconds"] for m in ledger["members"]]
        left = budget_s - sum(spent)
        if members is None and not another_member(left, spent, limit):
            return None
        if left <= 0:
            return None
        member_budget = left if members is None else left / (limit - k + 1)
    return {"folder": f"{MEMBERS_DIR}/{member_name(k)}", "seed": train_cfg.seed + k - 1,
            "budget_s": member_budget, "seconds": None}


__all__ = ["LEDGER", "write_ensemble", "train_ensemble"]
