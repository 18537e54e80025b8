"""Shared test helpers: a float64 reference written from the paper's formula, and input makers."""

from __future__ import annotations

import math

import pytest
import torch

DTYPES_LOW = (torch.float32, torch.bfloat16, torch.float16)


def bonus_from_probs(p, log_one_minus_p, kind="log", log_end=0.75, gamma=1.0, start=0.0):
    """b(p) in float64 from the definitions, given p and an exact log(1 - p)."""

    def raw(p, log_one_minus_p):
        if kind == "log":
            value = log_one_minus_p
            if log_end < 1.0:
                tangent = math.log1p(-log_end) - (p - log_end) / (1.0 - log_end)
                value = torch.where(p > log_end, tangent, value)
            return value
        if kind == "power":
            return -p.pow(gamma)
        if kind == "cosine":
            return torch.cos(math.pi * p) - 1.0
        return torch.zeros_like(p)

    value = raw(p, log_one_minus_p)
    if start > 0.0:
        s = torch.tensor(start, dtype=torch.float64)
        value = torch.where(p >= start, value - raw(s, torch.log1p(-s)), torch.zeros_like(value))
    return value


def reference_loss(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    log_end=0.75,
    bonus_scale=1.0,
    bonus="log",
    bonus_gamma=1.0,
    bonus_start=0.0,
    bonus_weight=None,
    token_weight=None,
    z_loss=0.0,
    softcap=None,
):
    """EL = sum_j w_j q_j (-log p_j + rho v_j b(p_j)), reduced as F.cross_entropy, in float64.

    Written directly from the formula, independent of the library: log p from log_softmax, 1 - p as
    the sum of the other probabilities (exact where p -> 1), autograd for gradients. With
    ``token_weight`` (the index shape) each element's loss is multiplied by its weight t and the
    mean divides by sum t w_y over the non-ignored elements (sum t for probability targets).
    ``softcap`` c: the logits become c tanh(x / c) first; ``z_loss``: z lse**2 is added to each
    non-ignored element's loss before its token weight (not times its class weight).
    """
    x = input.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if x.dim() == 1:
        x = x.unsqueeze(0)
        target = target.unsqueeze(0)
    num_classes = x.shape[1]
    x = x.movedim(1, -1).reshape(-1, num_classes)
    log_p = torch.log_softmax(x, dim=1)
    p = log_p.exp()
    # log(1 - p_k) = logsumexp_{j != k} log p_j: no cancellation as p_k -> 1.
    eye = torch.eye(num_classes, dtype=torch.bool, device=x.device)
    others = log_p.unsqueeze(1).expand(-1, num_classes, -1).masked_fill(eye, float("-inf"))
    log_one_minus_p = torch.logsumexp(others, dim=2)
    if target.is_floating_point():
        q = target.double().movedim(1, -1).reshape(-1, num_classes) if target.dim() > 1 \
            else target.double().reshape(-1, num_classes)
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
        valid = torch.ones(q.shape[0], dtype=torch.bool)
    else:
        flat = target.reshape(-1)
        valid = flat != ignore_index
        safe = torch.where(valid, flat, 0)
        q = torch.nn.functional.one_hot(safe, num_classes).double()
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
        q = q * valid.unsqueeze(1)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    v = torch.ones(num_classes, dtype=torch.float64) if bonus_weight is None \
        else bonus_weight.double()
    b = bonus_from_probs(p, log_one_minus_p, bonus, log_end, bonus_gamma, bonus_start)
    per_class = -log_p + bonus_scale * v * b if bonus_scale != 0 else -log_p
    per_class = torch.where(q > 0, per_class, torch.zeros_like(per_class))
    rows = (w * q * per_class).sum(1)
    if z_loss != 0.0:
        rows = rows + z_loss * torch.logsumexp(x, dim=1).square() * valid
    t = torch.ones_like(rows) if token_weight is None else token_weight.double().reshape(-1)
    if token_weight is not None:  # a weight 0 drops the element, as ignore_index does
        rows = torch.where(t != 0, rows * t, 0.0)
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    if target.is_floating_point():
        return rows.sum() / (rows.shape[0] if token_weight is None else t.sum())
    return rows.sum() / (w[torch.where(valid, target.reshape(-1), 0)] * valid * t).sum()


def make_case(shape, num_classes, *, dtype=torch.float64, probs=False, ignore_fraction=0.0,
              scale=3.0, seed=0, ignore_index=-100):
    """Logits of shape (N, C, *shape[1:]) (or (C) for shape ()) and matching targets."""
    generator = torch.Generator().manual_seed(seed)
    if shape == ():
        logits_shape = (num_classes,)
        index_shape = ()
    else:
        logits_shape = (shape[0], num_classes, *shape[1:])
        index_shape = tuple(shape)
    logits = (scale * torch.randn(logits_shape, generator=generator, dtype=torch.float64)).to(dtype)
    if probs:
        raw = torch.randn(logits_shape, generator=generator, dtype=torch.float64)
        class_dim = 0 if shape == () else 1
        target = torch.softmax(2 * raw, dim=class_dim).to(dtype)
    else:
        target = torch.randint(0, num_classes, index_shape, generator=generator)
        if ignore_fraction > 0 and target.dim() > 0:
            mask = torch.rand(index_shape, generator=generator) < ignore_fraction
            target = torch.where(mask, ignore_index, target)
    return logits.requires_grad_(), target


def grad_of(loss_fn, logits, *args, **kwargs):
    """(value, gradient) of loss_fn w.r.t. logits, summed for reduction='none'."""
    x = logits.detach().clone().requires_grad_()
    value = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["small", "small-general", "rows"])
def loss_path(request, monkeypatch):
    """Run a test on the small-problem path (where it applies: its few-operation case first),
    on that path without its few-operation case, and on the row paths."""
    from encouraging_loss.ops import small, small_common

    if request.param == "small-general":
        monkeypatch.setattr(small_common, "HARD_LOG_BONUS_FAST", False)
    if request.param == "rows":
        monkeypatch.setattr(small, "SMALL_MAX_ELEMENTS", -1)
    return request.param


@pytest.fixture
def rows_path(monkeypatch):
    """The row paths only (the small-problem path switched off)."""
    from encouraging_loss.ops import small

    monkeypatch.setattr(small, "SMALL_MAX_ELEMENTS", -1)
