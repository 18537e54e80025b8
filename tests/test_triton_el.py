"""The Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the float64 reference.

Interpret mode runs each program in numpy, slowly: the cases are small, and the block size is
lowered to 16 so that rows span several blocks and end in a partial one.
"""

from __future__ import annotations

import os
import subprocess
import sys

# The repository's conftest.py sets it before anything imports triton (see there); this covers
# running the module from elsewhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import grad_of, reference_loss  # noqa: E402

pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("the kernels are tested on CPU tensors: needs TRITON_INTERPRET=1",
                allow_module_level=True)

import encouraging_loss.functional as functional  # noqa: E402
from encouraging_loss import EncouragingLoss, encouraging_loss  # noqa: E402
from encouraging_loss.ops import triton_el  # noqa: E402
from encouraging_loss.ops.triton_el import triton_encouraging_loss  # noqa: E402

NUM_CLASSES = 37  # three blocks of 16, the last partial


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(triton_el, "MAX_BLOCK", 16)


def case(num_rows=6, *, dtype=torch.float32, seed=0, ignore=(2,), confident=(), scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(num_rows, NUM_CLASSES, generator=generator, dtype=torch.float64)
    target = torch.randint(0, NUM_CLASSES, (num_rows,), generator=generator)
    for row in confident:  # p_y -> 1: the target logit 30 above the rest
        logits[row, target[row]] = logits[row].max() + 30.0
    for row in ignore:
        target[row] = -100
    return logits.to(dtype), target


def triton_and_reference(logits, target, **options):
    """(loss, grad) of the Triton path and of the float64 reference on the same (rounded) input."""
    x = logits.detach().clone().requires_grad_()
    value = encouraging_loss(x, target, backend="triton", **options)
    (grad,) = torch.autograd.grad(value.sum(), x)
    r = logits.detach().double().requires_grad_()
    expected = reference_loss(r, target, **options)
    (expected_grad,) = torch.autograd.grad(expected.sum(), r)
    assert value.dtype == logits.dtype and grad.dtype == logits.dtype
    return value.double(), grad.double(), expected.detach(), expected_grad


OPTIONS = [
    dict(),
    dict(log_end=1.0, reduction="sum"),
    dict(log_end=0.5, reduction="none"),
    dict(bonus="power", bonus_gamma=2.0),
    dict(bonus="cosine", bonus_start=0.2),
    dict(bonus_scale=0.0),
    dict(bonus="none", reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, log_end=1.0, reduction="none"),
    dict(label_smoothing=0.3, log_end=0.3, reduction="sum"),  # tangent on non-arg-max classes
    dict(label_smoothing=0.1, bonus="none"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_float32_matches_reference(options):
    logits, target = case(confident=(4,))
    value, grad, expected, expected_grad = triton_and_reference(logits, target, **options)
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_and_bonus_weights(label_smoothing, reduction):
    logits, target = case(seed=1, ignore=(0, 5))
    generator = torch.Generator().manual_seed(7)
    weight = torch.rand(NUM_CLASSES, generator=generator) + 0.2
    bonus_weight = torch.rand(NUM_CLASSES, generator=generator)
    value, grad, expected, expected_grad = triton_and_reference(
        logits, target, weight=weight, bonus_weight=bonus_weight,
        label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, log_end=1.0)])
def test_bfloat16_matches_reference_on_the_rounded_input(options):
    logits, target = case(8, dtype=torch.bfloat16, seed=2, confident=(1,))
    value, grad, expected, expected_grad = triton_and_reference(logits, target, **options)
    # The loss and gradient are computed in float32 and rounded once to bfloat16.
    torch.testing.assert_close(value, expected, rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_rows_ignored_and_none_ignored(label_smoothing):
    logits, target = case(4, ignore=(0, 1, 2, 3))
    x = logits.clone().requires_grad_()
    value = encouraging_loss(x, target, label_smoothing=label_smoothing, backend="triton")
    value.backward()
    assert torch.isnan(value)  # the mean over zero items, as torch CE
    assert torch.equal(x.grad, torch.zeros_like(x))
    logits, target = case(4, ignore=())
    value, grad, expected, expected_grad = triton_and_reference(
        logits, target, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


def test_confident_rows_keep_the_exact_gradient():
    """p_y = 1 - 1e-13: the plain log bonus keeps the target gradient at -1 (no clamp)."""
    logits = torch.zeros(2, NUM_CLASSES)
    logits[:, 3] = 30.0 + torch.log(torch.tensor(float(NUM_CLASSES - 1)))
    target = torch.tensor([3, 3])
    value, grad, expected, expected_grad = triton_and_reference(
        logits, target, log_end=1.0, reduction="sum"
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad[:, 3], torch.full((2,), -1.0, dtype=torch.float64))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-12)


def test_single_row_input_and_module():
    logits, target = case(1, ignore=())
    value, grad, expected, expected_grad = triton_and_reference(logits[0], target[0])
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    criterion = EncouragingLoss(label_smoothing=0.1, backend="triton")
    torch.testing.assert_close(
        criterion(logits, target), encouraging_loss(logits, target, label_smoothing=0.1)
    )


def test_in_place_gradient_into_the_logits():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 8, generator=generator, requires_grad=True)
    projection = torch.randn(NUM_CLASSES, 8, generator=generator)
    target = torch.tensor([0, 5, -100, 36, 17])
    logits = hidden @ projection.T
    loss = triton_encouraging_loss(logits, target, in_place=True)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    expected = encouraging_loss(reference_hidden @ projection.T, target, backend="torch")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)


