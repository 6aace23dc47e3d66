"""An exponential moving average (EMA) of a model's weights, for validation and the saved model.

Not in the papers. A run of a few hundred steps with batches of 8 patches ends wherever the
last noisy steps left it; the average of the recent weights is a smoother model. The averaging
itself is :class:`torch.optim.swa_utils.AveragedModel`; this module chooses the decay.

The decay warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``:
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the first steps, taken from
random weights, are forgotten quickly in a short run. Batch-norm statistics are averaged with
the weights (``use_buffers=True``); integer buffers (batch counts) take the model's value.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from qpcell.errors import QpcellError


def ema_decay(decay: float, n_updates: int) -> float:
    """The decay of the update that follows ``n_updates`` earlier ones:
    ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n_updates) / (10.0 + n_updates))


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An averaged copy of ``model`` (on its device) that :meth:`update_parameters` moves
    towards the model's weights by ``1 - ema_decay(decay, n)`` per update.

    Raises
    ------
    QpcellError
        When ``decay`` is not in (0, 1).
    """
    if not 0.0 < decay < 1.0:
        raise QpcellError(f"the EMA decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               n_averaged: torch.Tensor) -> None:
        d = ema_decay(decay, int(n_averaged))
        for a, c in zip(averaged, current, strict=True):
            if torch.is_floating_point(a):
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
