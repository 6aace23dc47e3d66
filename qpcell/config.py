"""Constants from the two source papers, in one place, each with the paper's value as default.

"S-DRDIN" = paper 000 (symmetric dense inception network, multiplex IHC);
"MTL-IHC" = paper 003 (multi-task IHC cytoplasm-staining framework).
Every pixel constant is stated at the resolution ``mpp`` (µm per pixel) it was given at;
use :meth:`PostprocessConfig.scaled` to carry it to another resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

PAPER_MPP = 0.44  # S-DRDIN 2.2: 40x scans rescaled to 20x, 0.44 µm/pixel


@dataclass(frozen=True)
class MaskConfig:
    """Label masks drawn from point annotations (pixels at ``mpp``)."""

    disc_radius_px: float = 2.0  # S-DRDIN 2.2: circle of radius r = 2 px at each dot
    mpp: float = PAPER_MPP  # S-DRDIN 2.2


@dataclass(frozen=True)
class PatchConfig:
    """Training patches (pixels at the model's µm/px)."""

    size: int = 224  # S-DRDIN 2.2: 224x224 patches
    stride: int = 120  # S-DRDIN 2.2: stride of 120 pixels
    background_fraction: float = 0.1  # share of cell-free patches kept (not in the paper)
    flips: bool = True  # S-DRDIN 2.2: random horizontal and vertical flips
    rotate90: bool = False  # optional, not in the paper
    # Not in the paper: windows holding a cell of a rare class (under rare_share of the
    # training points) are drawn rare_repeats more times per epoch; 0 = the paper's sampling.
    rare_share: float = 0.05
    rare_repeats: int = 0
    # Not in the paper: "grid" = the S-DRDIN 2.2 stride grid over every image; "cells" = each
    # window centred near a random annotated cell (plus background_fraction anywhere), drawn
    # anew every round (qpcell.patches.cell_windows).
    sampling: str = "grid"
    # "cells" sampling: a cell of class c is drawn with weight share_c ** -class_balance
    class_balance: float = 0.0
    colour_jitter: float = 0.0  # HED stain + brightness/contrast jitter strength (qpcell.augment)
    # Not in the paper: each window is read at a random scale between 1 / (1 + j) and 1 + j
    # (log-uniform; j = scale_jitter, 0 = off) and resized to ``size``: nuclei vary in size
    # between tissues and the working scale of an image without a pixel size is an estimate
    scale_jitter: float = 0.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Detection map -> cells, S-DRDIN 2.5 (pixels at ``mpp``)."""

    threshold: float = 0.5  # S-DRDIN 2.5: tuned for F1 on validation; 0.5 before tuning
    min_area_px: float = 50.0  # S-DRDIN 2.5: components smaller than 50 px are dropped
    peak_window_px: int = 15  # S-DRDIN 2.5: local maxima in a 15x15 window
    class_box_px: int = 49  # S-DRDIN 2.5: mean class probability in a 49x49 box
    # Not in the papers: per-class factors on the box means before the class is chosen (a
    # prior shift, p'_c = g_c p_c / sum_k g_k p_k), tuned on validation so that rare classes
    # are predicted at all; () = every factor 1, the paper's plain argmax.
    class_gain: tuple[float, ...] = ()
    # Not in the papers: each cell's class probabilities are mixed with the mean of those of
    # the other cells within context_radius_px, with weight context_weight (0 = off, the
    # papers), before the gains: tissue classes such as epithelium and stroma come in groups.
    # Training tunes the weight on validation where a radius is given (qpcell.tuning).
    context_radius_px: float = 0.0
    context_weight: float = 0.0
    mpp: float = PAPER_MPP  # S-DRDIN 2.2

    def scaled(self, mpp: float) -> PostprocessConfig:
        """The same physical sizes at another pixel size ``mpp`` (µm/px).

        Lengths scale with ``self.mpp / mpp``, areas with its square; windows stay odd.
        """
        f = self.mpp / mpp

        def odd(n: float) -> int:
            k = max(1, round(n))
            return k if k % 2 else k + 1

        return replace(self, min_area_px=self.min_area_px * f * f,
                       peak_window_px=odd(self.peak_window_px * f),
                       class_box_px=odd(self.class_box_px * f),
                       context_radius_px=self.context_radius_px * f, mpp=mpp)

    @property
    def reach_px(self) -> int:
        """How far (pixels) post-processing looks around a cell: the tile halo must cover it
        (the neighbours that give a cell its context, and what they look at)."""
        reach = max(self.class_box_px, self.peak_window_px) // 2 + 1
        if self.context_weight > 0:
            reach += math.ceil(self.context_radius_px)
        return reach


@dataclass(frozen=True)
class MatchConfig:
    """Matching radius used to score detections against points."""

    radius_px: float = 10.0  # S-DRDIN 2.5: a prediction within 10 px of an annotation is a TP
    mpp: float = PAPER_MPP


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings, S-DRDIN 2.3 unless noted."""

    epochs: int = 100  # S-DRDIN 2.3: 100 epochs
    batch_size: int = 4  # S-DRDIN 2.3: batch size 4
    lr: float = 1e-3  # S-DRDIN 2.3: Adam, learning rate 1e-3
    # S-DRDIN 2.3 keeps the learning rate constant; "cosine" lowers it to 0 by the last epoch
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # S-DRDIN: none stated
    # Not in the papers: AdamW's decoupled decay (Loshchilov & Hutter, ICLR 2019) of the
    # convolution and linear weights instead of Adam's L2 term on every parameter
    decoupled_weight_decay: bool = False
    val_fraction: float = 0.3  # S-DRDIN 2.1: 7:3 train/validation split
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers; None = by device and cores
    # "auto": bfloat16 autocast where the hardware computes bf16 natively (CUDA; CPUs with
    # AVX512-BF16 or AMX: about 2.5x faster steps here), channels-last with it; "fp32" or
    # "bf16" (qpcell.device.training_layout)
    precision: str = "auto"
    # Which epoch's model is kept. S-DRDIN 2.3 does not say; "detection" keeps the best
    # validation detection F1 (ties: weighted classification F1), "combined" the best mean of
    # the two, for models that classify (detection-only models always use detection F1).
    select_on: str = "detection"  # one of SELECT_ON
    keep_epochs: bool = False  # also save every epoch's model under <out>/epochs/
    # Not in the papers: a linear warm-up over this share of the run before the schedule
    warmup: float = 0.0
    # Not in the papers: train for this many seconds (wall clock, validation and writing the
    # model included) instead of ``epochs``; the schedule spans the time (qpcell.schedule)
    time_budget_s: float | None = None
    val_share: float = 0.1  # a time-budgeted run validates for at most this share of it
    # Not in the papers: a time-budgeted run also stops once its windows have covered the
    # training images' area (at the model's scale) this many times, but not before min_steps
    # steps (qpcell.schedule.step_cap); 0 = the time alone
    max_passes: float = 0.0
    min_steps: int = 0
    # Not in the papers: with at most refit_max_images annotated images, the last refit_share
    # of the run (time or epochs) trains on every image, the validation images too; the
    # post-processing settings are chosen on the validation images just before (qpcell.train)
    refit_share: float = 0.0
    refit_max_images: int = 30
    # Not in the papers: validate and keep an exponential moving average of the weights with
    # this decay (warmed up, qpcell.ema); 0 validates and keeps the weights themselves
    ema_decay: float = 0.0
    # Not in the papers: the test-time views (qpcell.views) whose averaged maps the final
    # post-processing settings are tuned on and the model predicts with; S-DRDIN 2.5 predicts
    # each tile once ("none"). The rounds' validations, which pick the kept round, see one view.
    views: str = "none"
    # Not in the papers: this share of a time budget trains a cell classifier on crops around
    # the training cells after the network (qpcell.models.cell_classifier), for at most
    # cells_passes draws of every training cell (without a budget: that many, at least
    # cells_min_steps steps); half of its class map is mixed into the network's
    # (qpcell.tuning.CELL_SHARES). 0 = none, as in the papers
    cells_share: float = 0.0
    cells_passes: float = 12.0
    # 300: on NuCLS's ~500 training cells (12 passes: under 50 steps) 50 steps added +0.003
    # weighted F1, 300 +0.073 and 1,000 +0.051 (docs/RESULTS.md, "The cell classifier looks at
    # the cell too")
    cells_min_steps: int = 300


#: The rules for TrainConfig.select_on.
SELECT_ON = ("detection", "combined")
#: The ways of drawing training windows (PatchConfig.sampling).
SAMPLINGS = ("grid", "cells")


@dataclass(frozen=True)
class MTLConfig:
    """Multi-task IHC framework, paper 003."""

    alpha: float = 0.8  # MTL-IHC eq. 3: Lm = 0.8 CE + 0.2 IoU
    lambda_c: float = 0.5  # MTL-IHC eq. 7: consistency weight
    lambda_p: float = 0.5  # MTL-IHC eq. 7: prior weight
    lambda_d: float = 1.0  # MTL-IHC eq. 7: dynamic-mask weight
    lr: float = 1e-3  # MTL-IHC 3.1: initial learning rate 0.001
    weight_decay: float = 2e-5  # MTL-IHC 3.1: weight decay 2e-5
    prior_epochs: int = 10  # MTL-IHC 3.1: pre-trained model stopped early at 10 epochs
    # MTL-IHC 2.1: a fixed-size circle per cell; its size and the dynamic ranges are not given
    circle_radius_px: float = 4.0  # about a nucleus at 0.5 µm/px
    dynamic_radius_px: tuple[float, float] = (2.0, 7.0)  # MTL-IHC 2.2: random size
    dynamic_vertices: tuple[int, int] = (3, 9)  # MTL-IHC 2.2: random polygon
    mpp: float = 0.5  # the scale of the pixel constants above
    backbone: str = "resnet18"  # MTL-IHC 3.1 uses resnet101; lighter default for CPUs
    aux: tuple[str, ...] = ("dynamic", "prior")  # MTL-IHC Table 1: Ours++ (full framework)


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def from_dict(cls, data: dict):
    """Rebuild a config dataclass from :func:`to_dict` output, ignoring unknown keys."""
    names = {f.name: f for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)


__all__ = ["PAPER_MPP", "SAMPLINGS", "SELECT_ON", "MaskConfig", "PatchConfig",
           "PostprocessConfig", "MatchConfig", "TrainConfig", "MTLConfig", "to_dict", "from_dict"]
