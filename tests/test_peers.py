"""Focal loss, Poly-1 and the sigmoid form against references written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import grad_of, make_case
from encouraging_loss import binary_encouraging_loss_with_logits, focal_loss, poly1_loss

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(), (6,), (4, 3)])
def test_peers_reduce_to_cross_entropy(reduction, shape):
    logits, target = make_case(shape, 5, ignore_fraction=0.3)
    weight = torch.rand(5, dtype=torch.float64) + 0.2
    options = dict(weight=weight, reduction=reduction)
    expected, expected_grad = grad_of(F.cross_entropy, logits, target, **options)
    for loss, extra in [(focal_loss, dict(gamma=0.0)), (poly1_loss, dict(epsilon=0.0))]:
        value, grad = grad_of(loss, logits, target, **options, **extra)
        torch.testing.assert_close(value, expected, equal_nan=True)
        torch.testing.assert_close(grad, expected_grad, equal_nan=True)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_matches_definition(gamma):
    logits, target = make_case((8,), 4, ignore_fraction=0.25, seed=2)
    weight = torch.rand(4, dtype=torch.float64) + 0.2
    valid = target != -100
    safe = torch.where(valid, target, 0)

    def reference(x, t, **_):
        p = x.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        per_item = -weight[safe] * (1 - p) ** gamma * p.log() * valid
        return per_item.sum() / (weight[safe] * valid).sum()

    value, grad = grad_of(focal_loss, logits, target, gamma=gamma, weight=weight)
    expected, expected_grad = grad_of(reference, logits, target)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_poly1_matches_definition(smoothing):
    logits, target = make_case((8,), 4, seed=4)

    def reference(x, t, **_):
        q = F.one_hot(t, 4).double() * (1 - smoothing) + smoothing / 4
        p = x.softmax(1)
        cross_entropy = -(q * p.log()).sum(1)
        return (cross_entropy + 2.0 * (1 - (q * p).sum(1))).mean()

    value, grad = grad_of(poly1_loss, logits, target, epsilon=2.0, label_smoothing=smoothing)
    expected, expected_grad = grad_of(reference, logits, target)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def _binary_reference(x, t, base="bce", alpha=None, gamma=2.0, log_end=0.75, bonus_scale=1.0,
                      reduction="mean"):
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)

    def bonus(prob, log_complement):
        if log_end == 1:
            return log_complement
        tangent = math.log1p(-log_end) - (prob - log_end) / (1 - log_end)
        return torch.where(prob > log_end, tangent, log_complement)

    log_p, log_1mp = F.logsigmoid(x), F.logsigmoid(-x)
    loss = -(t * log_p + (1 - t) * log_1mp)
    if base == "focal":  # torchvision.ops.sigmoid_focal_loss's formula
        p_t = p * t + (1 - p) * (1 - t)
        loss = loss * (1 - p_t) ** gamma
    loss = loss + bonus_scale * (t * bonus(p, log_1mp) + (1 - t) * bonus(1 - p, log_p))
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize("base,alpha", [("bce", None), ("focal", 0.25), ("bce", 0.6)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_end", [0.75, 1.0])
def test_binary_matches_definition(base, alpha, reduction, log_end):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    labels = (torch.rand(5, 4, generator=generator) > 0.5).double()
    labels[0] = 0.3  # soft labels too
    options = dict(base=base, alpha=alpha, log_end=log_end, reduction=reduction)
    value, grad = grad_of(binary_encouraging_loss_with_logits, logits, labels, **options)
    expected, expected_grad = grad_of(_binary_reference, logits, labels, **options)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_binary_without_bonus_is_bce():
    logits, labels = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    weight = torch.rand(3, dtype=torch.float64)
    value = binary_encouraging_loss_with_logits(logits, labels, weight, bonus_scale=0.0)
    torch.testing.assert_close(value, F.binary_cross_entropy_with_logits(logits, labels, weight))


def test_binary_confident_logits_are_exact():
    logits = torch.tensor([30.0, -30.0], requires_grad=True)
    labels = torch.tensor([1.0, 0.0])
    loss = binary_encouraging_loss_with_logits(logits, labels, log_end=1.0, reduction="sum")
    loss.backward()
    # Each element: softplus(-30) - softplus(30) = -30 exactly; gradient stays -1 / +1.
    assert loss.item() == pytest.approx(-60.0, rel=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([-1.0, 1.0]))


def test_binary_gradcheck():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.rand(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: binary_encouraging_loss_with_logits(x, labels, base="focal", alpha=0.25),
        (logits,),
    )