def test_backend_dispatch(monkeypatch):
    logits, target = case(3)

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(functional, "triton_loss_with_options", fail)
    encouraging_loss(logits, target)  # auto: CPU tensors take the torch path
    encouraging_loss(logits, target, backend="torch")
    with pytest.raises(AssertionError, match="Triton path"):
        encouraging_loss(logits, target, backend="triton")
    with pytest.raises(AssertionError, match="Triton path"):  # no ignored row: no fallback either
        encouraging_loss(*case(3, ignore=()), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        encouraging_loss(logits, target, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton': label smoothing"):
        encouraging_loss(logits, target, label_smoothing=0.1, bonus="power", backend="triton")
    with pytest.raises(ValueError, match="probability targets"):
        encouraging_loss(logits, torch.softmax(logits, 1), backend="triton")
    with pytest.raises(ValueError, match="more than 2 dimensions"):
        encouraging_loss(logits.unsqueeze(2), target.unsqueeze(1), backend="triton")


def test_triton_function_validates_arguments():
    logits, target = case(2, ignore=())
    with pytest.raises(ValueError, match="bonus must be one of"):
        triton_encouraging_loss(logits, target, bonus="square")
    with pytest.raises(TypeError, match="in_place must be a bool"):
        triton_encouraging_loss(logits, target, in_place=1)
    with pytest.raises(ValueError, match="reduction"):
        triton_encouraging_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        triton_encouraging_loss(logits, target, weight=torch.ones(3))
    with pytest.raises(ValueError, match="class-index targets"):
        triton_encouraging_loss(logits, target[:1])


def test_backward_twice_is_refused():
    """The stored gradient is scaled in place: a second backward would be wrong, so it raises."""
    logits, target = case(2, ignore=())
    x = logits.clone().requires_grad_()
    loss = triton_encouraging_loss(x, target)
    (2.0 * loss).backward(retain_graph=True)
    expected = x.grad.clone()
    y = logits.clone().requires_grad_()
    (2.0 * encouraging_loss(y, target, backend="torch")).backward()
    torch.testing.assert_close(expected, y.grad)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize(
    "options",
    [dict(), dict(reduction="none", label_smoothing=0.1, log_end=1.0), dict(reduction="sum"),
     dict(z_loss=0.01, softcap=3.0), dict(reduction="none", softcap=2.0, label_smoothing=0.1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_with_triton_chunks(options, dtype, monkeypatch):
    """linear_encouraging_loss(backend="triton") against the torch chunks, bias and weights;
    the softcap and the z-loss inside each chunk's kernel, and the lse from it."""
    from encouraging_loss import linear_encouraging_loss

    calls = record_launches(monkeypatch)

    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 8, generator=generator).to(dtype)
    projection = torch.randn(NUM_CLASSES, 8, generator=generator).to(dtype)
    bias = torch.randn(NUM_CLASSES, generator=generator).to(dtype)
    class_weight = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    target = torch.randint(0, NUM_CLASSES, (10,), generator=generator)
    target[3] = -100
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (hidden, projection, bias)]
        value, lse = linear_encouraging_loss(leaves[0], leaves[1], target, leaves[2],
                                             chunk_size=4, class_weight=class_weight,
                                             backend=backend, return_lse=True, **options)
        grads = torch.autograd.grad(value.sum(), leaves)
        results[backend] = (value, lse, *grads)
    assert calls and all(kernel_options.softcap == options.get("softcap")
                         and kernel_options.z_loss == options.get("z_loss", 0.0)
                         for _, kernel_options in calls)  # fmt: skip
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tolerance)


def test_fused_linear_with_triton_chunks_accumulating_in_bf16():
    """The in-place bf16 chunk gradient feeds a bf16 weight-gradient sum as the torch one does."""
    from encouraging_loss import linear_encouraging_loss

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 8, generator=generator).bfloat16()
    projection = torch.randn(NUM_CLASSES, 8, generator=generator).bfloat16()
    bias = torch.randn(NUM_CLASSES, generator=generator).bfloat16()
    target = torch.randint(0, NUM_CLASSES, (12,), generator=generator)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (hidden, projection, bias)]
        value = linear_encouraging_loss(leaves[0], leaves[1], target, leaves[2], chunk_size=4,
                                        accumulation_dtype=torch.bfloat16, backend=backend)
        results[backend] = (value, *torch.autograd.grad(value, leaves))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_a_new_bonus_shape_is_refused_by_the_kernels_and_runs_on_torch(monkeypatch):
    """A shape added to bonus.SHAPES without kernel code: triton_supports names it, "auto" and
    "torch" compute it (small-problem and row paths alike), "triton" refuses it."""
    from encouraging_loss import bonus as bonus_module
    from encouraging_loss.ops import small
    from encouraging_loss.options import LossOptions

    # b(p) = -p^2: g = p (1 - p) b'(p) = -2 p^2 (1 - p), r = p b'(p) = -2 p^2.
    square = bonus_module.Shape(
        terms=lambda bonus, p, one_minus_p, log_one_minus_p: (-p * p, -2 * p * p * one_minus_p),
        ratio=lambda bonus, p, one_minus_p: (-p * p, -2 * p * p),
    )
    monkeypatch.setitem(bonus_module.SHAPES, "square", square)
    logits, target = case(ignore=())
    reason = triton_el.triton_supports(logits, target, LossOptions(bonus="square"))
    assert reason is not None and "'square'" in reason
    with pytest.raises(ValueError, match="square"):
        encouraging_loss(logits, target, bonus="square", backend="triton")

    x = logits.double().requires_grad_()
    p = torch.softmax(x, 1).gather(1, target[:, None]).squeeze(1)
    expected = (-torch.log(p) - p * p).mean()
    (expected_grad,) = torch.autograd.grad(expected, x)
    for max_elements in (small.SMALL_MAX_ELEMENTS, -1):  # the small-problem path, the row paths
        monkeypatch.setattr(small, "SMALL_MAX_ELEMENTS", max_elements)
        for backend in ("auto", "torch"):
            value, grad = grad_of(encouraging_loss, x, target, bonus="square", backend=backend)
            torch.testing.assert_close(value, expected)
            torch.testing.assert_close(grad, expected_grad)


