"""Starting weights: the built-in IHC nucleus model, and copying a model's weights into a new one.

StarDist, Cellpose and InstanSeg start users from a pretrained model; ``qpcell train --init``
does the same. The starting model gives the encoder, both decoders and the detection head;
the class output layer is fitted to the user's classes (kept only when the classes are the
starting model's own, same names in the same order). Starting models are ordinary model
folders (``config.json`` + ``weights.safetensors``), read without unpickling anything.

The built-in model (``qpcell/builtin/ihc-nuclei``, its ``MODEL_CARD.md`` says how it was made):
S-DRDIN of the ``fast`` recipe, trained by qpcell on the EndoNuke training split (IHC,
Naumov et al., Data 2022, CC BY 4.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qpcell.checkpoint import WEIGHTS, read_config
from qpcell.ensemble import MEMBERS_DIR, member_name
from qpcell.errors import QpcellError
from qpcell.models.cell_classifier import base_spec, base_state
from qpcell.points import CellClass

BUILTIN = "builtin"
NONE = "none"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "ihc-nuclei"


def resolve_init(value: str | Path | None) -> Path | None:
    """The model folder ``--init`` names: ``builtin``, ``none`` (None) or a model folder."""
    if value is None or str(value).lower() == NONE:
        return None
    if str(value).lower() == BUILTIN:
        if not (BUILTIN_DIR / WEIGHTS).exists():
            raise QpcellError("the built-in starting model is missing from this installation "
                              "(reinstall qpcell, or pass --init none)", BUILTIN_DIR)
        return BUILTIN_DIR
    folder = Path(value)
    config = read_config(folder)  # one-line errors for folders that are no model
    if config.get("kind") == "pipeline":
        raise QpcellError("--init takes a single model, not a detection + classification "
                          "pipeline", folder)
    if config.get("kind") == "ensemble":
        raise QpcellError("--init takes a single model, not an ensemble; pass one of its "
                          f"members (e.g. {folder / MEMBERS_DIR / member_name(1)})", folder)
    return folder


@dataclass(frozen=True)
class Transfer:
    """What :func:`transfer_weights` copied."""

    source: str  # the starting model's folder (or "builtin")
    copied: int  # tensors copied
    total: int  # tensors of the new model
    classes_kept: bool  # the class output layer came from the starting model too
    source_mpp: float | None  # µm/px the starting model works at

    def note(self, model_mpp: float | None) -> str:
        """One line for the user."""
        text = (f"started from {self.source}: {self.copied} of {self.total} weight tensors; "
                + ("the class layer is the starting model's (same classes)" if self.classes_kept
                   else "the class layer is fitted to your classes"))
        if self.source_mpp != model_mpp:
            work = lambda v: f"{v:g} µm/px" if v else "native scale"  # noqa: E731
            text += (f"; the starting model works at {work(self.source_mpp)}, this model at "
                     f"{work(model_mpp)}")
        return text

    def meta(self) -> dict:
        """The entry in the new model's ``config.json`` (``Transfer(**meta)`` rebuilds it)."""
        return {"source": self.source, "copied": self.copied, "total": self.total,
                "classes_kept": self.classes_kept, "source_mpp": self.source_mpp}


def transfer_weights(model: torch.nn.Module, folder: Path, classes: tuple[CellClass, ...]
                     ) -> Transfer:
    """Copy into ``model`` every tensor of the model folder ``folder`` with its name and shape.

    The layers named by ``model.class_layers`` (prefixes of the class output layer) are left
    as initialised unless ``classes`` are the starting model's classes. The layers named by
    ``model.encoder_layers`` must all fit, or the starting model is of another architecture
    and nothing is copied.

    Raises
    ------
    QpcellError
        If the starting model's weights are unreadable or its encoder does not fit ``model``.
    """
    config = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise QpcellError(f"corrupt starting model weights ({err})", folder / WEIGHTS) from None
    spec = config.get("model", {})
    state, config = base_state(spec, state), {**config, "model": base_spec(spec)}
    own = model.state_dict()
    same_classes = [c["name"] for c in config["classes"]] == [c.name for c in classes]
    skip = () if same_classes else tuple(getattr(model, "class_layers", ()))
    fits = {k: v for k, v in state.items()
            if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    encoder = [k for k in own if k.startswith(tuple(getattr(model, "encoder_layers", ())))]
    missing = [k for k in encoder if k not in fits]
    if not encoder or missing:
        spec = config.get("model", {})
        raise QpcellError(
            f"the starting model ({spec.get('name')}, width {spec.get('base')}) does not fit "
            f"this model ({getattr(model, 'name', type(model).__name__)}): "
            f"{len(missing) or 'no'} encoder tensors differ; pass --init none", folder)
    own.update({k: v.to(own[k].dtype) for k, v in fits.items()})
    model.load_state_dict(own)
    source = BUILTIN if folder.resolve() == BUILTIN_DIR else str(folder)
    kept = same_classes and any(k.startswith(tuple(getattr(model, "class_layers", ())))
                                for k in fits)
    return Transfer(source, len(fits), len(own), kept, config.get("mpp"))


__all__ = ["BUILTIN", "NONE", "BUILTIN_DIR", "resolve_init", "Transfer", "transfer_weights"]
