"""When training does what: the learning rate, the validation cadence and when to stop.

A run is either a number of epochs (the papers' way) or a time budget (a user's way: "train for
10 minutes"). Both are expressed as *progress*, a number from 0 at the first step to 1 at the
end, so the learning-rate schedule is one function of progress whichever way the run is
measured. Pure and clock-free: :class:`Budget` takes the clock as an argument, so tests drive
it with made-up times.

A time budget can also carry a *step cap* tied to the data (:func:`step_cap`): on a fast machine
ten minutes hold more steps than a few hundred annotated cells can use, and the run then
over-fits; with the cap the schedule spans whichever ends first, the time or the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qpcell.errors import QpcellError

LR_SCHEDULES = ("constant", "cosine")


def lr_at(progress: float, lr: float, schedule: str = "constant",
          warmup: float = 0.0) -> float:
    """The learning rate at ``progress`` (0 = first step, 1 = end of the run).

    ``"constant"``: ``lr`` throughout (S-DRDIN 2.3). ``"cosine"``: a half cosine from ``lr``
    down to 0 at progress 1. Either way a linear warm-up from ``lr / 10`` to ``lr`` over the
    first ``warmup`` of the run comes first (0: none).

    Examples
    --------
    >>> lr_at(0.5, 1e-3, "cosine")
    0.0005
    >>> round(lr_at(1.0, 1e-3, "cosine"), 12)
    0.0
    """
    if schedule not in LR_SCHEDULES:
        raise QpcellError(f"unknown learning-rate schedule {schedule!r}; choose from "
                          f"{', '.join(LR_SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise QpcellError(f"warm-up must be a fraction in [0, 1), got {warmup}")
    p = min(max(float(progress), 0.0), 1.0)
    if warmup and p < warmup:
        return lr * (0.1 + 0.9 * p / warmup)
    if schedule == "constant":
        return lr
    q = (p - warmup) / (1.0 - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * q))


def step_cap(area_px: float, batch_size: int, window_px: int, passes: float,
             min_steps: int = 0) -> int | None:
    """The steps after which a time-budgeted run stops even with time left.

    Parameters
    ----------
    area_px
        Summed area of the training images at the model's scale (pixels²).
    batch_size, window_px
        Windows per step and their side (pixels).
    passes
        How many times the windows may cover ``area_px`` in all; 0 = no cap (the time alone).
    min_steps
        The cap is never below this, so that a handful of small images still gets enough
        steps to learn from.

    Returns
    -------
    The number of steps, or ``None`` for no cap.

    Examples
    --------
    >>> step_cap(4 * 128 * 128, batch_size=8, window_px=128, passes=100)
    50
    >>> step_cap(4 * 128 * 128, batch_size=8, window_px=128, passes=100, min_steps=200)
    200
    """
    if passes < 0 or min_steps < 0:
        raise QpcellError(f"the passes over the data and the least steps must not be negative, "
                          f"got {passes} and {min_steps}")
    if not passes:
        return None
    steps = math.ceil(passes * float(area_px) / (batch_size * window_px * window_px))
    return max(steps, int(min_steps), 1)


#: The final validation's cost in in-run validations when it sees one view (maps of every
#: validation image, then every setting searched instead of the threshold alone).
FINAL_FACTOR = 3.0


def final_validation_factor(views: int) -> float:
    """:attr:`Budget.final_factor` for a final validation on the maps of ``views`` test-time
    views (:mod:`qpcell.views`): each view beyond the first adds one in-run validation's
    worth of maps (an upper bound: the in-run validation also searches the threshold).

    >>> final_validation_factor(1), final_validation_factor(4)
    (3.0, 6.0)
    """
    return FINAL_FACTOR + max(views - 1, 0)


@dataclass
class Budget:
    """A training run limited by wall-clock time, with validation at most ``val_share`` of it.

    Parameters
    ----------
    seconds
        The whole budget: training, validation and writing the model (seconds).
    val_share
        The largest share of the budget validation may take (the issue's ~10%).
    max_rounds
        Validate at most this often (evenly spread), however cheap validation is.
    final_factor
        The final validation (every setting searched, :mod:`qpcell.tuning`) costs about this
        many in-run validations (the threshold only, one view); it is reserved from the
        budget. :func:`final_validation_factor` gives it for the final validation's views.

    Call :meth:`start` with the clock's time, then after every step :meth:`progress`,
    :meth:`should_validate` and :meth:`done`; tell it what each validation cost with
    :meth:`validated`. The last validation and the writing of the model are reserved from the
    budget (:attr:`reserve`, the last validation's cost plus a margin), so the run ends on time.
    """

    seconds: float
    val_share: float = 0.1
    max_rounds: int = 8
    final_factor: float = FINAL_FACTOR
    max_steps: int | None = None
    t0: float = 0.0
    val_cost: float = 0.0
    val_total: float = 0.0
    last_val: float = 0.0
    last_progress: float = 0.0
    rounds: int = 0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise QpcellError(f"the time budget must be positive, got {self.seconds} s")
        if not 0.0 < self.val_share < 1.0:
            raise QpcellError(f"val_share must be in (0, 1), got {self.val_share}")
        if self.max_steps is not None and self.max_steps < 1:
            raise QpcellError(f"the step cap must be at least 1, got {self.max_steps}")

    def start(self, now: float) -> None:
        """Start the clock at ``now`` (seconds)."""
        self.t0 = self.last_val = float(now)

    @property
    def reserve(self) -> float:
        """Seconds kept back for the final validation and writing the model."""
        return self.final_factor * self.val_cost + 2.0

    @property
    def train_seconds(self) -> float:
        """Seconds available to training steps and in-run validations."""
        return max(self.seconds - self.reserve, 1e-9)

    def progress(self, now: float, steps: int = 0) -> float:
        """Share of the run done at ``now`` after ``steps`` steps, in [0, 1]: the time's share,
        or the step cap's when that is larger."""
        by_time = (now - self.t0) / self.train_seconds
        by_steps = steps / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(0.0, by_time, by_steps))

    def done(self, now: float, steps: int = 0) -> bool:
        """True when no time (or no step of the cap) is left for another step."""
        return self.progress(now, steps) >= 1.0

    def cost_interval(self) -> float:
        """Training seconds between validations so that the in-run validations take at most
        half of ``val_share`` (the final one takes about the other half)."""
        share = self.val_share / 2
        return self.val_cost * (1.0 - share) / share

    def should_validate(self, now: float, steps: int = 0) -> bool:
        """True when it is time for a validation round: at least ``1 / max_rounds`` of the run
        and the :meth:`cost_interval` since the last one, and never in the last stretch, where
        the final validation follows anyway."""
        if self.done(now, steps):
            return False
        round_share = 1.0 / max(1, self.max_rounds)
        p = self.progress(now, steps)
        since, left = now - self.last_val, self.t0 + self.train_seconds - now
        return (p - self.last_progress >= round_share - 1e-9
                and since >= self.cost_interval()
                and 1.0 - p > 0.5 * round_share and left > 0.5 * self.cost_interval())

    def validated(self, now: float, cost: float, steps: int = 0) -> None:
        """Record a validation that ended at ``now``, took ``cost`` seconds and followed
        ``steps`` steps."""
        self.val_cost = max(self.val_cost, float(cost)) if self.rounds == 0 else \
            0.5 * (self.val_cost + float(cost))
        self.val_total += float(cost)
        self.last_val = float(now)
        self.last_progress = self.progress(now, steps)
        self.rounds += 1

    def left(self, now: float, steps: int = 0) -> float:
        """Seconds of the whole budget left at ``now``; with a step cap, at most the time the
        remaining steps take at the rate so far (plus the final validation)."""
        left = max(0.0, self.t0 + self.seconds - now)
        if self.max_steps and steps > 0 and now > self.t0:
            per_step = (now - self.t0) / steps
            left = min(left, max(0, self.max_steps - steps) * per_step + self.reserve)
        return left


__all__ = ["LR_SCHEDULES", "FINAL_FACTOR", "lr_at", "step_cap", "final_validation_factor",
           "Budget"]
