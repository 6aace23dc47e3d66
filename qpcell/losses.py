"""Loss functions of the two source papers (PyTorch).

Shapes: ``logits``/``prob`` and ``target`` are ``(B, K, H, W)``; class targets may be one-hot or
soft (non-negative, summing to 1 over ``K``).

S-DRDIN (paper 000, section 2.4)
---------------------------------
Pixel-weighted cross-entropy, eq. 1-2::

    w_c = N * Nc * B / sum_i x_i^c                         (1)
    L   = -1 / (Nc * N) * sum_c sum_i w_c * y_ic * log p_c(x_i)   (2)

``N`` = pixels per channel of one image (H*W), ``Nc`` = channels of the class map (C+1), ``B`` =
batch size, ``sum_i x_i^c`` = number of pixels of class ``c`` in the whole batch. Eq. 2 as printed
omits the target ``y_ic``: the loss of a pixel is the log-probability of its own class, as in any
cross-entropy, so we put it back. Eq. 2 is a per-image loss (its sum runs over the N pixels of one
image) and, as Keras does with a per-sample loss, the batch loss is its mean over the B images.
``B`` in eq. 1 then cancels that mean, and ``Nc * N`` cancels the normalisation::

    L = (1 / B) * sum_b [-1/(Nc N) sum_c w_c sum_{i in b} y_ic log p_ic]
      = sum_c [ -sum_{i in batch} y_ic log p_ic / sum_{i in batch} y_ic ]

i.e. the **sum over classes of the mean negative log-likelihood of that class's pixels** (every
class present in the batch counts equally, however few its pixels). A class absent from the batch
has no pixels, contributes nothing and gets weight 0 (no division by zero). The detection branch
uses binary cross-entropy; the S-DRDIN loss is their sum.

Paper 003 (multi-task IHC)
--------------------------
:func:`map_bce_loss` (eq. 1 with the (1 - G) log(1 - P) term of a binary CE over sigmoid maps:
eq. 1 as printed keeps only the positive term, which P = 1 everywhere would minimise),
:func:`soft_iou_loss` (eq. 2 as a loss to minimise, 1 - IoU), :func:`l1_loss` (eqs. 4-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_pixel_counts(target: Tensor) -> Tensor:
    """``(K,)`` pixels of each class in the batch, ``sum_{b,h,w} y[b, k, h, w]``."""
    return target.sum(dim=(0, 2, 3))


def pixel_class_weights(target: Tensor) -> Tensor:
    """S-DRDIN eq. 1: ``w_c = N * Nc * B / n_c`` (``(K,)``, 0 for a class absent from the batch).

    ``N * B`` is the number of pixels in the batch, so ``w_c = Nc / share_c``: the inverse share
    of class ``c``'s pixels, times the number of channels.
    """
    b, k, h, w = target.shape
    n_c = class_pixel_counts(target)
    present = n_c > 0
    return torch.where(present, (h * w * k * b) / n_c.clamp_min(1e-12), torch.zeros_like(n_c))


def weighted_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """S-DRDIN pixel-weighted cross-entropy (eq. 1-2), see the module docstring.

    Parameters
    ----------
    logits
        ``(B, K, H, W)`` class scores (softmax over ``K`` is applied here, via ``log_softmax``).
    target
        ``(B, K, H, W)`` one-hot (or soft) class map, the S-DRDIN ``"cls"`` target.

    Returns
    -------
    Tensor
        Scalar ``-1/(B Nc N) * sum_c w_c sum_{b,i} y_ic log p_ic``.
    """
    b, k, h, w = target.shape
    logp = F.log_softmax(logits.float(), dim=1)
    nll_c = -(target * logp).sum(dim=(0, 2, 3))  # (K,) summed over the batch
    weights = pixel_class_weights(target)
    return (weights * nll_c).sum() / (b * k * h * w)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Plain (unweighted) softmax cross-entropy, ``-mean_i sum_c y_ic log p_ic`` over pixels."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def cell_balanced_cross_entropy(logits: Tensor, target: Tensor,
                                class_target: Tensor | None = None, *,
                                power: float = 1.0) -> Tensor:
    """Softmax cross-entropy in which the cell classes count alike among the cells, while the
    detection (cell against background) is learnt as with the plain loss (the fast recipe's
    U-Net).

    A pixel's plain loss ``-log p_c`` splits into a detection term, ``-log p(cell)`` (or
    ``-log p(background)``), and a class term, ``-log p(c | cell) = -log p_c + log p(cell)``.
    Only the class term is weighted: a pixel of cell class ``c`` by ``n_cell / (C_present *
    n_c)``, with ``n_c`` the pixels of class ``c`` in the batch, ``n_cell`` those of all cell
    classes and ``C_present`` the cell classes present. So a rare class among the cells weighs
    as much as a common one, and the detection map (``1 - p(background)``) gets the plain
    loss's gradient, whatever the classes. With one cell class (or none) in the batch it *is*
    the plain loss.

    ``power`` ``p`` softens the balance: the weights go as ``n_c ** -p``, scaled so that the
    class term's weights still sum to ``n_cell`` over the cell pixels. 1 (the default) is the
    balance above, 0 the plain loss, 0.5 halfway (a class 100 times rarer weighs 10 times more
    per pixel, not 100 times).

    ``class_target`` (``(B, K - 1, H, W)``, one-hot over the cell classes) puts the class term
    on other pixels than the cells of ``target``, e.g. on wider discs than the detection's
    (``UNet(class_region=...)``); its weights are scaled so that the class term weighs as much
    as on ``target``'s cell pixels.

    Parameters
    ----------
    logits, target
        ``(B, K, H, W)`` class scores and one-hot (or soft) class map, background last.
    class_target
        Where the class term applies, and which class; default ``target``'s cell classes.

    Returns
    -------
    Tensor
        Scalar ``(sum_i det_i + sum_c w_c sum_i y_ic (-log p(c | cell)_i)) / (B H W)``.
    """
    b, k, h, w = target.shape
    logp = F.log_softmax(logits.float(), dim=1)
    log_cell = torch.logsumexp(logp[:, :-1], dim=1)
    y_cells = target[:, :-1]
    det = -(y_cells.sum(dim=1) * log_cell + target[:, -1] * logp[:, -1]).sum()
    y_cls = y_cells if class_target is None else class_target.to(y_cells.dtype)
    cls_c = -(y_cls * (logp[:, :-1] - log_cell[:, None])).sum(dim=(0, 2, 3))  # (C,)
    n_c = class_pixel_counts(y_cls)
    inv = torch.where(n_c > 0, n_c.clamp_min(1e-12) ** -float(power), torch.zeros_like(n_c))
    weights = y_cells.sum() * inv / (inv * n_c).sum().clamp_min(1e-12)
    return (det + (weights * cls_c).sum()) / (b * h * w)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of a sigmoid map (S-DRDIN detection branch), mean over pixels."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def dice_loss(logits: Tensor, target: Tensor, *, smooth: float = 1.0) -> Tensor:
    """``1 - soft Dice`` of a sigmoid map against a binary target, over the whole batch.

    Not in the papers: added to the detection BCE by the fast recipe (:mod:`qpcell.recipe`),
    because a BCE over a map that is 97% background is lowest for a timid map, while Dice
    rewards covering the cells whatever their share of the pixels.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + t.sum() + smooth)


