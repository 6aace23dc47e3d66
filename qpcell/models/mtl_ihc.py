"""MTL-IHC (paper 003): a DeepLabv3+ encoder shared by a main decoder and two auxiliary decoders.

Architecture::

    x (B,3,H,W) in [0,1] -> ImageNet normalisation
    encoder  ResNet-{18,34,50,101}, layer4 dilated (output stride 16)
             low  = layer1 output (stride 4; 64 or 256 channels)
             high = ASPP(layer4): 1x1, three 3x3 atrous convs (rates 6, 12, 18), image pooling;
                    concatenated, 1x1 conv -> ``channels``, dropout 0.1
    decoder  (one per task, identical layers) low -> 1x1 conv -> 48; high upsampled x4;
             concat -> 3x3 conv -> 3x3 conv (``channels`` each) -> 1x1 conv -> logits;
             bilinear upsampling to the input size
    main     C class maps (sigmoid; a pixel may belong to several classes)
    dynamic  C class maps, trained on random-polygon masks       (``"dynamic" in aux``)
    prior    ``n_prior`` maps, trained on an early-stopped model's output   (``"prior" in aux``)

Decisions where the paper (section 3.1: "deeplabv3+ with resnet101 backbone"; "the dynamic
decoder and prior decoder have the same layers as the main decoder") is silent:

* The ASPP is part of the **shared encoder**, as in the DeepLabv3+ paper (Chen et al. 2018,
  Fig. 2: "DeepLabv3 as encoder"); each decoder is DeepLabv3+'s decoder module. So the
  auxiliary tasks shape the ASPP too, and each extra decoder is light.
* Every conv of the encoder's ASPP and of the decoders is followed by BatchNorm + ReLU except
  the image-pooling branch, which has a biased conv + ReLU and no BatchNorm: its input is
  ``1 x 1`` per image, and BatchNorm in training fails on a batch of one (the last batch of an
  epoch may be one patch).
* Regular (not depthwise-separable) convolutions, as torchvision's DeepLab with ResNet.
* The heads' biases start at ``logit(0.1)``: cells cover a small share of the pixels, and maps
  that start near 0.1 instead of 0.5 make the first steps of CE + IoU training stable.
* Inputs are normalised with ImageNet statistics inside the model (non-persistent buffers),
  so that torchvision ImageNet weights (``pretrained_path``) see what they were trained on;
  harmless when training from scratch.

Losses (paper 003 eqs. 1-7; :mod:`qpcell.losses`):

* ``Lm = alpha * CE + (1 - alpha) * IoU`` on the circle masks (``main_loss="ce+iou"``, alpha
  0.8) or ``CE`` alone (``main_loss="ce"``: the early-stopped model that makes the tissue prior).
  CE is the binary cross-entropy of each sigmoid class map (:func:`qpcell.losses.map_bce_loss`,
  eq. 1 with its negative term); IoU is ``1 - soft IoU`` per class (eq. 2).
* ``Ld = L1(sigmoid(dynamic), dynamic masks)`` (eq. 4).
* ``Lc = L1(sigmoid(main), sigmoid(dynamic))`` (eq. 5). **Neither side is detached** by default
  (``consistency_detach="none"``): the paper "minimize[s] the difference of the output
  probability maps between dynamic decoder and main decoder" and wants the *main* branch (the
  one used at inference) to become less tied to the fixed circle, which needs the gradient on
  the main side; the dynamic side's gradient makes the two meet half-way. ``"main"`` detaches
  the main output (a teacher for the dynamic decoder, as in cross-consistency training),
  ``"dynamic"`` the dynamic one (only the main branch moves).
* ``Lp = L1(sigmoid(prior), prior target)`` (eq. 6). Eq. 6 prints a sum over pixels; we use
  the mean, like eqs. 4-5, so that ``lambda_p = 0.5`` weighs it like the other terms.
* ``Lt = Lm + lambda_c Lc + lambda_p Lp + lambda_d Ld`` (eq. 7; 0.5, 0.5, 1.0).

Only the encoder and the main decoder are used at inference (paper section 2): in eval mode
``forward`` runs the main decoder only (``forward(x, aux=True)`` forces the others), and
:meth:`MTLIHC.export` returns a copy without the auxiliary decoders, whose ``spec()`` has
``aux=[]`` so that ``create_model(**spec)`` never builds them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qpcell.config import MTLConfig
from qpcell.errors import QpcellError
from qpcell.losses import l1_loss, map_bce_loss, soft_iou_loss
from qpcell.models.resnet import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dilate_last_stage,
    load_pretrained,
    out_channels,
    resnet,
    resnet_features,
)

_MTL = MTLConfig()
AUX_TASKS: tuple[str, ...] = ("dynamic", "prior")
MAIN_LOSSES: tuple[str, ...] = ("ce+iou", "ce")
DETACH_OPTIONS: tuple[str, ...] = ("none", "main", "dynamic")
HEAD_PRIOR = 0.1  # initial probability of the heads (bias = logit(0.1))


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): 1x1, atrous 3x3 at ``rates``, image pooling."""

    def __init__(self, cin: int, channels: int, rates: tuple[int, ...],
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, channels, 1)] + [_conv_bn_relu(cin, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, channels, 1),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        feats = [b(x) for b in self.branches]
        feats.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(feats, dim=1))


