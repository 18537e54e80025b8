"""The small path's few-operation case (ops/small_common.py, ops/small_terms.py) on its own.

Each test runs with the per-row arithmetic in NumPy and in torch (``small_terms.ROW_ARRAYS``),
against the float64 reference of conftest.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from conftest import grad_of, reference_loss
from encouraging_loss import encouraging_loss
from encouraging_loss.ops import small_common, small_terms
from encouraging_loss.options import LossOptions

#: (N, C): class-major (C < 16), over the last dimension, and smoothing's class-major small case.
SHAPES = [(128, 10), (256, 100), (64, 50), (300, 40)]


@pytest.fixture(params=["numpy", "torch"], autouse=True)
def row_arrays(request, monkeypatch):
    module = numpy if request.param == "numpy" else None
    monkeypatch.setattr(small_terms, "ROW_ARRAYS", small_terms.RowArrays(module))
    return request.param


def _case(shape, dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    target = torch.randint(0, shape[1], (shape[0],), generator=generator)
    return logits.to(dtype).requires_grad_(), target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dispatch_takes_the_few_operation_case(shape, smoothing, dtype):
    logits, target = _case(shape, dtype)
    options = LossOptions(label_smoothing=smoothing)
    assert small_common.hard_log_bonus_loss(logits, target, options) is not None
    assert small_common.loss_plan(options) is options.derived[small_common.PLAN_KEY]


@pytest.mark.parametrize(
    "change",
    [dict(reduction="none"), dict(log_end=1.0), dict(bonus="power"), dict(bonus_start=0.1),
     dict(bonus_scale=0.0), dict(z_loss=1e-4), dict(softcap=30.0)],
)  # fmt: skip
def test_dispatch_leaves_other_options_to_the_general_route(change):
    logits, target = _case((128, 10), torch.float32)
    assert small_common.hard_log_bonus_loss(logits, target, LossOptions(**change)) is None


def test_dispatch_leaves_other_tensors_to_the_general_route():
    options = LossOptions()
    logits, target = _case((128, 10), torch.float32)
    assert small_common.hard_log_bonus_loss(logits.bfloat16(), target, options) is None
    assert small_common.hard_log_bonus_loss(logits, target.int(), options) is None
    ignored = target.clone()
    ignored[3] = -100
    assert small_common.hard_log_bonus_loss(logits, ignored, options) is None
    assert small_common.hard_log_bonus_loss(logits, target, LossOptions(ignore_index=2)) is None


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_matches_reference(shape, smoothing, reduction):
    logits, target = _case(shape, torch.float64, scale=5.0)
    kwargs = dict(label_smoothing=smoothing, reduction=reduction)
    value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
    expected, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_within_cross_entropy_error(shape, smoothing, scale, dtype):
    """The reduced value errs no more than torch CE's (or its own final rounding); the gradient
    by one unit of the dtype more than CE's at most (bfloat16 takes the general route)."""
    logits, target = _case(shape, dtype, scale=scale, seed=5)

    def errors(fn, reference, **kwargs):
        value, grad = grad_of(fn, logits, target, label_smoothing=smoothing, **kwargs)
        expected, expected_grad = grad_of(reference, logits.double(), target,
                                          label_smoothing=smoothing, **kwargs)  # fmt: skip
        half_ulp = (torch.nextafter(value, value + 1) - value).abs().item() / 2
        relative = 1.0 + expected.abs().item()
        value_error = (value.double() - expected).abs().item() / relative
        grad_error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
        return value_error, half_ulp / relative, grad_error.item()

    el_value, el_rounding, el_grad = errors(encouraging_loss, reference_loss)
    ce_value, _, ce_grad = errors(F.cross_entropy,
                                  lambda x, t, **k: reference_loss(x, t, bonus_scale=0.0, **k))
    eps = torch.finfo(dtype).eps
    assert el_value <= max(ce_value, el_rounding) * (1 + 1e-6), (el_value, ce_value, el_rounding)
    assert el_grad <= ce_grad + eps, (el_grad, ce_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [2, 10, 40])
def test_confident_target_gradient_is_exact(dtype, num_classes):
    """p_y = 1 - 1e-8, below float32's resolution of 1: the target's gradient
    -(1 - p_y)(1 + rho p_y / u) comes from expm1(log p_y), not from p_y - 1 rounded."""
    margin = math.log(1e8 * (num_classes - 1))
    logits = torch.zeros(16, num_classes, dtype=torch.float64)
    target = torch.arange(16) % num_classes
    logits[torch.arange(16), target] = margin
    logits = logits.to(dtype).requires_grad_()
    value, grad = grad_of(encouraging_loss, logits, target, reduction="sum")
    expected, expected_grad = grad_of(reference_loss, logits.double(), target, reduction="sum")
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0.0)
    rows = torch.arange(16)
    torch.testing.assert_close(grad[rows, target].double(), expected_grad[rows, target],
                               rtol=1e-5, atol=0.0)  # fmt: skip


@pytest.mark.parametrize("shape", [(6, 5), (4, 20), (3, 40)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck(shape, smoothing, reduction, monkeypatch):
    # Small inputs: the smoothed case's last-dimension reading switched on for them too.
    monkeypatch.setattr(small_terms, "SMOOTHED_LAST_FROM", 0)
    logits, target = _case(shape, torch.float64)
    assert small_common.hard_log_bonus_loss(logits, target, LossOptions(
        label_smoothing=smoothing, reduction=reduction)) is not None  # fmt: skip
    torch.autograd.gradcheck(
        lambda x: encouraging_loss(x, target, label_smoothing=smoothing, reduction=reduction,
                                   log_end=0.5),
        (logits,),
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(128, 10), (256, 100)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_scaled_and_repeated_backward(shape, smoothing):
    logits, target = _case(shape, torch.float64)
    loss = encouraging_loss(logits, target, label_smoothing=smoothing)
    (3.0 * loss).backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    torch.testing.assert_close(first, 3.0 * logits.grad, rtol=1e-14, atol=0.0)
    _, expected = grad_of(reference_loss, logits, target, label_smoothing=smoothing)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-14)
