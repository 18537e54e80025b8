"""The custom operators of encouraging_loss.ops.library: opcheck, equality with the functions,
torch.compile(fullgraph=True), and the errors they raise."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_case
from encouraging_loss import (
    encouraging_loss,
    encouraging_loss_op,
    linear_encouraging_loss,
    linear_encouraging_loss_op,
)

OPS = torch.ops.encouraging_loss
#: The bonus options in the inner operator's order, after the cross-entropy ones.
BONUS_DEFAULTS = dict(log_end=0.75, bonus_scale=1.0, bonus="log", bonus_gamma=1.0,
                      bonus_start=0.0, validate_args=True, backend="auto", z_loss=0.0,
                      softcap=None)  # fmt: skip


def inner_args(input, target, weight=None, bonus_weight=None, ignore_index=-100,
               reduction="mean", label_smoothing=0.0, token_weight=None, **bonus):  # fmt: skip
    """The positional arguments of ``encouraging_loss_and_grad``."""
    options = {**BONUS_DEFAULTS, **bonus}
    return (input, target, weight, bonus_weight, token_weight, ignore_index, reduction,
            label_smoothing, *options.values())  # fmt: skip


def weights(num_classes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.1


# (shape of the index, classes, dtype, probability targets, options); each takes a distinct
# path: the few-operation paths (small problems), the row paths (plain log bonus, log_end=1).
CASES = {
    "f32-hard-mean": ((8,), 5, torch.float32, False, dict()),
    "f64-kdim-none-weight-ignore": ((4, 3), 6, torch.float64, False,
                                    dict(reduction="none", ignore_index=2, weight=True)),
    "f64-probs-sum-smoothing": ((6,), 4, torch.float64, True,
                                dict(reduction="sum", label_smoothing=0.1)),
    "f32-smoothing-power-bonus-weight": ((7,), 5, torch.float32, False,
                                         dict(label_smoothing=0.2, bonus="power", bonus_gamma=2.0,
                                              bonus_weight=True)),
    "f64-cosine-start-none": ((5,), 4, torch.float64, False,
                              dict(bonus="cosine", bonus_start=0.2, reduction="none")),
    "f64-rows-plain-log-ignore": ((6,), 5, torch.float64, False,
                                  dict(log_end=1.0, label_smoothing=0.1, weight=True)),
    "f64-single-sample-none": ((), 5, torch.float64, False, dict(reduction="none")),
    "bf16-hard-none": ((6,), 5, torch.bfloat16, False, dict(reduction="none")),
    "f64-kdim-token-weight-ignore": ((4, 3), 6, torch.float64, False,
                                     dict(token_weight=True, weight=True, label_smoothing=0.1)),
    "f32-probs-token-weight-none": ((6,), 4, torch.float32, True,
                                    dict(token_weight=True, reduction="none")),
    "f64-kdim-zloss-softcap-token-weight": ((4, 3), 6, torch.float64, False,
                                            dict(z_loss=0.05, softcap=2.0, token_weight=True,
                                                 weight=True, label_smoothing=0.1)),
    "f32-zloss-none": ((7,), 5, torch.float32, False, dict(z_loss=1e-3, reduction="none")),
    "bf16-softcap-mean": ((6,), 5, torch.bfloat16, False, dict(softcap=3.0)),
}  # fmt: skip


def build(name, requires_grad=True):
    index_shape, num_classes, dtype, probs, options = CASES[name]
    options = dict(options)
    ignore_fraction = 0.0 if probs or index_shape == () else 0.25
    logits, target = make_case(index_shape, num_classes, dtype=dtype, probs=probs,
                               ignore_fraction=ignore_fraction)  # fmt: skip
    if "ignore_index" in options and not probs:
        target = target.masked_fill(target == -100, options["ignore_index"])
    if options.pop("weight", False):
        options["weight"] = weights(num_classes).to(dtype)
    if options.pop("bonus_weight", False):
        options["bonus_weight"] = weights(num_classes, seed=2).to(dtype)
    if options.pop("token_weight", False):
        token_weight = torch.rand(index_shape, generator=torch.Generator().manual_seed(4))
        options["token_weight"] = token_weight.masked_fill(token_weight < 0.2, 0.0).to(dtype)
    return logits.detach().requires_grad_(requires_grad), target, options


@pytest.mark.parametrize("name", CASES)
def test_opcheck(name):
    logits, target, options = build(name)
    result = torch.library.opcheck(OPS.encouraging_loss_and_grad.default,
                                   inner_args(logits, target, **options))  # fmt: skip
    assert set(result.values()) == {"SUCCESS"}, result
    weight = options.pop("weight", None)
    result = torch.library.opcheck(OPS.encouraging_loss.default, (logits, target, weight),
                                   options)  # fmt: skip
    assert set(result.values()) == {"SUCCESS"}, result


def value_and_grad(function, logits, target, options, seed=3):
    """The loss and the gradient of ``(loss * upstream).sum()`` for a random upstream."""
    x = logits.detach().clone().requires_grad_()
    value = function(x, target, **options)
    upstream = torch.rand(value.shape, generator=torch.Generator().manual_seed(seed),
                          dtype=value.dtype) + 0.5  # fmt: skip
    (grad,) = torch.autograd.grad(value, x, upstream)
    return value.detach(), grad


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("entry", ["wrapper", "torch.ops"])
def test_equals_function(name, entry):
    logits, target, options = build(name)
    function = encouraging_loss_op if entry == "wrapper" else OPS.encouraging_loss
    value, grad = value_and_grad(function, logits, target, options)
    expected, expected_grad = value_and_grad(encouraging_loss, logits, target, options)
    assert value.dtype == logits.dtype and value.shape == expected.shape
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    # Unit gradient times the incoming one: one more rounding than the function's own scaling.
    torch.testing.assert_close(grad, expected_grad)


def test_without_grad_and_retained_graph():
    logits, target, options = build("f64-kdim-none-weight-ignore")
    expected = encouraging_loss(logits, target, **options)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            value = encouraging_loss_op(logits, target, **options)
        assert not value.requires_grad
        torch.testing.assert_close(value, expected.detach(), rtol=0, atol=0)
    x = logits.detach().clone().requires_grad_()
    loss = encouraging_loss_op(x, target, **options).sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_second_derivative_raises():
    logits, target, options = build("f32-hard-mean")
    x = logits.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(encouraging_loss_op(x, target), x, create_graph=True)
    # The gradient is a constant of the graph (as the functions' once_differentiable ones).
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(grad.sum(), x)


@pytest.fixture
def fresh_dynamo():
    # Each case compiles the same code with other options: reset to stay under the recompile
    # limit, which fullgraph=True turns into an error. No AOTAutograd cache: its key (the Dynamo
    # graph, which calls the public operators) does not cover their composite bodies, so an
    # entry written for another version of the inner operators' schema would be served.
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


# Inductor once (its compile costs seconds on two cores), aot_eager for the rest: the op is
# opaque to both, what differs is the code around it.
@pytest.mark.parametrize(
    "backend, name",
    [
        ("inductor", "f32-hard-mean"),
        ("aot_eager", "f64-kdim-none-weight-ignore"),
        ("aot_eager", "f64-probs-sum-smoothing"),
    ],
)
def test_compile_fullgraph(fresh_dynamo, backend, name):
    logits, target, options = build(name)

    def step(x, target):
        # Something around the op for the compiler to fuse.
        return encouraging_loss_op(x * 2.0, target, **options) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    value, grad = value_and_grad(compiled, logits, target, {})
    expected, expected_grad = value_and_grad(step, logits, target, {})
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_export_keeps_one_node():
    class Criterion(torch.nn.Module):
        def forward(self, logits, target):
            return OPS.encouraging_loss(logits, target, label_smoothing=0.1)

    logits, target, _ = build("f32-hard-mean", requires_grad=False)
    exported = torch.export.export(Criterion(), (logits, target))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [OPS.encouraging_loss.default]
    expected = encouraging_loss(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(exported.module()(logits, target), expected, rtol=0, atol=0)


def test_compile_checks_target_range(fresh_dynamo):
    # The op's eager kernel runs inside the compiled graph, with its value checks.
    logits, target, _ = build("f32-hard-mean")
    compiled = torch.compile(lambda x, t: OPS.encouraging_loss(x, t), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    compiled(logits, target)
    with pytest.raises(ValueError, match="target holds class index 7"):
        compiled(logits, target.clone().fill_(7))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, t: encouraging_loss_op(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, t: OPS.encouraging_loss(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, t: OPS.encouraging_loss(x, t, label_smoothing=1.5), ValueError,
         "label_smoothing"),
        (lambda x, t: OPS.encouraging_loss(x, t, log_end=0.0), ValueError, "log_end"),
        (lambda x, t: OPS.encouraging_loss(x, t, bonus="square"), ValueError, "bonus"),
        (lambda x, t: OPS.encouraging_loss(x, t, backend="cuda"), ValueError, "backend"),
        (lambda x, t: OPS.encouraging_loss(x, t, torch.ones(3)), ValueError, "weight"),
        (lambda x, t: OPS.encouraging_loss(x, t, bonus_weight=torch.ones(4, 5)), ValueError,
         "bonus_weight"),
        (lambda x, t: OPS.encouraging_loss(x, t[:3]), ValueError, "target"),
        (lambda x, t: OPS.encouraging_loss(x, t + 5), ValueError, "target holds class index"),
        (lambda x, t: encouraging_loss_op(x, t, gamma=2.0), TypeError, "gamma"),
        (lambda x, t: OPS.encouraging_loss(x, t, token_weight=torch.ones(7)), ValueError,
         r"token_weight must have the target's index shape \(8,\)"),
        (lambda x, t: encouraging_loss_op(x, t, token_weight=-torch.ones(8)), ValueError,
         "token_weight must hold finite values >= 0"),
    ],
)  # fmt: skip
def test_bad_inputs(call, error, match):
    logits, target, _ = build("f32-hard-mean")
    with pytest.raises(error, match=match):
        call(logits, target)


def test_bad_inputs_fail_while_tracing(fresh_dynamo):
    logits, target, _ = build("f32-hard-mean")
    compiled = torch.compile(lambda x, t, w: OPS.encouraging_loss(x, t, w), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    with pytest.raises(Exception, match="weight must be a 1-D tensor"):
        compiled(logits, target, torch.ones(3))


# --- the fused linear operator -----------------------------------------------------------------


def linear_case(dtype=torch.float64, bias=True, class_weight=False, shape=(2, 5), classes=7,
                hidden_size=4, token_weight=False):  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, hidden_size, generator=generator, dtype=dtype)
    projection = torch.randn(classes, hidden_size, generator=generator, dtype=dtype)
    target = torch.randint(0, classes, shape, generator=generator)
    target.view(-1)[1] = -100
    tensors = dict(hidden=hidden.requires_grad_(), weight=projection.requires_grad_(),
                   target=target)  # fmt: skip
    if bias:
        tensors["bias"] = torch.randn(classes, generator=generator, dtype=dtype).requires_grad_()
    options = dict(chunk_size=3)
    if class_weight:
        options["class_weight"] = weights(classes).to(dtype)
    if token_weight:
        weight = torch.rand(shape, generator=generator, dtype=dtype)
        options["token_weight"] = weight.masked_fill(weight < 0.2, 0.0)
    return tensors, options


LINEAR_CASES = {
    "f64-mean-bias": (dict(), dict()),
    "f32-sum-class-weight": (dict(dtype=torch.float32, class_weight=True),
                             dict(reduction="sum", label_smoothing=0.1)),
    "f64-none-no-bias": (dict(bias=False), dict(reduction="none", log_end=1.0)),
    "f64-mean-token-weight": (dict(class_weight=True, token_weight=True), dict()),
    "f32-none-token-weight": (dict(dtype=torch.float32, token_weight=True),
                              dict(reduction="none", label_smoothing=0.1)),
    "f64-mean-zloss-softcap": (dict(class_weight=True, token_weight=True),
                               dict(z_loss=0.05, softcap=2.0)),
    "f32-none-zloss-softcap": (dict(dtype=torch.float32),
                               dict(reduction="none", z_loss=1e-3, softcap=5.0)),
}  # fmt: skip


def linear_inner_args(tensors, options, wanted):
    merged = {**dict(ignore_index=-100, reduction="mean", label_smoothing=0.0), **BONUS_DEFAULTS,
              "chunk_size": None, "accumulation_dtype": None, **options}  # fmt: skip
    return (tensors["hidden"], tensors["weight"], tensors["target"], tensors.get("bias"),
            merged.pop("class_weight", None), merged.pop("bonus_weight", None),
            merged.pop("token_weight", None), *merged.values(), *wanted)  # fmt: skip


@pytest.mark.parametrize("name", LINEAR_CASES)
def test_linear_opcheck(name):
    case_args, extra = LINEAR_CASES[name]
    tensors, options = linear_case(**case_args)
    options.update(extra)
    precompute = options.get("reduction", "mean") != "none"
    wanted = (precompute, precompute, precompute and "bias" in tensors)
    result = torch.library.opcheck(OPS.linear_encouraging_loss_and_grads.default,
                                   linear_inner_args(tensors, options, wanted))  # fmt: skip
    assert set(result.values()) == {"SUCCESS"}, result
    positional = (tensors["hidden"], tensors["weight"], tensors["target"], tensors.get("bias"))
    result = torch.library.opcheck(OPS.linear_encouraging_loss.default, positional, options)
    assert set(result.values()) == {"SUCCESS"}, result


def linear_value_and_grads(function, tensors, options, seed=3):
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    value = function(**leaves, **options)
    upstream = torch.rand(value.shape, generator=torch.Generator().manual_seed(seed),
                          dtype=value.dtype) + 0.5  # fmt: skip
    differentiated = [v for v in leaves.values() if v.requires_grad]
    return value.detach(), torch.autograd.grad(value, differentiated, upstream)


@pytest.mark.parametrize("name", LINEAR_CASES)
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_linear_equals_function(name, frozen_weight):
    case_args, extra = LINEAR_CASES[name]
    tensors, options = linear_case(**case_args)
    options.update(extra)
    if frozen_weight:  # fine-tuning with a frozen head: no weight gradient is computed
        tensors["weight"].requires_grad_(False)
    value, grads = linear_value_and_grads(linear_encouraging_loss_op, tensors, options)
    expected, expected_grads = linear_value_and_grads(linear_encouraging_loss, tensors, options)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_linear_without_grad():
    tensors, options = linear_case()
    expected = linear_encouraging_loss(**tensors, **options).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            value = linear_encouraging_loss_op(**tensors, **options)
        assert not value.requires_grad
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_retained_graph(reduction):
    # The first backward scales the precomputed gradients in place; the second recomputes them.
    tensors, options = linear_case()
    loss = linear_encouraging_loss_op(**tensors, **options, reduction=reduction).sum()
    leaves = [tensors["hidden"], tensors["weight"], tensors["bias"]]
    first = torch.autograd.grad(loss * 2.0, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, leaves)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction, backend", [("mean", "inductor"), ("none", "aot_eager")])
def test_linear_compile_fullgraph(fresh_dynamo, reduction, backend):
    tensors, options = linear_case(dtype=torch.float32)

    def step(hidden, weight, target, bias):
        loss = OPS.linear_encouraging_loss(hidden * 2.0, weight, target, bias, chunk_size=3,
                                           reduction=reduction)  # fmt: skip
        return loss * 3.0

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    value, grads = linear_value_and_grads(compiled, tensors, {})
    expected, expected_grads = linear_value_and_grads(step, tensors, {})
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(accumulation_dtype=torch.float16), ValueError, "accumulation_dtype"),
        (dict(class_weight=torch.ones(3)), ValueError, "class_weight"),
        (dict(bias=torch.ones(3)), ValueError, "bias"),
        (dict(weight=torch.ones(7, 5)), ValueError, "input features"),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target"),
        (dict(token_weight=torch.ones(10)), ValueError,
         r"token_weight must have the target's index shape \(2, 5\)"),
        (dict(token_weight=torch.ones(2, 5, dtype=torch.long)), TypeError,
         "token_weight must be a floating-point tensor"),
    ],
)  # fmt: skip
def test_linear_bad_inputs(change, error, match):
    tensors, options = linear_case(dtype=torch.float32, bias=False)
    arguments = {**tensors, **options, **change}
    with pytest.raises(error, match=match):
        linear_encouraging_loss_op(**arguments)
    with pytest.raises(error, match=match):
        OPS.linear_encouraging_loss(**arguments)


# --- the Triton kernels inside the operator ----------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)",
)
def test_triton_backend_inside_op():
    pytest.importorskip("triton")
    logits, target = make_case((3,), 5, dtype=torch.float32, ignore_fraction=0.3)
    options = dict(backend="triton", label_smoothing=0.1, log_end=1.0)
    value, grad = value_and_grad(encouraging_loss_op, logits, target, options)
    expected, expected_grad = value_and_grad(encouraging_loss, logits, target, options)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad)
