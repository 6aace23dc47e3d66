"""Ensembles: models trained alike from other seeds, their probability maps averaged.

A time budget that outlasts the step cap (:func:`qpcell.schedule.step_cap`, which ends a run
once more steps would only over-fit the annotations) buys nothing more from one model. It
buys another model: trained the same way from the next seed, so it starts from other weights,
sees other patches and validates on other images. The members' detection and class maps are
averaged, and the averaged maps are post-processed once. Each member costs a model's
prediction time, so the number of members is bounded (:data:`MAX_MEMBERS`).

The member models live in ``OUT/members/member-K`` (complete model folders, usable alone);
``OUT/config.json`` (``"kind": "ensemble"``) lists them with the combined post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from qpcell.config import PostprocessConfig

#: Sub-folder of a model folder that holds an ensemble's members.
MEMBERS_DIR = "members"
#: The most members ``--members auto`` trains: each one adds a model's prediction time.
MAX_MEMBERS = 3
#: Another member starts only when the budget left holds this share of a member's time
#: (the members so far, on average): with less, it would end by the clock well short of the
#: step cap, a weaker model pulling the average down.
MIN_TIME_SHARE = 0.9


def member_name(k: int) -> str:
    """Sub-folder (under :data:`MEMBERS_DIR`) of member ``k`` (1-based)."""
    return f"member-{k}"


def another_member(left_s: float, spent_s: Sequence[float], max_members: int) -> bool:
    """True when a time budget with ``left_s`` seconds left should train one more member.

    Parameters
    ----------
    left_s
        Seconds of the budget not yet spent.
    spent_s
        Seconds each member so far took (training, validation and writing).
    max_members
        The most members to train.
    """
    if not spent_s or len(spent_s) >= max_members:
        return False
    return left_s >= MIN_TIME_SHARE * float(np.mean(spent_s))


def mean_maps(maps: Sequence[tuple[np.ndarray, np.ndarray | None]]
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """The members' detection ``(B, H, W)`` and class ``(B, C, H, W)`` maps, averaged
    (float32; class maps None when the members have none)."""
    if not maps:
        raise ValueError("no maps to average")
    det = np.mean(np.stack([m[0] for m in maps]), axis=0, dtype=np.float32)
    if maps[0][1] is None:
        return det, None
    cls = np.mean(np.stack([m[1] for m in maps]), axis=0, dtype=np.float32)
    return det, cls


def combined_postprocess(posts: Sequence[PostprocessConfig]) -> PostprocessConfig:
    """Post-processing for the averaged maps, from the members' tuned settings: the mean
    detection threshold, the geometric mean of the class gains (a member without gains
    counts as all 1), and for the window sizes, the minimum area and the neighbours' share of
    the classes the members' median (the lower one of an even count, so that it is
    a value some member chose).

    The members validated on different images, and every image some member validated on was
    another member's training image, so no image is left to tune the ensemble on honestly.
    """
    if not posts:
        raise ValueError("an ensemble needs at least one member")

    def median(name: str):
        values = sorted(getattr(p, name) for p in posts)
        return values[(len(values) - 1) // 2]

    n = max(len(p.class_gain) for p in posts)  # a member without gains has every gain 1
    gain = tuple(float(math.exp(v)) for v in np.mean(
        [np.log(p.class_gain or (1.0,) * n) for p in posts], axis=0)) if n else ()
    return replace(posts[0], threshold=float(np.mean([p.threshold for p in posts])),
                   min_area_px=median("min_area_px"), peak_window_px=median("peak_window_px"),
                   class_box_px=median("class_box_px"),
                   context_weight=median("context_weight"), class_gain=gain)


__all__ = ["MEMBERS_DIR", "MAX_MEMBERS", "MIN_TIME_SHARE", "member_name", "another_member",
           "mean_maps", "combined_postprocess"]
