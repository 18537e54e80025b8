"""torch.compile(fullgraph=True) traces the loss without graph breaks and gives the same results."""

from __future__ import annotations

import pytest
import torch

from conftest import make_case, reference_loss
from encouraging_loss import EncouragingLoss, encouraging_loss, linear_encouraging_loss


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each case compiles the same code objects with other options: without a reset the cases
    # together pass dynamo's recompile limit, which fullgraph=True turns into an error.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, log_end=1.0),
                                     dict(bonus="cosine", reduction="sum"),
                                     dict(label_smoothing=0.1),
                                     dict(label_smoothing=0.2, log_end=0.5, bonus_scale=0.5)])
def test_compiled_matches_eager(backend, options):
    logits, target = make_case((16,), 7, dtype=torch.float32, ignore_fraction=0.2)
    # Confident rows, right and wrong: the compiled smoothed path treats every row exactly.
    logits.data[:4, 0] += 15.0
    weight = torch.rand(7) + 0.1
    criterion = EncouragingLoss(weight, **options)
    compiled = torch.compile(criterion, fullgraph=True, backend=backend)
    x = logits.detach().clone().requires_grad_()
    value = compiled(x, target)
    value.backward()
    y = logits.detach().clone().requires_grad_()
    expected = encouraging_loss(y, target, weight, **options)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_compiled_probability_targets():
    logits, target = make_case((8,), 5, dtype=torch.float32, probs=True)
    compiled = torch.compile(encouraging_loss, fullgraph=True, backend="aot_eager")
    x = logits.detach().clone().requires_grad_()
    compiled(x, target, label_smoothing=0.05).backward()
    y = logits.detach().clone().requires_grad_()
    encouraging_loss(y, target, label_smoothing=0.05).backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, reduction="none")])
def test_compiled_token_weight(backend, options):
    logits, target = make_case((16,), 7, dtype=torch.float32, ignore_fraction=0.2)
    token_weight = torch.rand(16)
    criterion = EncouragingLoss(**options)
    compiled = torch.compile(criterion, fullgraph=True, backend=backend)
    x = logits.detach().clone().requires_grad_()
    value = compiled(x, target, token_weight)
    value.sum().backward()
    y = logits.detach().clone().requires_grad_()
    expected = encouraging_loss(y, target, token_weight=token_weight, **options)
    expected.sum().backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("options", [dict(z_loss=1e-3, softcap=5.0),
                                     dict(softcap=3.0, label_smoothing=0.1, reduction="none")])
def test_compiled_logit_terms(backend, options):
    logits, target = make_case((16,), 7, dtype=torch.float32, ignore_fraction=0.2)
    token_weight = torch.rand(16)
    criterion = EncouragingLoss(return_lse=True, **options)
    compiled = torch.compile(criterion, fullgraph=True, backend=backend)
    x = logits.detach().clone().requires_grad_()
    value, lse = compiled(x, target, token_weight)
    value.sum().backward()
    y = logits.detach().clone().requires_grad_()
    expected, expected_lse = encouraging_loss(y, target, token_weight=token_weight,
                                              return_lse=True, **options)
    expected.sum().backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_float32_softcap_is_exact_to_the_float64_cap(reduction):
    """Compiled, float32 EL with a softcap takes the loss of the float64 cap in float64 (eager
    corrects the float32 cap's value instead): about a unit against the float64 loss of the
    float64 capped logits, as eager; several without it (tests/test_functional.py)."""
    logits, target = make_case((64,), 50, dtype=torch.float32, scale=10.0, seed=11)
    options = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    compiled = torch.compile(EncouragingLoss(return_lse=True, **options), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    x = logits.detach().clone().requires_grad_()
    value, lse = compiled(x, target)
    value.sum().backward()
    expected = reference_loss(logits.detach().double(), target, **options)
    unit = torch.finfo(torch.float32).eps
    error = ((value.double() - expected).abs() / (expected.abs() + 1)).max().item()
    assert value.dtype == lse.dtype == torch.float32 and error <= 1.5 * unit, error / unit
    y = logits.detach().clone().requires_grad_()
    eager, eager_lse = encouraging_loss(y, target, return_lse=True, **options)
    eager.sum().backward()
    torch.testing.assert_close(lse, eager_lse)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fused_linear_float32_softcap_is_exact(backend):
    """The fused linear loss's chunks correct the float32 cap compiled too (the logits are the
    hidden states: an identity projection)."""
    logits, target = make_case((64,), 50, dtype=torch.float32, scale=10.0, seed=11)
    logits = logits.detach()
    compiled = torch.compile(linear_encouraging_loss, fullgraph=True, backend=backend)
    options = dict(softcap=30.0, reduction="none", chunk_size=24)
    x = logits.clone().requires_grad_()
    value = compiled(x, torch.eye(50), target, **options)
    value.sum().backward()
    exact = reference_loss(logits.double(), target, softcap=30.0, reduction="none")
    error = ((value.double() - exact).abs() / (exact.abs() + 1)).max().item()
    assert error <= 1.5 * torch.finfo(torch.float32).eps, error
    y = logits.clone().requires_grad_()
    linear_encouraging_loss(y, torch.eye(50), target, **options).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
