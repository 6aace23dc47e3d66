"""When training does what: the learning rate, the validation cadence and when to stop.

A run is either a number of epochs (the papers' way) or a time budget (a user's way: "train for
10 minutes"). Both are expressed as *progress*, a number from 0 at the first step to 1 at the
end, so the learning-rate schedule is one function of progress whichever way the run is
measured. Pure and clock-free: :class:`Budget` takes the clock as an argument, so tests drive
it with made-up times.
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
        many in-run validations (the threshold only); it is reserved from the budget.

    Call :meth:`start` with the clock's time, then after every step :meth:`progress`,
    :meth:`should_validate` and :meth:`done`; tell it what each validation cost with
    :meth:`validated`. The last validation and the writing of the model are reserved from the
    budget (:attr:`reserve`, the last validation's cost plus a margin), so the run ends on time.
    """

    seconds: float
    val_share: float = 0.1
    max_rounds: int = 8
    final_factor: float = 3.0
    t0: float = 0.0
    val_cost: float = 0.0
    val_total: float = 0.0
    last_val: float = 0.0
    rounds: int = 0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise QpcellError(f"the time budget must be positive, got {self.seconds} s")
        if not 0.0 < self.val_share < 1.0:
            raise QpcellError(f"val_share must be in (0, 1), got {self.val_share}")

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

    def progress(self, now: float) -> float:
        """Share of the training time used at ``now``, in [0, 1]."""
        return min(1.0, max(0.0, (now - self.t0) / self.train_seconds))

    def done(self, now: float) -> bool:
        """True when no time is left for another step."""
        return self.progress(now) >= 1.0

    def interval(self) -> float:
        """Training seconds between validations: long enough that the in-run validations take
        at most half of ``val_share`` (the final one takes about the other half), and at least
        ``1 / max_rounds`` of the training time."""
        share = self.val_share / 2
        by_cost = self.val_cost * (1.0 - share) / share
        return max(by_cost, self.train_seconds / max(1, self.max_rounds))

    def should_validate(self, now: float) -> bool:
        """True when it is time for a validation round (never in the last stretch, where the
        final validation follows anyway)."""
        if self.done(now):
            return False
        since = now - self.last_val
        left = self.t0 + self.train_seconds - now
        return since >= self.interval() and left > 0.5 * self.interval()

    def validated(self, now: float, cost: float) -> None:
        """Record a validation that ended at ``now`` and took ``cost`` seconds."""
        self.val_cost = max(self.val_cost, float(cost)) if self.rounds == 0 else \
            0.5 * (self.val_cost + float(cost))
        self.val_total += float(cost)
        self.last_val = float(now)
        self.rounds += 1

    def left(self, now: float) -> float:
        """Seconds of the whole budget left at ``now``."""
        return max(0.0, self.t0 + self.seconds - now)


__all__ = ["LR_SCHEDULES", "lr_at", "Budget"]