def map_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Paper 003 eq. 1: binary CE of sigmoid class maps, mean over pixels, classes and batch.

    ``-1/(L m n) sum_l sum_ij [G log P + (1 - G) log(1 - P)]`` with ``P = sigmoid(logits)``.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def soft_iou_loss(prob: Tensor, target: Tensor, *, smooth: float = 0.0,
                  eps: float = 1e-6) -> Tensor:
    """Paper 003 eq. 2 as a loss: ``1 - mean_l I_l / U_l`` over the channels ``l``.

    ``I_l = sum G*P`` and ``U_l = sum G + sum P - sum G*P``, summed over the batch and all pixels
    (eq. 2 prints ``I / (sum G + sum P)``, a ratio that would be *maximised*; the IoU loss it cites
    is ``1 - I/U``). ``prob`` are probabilities in [0, 1] (apply sigmoid/softmax first).
    ``smooth`` is added to ``I`` and ``U`` (0 = the formula as written); ``eps`` only guards an
    empty ``U`` (a channel absent from target and prediction then scores IoU 0).
    """
    dims = (0, *range(2, prob.ndim))
    inter = (prob * target).sum(dim=dims)
    union = prob.sum(dim=dims) + target.sum(dim=dims) - inter
    return 1.0 - ((inter + smooth) / (union + smooth + eps)).mean()


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute difference (paper 003 eqs. 4-6: ``1/(L m n) sum |P - G|``)."""
    return (pred.float() - target.float()).abs().mean()


__all__ = ["class_pixel_counts", "pixel_class_weights", "weighted_cross_entropy",
           "cross_entropy", "cell_balanced_cross_entropy", "bce_loss", "map_bce_loss",
           "soft_iou_loss", "l1_loss"]
