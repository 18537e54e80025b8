"""encouraging_loss against torch's cross-entropy and a float64 reference from the formula."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import grad_of, make_case, reference_loss
from encouraging_loss import encouraging_loss, linear_encouraging_loss

# Every test runs on the small-problem path (ops/small.py, where it applies) and on the row paths.
pytestmark = pytest.mark.usefixtures("loss_path")

SHAPES = [(), (7,), (5, 3), (3, 2, 2)]  # input (C), (N, C), (N, C, d1), (N, C, d1, d2)
REDUCTIONS = ["mean", "sum", "none"]


def _weight(use, num_classes):
    return torch.rand(num_classes, dtype=torch.float64) + 0.2 if use else None


@pytest.mark.parametrize(
    "shape,probs,use_weight,reduction,smoothing",
    list(itertools.product(SHAPES, [False, True], [False, True], REDUCTIONS, [0.0, 0.2])),
)
@pytest.mark.parametrize("no_bonus", ["zero_scale", "none_shape"])
def test_without_bonus_equals_cross_entropy(shape, probs, use_weight, reduction, smoothing,
                                            no_bonus):
    num_classes = 4
    logits, target = make_case(shape, num_classes, probs=probs,
                               ignore_fraction=0.0 if probs else 0.3)
    weight = _weight(use_weight, num_classes)
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    bonus = dict(bonus_scale=0.0) if no_bonus == "zero_scale" else dict(bonus="none")
    value, grad = grad_of(encouraging_loss, logits, target, **options, **bonus)
    expected_value, expected_grad = grad_of(F.cross_entropy, logits, target, **options)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12, equal_nan=True)


BONUS_OPTIONS = [
    dict(),
    dict(log_end=1.0),
    dict(log_end=0.5),
    dict(log_end=0.3),
    dict(bonus_scale=0.5, log_end=0.9),
    dict(bonus="power", bonus_gamma=2.0),
    dict(bonus="power", bonus_gamma=0.5),
    dict(bonus="cosine"),
    dict(bonus_start=0.5),
    dict(bonus_start=0.3, log_end=1.0),
    dict(bonus="cosine", bonus_start=0.2),
    dict(bonus_scale=2.0, log_end=1.0),
]


def _name(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", BONUS_OPTIONS, ids=_name)
@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)])
@pytest.mark.parametrize("use_weight,use_bonus_weight", [(False, False), (True, True)])
def test_matches_float64_reference(options, probs, smoothing, use_weight, use_bonus_weight):
    num_classes = 6
    logits, target = make_case((9, 2), num_classes, probs=probs,
                               ignore_fraction=0.0 if probs else 0.2, scale=4.0)
    weight = _weight(use_weight, num_classes)
    bonus_weight = _weight(use_bonus_weight, num_classes)
    for reduction in REDUCTIONS:
        kwargs = dict(weight=weight, reduction=reduction, label_smoothing=smoothing,
                      bonus_weight=bonus_weight, **options)
        value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
        expected_value, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
        torch.testing.assert_close(value, expected_value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(log_end=1.0), dict(bonus="cosine"),
                                     dict(bonus="power", bonus_gamma=1.5), dict(bonus_start=0.4)])
@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.15), (True, 0.05)])
def test_gradcheck(options, probs, smoothing):
    logits, target = make_case((4,), 5, probs=probs, ignore_fraction=0.0, scale=2.0, seed=3)
    weight = torch.rand(5, dtype=torch.float64) + 0.5

    def loss(x):
        return encouraging_loss(x, target, weight=weight, label_smoothing=smoothing,
                                reduction="none", **options)

    assert torch.autograd.gradcheck(loss, (logits.detach().requires_grad_(),))


def test_rho_one_is_logsumexp_of_other_margins():
    logits, target = make_case((16,), 10, dtype=torch.float64, scale=5.0)
    loss = encouraging_loss(logits, target, log_end=1.0, bonus_scale=1.0, reduction="none")
    z_y = logits.gather(1, target.unsqueeze(1))
    others = logits.scatter(1, target.unsqueeze(1), float("-inf"))
    torch.testing.assert_close(loss, torch.logsumexp(others - z_y, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_confident_prediction_is_exact(dtype):
    # p_y = 1 - 1e-8: log(1 - p_y) = log(1e-8) exactly, and the target logit keeps gradient -1.
    margin = math.log(1e8)  # 1 - p_y = 1 / (1 + e^margin) ~ 1e-8
    logits = torch.tensor([[0.0, margin]], dtype=dtype, requires_grad=True)
    target = torch.tensor([1])
    loss = encouraging_loss(logits, target, log_end=1.0)
    loss.backward()
    exact = math.log1p(math.exp(-margin)) - math.log1p(math.exp(margin))
    assert loss.item() == pytest.approx(exact, rel=1e-6)
    assert logits.grad[0, 1].item() == pytest.approx(-1.0, rel=1e-6)
    assert logits.grad[0, 0].item() == pytest.approx(1.0, rel=1e-6)
    # The authors' clamp (1 - p >= 1e-5) would give log(1e-5) and a zero gradient here.
    assert loss.item() < math.log(1e-5) - 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_logits_stay_finite(dtype, smoothing):
    logits = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 9.99e3, 0.0]], dtype=dtype)
    target = torch.tensor([0, 2])
    for options in [dict(), dict(log_end=1.0), dict(log_end=0.5)]:
        value, grad = grad_of(encouraging_loss, logits.requires_grad_(), target,
                              label_smoothing=smoothing, reduction="none", **options)
        assert value.dtype == dtype and grad.dtype == dtype
        expected, expected_grad = grad_of(reference_loss, logits.double(), target,
                                          label_smoothing=smoothing, reduction="none", **options)
        # Where the true value fits the dtype, it is finite and right.
        fits = expected.abs() < torch.finfo(dtype).max
        assert torch.isfinite(value[fits]).all()
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-2)


def _errors(fn, reference, logits, target, **kwargs):
    """(value error, gradient error) against float64: the value error relative to 1 + |value|, the
    gradient error relative to the largest gradient entry (the scale a dtype can resolve)."""
    value, grad = grad_of(fn, logits, target, reduction="none", **kwargs)
    expected, expected_grad = grad_of(reference, logits.double(), target, reduction="none",
                                      **kwargs)
    value_error = ((value.double() - expected).abs() / (expected.abs() + 1)).max().item()
    grad_error = ((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()).item()
    return value_error, grad_error


def _reference_cross_entropy(x, t, **kwargs):
    return reference_loss(x, t, bonus_scale=0.0, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
@pytest.mark.parametrize("options", [dict(), dict(log_end=1.0)], ids=["log_end=0.75", "log_end=1"])
def test_error_in_each_dtype_within_cross_entropy_error(dtype, smoothing, scale, options):
    """EL in each dtype errs no more than torch CE does in that dtype, on the same inputs.

    The loss value meets CE's error outright; the gradient is allowed one unit of the dtype's
    resolution on top (float32 rounding of the last product), measured relative to its scale.
    """
    logits, target = make_case((64,), 50, dtype=dtype, scale=scale, seed=11)
    el_value_error, el_grad_error = _errors(encouraging_loss, reference_loss, logits, target,
                                            label_smoothing=smoothing, **options)
    ce_value_error, ce_grad_error = _errors(F.cross_entropy, _reference_cross_entropy, logits,
                                            target, label_smoothing=smoothing)
    # Both are mostly the final rounding to the dtype: compare up to a sliver of one unit.
    slack = 1e-3 * torch.finfo(dtype).eps
    assert el_value_error <= ce_value_error + slack, (el_value_error, ce_value_error)
    assert el_grad_error <= ce_grad_error + torch.finfo(dtype).eps, (el_grad_error, ce_grad_error)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_reduced_float32_error_within_cross_entropy_error(smoothing, num_classes, scale):
    """The reduced loss (the small-problem path's few-operation case, where it applies) errs no
    more than torch CE's reduced loss in float32, or than its own final rounding to float32
    (half a unit in the last place: one scalar's rounding is luck, so CE's may be smaller); the
    gradient by one unit more than CE's at most."""
    logits, target = make_case((64,), num_classes, dtype=torch.float32, scale=scale, seed=3)

    def errors(fn, reference, **kwargs):
        value, grad = grad_of(fn, logits, target, **kwargs)
        expected, expected_grad = grad_of(reference, logits.double(), target, **kwargs)
        half_ulp = (torch.nextafter(value, value + 1) - value).abs().item() / 2
        relative = 1.0 + expected.abs().item()
        value_error = (value.double() - expected).abs().item() / relative
        grad_error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
        return value_error, half_ulp / relative, grad_error.item()

    el_value, el_rounding, el_grad = errors(encouraging_loss, reference_loss,
                                            label_smoothing=smoothing)  # fmt: skip
    ce_value, _, ce_grad = errors(F.cross_entropy, _reference_cross_entropy,
                                  label_smoothing=smoothing)  # fmt: skip
    eps = torch.finfo(torch.float32).eps
    assert el_value <= max(ce_value, el_rounding) * (1 + 1e-6), (el_value, ce_value, el_rounding)
    assert el_grad <= ce_grad + eps, (el_grad, ce_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("probs", [False, True])
def test_empty_batch_behaves_as_cross_entropy(reduction, smoothing, probs):
    logits = torch.zeros(0, 5, requires_grad=True)
    target = torch.zeros(0, 5) if probs else torch.zeros(0, dtype=torch.long)
    value = encouraging_loss(logits, target, reduction=reduction, label_smoothing=smoothing)
    expected = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(value, expected, equal_nan=True)
    value.sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_all_ignored_gives_nan_mean_as_cross_entropy(smoothing):
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3,), -100)
    value = encouraging_loss(logits, target, label_smoothing=smoothing)
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing)
    assert math.isnan(value.item()) and math.isnan(expected.item())
    value.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))  # torch CE's gradient too
    assert encouraging_loss(logits, target, reduction="sum").item() == 0.0