# --- per-row weights (token_weight) -------------------------------------------------------------


def token_weights(num_rows, seed=8):
    """Weights in [0, 2) with row 1 exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    weight = 2 * torch.rand(num_rows, generator=generator)
    weight[1] = 0.0
    return weight


@pytest.mark.parametrize("options", [dict(), dict(log_end=1.0, bonus="power", bonus_gamma=2.0),
                                     dict(label_smoothing=0.1), dict(label_smoothing=0.2,
                                                                     log_end=1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_token_weight_matches_reference(options, reduction, use_weight):
    logits, target = case(seed=3, ignore=(2,), confident=(4,))
    weight = torch.rand(NUM_CLASSES, generator=torch.Generator().manual_seed(9)) + 0.2 \
        if use_weight else None
    value, grad, expected, expected_grad = triton_and_reference(
        logits, target, weight=weight, token_weight=token_weights(6), reduction=reduction,
        **options,
    )  # fmt: skip
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_token_weight_of_ones_and_zeros(label_smoothing):
    logits, target = case(4, ignore=(2,))
    options = dict(label_smoothing=label_smoothing, backend="triton")
    for reduction in ("mean", "sum", "none"):
        value, grad = grad_of(encouraging_loss, logits.requires_grad_(), target,
                              reduction=reduction, token_weight=torch.ones(4), **options)
        expected, expected_grad = grad_of(encouraging_loss, logits, target, reduction=reduction,
                                          **options)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
    x = logits.detach().clone().requires_grad_()
    value = encouraging_loss(x, target, token_weight=torch.zeros(4), **options)
    value.backward()
    assert torch.isnan(value)  # the mean over zero weight, as over zero items
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_token_weight_through_triton_encouraging_loss_and_its_checks():
    logits, target = case(5, ignore=())
    weights = token_weights(5)
    value = triton_encouraging_loss(logits, target, token_weight=weights, reduction="none")
    torch.testing.assert_close(value, encouraging_loss(logits, target, token_weight=weights,
                                                       reduction="none", backend="torch"))
    with pytest.raises(ValueError, match=r"token_weight must have the target's index shape"):
        triton_encouraging_loss(logits, target, token_weight=torch.ones(4))


@pytest.mark.parametrize("options", [dict(), dict(reduction="none", label_smoothing=0.1),
                                     dict(reduction="sum")])
def test_fused_linear_with_triton_chunks_and_token_weight(options):
    """linear_encouraging_loss(backend="triton", token_weight=...) against the torch chunks."""
    from encouraging_loss import linear_encouraging_loss

    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(10, 8, generator=generator)
    projection = torch.randn(NUM_CLASSES, 8, generator=generator)
    bias = torch.randn(NUM_CLASSES, generator=generator)
    class_weight = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    target = torch.randint(0, NUM_CLASSES, (10,), generator=generator)
    target[3] = -100
    token_weight = token_weights(10)
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (hidden, projection, bias)]
        value = linear_encouraging_loss(leaves[0], leaves[1], target, leaves[2], chunk_size=4,
                                        class_weight=class_weight, backend=backend,
                                        token_weight=token_weight, **options)
        results[backend] = (value, *torch.autograd.grad(value.sum(), leaves))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- z-loss, logsumexp, softcap: fused into the kernels ----------------------------------------

LOGIT_TERMS = [
    dict(z_loss=0.05),
    dict(softcap=4.0, reduction="none"),
    dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1, reduction="sum"),
    dict(z_loss=0.02, softcap=2.0, bonus="power", bonus_gamma=2.0, reduction="none"),
    dict(z_loss=0.03, softcap=5.0, label_smoothing=0.2, log_end=1.0),
]


def record_launches(monkeypatch):
    """The (logits, options) of every kernel launch, recorded."""
    calls, launch = [], triton_el.launch_rows

    def recording(logits, *args):
        calls.append((logits.detach().clone(), args[3]))
        return launch(logits, *args)

    monkeypatch.setattr(triton_el, "launch_rows", recording)
    return calls


@pytest.mark.parametrize("options", LOGIT_TERMS)
def test_logit_terms_fused_match_reference(options, monkeypatch):
    """backend="triton" hands the raw logits and the z-loss and softcap to the kernels (no
    capped copy, no torch z-loss) and matches the float64 reference."""
    logits, target = case(confident=(4,))
    calls = record_launches(monkeypatch)
    value, grad, expected, expected_grad = triton_and_reference(logits, target, **options)
    ((launched, kernel_options),) = calls
    assert torch.equal(launched, logits), "the kernel got capped logits"
    assert kernel_options.z_loss == options.get("z_loss", 0.0)
    assert kernel_options.softcap == options.get("softcap")
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_terms_with_weights_and_token_weight(label_smoothing, reduction):
    """The z-loss counts each element's token weight, not its class weight, and is 0 on ignored
    elements and on those of token weight 0; "mean" divides it by sum t w_y, as the loss."""
    logits, target = case(seed=5, ignore=(0, 3), confident=(2,))
    generator = torch.Generator().manual_seed(11)
    weight = torch.rand(NUM_CLASSES, generator=generator) + 0.2
    bonus_weight = torch.rand(NUM_CLASSES, generator=generator)
    value, grad, expected, expected_grad = triton_and_reference(
        logits, target, weight=weight, bonus_weight=bonus_weight, token_weight=token_weights(6),
        label_smoothing=label_smoothing, reduction=reduction, z_loss=0.04, softcap=3.5,
    )  # fmt: skip
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("options", [dict(z_loss=0.02, softcap=3.0),
                                     dict(z_loss=0.02, softcap=3.0, label_smoothing=0.1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logit_terms_half_precision(options, dtype):
    logits, target = case(8, dtype=dtype, seed=2, confident=(1,))
    value, grad, expected, expected_grad = triton_and_reference(logits, target, **options)
    # Computed in float32 from the rounded logits, rounded once to the half dtype.
    unit = torch.finfo(dtype).eps
    torch.testing.assert_close(value, expected, rtol=unit, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=unit, atol=1e-5)


def _errors_against(value, grad, reference, logits, target, **options):
    """(value error, gradient error) against the float64 ``reference`` of the float64 logits:
    the value's relative to 1 + |value| (its largest over the rows), the gradient's relative to
    the largest exact gradient entry."""
    x = logits.detach().double().requires_grad_()
    expected = reference(x, target, reduction="none", **options)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    expected = expected.detach()
    value_error = ((value.double() - expected).abs() / (expected.abs() + 1)).max().item()
    grad_error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
    return value_error, grad_error.item()


def _torch_cross_entropy(x, t, *, z_loss=0.0, softcap=None, label_smoothing=0.0):
    """What one writes in torch: CE of ``c tanh(x / c)`` plus ``z lse**2``, in x's dtype."""
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    rows = torch.nn.functional.cross_entropy(capped, t, reduction="none",
                                             label_smoothing=label_smoothing)  # fmt: skip
    return rows + z_loss * torch.logsumexp(capped, dim=1).square()


