"""The chunked fused linear + EL against the materialised path (F.linear, then the loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_case, reference_loss
from encouraging_loss import LinearEncouragingLoss, encouraging_loss, linear_encouraging_loss
from encouraging_loss.ops.fused_linear import default_chunk_size

NUM_CLASSES, HIDDEN = 37, 12


def make_linear_case(num_rows=29, *, dtype=torch.float64, ignore_fraction=0.25, seed=0,
                     with_bias=True, ignore_index=-100):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(NUM_CLASSES, HIDDEN, generator=generator, dtype=torch.float64) * 0.8
    bias = torch.randn(NUM_CLASSES, generator=generator, dtype=torch.float64) if with_bias \
        else None
    target = torch.randint(0, NUM_CLASSES, (num_rows,), generator=generator)
    ignored = torch.rand(num_rows, generator=generator) < ignore_fraction
    target = torch.where(ignored, ignore_index, target)
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    tensors = [t.to(dtype).requires_grad_() for t in tensors]
    return (*tensors, *([None] if not with_bias else [])), target


def gradients(loss_fn, tensors):
    """(value, gradients of the present tensors) of loss_fn(*fresh copies)."""
    copies = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    value = loss_fn(*copies)
    present = [c for c in copies if c is not None]
    grads = torch.autograd.grad(value.sum(), present)
    return value.detach(), grads


def materialised(options):
    def loss_fn(hidden, weight, bias):
        extra = dict(options)
        class_weight = extra.pop("class_weight", None)
        return encouraging_loss(F.linear(hidden, weight, bias), extra.pop("target"), class_weight,
                                **extra)
    return loss_fn


def fused(options):
    def loss_fn(hidden, weight, bias):
        extra = dict(options)
        return linear_encouraging_loss(hidden, weight, extra.pop("target"), bias, **extra)
    return loss_fn


OPTION_SETS = [
    dict(),
    dict(reduction="sum", log_end=1.0),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, reduction="none", bonus="cosine"),
    dict(bonus="power", bonus_gamma=2.0, bonus_start=0.1),
    dict(bonus_scale=0.0),
]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_float64_matches_materialised(options, chunk_size):
    tensors, target = make_linear_case()
    options = dict(options, target=target)
    expected, expected_grads = gradients(materialised(options), tensors)
    value, grads = gradients(fused(dict(options, chunk_size=chunk_size)), tensors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_class_and_bonus_weights(label_smoothing):
    tensors, target = make_linear_case(seed=3)
    generator = torch.Generator().manual_seed(5)
    class_weight = torch.rand(NUM_CLASSES, generator=generator, dtype=torch.float64) + 0.2
    bonus_weight = torch.rand(NUM_CLASSES, generator=generator, dtype=torch.float64)
    options = dict(target=target, class_weight=class_weight, bonus_weight=bonus_weight,
                   label_smoothing=label_smoothing)
    expected, expected_grads = gradients(materialised(options), tensors)
    value, grads = gradients(fused(dict(options, chunk_size=7)), tensors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_against_float64_reference_and_3d_hidden():
    """Against the independent reference, with (batch, sequence, H) hidden states and no bias."""
    (hidden, weight, _), target = make_linear_case(24, with_bias=False)
    hidden3, target3 = hidden.detach().reshape(4, 6, HIDDEN).requires_grad_(), target.reshape(4, 6)
    value = linear_encouraging_loss(hidden3, weight, target3, chunk_size=5, log_end=0.5)
    value.backward()
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    expected = reference_loss(h_ref @ w_ref.T, target, log_end=0.5)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(hidden3.grad.reshape(24, HIDDEN), h_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)
    per_token = linear_encouraging_loss(hidden3, weight, target3, reduction="none")
    assert per_token.shape == (4, 6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, reduction="sum")])
def test_low_precision_within_materialised_error(dtype, tolerance, options):
    """In float32/bf16 the fused result is as close to float64 as the materialised one (or closer).

    Both are compared with the float64 materialised result; the fused error may not exceed the
    materialised error by more than ``tolerance`` relative to the gradient's scale.
    """
    tensors64, target = make_linear_case(40, seed=1)
    options = dict(options, target=target)
    exact, exact_grads = gradients(materialised(options), tensors64)
    tensors = [t.detach().to(dtype) for t in tensors64]
    fused_value, fused_grads = gradients(fused(dict(options, chunk_size=16)), tensors)
    mat_value, mat_grads = gradients(materialised(options), tensors)
    assert fused_value.dtype == dtype
    for name, f, m, e in [("loss", fused_value, mat_value, exact),
                          *zip(["hidden", "weight", "bias"], fused_grads, mat_grads, exact_grads,
                               strict=True)]:
        scale = e.abs().max().item()
        fused_error = (f.double() - e).abs().max().item()
        mat_error = (m.double() - e).abs().max().item()
        assert fused_error <= mat_error + tolerance * scale, (name, fused_error, mat_error)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, reduction="none")])
def test_accumulation_in_the_weight_dtype(options):
    """bf16 weight/bias gradients summed in bf16: one rounding per chunk, the rest unchanged.

    The loss and the hidden gradient do not depend on the accumulation; the weight and bias
    gradients are within one bf16 rounding per chunk of the float64 result (and the default
    float32 accumulation is within the materialised path's error, as tested above).
    """
    tensors64, target = make_linear_case(64, seed=3)
    options = dict(options, target=target)
    _, exact = gradients(materialised(options), tensors64)
    tensors = [t.detach().to(torch.bfloat16) for t in tensors64]
    wide_value, wide = gradients(fused(dict(options, chunk_size=8)), tensors)
    narrow_value, narrow = gradients(
        fused(dict(options, chunk_size=8, accumulation_dtype=torch.bfloat16)), tensors
    )
    assert all(g.dtype == torch.bfloat16 for g in narrow)
    torch.testing.assert_close(narrow_value, wide_value, rtol=0, atol=0)
    torch.testing.assert_close(narrow[0], wide[0], rtol=0, atol=0)
    chunks = -(-64 // 8)
    unit = torch.finfo(torch.bfloat16).eps / 2  # one rounding's relative error
    for got, wide_got, expected in zip(narrow[1:], wide[1:], exact[1:], strict=True):
        scale = expected.abs().max().item()
        wide_error = (wide_got.double() - expected).abs().max().item()
        narrow_error = (got.double() - expected).abs().max().item()
        assert narrow_error <= wide_error + chunks * unit * scale, (narrow_error, wide_error)
        assert not torch.equal(got, wide_got)  # the option did change the summation


def test_wider_accumulation_than_the_default():
    """float32 inputs may accumulate in float64; float32 named explicitly equals the default."""
    tensors64, target = make_linear_case(48, seed=5)
    _, exact = gradients(materialised(dict(target=target)), tensors64)
    tensors = [t.detach().float() for t in tensors64]
    options = dict(target=target, chunk_size=8)
    _, default = gradients(fused(options), tensors)
    _, same = gradients(fused(dict(options, accumulation_dtype=torch.float32)), tensors)
    _, wide = gradients(fused(dict(options, accumulation_dtype=torch.float64)), tensors)
    for a, b in zip(default, same, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for got, expected in zip(wide, exact, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1.2e-7, atol=1e-7)


def test_all_ignored_and_none_ignored():
    tensors, target = make_linear_case(9)
    all_ignored = torch.full_like(target, -100)
    value, grads = gradients(fused(dict(target=all_ignored, chunk_size=4)), tensors)
    assert torch.isnan(value)  # the mean over zero items, as torch CE
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    summed, _ = gradients(fused(dict(target=all_ignored, reduction="sum")), tensors)
    assert summed.item() == 0.0
    none_ignored = torch.arange(9) % NUM_CLASSES
    options = dict(target=none_ignored)
    expected, expected_grads = gradients(materialised(options), tensors)
    value, grads = gradients(fused(dict(options, chunk_size=4)), tensors)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_custom_ignore_index_and_confident_rows():
    (hidden, weight, bias), target = make_linear_case(10, ignore_index=3, ignore_fraction=0.3)
    # Make rows confident: a large logit gap on the target.
    with torch.no_grad():
        bias.zero_()
        weight.mul_(20.0)
    options = dict(target=target, ignore_index=3, log_end=1.0)
    expected, expected_grads = gradients(materialised(options), (hidden, weight, bias))
    value, grads = gradients(fused(dict(options, chunk_size=3)), (hidden, weight, bias))
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_grad_output_scaling_and_retain_graph():
    """backward scales by grad_output; a second backward through a retained graph recomputes."""
    (hidden, weight, bias), target = make_linear_case(11)
    loss = linear_encouraging_loss(hidden, weight, target, bias, chunk_size=4)
    (3.0 * loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    (3.0 * loss).backward()
    for t, g in zip((hidden, weight, bias), first, strict=True):
        torch.testing.assert_close(t.grad, g)
    _, expected = gradients(materialised(dict(target=target)), (hidden, weight, bias))
    for g, e in zip(first, expected, strict=True):
        torch.testing.assert_close(g, 3.0 * e)


def test_only_some_inputs_require_grad_and_no_grad():
    (hidden, weight, bias), target = make_linear_case(8)
    frozen = weight.detach()
    loss = linear_encouraging_loss(hidden, frozen, target, bias.detach())
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    expected = encouraging_loss(F.linear(hidden, frozen, bias.detach()), target)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad_hidden, expected_grad)
    with torch.no_grad():
        value = linear_encouraging_loss(hidden, weight, target, bias, reduction="none")
    torch.testing.assert_close(value, encouraging_loss(F.linear(hidden, weight, bias), target,
                                                       reduction="none").detach())


def test_gradcheck():
    (hidden, weight, bias), target = make_linear_case(6, ignore_fraction=0.2)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, r=reduction: linear_encouraging_loss(
                h, w, target, b, reduction=r, label_smoothing=0.1, chunk_size=4),
            (hidden, weight, bias),
        )


def test_module_matches_function():
    (hidden, weight, bias), target = make_linear_case(13)
    criterion = LinearEncouragingLoss(label_smoothing=0.05, log_end=0.5, chunk_size=5)
    torch.testing.assert_close(
        criterion(hidden, weight, target, bias),
        linear_encouraging_loss(hidden, weight, target, bias, label_smoothing=0.05, log_end=0.5),
    )
    assert "chunk_size=5" in repr(criterion)


def test_default_chunk_size():
    assert default_chunk_size(8192, 4096, 128256) == 256  # Liger's rule
    assert default_chunk_size(4096, 1024, 32000) == 512  # at least 2**23 logits
    assert default_chunk_size(10, 64, 32) == 16  # never above N rounded up
    assert default_chunk_size(0, 8, 8) == 1


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=torch.ones(3, 5)), ValueError, "input features"),
        (dict(weight=torch.ones(NUM_CLASSES)), ValueError, "weight must have shape"),
        (dict(weight=torch.ones(NUM_CLASSES, HIDDEN, dtype=torch.float64)), TypeError,
         "weight has dtype"),
        (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target must have"),
        (dict(target=torch.zeros(3)), TypeError, "target must hold class indices"),
        (dict(target=torch.tensor([0, 1, NUM_CLASSES])), ValueError, "target holds class index"),
        (dict(bias=torch.ones(3)), ValueError, "bias must have shape"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(class_weight=torch.ones(3)), ValueError, "class_weight"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
        (dict(accumulation_dtype=torch.bfloat16), ValueError, "accumulation_dtype"),
        (dict(accumulation_dtype="float32"), TypeError, "accumulation_dtype"),
    ],
)
def test_validation_names_the_argument(change, error, match):
    arguments = dict(hidden=torch.ones(3, HIDDEN), weight=torch.ones(NUM_CLASSES, HIDDEN),
                     target=torch.tensor([0, 1, 2]), bias=None)
    arguments.update(change)
    hidden, weight, target, bias = (
        arguments.pop(name) for name in ("hidden", "weight", "target", "bias")
    )
    with pytest.raises(error, match=match):
        linear_encouraging_loss(hidden, weight, target, bias, **arguments)


def test_module_compiles_without_graph_breaks():
    (hidden, weight, bias), target = make_linear_case(10, dtype=torch.float32)
    criterion = LinearEncouragingLoss(label_smoothing=0.1, chunk_size=4)
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    value, grads = gradients(lambda h, w, b: compiled(h, w, target, b), (hidden, weight, bias))
    expected, expected_grads = gradients(lambda h, w, b: criterion(h, w, target, b),
                                         (hidden, weight, bias))
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


# --- per-token weights (token_weight) -----------------------------------------------------------


def make_token_weight(shape, seed=7, dtype=torch.float64):
    """Weights in [0, 2) with a few exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    weight = 2 * torch.rand(shape, generator=generator, dtype=torch.float64)
    weight.view(-1)[::5] = 0.0
    return weight.to(dtype)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("chunk_size", [1, 8])
@pytest.mark.parametrize("use_class_weight", [False, True])
def test_token_weight_matches_materialised(options, chunk_size, use_class_weight):
    tensors, target = make_linear_case()
    class_weight = torch.rand(NUM_CLASSES, dtype=torch.float64) + 0.2 if use_class_weight \
        else None
    options = dict(options, target=target, token_weight=make_token_weight(target.shape),
                   class_weight=class_weight)
    expected, expected_grads = gradients(materialised(options), tensors)
    value, grads = gradients(fused(dict(options, chunk_size=chunk_size)), tensors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weight_against_float64_reference_with_3d_hidden(reduction):
    (hidden, weight, _), target = make_linear_case(24, with_bias=False)
    token_weight = make_token_weight((4, 6))
    hidden3 = hidden.detach().reshape(4, 6, HIDDEN).requires_grad_()
    value = linear_encouraging_loss(hidden3, weight, target.reshape(4, 6), chunk_size=5,
                                    reduction=reduction, token_weight=token_weight)
    value.sum().backward()
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    expected = reference_loss(h_ref @ w_ref.T, target, reduction=reduction,
                              token_weight=token_weight.reshape(24))
    expected.sum().backward()
    torch.testing.assert_close(value.reshape(expected.shape), expected)
    torch.testing.assert_close(hidden3.grad.reshape(24, HIDDEN), h_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)


@pytest.mark.parametrize("terms", [dict(), dict(z_loss=0.1, softcap=2.0)], ids=["", "z-softcap"])
def test_token_weight_gradcheck(terms):
    (hidden, weight, bias), target = make_linear_case(6, ignore_fraction=0.2)
    token_weight = make_token_weight((6,))
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, r=reduction: linear_encouraging_loss(
                h, w, target, b, reduction=r, label_smoothing=0.1, chunk_size=4,
                token_weight=token_weight, **terms),
            (hidden, weight, bias),
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weight_of_ones_and_zeros(reduction):
    tensors, target = make_linear_case(9)
    options = dict(target=target, reduction=reduction, chunk_size=4)
    expected, expected_grads = gradients(fused(options), tensors)
    value, grads = gradients(fused(dict(options, token_weight=torch.ones(9))), tensors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    value, grads = gradients(fused(dict(options, token_weight=torch.zeros(9))), tensors)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    if reduction == "mean":
        assert torch.isnan(value)  # the mean over zero weight, as over zero items
    else:
        assert (value == 0).all()


def test_token_weight_retain_graph_no_grad_and_module():
    (hidden, weight, bias), target = make_linear_case(11)
    token_weight = make_token_weight((11,))
    loss = linear_encouraging_loss(hidden, weight, target, bias, chunk_size=4,
                                   token_weight=token_weight)
    first = torch.autograd.grad(loss, (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(2.0 * loss, (hidden, weight, bias))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, 2.0 * a)
    with torch.no_grad():
        rows = linear_encouraging_loss(hidden, weight, target, bias, reduction="none",
                                       token_weight=token_weight)
    expected = encouraging_loss(F.linear(hidden, weight, bias), target, reduction="none",
                                token_weight=token_weight)
    torch.testing.assert_close(rows, expected.detach())
    criterion = LinearEncouragingLoss(label_smoothing=0.05, chunk_size=5)
    torch.testing.assert_close(
        criterion(hidden, weight, target, bias, token_weight=token_weight),
        linear_encouraging_loss(hidden, weight, target, bias, label_smoothing=0.05,
                                token_weight=token_weight),
    )


@pytest.mark.parametrize(
    "token_weight, error, match",
    [
        (torch.ones(4), ValueError, r"token_weight must have the target's index shape \(3,\)"),
        (torch.ones(3, dtype=torch.int32), TypeError, "token_weight must be a floating-point"),
        (torch.tensor([1.0, -0.5, 1.0]), ValueError, "token_weight must hold finite values"),
        (torch.tensor([1.0, float("inf"), 1.0]), ValueError, "token_weight must hold finite"),
        (torch.ones(3, device="meta"), ValueError, "token_weight is on meta"),
    ],
)
def test_token_weight_validation(token_weight, error, match):
    with pytest.raises(error, match=match):
        linear_encouraging_loss(torch.ones(3, HIDDEN), torch.ones(NUM_CLASSES, HIDDEN),
                                torch.tensor([0, 1, 2]), token_weight=token_weight)


def test_module_with_token_weight_compiles_without_graph_breaks():
    (hidden, weight, bias), target = make_linear_case(10, dtype=torch.float32)
    token_weight = make_token_weight((10,), dtype=torch.float32)
    criterion = LinearEncouragingLoss(label_smoothing=0.1, chunk_size=4)
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")

    def call(module):
        return lambda h, w, b: module(h, w, target, b, token_weight=token_weight)

    value, grads = gradients(call(compiled), (hidden, weight, bias))
    expected, expected_grads = gradients(call(criterion), (hidden, weight, bias))
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


# --- z-loss, logsumexp, softcap (per chunk) ---------------------------------------------------

LOGIT_TERMS = [dict(z_loss=0.05), dict(softcap=2.0), dict(z_loss=0.02, softcap=1.5)]


@pytest.mark.parametrize("terms", LOGIT_TERMS)
@pytest.mark.parametrize("options", [dict(), dict(reduction="sum", label_smoothing=0.1),
                                     dict(reduction="none"), dict(bonus="cosine")])
@pytest.mark.parametrize("chunk_size", [1, 8])
def test_logit_terms_match_float64_reference(terms, options, chunk_size):
    tensors, target = make_linear_case()
    class_weight = torch.rand(NUM_CLASSES, dtype=torch.float64) + 0.2
    token_weight = make_token_weight(target.shape)
    options = dict(options, **terms, target=target, class_weight=class_weight,
                   token_weight=token_weight)

    def reference(hidden, weight, bias):
        extra = dict(options)
        return reference_loss(F.linear(hidden, weight, bias), extra.pop("target"),
                              extra.pop("class_weight"), **extra)

    expected, expected_grads = gradients(reference, tensors)
    value, grads = gradients(fused(dict(options, chunk_size=chunk_size)), tensors)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_terms_float32_and_lse_match_materialised(reduction):
    """float32 fused equals the materialised loss; the lse is each token's logsumexp of the
    capped logits (ignored tokens' too), without a gradient; a retained graph's second
    backward (the recomputing one) gives the same gradients."""
    (hidden, weight, bias), target = make_linear_case(21, dtype=torch.float32)
    terms = dict(z_loss=1e-3, softcap=3.0, reduction=reduction)
    loss, lse = linear_encouraging_loss(hidden, weight, target, bias, chunk_size=8,
                                        return_lse=True, **terms)
    logits = F.linear(hidden, weight, bias)
    expected = encouraging_loss(logits, target, **terms)
    torch.testing.assert_close(loss, expected)
    capped = 3.0 * torch.tanh(logits.detach() / 3.0)
    torch.testing.assert_close(lse, torch.logsumexp(capped, dim=1))
    assert lse.dtype == torch.float32 and not lse.requires_grad
    first = torch.autograd.grad(loss.sum(), (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    for a, b, e in zip(first, second, expected_grads, strict=True):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)
    with torch.no_grad():
        plain = linear_encouraging_loss(hidden, weight, target, bias, reduction=reduction)
        off = linear_encouraging_loss(hidden, weight, target, bias, reduction=reduction,
                                      z_loss=0.0, softcap=None)
        with_lse, _ = linear_encouraging_loss(hidden, weight, target, bias, reduction=reduction,
                                              return_lse=True)
    assert torch.equal(off, plain) and torch.equal(with_lse, plain)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_float32_softcap_is_exact_to_the_float64_cap(label_smoothing):
    """As the function's (tests/test_functional.py): float32 fused EL with a softcap errs about
    a unit against the float64 loss of the float64 capped logits (here the logits are exactly
    the hidden states: an identity projection), where the loss of the float32 capped logits
    errs several; per row and reduced, with and without a gradient, chunk by chunk."""
    logits, target = make_case((64,), 50, dtype=torch.float32, scale=10.0, seed=11)
    logits, identity = logits.detach(), torch.eye(50)
    unit = torch.finfo(torch.float32).eps
    options = dict(softcap=30.0, label_smoothing=label_smoothing)
    expected = reference_loss(logits.double(), target, reduction="none", **options)
    hidden = logits.clone().requires_grad_()
    value = linear_encouraging_loss(hidden, identity, target, reduction="none", chunk_size=24,
                                    **options)  # fmt: skip
    uncorrected = encouraging_loss(30.0 * torch.tanh(logits / 30.0), target, reduction="none",
                                   label_smoothing=label_smoothing)  # fmt: skip
    error = ((value.double() - expected).abs() / (expected.abs() + 1)).max().item()
    old = ((uncorrected.double() - expected).abs() / (expected.abs() + 1)).max().item()
    assert error <= 1.5 * unit < 3 * unit < old, (error / unit, old / unit)
    value.sum().backward()  # the gradient of the rounded cap, as the function's
    reference = logits.detach().clone().requires_grad_()
    encouraging_loss(reference, target, reduction="sum", **options).backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-6)
    for reduction in ("mean", "sum"):
        exact = reference_loss(logits.double(), target, reduction=reduction, **options).item()
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                reduced = linear_encouraging_loss(logits.clone().requires_grad_(grad), identity,
                                                  target, reduction=reduction, chunk_size=24,
                                                  **options)  # fmt: skip
            assert abs(reduced.item() - exact) <= unit * (abs(exact) + 1), (reduced.item(), exact)


def test_logit_terms_module_and_validation():
    (hidden, weight, bias), target = make_linear_case(9)
    criterion = LinearEncouragingLoss(z_loss=0.01, softcap=5.0, return_lse=True, chunk_size=4)
    loss, lse = criterion(hidden, weight, target, bias)
    expected = linear_encouraging_loss(hidden, weight, target, bias, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(loss, expected)
    assert lse.shape == target.shape and criterion.softcap == 5.0
    with pytest.raises(ValueError, match="softcap must be in"):
        criterion.softcap = 0.0
    with pytest.raises(ValueError, match="z_loss must be in"):
        linear_encouraging_loss(hidden, weight, target, bias, z_loss=-1.0)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        LinearEncouragingLoss(return_lse=1)