class DeepLabEncoder(nn.Module):
    """ResNet (output stride 16) + ASPP; returns ``(low-level stride-4 features, ASPP output)``."""

    def __init__(self, backbone: str, channels: int, rates: tuple[int, ...], *,
                 pretrained_path: str | None = None, use_torchvision: bool | None = None) -> None:
        super().__init__()
        self.backbone = resnet(backbone, use_torchvision=use_torchvision)
        if pretrained_path:
            load_pretrained(self.backbone, pretrained_path)
        dilate_last_stage(self.backbone)
        self.low_channels, high_channels = out_channels(backbone)
        self.aspp = ASPP(high_channels, channels, rates)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        low, high = resnet_features(self.backbone, x)
        return low, self.aspp(high)


class DeepLabDecoder(nn.Module):
    """DeepLabv3+ decoder: low-level projection to 48, fuse with upsampled ASPP, two 3x3 convs."""

    def __init__(self, low_channels: int, channels: int, n_out: int, low_proj: int = 48) -> None:
        super().__init__()
        self.low = _conv_bn_relu(low_channels, low_proj, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(channels + low_proj, channels, 3),
                                  _conv_bn_relu(channels, channels, 3))
        self.head = nn.Conv2d(channels, n_out, 1)
        nn.init.constant_(self.head.bias, math.log(HEAD_PRIOR / (1 - HEAD_PRIOR)))

    def forward(self, low: Tensor, high: Tensor, size: tuple[int, int]) -> Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([high, self.low(low)], dim=1))
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)


@dataclass
class MTLTargets:
    """Per-patch training targets of MTL-IHC (picklable, for DataLoader workers).

    Called as ``(xy, labels, shape, rng=None) -> dict``: ``"circle"`` (C, H, W) fixed-radius
    discs (:func:`qpcell.masks.circle_masks`) and, when ``dynamic``, ``"dynamic"`` (C, H, W)
    random polygons drawn anew on every call from ``rng``
    (:func:`qpcell.dynamic_masks.dynamic_masks`).
    """

    n_classes: int
    radius_px: float
    dynamic: bool
    dynamic_radius_px: tuple[float, float]
    dynamic_vertices: tuple[int, int]
    dynamic_jitter: float

    def __call__(self, xy, labels, shape, rng: np.random.Generator | None = None,
                 ) -> dict[str, np.ndarray]:
        from qpcell.dynamic_masks import dynamic_masks
        from qpcell.masks import circle_masks

        out = {"circle": circle_masks(xy, labels, self.n_classes, shape, self.radius_px)}
        if self.dynamic:
            out["dynamic"] = dynamic_masks(xy, labels, self.n_classes, shape,
                                           radius_px=self.dynamic_radius_px,
                                           vertices=self.dynamic_vertices,
                                           jitter=self.dynamic_jitter, rng=rng)
        return out