@pytest.mark.parametrize("scale", [1.0, 8.0, 50.0])
@pytest.mark.parametrize("terms", [dict(z_loss=0.01, softcap=6.0), dict(z_loss=0.01, softcap=30.0),
                                   dict(z_loss=0.01), dict()], ids=["cap6", "cap30", "z", "plain"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_error_is_within_the_torch_float32_error(label_smoothing, terms, scale):
    """Against the float64 reference of the float64 logits (the exact softcap), the kernels' error
    in float32 is no larger than that of torch's own F.cross_entropy in float32 on the same
    problem (CE of torch's float32 capped logits plus the z-loss), up to a sliver of a unit in
    the value and one unit in the gradient: for cross-entropy (bonus_scale=0) and for EL, whose
    error is held to CE's as in test_functional's test_logit_terms_error_within_cross_entropy_error.

    The float32 rounding of c tanh(z / c) alone would make EL err several units on confident
    rows (its target gradient stays near -1): the kernels correct the loss to first order."""
    logits, target = case(32, seed=7, scale=scale, ignore=(), confident=(3, 9, 20))
    options = dict(label_smoothing=label_smoothing, **terms)
    ce_value_error, ce_grad_error = _errors_against(
        *grad_of(_torch_cross_entropy, logits, target, **options), reference_loss, logits,
        target, bonus_scale=0.0, **options,
    )  # fmt: skip
    unit = torch.finfo(torch.float32).eps
    for bonus in (dict(bonus_scale=0.0), dict()):
        value, grad = grad_of(encouraging_loss, logits, target, backend="triton",
                              reduction="none", **bonus, **options)  # fmt: skip
        value_error, grad_error = _errors_against(value, grad, reference_loss, logits, target,
                                                  **bonus, **options)  # fmt: skip
        assert value_error <= ce_value_error + 1e-3 * unit, (bonus, value_error / unit,
                                                              ce_value_error / unit)
        assert grad_error <= ce_grad_error + unit, (bonus, grad_error / unit, ce_grad_error / unit)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softcap_correction_does_not_depend_on_the_gradient(label_smoothing):
    """The softcap's correction of the loss comes from the gradient pass, which every launch
    runs: the fused linear loss without gradients (a row scale of 0) gives the same values."""
    from encouraging_loss import linear_encouraging_loss

    generator = torch.Generator().manual_seed(6)
    hidden = 4 * torch.randn(10, 8, generator=generator)
    projection = torch.randn(NUM_CLASSES, 8, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (10,), generator=generator)
    options = dict(softcap=6.0, z_loss=0.01, label_smoothing=label_smoothing, reduction="none",
                   chunk_size=4, backend="triton")  # fmt: skip
    with torch.no_grad():
        without = linear_encouraging_loss(hidden, projection, target, **options)
    leaf = hidden.clone().requires_grad_()
    with_grad = linear_encouraging_loss(leaf, projection, target, **options)
    with_grad.sum().backward()
    assert torch.equal(without, with_grad.detach())


CUDA_COMPILE = """
import sys
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from encouraging_loss.ops import triton_kernels

if "nvidia" not in backends:
    sys.exit(77)
pointers = dict(logits_ptr="*bf16", grad_ptr="*bf16", target_ptr="*i64", weight_ptr="*fp32",
                bonus_weight_ptr="*fp32", loss_ptr="*fp32", lse_ptr="*fp32", scale_ptr="*fp32")
integers = dict(logits_stride="i64", grad_stride="i64", n_cols="i32", ignore_index="i32")
flags = ("HAS_WEIGHT", "HAS_BONUS_WEIGHT", "HAS_Z_LOSS", "HAS_SOFTCAP", "HAS_START")
cases = [("hard_target_kernel", bonus, on) for bonus in (0, 1, 2, 3) for on in (False, True)]
cases += [("smoothed_kernel", bonus, on) for bonus in (0, 1) for on in (False, True)]
for name, bonus, on in cases:
    kernel = getattr(triton_kernels, name)
    constants = {flag: on for flag in flags if flag in kernel.arg_names}
    constants.update(BONUS=bonus, BLOCK=1024)
    types = {**pointers, **integers}
    signature = {arg: "constexpr" if arg in constants else types.get(arg, "fp32")
                 for arg in kernel.arg_names}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                   target=GPUTarget("cuda", 90, 32))
print(len(cases))
"""


def test_kernels_compile_for_cuda(tmp_path):
    """The kernels compile for a CUDA target (sm_90, no GPU needed), every bonus code with the
    flags off and on: the interpreter does not check what the compiler does (a loop-carried
    variable that changes type, a float64 operation without a lowering)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", CUDA_COMPILE], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    if result.returncode == 77:
        pytest.skip("triton has no CUDA backend here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "12"


# The interpreter's numpy warns on the ignored row's NaN logits.
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softcap_edges(label_smoothing):
    """Large logits saturate the cap (the gradient 1 - tanh**2 keeps its relative precision),
    a logit of -inf is capped to -c, small ones go through the series; an ignored row's logits
    may be NaN (loss and gradient 0)."""
    logits, target = case(4, seed=9, ignore=(3,), scale=1e-3)
    logits[0, :5] = torch.tensor([40.0, -40.0, 25.0, -float("inf"), 0.2])
    logits[1, 7] = 60.0
    target[1] = 7
    logits[3] = float("nan")
    options = dict(softcap=5.0, z_loss=0.01, reduction="none", label_smoothing=label_smoothing)
    x = logits.clone().requires_grad_()
    value, lse = encouraging_loss(x, target, backend="triton", return_lse=True, **options)
    value.sum().backward()
    assert value[3] == 0 and torch.equal(x.grad[3], torch.zeros(NUM_CLASSES))
    r = logits[:3].double().requires_grad_()
    expected = reference_loss(r, target[:3], **options)
    expected.sum().backward()
    torch.testing.assert_close(value[:3].double(), expected.detach(), rtol=2e-6, atol=2e-6)
    nonzero = r.grad != 0
    assert r.grad[0, [0, 1, 3]].abs().max() < 1e-6  # 1 - tanh**2 at 40 / 5: 4.5e-7 (0 at -inf)
    # Relatively exact everywhere, the tiny gradients of the saturated logits included.
    torch.testing.assert_close(x.grad[:3][nonzero].double() / r.grad[nonzero],
                               torch.ones(int(nonzero.sum()), dtype=torch.float64),
                               rtol=2e-5, atol=0.0)  # fmt: skip
    capped = 5.0 * torch.tanh(logits[:3].double() / 5.0)
    torch.testing.assert_close(lse[:3].double(), torch.logsumexp(capped, 1), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("options", LOGIT_TERMS[:3])
def test_logit_terms_lse_and_token_weight_against_torch(options):
    logits, target = case(confident=(4,))
    token_weight = token_weights(6)
    x = logits.clone().requires_grad_()
    loss, lse = encouraging_loss(x, target, backend="triton", token_weight=token_weight,
                                 return_lse=True, **options)
    expected_loss, expected_lse = encouraging_loss(logits, target, backend="torch",
                                                   token_weight=token_weight, return_lse=True,
                                                   **options)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)


def test_logit_terms_through_triton_encouraging_loss():
    """Called directly, the kernels take z_loss and softcap (in place too) and return the lse."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 8, generator=generator, requires_grad=True)
    projection = torch.randn(NUM_CLASSES, 8, generator=generator)
    target = torch.tensor([0, 5, -100, 36, 17])
    terms = dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.1)
    loss, lse = triton_encouraging_loss(hidden @ projection.T, target, in_place=True,
                                        return_lse=True, **terms)  # fmt: skip
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    expected, expected_lse = encouraging_loss(reference_hidden @ projection.T, target,
                                              backend="torch", return_lse=True, **terms)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    single, single_lse = triton_encouraging_loss(hidden[0].detach(), target[0], return_lse=True,
                                                 **terms)  # fmt: skip
    assert single.shape == () and single_lse.shape == ()
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        triton_encouraging_loss(hidden.detach(), target, return_lse=1)