def test_weight_smoothing_ignore_index_together():
    """The combination torch's own CE got wrong in its history (pytorch#73205, #75283)."""
    num_classes = 5
    weight = torch.tensor([0.1, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    for ignore_index in (-100, 3):
        logits, t = make_case((12,), num_classes, ignore_fraction=0.3, seed=5,
                              ignore_index=ignore_index)
        t[1] = ignore_index
        for reduction in REDUCTIONS:
            options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=0.3)
            value, grad = grad_of(encouraging_loss, logits, t, bonus_scale=0.0, **options)
            expected, expected_grad = grad_of(F.cross_entropy, logits, t, **options)
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
            value, grad = grad_of(encouraging_loss, logits, t, **options)
            expected, expected_grad = grad_of(reference_loss, logits, t, **options)
            torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index_that_is_a_class(smoothing, reduction):
    """An ignore_index in [0, C) (the shape of the most common call otherwise): its rows count
    for nothing, as in the float64 reference."""
    logits, target = make_case((9,), 5, seed=8)
    target[[0, 4]] = 2
    options = dict(ignore_index=2, reduction=reduction, label_smoothing=smoothing)
    value, grad = grad_of(encouraging_loss, logits, target, **options)
    expected, expected_grad = grad_of(reference_loss, logits, target, **options)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_ignored_rows_with_nonfinite_logits_contribute_nothing():
    logits = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([1, -100])
    value = encouraging_loss(logits, target)
    expected = encouraging_loss(logits[:1], target[:1])
    torch.testing.assert_close(value, expected)


def test_non_contiguous_and_channels_inputs():
    logits, target = make_case((4, 3, 2), 5, dtype=torch.float32)
    transposed = logits.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not transposed.is_contiguous()
    value, grad = grad_of(encouraging_loss, transposed, target, label_smoothing=0.1)
    expected, expected_grad = grad_of(reference_loss, transposed.double(), target,
                                      label_smoothing=0.1)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_second_backward_through_retained_graph(smoothing):
    # The first backward consumes the private buffer in place; a second one recomputes it.
    logits = torch.randn(4, 3, requires_grad=True)
    loss = encouraging_loss(logits, torch.tensor([0, 1, 2, 0]), label_smoothing=smoothing)
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(2 * loss, logits)
    torch.testing.assert_close(second, 2 * first)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 6),
    extra=st.sampled_from([(), (2,), (1, 3)]),
    num_classes=st.integers(1, 9),
    probs=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    use_weight=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    bonus=st.sampled_from(["log", "power", "cosine", "none"]),
    log_end=st.sampled_from([1.0, 0.75, 0.5, 0.2]),
    bonus_scale=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    bonus_start=st.sampled_from([0.0, 0.5]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    scale=st.sampled_from([0.5, 5.0, 30.0]),
    seed=st.integers(0, 10_000),
    use_token_weight=st.booleans(),
)
def test_property_matches_reference(batch, extra, num_classes, probs, smoothing, use_weight,
                                    reduction, bonus, log_end, bonus_scale, bonus_start, dtype,
                                    scale, seed, use_token_weight):
    logits, target = make_case((batch, *extra), num_classes, dtype=dtype, probs=probs,
                               ignore_fraction=0.0 if probs else 0.25, scale=scale, seed=seed)
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.1 if use_weight else None
    token_weight = _token_weight((batch, *extra), seed=seed).to(dtype) if use_token_weight \
        else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=smoothing, bonus=bonus,
                  log_end=log_end, bonus_scale=bonus_scale, bonus_start=bonus_start,
                  token_weight=token_weight)
    value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
    expected, expected_grad = grad_of(reference_loss, logits.double(), target, **kwargs)
    assert value.dtype == dtype and grad.dtype == dtype
    tolerance = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-2}[dtype]
    size = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(value.double(), expected, rtol=tolerance,
                               atol=tolerance * size, equal_nan=True)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance,
                               atol=tolerance * max(1.0, bonus_scale) * 4, equal_nan=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("log_end", [1.0, 0.75])