class MTLIHC(nn.Module):
    """The multi-task IHC model of paper 003 (see the module docstring).

    Parameters
    ----------
    n_classes
        Number of cell classes ``C`` (maps of the main and dynamic decoders).
    backbone
        ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101`` (paper: resnet101).
    aux
        Auxiliary decoders to build: ``()`` (paper Table 1 "Ours"), ``("dynamic",)`` ("Ours+"),
        ``("dynamic", "prior")`` ("Ours++"). Only these are built.
    n_prior
        Channels of the prior decoder (one per prior class); used when ``"prior" in aux``.
    channels, rates
        ASPP / decoder width and ASPP atrous rates (DeepLabv3+ at output stride 16: 256,
        (6, 12, 18)).
    main_loss
        ``"ce+iou"`` (eq. 3) or ``"ce"`` (the early-stopped prior model).
    alpha, lambda_c, lambda_p, lambda_d
        Loss weights (eq. 3 and eq. 7).
    consistency_detach
        ``"none"`` (default), ``"main"`` or ``"dynamic"``: which side of ``Lc`` gets no gradient.
    circle_radius_px, dynamic_radius_px, dynamic_vertices, dynamic_jitter
        Mask settings at the reference scale: :meth:`target_fn` scales the dynamic radius range
        by ``radius / circle_radius_px``, keeping its ratio to the training circle.
    pretrained_path
        A torchvision ImageNet ResNet weights file to start the backbone from (not saved in
        ``spec()``: a saved model carries all its weights).
    use_torchvision
        Build the backbone with torchvision (None: when it imports). Same weights either way.
    """

    postprocess_kind = "peaks"

    def __init__(self, n_classes: int, *, backbone: str = _MTL.backbone,
                 aux: tuple[str, ...] | list[str] = (), n_prior: int = 1, channels: int = 256,
                 rates: tuple[int, ...] | list[int] = (6, 12, 18), main_loss: str = "ce+iou",
                 alpha: float = _MTL.alpha, lambda_c: float = _MTL.lambda_c,
                 lambda_p: float = _MTL.lambda_p, lambda_d: float = _MTL.lambda_d,
                 consistency_detach: str = "none",
                 circle_radius_px: float = _MTL.circle_radius_px,
                 dynamic_radius_px: tuple[float, float] | list[float] = _MTL.dynamic_radius_px,
                 dynamic_vertices: tuple[int, int] | list[int] = _MTL.dynamic_vertices,
                 dynamic_jitter: float = 0.3, pretrained_path: str | None = None,
                 use_torchvision: bool | None = None) -> None:
        super().__init__()
        aux = tuple(aux)
        unknown = sorted(set(aux) - set(AUX_TASKS))
        if unknown:
            raise QpcellError(f"unknown auxiliary task(s) {unknown}; choose from {AUX_TASKS}")
        self.aux = tuple(t for t in AUX_TASKS if t in aux)
        if backbone not in BACKBONES:
            raise QpcellError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        if main_loss not in MAIN_LOSSES:
            raise QpcellError(f"main_loss must be one of {MAIN_LOSSES}, got {main_loss!r}")
        if consistency_detach not in DETACH_OPTIONS:
            raise QpcellError(f"consistency_detach must be one of {DETACH_OPTIONS}, "
                              f"got {consistency_detach!r}")
        if n_classes < 1 or n_prior < 1 or channels < 1 or not 0.0 <= alpha <= 1.0:
            raise QpcellError(f"invalid MTL-IHC settings: n_classes={n_classes}, "
                              f"n_prior={n_prior}, channels={channels}, alpha={alpha}")
        if circle_radius_px <= 0:
            raise QpcellError(f"circle radius must be positive, got {circle_radius_px}")
        self.n_classes = int(n_classes)
        self.n_prior = int(n_prior)
        self.main_loss = main_loss
        self.alpha, self.lambda_c, self.lambda_p, self.lambda_d = (
            float(alpha), float(lambda_c), float(lambda_p), float(lambda_d))
        self.consistency_detach = consistency_detach
        self.circle_radius_px = float(circle_radius_px)
        self.dynamic_radius_px = tuple(float(r) for r in dynamic_radius_px)
        self.dynamic_vertices = tuple(int(v) for v in dynamic_vertices)
        self.dynamic_jitter = float(dynamic_jitter)
        self._spec = {
            "name": "mtl-ihc", "n_classes": self.n_classes, "backbone": backbone,
            "aux": list(self.aux), "n_prior": self.n_prior, "channels": int(channels),
            "rates": [int(r) for r in rates], "main_loss": main_loss, "alpha": self.alpha,
            "lambda_c": self.lambda_c, "lambda_p": self.lambda_p, "lambda_d": self.lambda_d,
            "consistency_detach": consistency_detach,
            "circle_radius_px": self.circle_radius_px,
            "dynamic_radius_px": list(self.dynamic_radius_px),
            "dynamic_vertices": list(self.dynamic_vertices),
            "dynamic_jitter": self.dynamic_jitter,
        }

        self.encoder = DeepLabEncoder(backbone, channels, tuple(int(r) for r in rates),
                                      pretrained_path=pretrained_path,
                                      use_torchvision=use_torchvision)
        low = self.encoder.low_channels
        self.main_decoder = DeepLabDecoder(low, channels, self.n_classes)
        if "dynamic" in self.aux:
            self.dynamic_decoder = DeepLabDecoder(low, channels, self.n_classes)
        if "prior" in self.aux:
            self.prior_decoder = DeepLabDecoder(low, channels, self.n_prior)

    # ------------------------------------------------------------------ protocol
    def forward(self, x: Tensor, *, aux: bool | None = None) -> dict[str, Tensor]:
        """``{"main_logits": (B,C,H,W)}`` plus ``"dynamic_logits"`` / ``"prior_logits"``.

        The auxiliary decoders run when ``aux`` is True, or by default in training mode only
        (inference needs the main decoder alone).
        """
        size = (int(x.shape[-2]), int(x.shape[-1]))
        low, high = self.encoder(x)
        out = {"main_logits": self.main_decoder(low, high, size)}
        run_aux = self.training if aux is None else bool(aux)
        if run_aux:
            if "dynamic" in self.aux:
                out["dynamic_logits"] = self.dynamic_decoder(low, high, size)
            if "prior" in self.aux:
                out["prior_logits"] = self.prior_decoder(low, high, size)
        return out

    def maps(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``det (B,H,W)`` = max over classes of ``cls (B,C,H,W)`` = sigmoid of the main maps."""
        cls = torch.sigmoid(out["main_logits"].float())
        return cls.amax(dim=1), cls

    def loss(self, out: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """``Lt = Lm + lambda_c Lc + lambda_p Lp + lambda_d Ld`` (paper 003 eq. 7).

        ``targets``: ``"circle"`` (B,C,H,W), ``"dynamic"`` (B,C,H,W) when the dynamic decoder
        ran, ``"prior"`` (B,n_prior,H,W) when the prior decoder ran. An auxiliary term is
        computed only when its decoder's output is in ``out``. Parts: ``"main"`` and, where
        computed, ``"dynamic"``, ``"consistency"``, ``"prior"`` (unweighted values).
        """
        main = out["main_logits"].float()
        circle = _target(targets, "circle", main.shape)
        p_main = torch.sigmoid(main)
        lm = map_bce_loss(main, circle)
        if self.main_loss == "ce+iou":
            lm = self.alpha * lm + (1.0 - self.alpha) * soft_iou_loss(p_main, circle)
        parts = {"main": lm}
        total = lm
        if "dynamic_logits" in out:
            p_dyn = torch.sigmoid(out["dynamic_logits"].float())
            ld = l1_loss(p_dyn, _target(targets, "dynamic", p_dyn.shape))
            a = p_main.detach() if self.consistency_detach == "main" else p_main
            b = p_dyn.detach() if self.consistency_detach == "dynamic" else p_dyn
            lc = l1_loss(a, b)
            parts["dynamic"], parts["consistency"] = ld, lc
            total = total + self.lambda_d * ld + self.lambda_c * lc
        if "prior_logits" in out:
            p_prior = torch.sigmoid(out["prior_logits"].float())
            lp = l1_loss(p_prior, _target(targets, "prior", p_prior.shape))
            parts["prior"] = lp
            total = total + self.lambda_p * lp
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def target_fn(self, radius_px: float) -> MTLTargets:
        """Target function for :class:`qpcell.patches.PatchDataset` at circle radius ``radius_px``.

        The dynamic polygons' radius range is ``dynamic_radius_px * radius_px /
        circle_radius_px`` (the configured range, carried to the training scale).
        """
        if radius_px <= 0:
            raise QpcellError(f"circle radius must be positive, got {radius_px}")
        f = float(radius_px) / self.circle_radius_px
        return MTLTargets(self.n_classes, float(radius_px), "dynamic" in self.aux,
                          (self.dynamic_radius_px[0] * f, self.dynamic_radius_px[1] * f),
                          self.dynamic_vertices, self.dynamic_jitter)

    def spec(self) -> dict:
        """Name and constructor arguments, JSON-ready: ``create_model(**spec)`` rebuilds it."""
        return copy.deepcopy(self._spec)

    def export(self) -> MTLIHC:
        """The inference model: encoder + main decoder only (``aux=()``), same weights and mode.

        The paper keeps only these at test time; save this one (its ``spec()`` has ``aux=[]``,
        so loading it never builds the auxiliary decoders).
        """
        spec = self.spec()
        spec.pop("name")
        spec["aux"] = []
        model = MTLIHC(**spec, use_torchvision=False)
        state = {k: v for k, v in self.state_dict().items()
                 if not k.startswith(("dynamic_decoder.", "prior_decoder."))}
        model.load_state_dict(state, strict=True)
        ref = next(self.parameters())
        return model.to(device=ref.device).train(self.training)

    for_inference = export


def _target(targets: dict[str, Tensor], key: str, shape: torch.Size) -> Tensor:
    if key not in targets:
        hint = {"circle": "use the model's target_fn",
                "dynamic": "use the model's target_fn (it draws the dynamic masks)",
                "prior": "train with qpcell.mtl.train_mtl, which makes the prior maps"}[key]
        raise QpcellError(f"MTL-IHC loss needs targets[{key!r}]: {hint}")
    t = targets[key].float()
    if t.shape != shape:
        raise QpcellError(f"targets[{key!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


__all__ = ["AUX_TASKS", "MAIN_LOSSES", "ASPP", "DeepLabEncoder", "DeepLabDecoder", "MTLTargets",
           "MTLIHC"]
