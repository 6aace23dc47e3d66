"""Training recipes: the paper's settings, or the ones that learn fastest in a user's minutes.

``paper`` reproduces S-DRDIN 2.2-2.3 (and paper 003 for MTL-IHC): the configs' defaults,
constant learning rate, 2 px discs, the stride-120 grid, flips, epochs. ``fast`` (the default of
``qpcell train``) is what a pathologist with a laptop needs: a good model in minutes on stains,
scanners and pixel sizes it was not built for. Each of its changes was measured on its own
(docs/RESULTS.md, "Time to accuracy"):

* larger label discs (4 px at 0.44 µm/px, about a nucleus radius) and, for the networks with
  a detection decoder (S-DRDIN), a Dice term on the detection map, so that the map becomes
  confident within minutes;
* batch normalisation in the network, a short warm-up and a cosine schedule that reaches 0 at
  the end of the run (epochs or time budget);
* windows centred near annotated cells (rare classes drawn more often, ``class_balance=0.5``;
  drawing every class alike, 1, gained 0.009 weighted F1 on EndoNuke but scored 0.009 / 0.019
  / 0.017 below 0.5 on NuCLS, three seeds each), 128 px, batch 8, drawn anew every round,
  instead of every stride-120 window of every image;
* the time budget also ends after 150 passes of the windows over the training images (at least
  1,000 steps, :func:`qpcell.schedule.step_cap`): on a CPU with native bf16 ten minutes hold
  5,300-6,000 steps on EndoNuke's 132 training tiles, thirty minutes 18,000, and those scored no
  better. With the cap a 30-minute EndoNuke budget ends after 5,227 steps (9-10 minutes there)
  and a 10-minute NuCLS one after 1,000 (1.5 minutes), each level with the uncapped runs over
  three seeds. The schedule spans whichever end comes first, so a fast machine or a GPU
  finishes early with the learning rate run down;
* the round kept is the best on detection and classification together (``combined``): with
  the cosine the last rounds sharpen the classes most, often at an equal detection F1;
* with at most 30 images, the last 30% of the run trains on every image, the validation
  images too, once the post-processing settings are chosen on them (``refit_share``);
* the weights themselves are validated and kept: a moving average of them (``--ema``) scored
  level with them over three seeds;
* flips and 90-degree rotations. HED stain / brightness / contrast jitter
  (``--colour-jitter 1``) is there for stains unlike the training images, but did not help on
  the held-out images of the same stain, so it is off by default; so is scale jitter
  (``--scale-jitter``, each window read at a random scale), which scored level on EndoNuke;
* the model predicts each tile four times, as it is and flipped (``views="flips"``,
  :mod:`qpcell.views`), and averages the maps; the final post-processing settings are tuned on
  those maps. On the kept models of 24 runs (EndoNuke at 1x, 2x and 3x, NuCLS) detection F1
  rose in 22, by 0.002-0.005 on EndoNuke and 0.03 on NuCLS, with classification level, at four
  times the network's time (docs/RESULTS.md, "Test-time views"; ``qpcell predict --tta none``
  for one pass);
* each cell may take a share of the classes of the cells within 10 µm
  (:data:`CONTEXT_RADIUS_UM`), the share (0, 0.25 or 0.5) tuned on the validation images with
  the class gains: where classes are tissue compartments (epithelium, stroma) the neighbours
  steady a cell's class, where they are a cell's own stain the tuning keeps none. On kept models
  it added +0.001 weighted F1 on EndoNuke at 1x, +0.005-0.007 at 2x and 3x; through
  ``qpcell train`` (10 minutes, three seeds) it scored level (docs/RESULTS.md, "Neighbouring
  cells' classes");
* no cell classifier beside the network by default (``--cell-classifier 0.2`` trains one on
  21 µm crops around the annotated cells in a fifth of the budget, after the network, and mixes
  half of its class map into the network's, :mod:`qpcell.models.cell_classifier`). On EndoNuke
  it lifted weighted F1 at 10 minutes from 0.931 ± 0.011 to 0.943 ± 0.005 (three seeds,
  detection level, prediction about 70% slower), and on the weights of three NuCLS networks
  by 0.073. Through ``qpcell train`` it is unmeasured on NuCLS and at 2x, 3x and 30 minutes
  (docs/RESULTS.md, "The cell classifier looks at the cell too").

The fast recipe trains the plain U-Net (:data:`DEFAULT_MODELS`): its step costs a third of
S-DRDIN's, so it takes three times the steps in a budget, and it scored higher on EndoNuke at 5
and 10 minutes and level on NuCLS (H&E). Its loss weights the cell classes alike among the
cells and leaves the detection term as in the plain cross-entropy
(:func:`qpcell.losses.cell_balanced_cross_entropy`; a softer balance, ``class_power=0.5``, scored
level with it): with the plain loss a one-minute run on the
demo's four phenotypes never learnt one of them, and with S-DRDIN's weights (the background
one class among all) it lost detection F1 on EndoNuke (docs/RESULTS.md, "The network for a
budget"). ``paper`` trains S-DRDIN; ``--model`` names any other network.

A recipe only chooses settings: every one of them stays a flag of ``qpcell train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qpcell.config import MaskConfig, PatchConfig, PostprocessConfig, TrainConfig
from qpcell.errors import QpcellError

RECIPES = ("fast", "paper")
#: The network each recipe trains when ``--model`` is not given.
DEFAULT_MODELS = {"fast": "unet", "paper": "s-drdin"}
#: What ``qpcell train`` does when neither ``--epochs`` nor ``--time-budget`` is given (minutes).
DEFAULT_BUDGET_MIN = 10.0
#: The fast recipe offers each cell the classes of the cells within 10 µm
#: (:func:`qpcell.postprocess.neighbour_context`); the final tuning chooses how much of them it
#: takes, none included (:data:`qpcell.tuning.CONTEXT_WEIGHTS`; docs/RESULTS.md, "Neighbouring
#: cells' classes").
CONTEXT_RADIUS_UM = 10.0


@dataclass(frozen=True)
class Recipe:
    """Settings of one recipe for one model family."""

    name: str
    train: TrainConfig
    mask: MaskConfig
    patch: PatchConfig
    model_kwargs: dict = field(default_factory=dict)
    post: PostprocessConfig = PostprocessConfig()


def default_model(name: str) -> str:
    """The network recipe ``name`` trains when none is named (:data:`DEFAULT_MODELS`)."""
    if name not in DEFAULT_MODELS:
        raise QpcellError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return DEFAULT_MODELS[name]


def recipe(name: str, model_name: str | None = None) -> Recipe:
    """The settings of recipe ``name`` (:data:`RECIPES`) for ``model_name`` (default: the
    recipe's own network, :func:`default_model`).

    Model options apply where the family has them: S-DRDIN and its variants get batch
    normalisation and the detection Dice term, the U-Net batch normalisation; MTL-IHC keeps
    its own network and losses (paper 003) and takes the schedule, sampling and augmentation.
    """
    model_name = model_name or default_model(name)
    if name == "paper":
        return Recipe("paper", TrainConfig(), MaskConfig(), PatchConfig())
    # --weight-decay means AdamW's decoupled decay here; 0.05 scored level with none over three
    # budgets (docs/RESULTS.md, "Brakes on over-fitting"), so the default stays none
    train = replace(TrainConfig(), batch_size=8, lr=2e-3, lr_schedule="cosine", warmup=0.05,
                    select_on="combined", refit_share=0.3, max_passes=150.0, min_steps=1000,
                    decoupled_weight_decay=True, views="flips")
    mask = replace(MaskConfig(), disc_radius_px=4.0)
    patch = replace(PatchConfig(), size=128, sampling="cells", background_fraction=0.1,
                    class_balance=0.5, rotate90=True, colour_jitter=0.0)
    kwargs: dict = {}
    if model_name in ("s-drdin", "s-drdin-gradient", "drdin-detection", "drdin-classification",
                      "separate"):
        kwargs = {"batch_norm": True}
        if model_name != "drdin-classification":
            kwargs["det_dice"] = 1.0
    elif model_name == "unet":
        kwargs = {"batch_norm": True, "class_weights": "cells"}
    # the fast maps leave smaller blobs than the paper's: start the area search at 10 px
    post = replace(PostprocessConfig(), min_area_px=10.0,
                   context_radius_px=CONTEXT_RADIUS_UM / PostprocessConfig().mpp)
    return Recipe("fast", train, mask, patch, kwargs, post)


__all__ = ["RECIPES", "DEFAULT_MODELS", "DEFAULT_BUDGET_MIN", "CONTEXT_RADIUS_UM", "Recipe",
           "default_model", "recipe"]