def test_single_class_rows_with_ignored_items(smoothing, log_end):
    # One class: p = 1 identically, log(1 - p) = -inf; ignored items must stay out (0, not NaN).
    logits = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, -100, 0], [-100, 0, 0]])
    for reduction in REDUCTIONS:
        kwargs = dict(label_smoothing=smoothing, log_end=log_end, bonus_scale=0.5,
                      reduction=reduction)
        value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
        expected, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
        torch.testing.assert_close(value, expected)
        assert not torch.isnan(value).any()
        assert (grad == 0).all()


# --- per-element weights (token_weight) ---------------------------------------------------------


def _token_weight(index_shape, seed=0, zeros=True):
    """Weights in [0, 2) of the index shape, a few exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    weight = 2 * torch.rand(index_shape, generator=generator, dtype=torch.float64)
    if zeros and weight.dim() > 0 and weight.numel() > 2:
        weight.view(-1)[1] = 0.0
    return weight


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(log_end=1.0),
                                     dict(label_smoothing=0.2, bonus="power", bonus_gamma=2.0),
                                     dict(ignore_index=1)], ids=_name)
def test_token_weight_matches_float64_reference(shape, probs, use_weight, options):
    num_classes = 4
    logits, target = make_case(shape, num_classes, probs=probs, seed=2,
                               ignore_fraction=0.0 if probs else 0.3,
                               ignore_index=options.get("ignore_index", -100))
    weight = _weight(use_weight, num_classes)
    token_weight = _token_weight(shape)  # the index shape, for probability targets too
    for reduction in REDUCTIONS:
        kwargs = dict(weight=weight, reduction=reduction, token_weight=token_weight, **options)
        value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
        expected, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.15), (True, 0.05)])
def test_token_weight_gradcheck(probs, smoothing):
    logits, target = make_case((4, 2), 5, probs=probs, scale=2.0, seed=3)
    token_weight = _token_weight((4, 2), seed=4)
    for reduction in ("mean", "none"):

        def loss(x, reduction=reduction):
            return encouraging_loss(x, target, label_smoothing=smoothing, reduction=reduction,
                                    token_weight=token_weight)

        assert torch.autograd.gradcheck(loss, (logits.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_token_weight_of_ones_is_the_unweighted_loss(dtype, probs, smoothing):
    logits, target = make_case((6, 3), 5, dtype=dtype, probs=probs, seed=6,
                               ignore_fraction=0.0 if probs else 0.2)
    ones = torch.ones(6, 3, dtype=dtype)
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=smoothing)
        value, grad = grad_of(encouraging_loss, logits, target, token_weight=ones, **options)
        expected, expected_grad = grad_of(encouraging_loss, logits, target, **options)
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_zero_token_weights(smoothing):
    """A zero weight drops its element as ignore_index would (loss and gradient 0); all zeros
    give the mean over nothing (NaN, zero gradient), as an all-ignored batch does."""
    logits, target = make_case((5,), 4, seed=9)
    token_weight = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    ignored = torch.where(token_weight == 0, -100, target)
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=smoothing, token_weight=token_weight)
        value, grad = grad_of(encouraging_loss, logits, target, **options)
        expected, expected_grad = grad_of(encouraging_loss, logits, ignored, **options)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
        assert (grad[2] == 0).all()
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    value, grad = grad_of(encouraging_loss, logits, target, label_smoothing=smoothing,
                          token_weight=torch.zeros(5, dtype=torch.float64))
    assert math.isnan(value.item())
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_weight_error_within_cross_entropy_error(dtype, smoothing):
    """The weighted mean in each dtype errs no more than torch CE's weighted mean in that dtype
    (its rows times the weights, over their sum) against float64, up to a sliver of one unit."""
    logits, target = make_case((64,), 50, dtype=dtype, scale=10.0, seed=11)
    token_weight = _token_weight((64,), seed=12).to(dtype)

    def weighted_cross_entropy(x, t, **kwargs):
        rows = F.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
        weight = token_weight.to(rows.dtype)
        return (rows * weight).sum() / weight.sum()

    def errors(fn, reference, **kwargs):
        value, grad = grad_of(fn, logits, target, **kwargs)
        expected, expected_grad = grad_of(reference, logits.double(), target, **kwargs)
        value_error = (value.double() - expected).abs().item() / (1 + expected.abs().item())
        grad_error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
        return value_error, grad_error.item()

    el_value, el_grad = errors(encouraging_loss, reference_loss, label_smoothing=smoothing,
                               token_weight=token_weight)  # fmt: skip
    ce_value, ce_grad = errors(weighted_cross_entropy, _reference_cross_entropy,
                               label_smoothing=smoothing, token_weight=token_weight)
    eps = torch.finfo(dtype).eps
    assert el_value <= ce_value + 0.5 * eps, (el_value, ce_value)
    assert el_grad <= ce_grad + eps, (el_grad, ce_grad)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(token_weight=torch.ones(4)), ValueError, r"token_weight must have the target's"),
        (dict(token_weight=torch.ones(5, 1)), ValueError, r"token_weight .* shape \(5,\)"),
        (dict(token_weight=torch.ones(5, dtype=torch.long)), TypeError,
         r"token_weight must be a floating-point tensor of shape \(5,\)"),
        (dict(token_weight=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])), ValueError,
         r"token_weight must hold finite values >= 0"),
        (dict(token_weight=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])), ValueError,
         r"token_weight must hold finite values >= 0"),
        (dict(token_weight=torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])), ValueError,
         r"token_weight must hold finite values >= 0"),
        (dict(token_weight=torch.ones(5, device="meta")), ValueError, r"token_weight is on meta"),
        (dict(token_weight=torch.ones(5, requires_grad=True)), ValueError,
         r"token_weight must not require grad"),
        (dict(token_weight=[1.0] * 5), TypeError, r"token_weight must be a torch.Tensor"),
    ],
)
def test_token_weight_bad_inputs(change, error, match):
    logits, target = make_case((5,), 3, dtype=torch.float32)
    with pytest.raises(error, match=match):
        encouraging_loss(logits, target, **change)


def test_token_weight_value_check_follows_validate_args():
    logits, target = make_case((5,), 3, dtype=torch.float32)
    negative = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])
    # Without the value check (validate_args=False, the hot-path setting) the values are used.
    value = encouraging_loss(logits, target, token_weight=negative, validate_args=False,
                             reduction="sum")
    expected = (encouraging_loss(logits, target, reduction="none") * negative).sum()
    torch.testing.assert_close(value, expected)



# --- z-loss, logsumexp, softcap ---------------------------------------------------------------

LOGIT_TERMS = [dict(z_loss=0.05), dict(softcap=3.0), dict(z_loss=0.02, softcap=2.5)]


@pytest.mark.parametrize("terms", LOGIT_TERMS, ids=_name)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("use_weight,use_token_weight", [(False, False), (True, True)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(ignore_index=1)],
                         ids=_name)  # fmt: skip
def test_logit_terms_match_float64_reference(terms, shape, probs, use_weight, use_token_weight,
                                             options):  # fmt: skip
    num_classes = 4
    logits, target = make_case(shape, num_classes, probs=probs, seed=5,
                               ignore_fraction=0.0 if probs else 0.3,
                               ignore_index=options.get("ignore_index", -100))  # fmt: skip
    weight = _weight(use_weight, num_classes)
    token_weight = _token_weight(shape) if use_token_weight else None
    for reduction in REDUCTIONS:
        kwargs = dict(weight=weight, reduction=reduction, token_weight=token_weight, **options,
                      **terms)  # fmt: skip
        value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
        expected, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("terms", LOGIT_TERMS, ids=_name)
@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.15), (True, 0.05)])
def test_logit_terms_gradcheck(terms, probs, smoothing):
    logits, target = make_case((4, 2), 5, probs=probs, scale=2.0, seed=3)
    token_weight = _token_weight((4, 2), seed=4)
    for reduction in ("mean", "none"):

        def loss(x, reduction=reduction):
            return encouraging_loss(x, target, label_smoothing=smoothing, reduction=reduction,
                                    token_weight=token_weight, **terms)  # fmt: skip

        assert torch.autograd.gradcheck(loss, (logits.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("probs,smoothing", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_logit_terms_off_and_lse_leave_the_loss_unchanged(dtype, probs, smoothing):
    """z_loss=0 and softcap=None are the loss as before, bit for bit; so is return_lse's loss,
    and its lse is the logsumexp of each element's logits (float32 for half inputs), ignored
    elements' too, without a gradient."""
    logits, target = make_case((6, 3), 5, dtype=dtype, probs=probs, seed=6,
                               ignore_fraction=0.0 if probs else 0.2)  # fmt: skip
    for reduction in REDUCTIONS:
        options = dict(reduction=reduction, label_smoothing=smoothing)
        value, grad = grad_of(encouraging_loss, logits, target, **options)
        off, off_grad = grad_of(encouraging_loss, logits, target, z_loss=0.0, softcap=None,
                                **options)  # fmt: skip
        assert torch.equal(off, value) and torch.equal(off_grad, grad)
        loss, lse = encouraging_loss(logits, target, return_lse=True, **options)
        assert torch.equal(loss.detach(), value) and not lse.requires_grad
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        expected = torch.logsumexp(logits.detach().to(compute), dim=1)
        assert lse.dtype == compute
        torch.testing.assert_close(lse, expected, rtol=1e-6, atol=1e-6)


