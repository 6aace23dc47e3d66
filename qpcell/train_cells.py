"""Training the cell classifier (:mod:`qpcell.models.cell_classifier`) on the annotated cells.

Each step draws ``batch`` annotated cells of the training images, a cell of class ``k`` with
probability proportional to ``count_k ** -0.5`` (rare classes drawn more often, not as often as
the common ones), cuts the window (the crop and its margins) centred on it, shifted by up to
``jitter_px`` pixels (a detected cell lies a pixel or two from where it was clicked), flips and
turns it, scales its brightness by up to 10%, and takes one AdamW step on the cross-entropy.
The learning rate falls along a cosine to 0 by the end: the step count or the seconds,
whichever comes first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qpcell.errors import QpcellError
from qpcell.models.cell_classifier import CellClassifier
from qpcell.patches import PAD_VALUE

BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
JITTER_PX = 2
CLASS_POWER = 0.5  # a cell of class k is drawn with weight count_k ** -CLASS_POWER
BRIGHTNESS = 0.1


def cell_crops(pixels: np.ndarray, xy: np.ndarray, side: int) -> np.ndarray:
    """``(N, side, side, 3)`` uint8 crops of ``pixels`` (H, W, 3) centred on the points ``xy``
    (N, 2; x = column, y = row, pixels), white beyond the image.

    The crop of a point at pixel ``p`` (rounded) covers ``[p - side // 2, p + side // 2)``.
    White, as in training windows (:data:`qpcell.patches.PAD_VALUE`) and as a slide reads
    beyond its edge, so that a cell near an image's edge looks alike in training, in
    validation and in ``qpcell predict``'s tiles.
    """
    half = side // 2
    padded = np.pad(pixels[..., :3], ((half, half), (half, half), (0, 0)),
                    constant_values=PAD_VALUE)
    cols = np.rint(np.asarray(xy, float)[:, 0]).astype(int).clip(0, pixels.shape[1] - 1)
    rows = np.rint(np.asarray(xy, float)[:, 1]).astype(int).clip(0, pixels.shape[0] - 1)
    out = np.empty((len(cols), side, side, 3), np.uint8)
    for i, (c, r) in enumerate(zip(cols, rows, strict=True)):
        out[i] = padded[r:r + side, c:c + side]
    return out


def draw_weights(labels: np.ndarray, n_classes: int, power: float = CLASS_POWER) -> np.ndarray:
    """Each cell's probability of being drawn: ``count_k ** -power`` for its class ``k``,
    normalised to sum to 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    w = np.where(counts[labels] > 0, counts[labels], 1.0) ** -power
    return w / w.sum()


@dataclass
class CellTraining:
    """What the classifier's training did."""

    steps: int
    seconds: float
    first_loss: float  # mean of the first tenth of the steps
    last_loss: float  # mean of the last tenth


def _augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    if rng.random() < 0.5:
        batch = batch.flip(3)
    turns = int(rng.integers(4))
    if turns:
        batch = torch.rot90(batch, turns, (2, 3))
    scale = 1.0 + BRIGHTNESS * (2 * torch.from_numpy(rng.random((len(batch), 1, 1, 1))) - 1)
    return (batch * scale.to(batch)).clamp_(0.0, 1.0)


def fit_cell_classifier(model: CellClassifier, images: Sequence[tuple], *, steps: int,
                        seconds: float | None = None, device: torch.device | None = None,
                        amp: torch.dtype | None = None,
                        layout: torch.memory_format = torch.contiguous_format, seed: int = 0
                        ) -> CellTraining:
    """Train ``model`` on the cells of ``images`` (``(pixels, xy, labels)`` at the model's
    scale) for ``steps`` steps or ``seconds`` seconds, whichever ends first.

    ``amp`` autocasts the forward pass (bf16 where the run trains in it).
    """
    device = device or torch.device("cpu")
    side = model.window_px + 2 * JITTER_PX
    parts = [(cell_crops(px, xy, side), np.asarray(lab, int)) for px, xy, lab in images
             if len(xy)]
    if not parts:
        raise QpcellError("no annotated cells to train the cell classifier on")
    crops = torch.from_numpy(np.concatenate([c for c, _ in parts]))  # (N, s, s, 3) uint8
    labels = np.concatenate([lab for _, lab in parts])
    weights = draw_weights(labels, model.n_classes)
    target = torch.from_numpy(labels).long()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.to(device).to(memory_format=layout).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": rest, "weight_decay": 0.0}], lr=LR)
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        elapsed = time.perf_counter() - t0
        if seconds is not None and elapsed >= seconds:
            break
        progress = max(step / steps, elapsed / seconds if seconds else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = LR * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        idx = rng.choice(len(labels), BATCH, p=weights)
        dx, dy = rng.integers(0, 2 * JITTER_PX + 1, 2)
        x = crops[idx][:, dy:dy + model.window_px, dx:dx + model.window_px]
        x = _augment(x.permute(0, 3, 1, 2).float().div_(255.0), rng)
        x = x.to(device).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target[idx].to(device))
        if not torch.isfinite(loss):
            raise QpcellError(f"the cell classifier's training diverged at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
    model.eval()
    tenth = max(1, len(losses) // 10)
    return CellTraining(step, time.perf_counter() - t0,
                        float(np.mean(losses[:tenth])) if losses else math.nan,
                        float(np.mean(losses[-tenth:])) if losses else math.nan)


def classifier_steps(n_cells: int, passes: float, min_steps: int) -> int:
    """Steps that draw ``passes`` times as many crops as there are training cells, at least
    ``min_steps``."""
    return max(int(min_steps), math.ceil(passes * n_cells / BATCH))


__all__ = ["BATCH", "CellTraining", "cell_crops", "classifier_steps", "draw_weights",
           "fit_cell_classifier"]
