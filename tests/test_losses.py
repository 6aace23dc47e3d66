"""Losses against hand computations of the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qpcell.losses import (
    bce_loss,
    cell_balanced_cross_entropy,
    cross_entropy,
    l1_loss,
    map_bce_loss,
    pixel_class_weights,
    soft_iou_loss,
    weighted_cross_entropy,
)


def _one_hot(idx: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(idx, k).permute(0, 3, 1, 2).float()


def _eq12_by_hand(logits: np.ndarray, y: np.ndarray) -> float:
    """S-DRDIN eq. 1-2 literally, with loops: per-image eq. 2, averaged over the batch."""
    b, nc, h, w = y.shape
    n = h * w
    wc = [n * nc * b / y[:, c].sum() if y[:, c].sum() > 0 else 0.0 for c in range(nc)]
    per_image = []
    for bi in range(b):
        total = 0.0
        for c in range(nc):
            for r in range(h):
                for col in range(w):
                    z = logits[bi, :, r, col]
                    logp = z[c] - math.log(sum(math.exp(v) for v in z))
                    total += wc[c] * y[bi, c, r, col] * logp
        per_image.append(-total / (nc * n))
    return sum(per_image) / b


def test_weighted_ce_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    idx = torch.tensor([[[2, 2], [0, 2]], [[1, 2], [2, 2]]])  # class 0: 1 px, 1: 1 px, 2: 6 px
    y = _one_hot(idx, 3).double()
    got = weighted_cross_entropy(logits, y).item()
    assert math.isclose(got, _eq12_by_hand(logits.numpy(), y.numpy()), rel_tol=1e-6)
    # = sum over classes of the mean NLL of that class's pixels
    nll = -F.log_softmax(logits, dim=1).gather(1, idx[:, None])[:, 0]
    expected = sum(nll[idx == c].mean().item() for c in range(3))
    assert math.isclose(got, expected, rel_tol=1e-6)
    # eq. 1: w_c = N Nc B / n_c = 4 * 3 * 2 / n_c
    np.testing.assert_allclose(pixel_class_weights(y).numpy(), [24.0, 24.0, 4.0])


def test_weighted_ce_absent_class_gives_no_nan():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    idx = torch.full((2, 3, 3), 3)
    idx[0, 1, 1] = 0  # classes 1 and 2 absent
    y = _one_hot(idx, 4)
    loss = weighted_cross_entropy(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert pixel_class_weights(y)[1] == 0 and pixel_class_weights(y)[2] == 0
    assert math.isclose(loss.item(), _eq12_by_hand(logits.detach().double().numpy(),
                                                   y.double().numpy()), rel_tol=1e-5)
    # only background in the batch: still finite
    bg = _one_hot(torch.full((1, 3, 3), 3), 4)
    assert torch.isfinite(weighted_cross_entropy(torch.randn(1, 4, 3, 3), bg))


def _cell_balanced_by_hand(logits, idx, weight) -> float:
    """Mean over the pixels of ``-log p(cell or background) + w_c * -log p(c | cell)``, with
    ``idx`` the class of each pixel (the last channel background) and ``weight`` by class."""
    p = F.softmax(logits.detach(), dim=1)
    bg = p.shape[1] - 1
    total = 0.0
    for pos in np.ndindex(*idx.shape):
        bi, r, c = pos
        k = int(idx[pos])
        cell = p[bi, :bg, r, c].sum()
        if k == bg:
            total -= math.log(p[bi, bg, r, c])
        else:
            total -= math.log(cell) + weight[k] * math.log(p[bi, k, r, c] / cell)
    return total / idx.numel()


def test_cell_balanced_ce_weighs_cell_classes_alike_and_detection_as_plain_ce():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.full((2, 3, 3), 3)  # background (last channel) everywhere but:
    idx[0, 0, :] = 0  # 3 px of class 0
    idx[1, 2, 2] = 1  # 1 px of class 1; class 2 absent
    y = _one_hot(idx, 4).double()
    got = cell_balanced_cross_entropy(logits, y)
    # by hand, per pixel: -log p(cell or background) + w_c * -log p(c | cell), with
    # w_c = 4 cell px / (2 present classes * n_c)
    weight = {0: 4 / (2 * 3), 1: 4 / (2 * 1)}
    assert math.isclose(got.item(), _cell_balanced_by_hand(logits, idx, weight), rel_tol=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all()
    # the detection map's gradient is the plain loss's: d/d(logit) of p(cell) summed over
    # classes, i.e. the gradient on a common shift of the cell logits, is the same
    logits2 = logits.detach().clone().requires_grad_(True)
    cross_entropy(logits2, y).backward()
    shift = logits.grad[:, :3].sum(dim=1)
    assert torch.allclose(shift, logits2.grad[:, :3].sum(dim=1), atol=1e-9)
    assert not torch.allclose(logits.grad, logits2.grad)
    # one cell class, or none, in the batch: the plain cross-entropy
    one = _one_hot(torch.where(idx == 1, 0, idx), 4).double()
    assert math.isclose(cell_balanced_cross_entropy(logits, one).item(),
                        cross_entropy(logits, one).item(), rel_tol=1e-6)
    bg = _one_hot(torch.full((2, 3, 3), 3), 4).double()
    assert math.isclose(cell_balanced_cross_entropy(logits, bg).item(),
                        cross_entropy(logits, bg).item(), rel_tol=1e-6)



def test_cell_balanced_ce_power_softens_the_balance_between_plain_and_full():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    idx = torch.full((2, 3, 3), 3)
    idx[0, 0, :] = 0  # 3 px of class 0, 1 px of class 1, none of class 2
    idx[1, 2, 2] = 1
    y = _one_hot(idx, 4).double()
    full = cell_balanced_cross_entropy(logits, y)
    assert math.isclose(cell_balanced_cross_entropy(logits, y, power=1.0).item(), full.item(),
                        rel_tol=1e-12)
    assert math.isclose(cell_balanced_cross_entropy(logits, y, power=0.0).item(),
                        cross_entropy(logits, y).item(), rel_tol=1e-6)
    # power 0.5 by hand: w_c = n_cell n_c^-1/2 / sum_k n_k^1/2 = 4 / (sqrt(3) + 1) / sqrt(n_c)
    z = 4 / (math.sqrt(3) + 1)
    weight = {0: z / math.sqrt(3), 1: z / 1.0}
    half = cell_balanced_cross_entropy(logits, y, power=0.5)
    assert math.isclose(half.item(), _cell_balanced_by_hand(logits, idx, weight), rel_tol=1e-6)
    # the rare class weighs more than with the plain loss and less than with the full balance
    assert weight[1] / weight[0] == pytest.approx(math.sqrt(3))


def test_cell_balanced_ce_puts_the_class_term_on_a_class_target_of_equal_weight():
    torch.manual_seed(4)
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.full((2, 3, 3), 3)
    idx[0, 0, :] = 0  # detection discs: 3 px of class 0, 1 px of class 1
    idx[1, 2, 2] = 1
    y = _one_hot(idx, 4).double()
    assert math.isclose(cell_balanced_cross_entropy(logits, y, y[:, :3]).item(),
                        cell_balanced_cross_entropy(logits, y).item(), rel_tol=1e-12)
    wide = torch.zeros(2, 3, 3, 3, dtype=torch.float64)  # wider class discs: 6 px and 4 px
    wide[0, 0, :2, :] = 1
    wide[1, 1, 1:, 1:] = 1
    got = cell_balanced_cross_entropy(logits, y, wide)
    # the class term on the wide discs, weighted by 4 detection px / (2 classes * n_c wide)
    p = F.softmax(logits.detach(), dim=1)
    weight = {0: 4 / (2 * 6), 1: 4 / (2 * 4)}
    total = 0.0
    for bi, r, c in np.ndindex(2, 3, 3):
        k = int(idx[bi, r, c])
        cell = p[bi, :3, r, c].sum()
        total -= math.log(cell if k < 3 else p[bi, 3, r, c])
        for cls in (0, 1):
            if wide[bi, cls, r, c]:
                total -= weight[cls] * math.log(p[bi, cls, r, c] / cell)
    assert math.isclose(got.item(), total / 18, rel_tol=1e-6)
    # the detection map still learns from the detection discs alone
    got.backward()
    logits2 = logits.detach().clone().requires_grad_(True)
    cross_entropy(logits2, y).backward()
    assert torch.allclose(logits.grad[:, :3].sum(dim=1), logits2.grad[:, :3].sum(dim=1),
                          atol=1e-9)


def test_plain_ce_and_bce():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 4, 4)
    idx = torch.randint(0, 5, (2, 4, 4))
    assert torch.allclose(cross_entropy(logits, _one_hot(idx, 5)), F.cross_entropy(logits, idx),
                          atol=1e-6)
    z = torch.randn(2, 1, 4, 4)
    t = (torch.rand(2, 1, 4, 4) > 0.5).float()
    p = torch.sigmoid(z)
    by_hand = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert torch.allclose(bce_loss(z, t), by_hand, atol=1e-6)
    z2 = torch.randn(2, 2, 4, 4)
    t2 = (torch.rand(2, 2, 4, 4) > 0.5).float()
    p2 = torch.sigmoid(z2)
    by_hand2 = -(t2 * p2.log() + (1 - t2) * (1 - p2).log()).sum() / (2 * 2 * 16)
    assert torch.allclose(map_bce_loss(z2, t2), by_hand2, atol=1e-6)


def test_soft_iou_and_l1():
    g = torch.zeros(1, 2, 2, 2)
    g[0, 0, 0, 0] = 1
    g[0, 1, :, 1] = 1
    assert soft_iou_loss(g, g).item() < 1e-5  # perfect prediction
    p = torch.full_like(g, 0.5)
    # channel 0: I = 0.5, U = 1 + 2 - 0.5 = 2.5 ; channel 1: I = 1, U = 2 + 2 - 1 = 3
    assert math.isclose(soft_iou_loss(p, g).item(), 1 - (0.5 / 2.5 + 1 / 3) / 2, rel_tol=1e-5)
    assert math.isclose(l1_loss(p, g).item(), 0.5)