def test_softcap_lse_is_of_the_capped_logits():
    logits, target = make_case((5,), 4, scale=20.0, seed=1)
    _, lse = encouraging_loss(logits, target, softcap=5.0, return_lse=True)
    capped = 5.0 * torch.tanh(logits.detach() / 5.0)
    torch.testing.assert_close(lse, torch.logsumexp(capped, dim=1), rtol=1e-12, atol=1e-12)


def _torch_capped_cross_entropy(x, t, *, z_loss, softcap, reduction="none", **kwargs):
    """What one writes in torch: CE of ``c tanh(x / c)`` plus ``z lse**2``, in x's dtype."""
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    rows = F.cross_entropy(capped, t, reduction=reduction, **kwargs)
    return rows + z_loss * torch.logsumexp(capped, dim=1).square()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
@pytest.mark.parametrize("softcap", [30.0, None])
def test_logit_terms_error_within_cross_entropy_error(dtype, smoothing, scale, softcap):
    """With the z-loss and a softcap, EL in each dtype errs no more than torch CE does in that
    dtype on the same problem (CE of torch's softcapped logits plus the z-loss, in the dtype),
    up to a sliver of one unit in the value, one unit in the gradient, both against the float64
    loss of the float64 capped logits.

    For float32 logits this needs the cap's float64 remainder (ops/logit_terms.py): EL's target
    gradient stays near -1 where CE's vanishes, so the float32 rounding of the capped logits
    alone moves EL's value by ~8 float32 units at scale 10, where it moves CE's by ~2."""
    logits, target = make_case((64,), 50, dtype=dtype, scale=scale, seed=11)
    terms = dict(z_loss=1e-3, softcap=softcap, label_smoothing=smoothing)
    el_value_error, el_grad_error = _errors(encouraging_loss, reference_loss, logits, target,
                                            **terms)  # fmt: skip
    ce_reference = functools.partial(reference_loss, bonus_scale=0.0)
    ce_value_error, ce_grad_error = _errors(_torch_capped_cross_entropy, ce_reference, logits,
                                            target, **terms)  # fmt: skip
    slack = 1e-3 * torch.finfo(dtype).eps
    assert el_value_error <= ce_value_error + slack, (el_value_error, ce_value_error)
    # The gradient relative to its largest entry, as CE's.
    assert el_grad_error <= ce_grad_error + torch.finfo(dtype).eps, (el_grad_error, ce_grad_error)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_float32_softcap_is_exact_to_the_float64_cap(smoothing):
    """Against the float64 loss of the float64 capped logits, float32 EL with a softcap errs
    about a unit (the cap's remainder corrects its value) where the loss of the float32 capped
    logits errs several: the test fails without the correction. Reduced, and without a
    gradient, alike."""
    logits, target = make_case((64,), 50, dtype=torch.float32, scale=10.0, seed=11)
    unit = torch.finfo(torch.float32).eps
    options = dict(softcap=30.0, label_smoothing=smoothing)
    expected = reference_loss(logits.double(), target, reduction="none", **options)
    value = encouraging_loss(logits, target, reduction="none", **options)
    uncorrected = encouraging_loss(30.0 * torch.tanh(logits / 30.0), target, reduction="none",
                                   label_smoothing=smoothing)  # fmt: skip
    error = ((value.double() - expected).abs() / (expected.abs() + 1)).max().item()
    old = ((uncorrected.double() - expected).abs() / (expected.abs() + 1)).max().item()
    assert error <= 1.5 * unit < 3 * unit < old, (error / unit, old / unit)
    for reduction in ("mean", "sum"):
        with torch.no_grad():
            reduced = encouraging_loss(logits, target, reduction=reduction, **options)
        exact = reference_loss(logits.double(), target, reduction=reduction, **options).item()
        assert abs(reduced.item() - exact) <= unit * (abs(exact) + 1), (reduced.item(), exact)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(softcap=0.0), ValueError, r"softcap must be in \(0.0, inf\]"),
        (dict(softcap=-1.0), ValueError, r"softcap must be in"),
        (dict(softcap=float("inf")), ValueError, r"softcap must be finite"),
        (dict(softcap="30"), TypeError, r"softcap must be a real number, got str"),
        (dict(softcap=True), TypeError, r"softcap must be a real number, got bool"),
        (dict(z_loss=-1e-4), ValueError, r"z_loss must be in \[0.0, inf\]"),
        (dict(z_loss=float("nan")), ValueError, r"z_loss must be finite"),
        (dict(z_loss=None), TypeError, r"z_loss must be a real number, got NoneType"),
        (dict(return_lse="yes"), TypeError, r"return_lse must be a bool"),
    ],
)
def test_logit_terms_bad_inputs(change, error, match):
    logits, target = make_case((5,), 3, dtype=torch.float32)
    with pytest.raises(error, match=match):
        encouraging_loss(logits, target, **change)


def test_z_loss_of_ignored_rows_with_nonfinite_logits_is_nothing():
    """An ignored row's logits may be anything: no z-loss, no z-loss gradient."""
    logits = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 0.0, 0.0], [float("inf"), 0.0, 1.0]],
                          requires_grad=True)  # fmt: skip
    target = torch.tensor([1, -100, -100])
    token_weight = torch.tensor([1.0, 1.0, 0.5])
    for reduction in REDUCTIONS:
        value, grad = grad_of(encouraging_loss, logits, target, z_loss=0.1, reduction=reduction,
                              token_weight=token_weight)  # fmt: skip
        expected, expected_grad = grad_of(encouraging_loss, logits[:1], target[:1], z_loss=0.1,
                                          reduction=reduction)  # fmt: skip
        torch.testing.assert_close(value[:1] if reduction == "none" else value, expected)
        torch.testing.assert_close(grad[:1], expected_grad)
        # The ignored rows' gradient is the loss's own without the z-loss (the row paths give
        # NaN for NaN logits there, as before).
        _, plain_grad = grad_of(encouraging_loss, logits, target, reduction=reduction,
                                token_weight=token_weight)  # fmt: skip
        torch.testing.assert_close(grad[1:], plain_grad[1:], equal_nan=True)


@pytest.mark.parametrize("fused", [False, True])
def test_z_loss_gradient_keeps_float32_precision_at_large_logits(fused):
    """The z-loss gradient 2 z lse softmax takes softmax from the logits less their maximum:
    exp(z - lse) would carry the rounding of a large lse into every entry (~18 float32 units
    of the largest gradient entry at logit scale 50, against about one now)."""
    logits, target = make_case((64,), 50, dtype=torch.float32, scale=50.0, seed=11)
    logits = logits.detach()
    options = dict(z_loss=1e-2, reduction="sum")
    x = logits.clone().requires_grad_()
    if fused:
        linear_encouraging_loss(x, torch.eye(50), target, chunk_size=16, **options).backward()
    else:
        encouraging_loss(x, target, **options).backward()
    r = logits.double().requires_grad_()
    reference_loss(r, target, **options).backward()
    error = ((x.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
    assert error <= 2 * torch.finfo(torch.float32).eps, error / torch.finfo(torch.float32).eps
