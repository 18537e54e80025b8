"""torch.compile(fullgraph=True) traces the loss without graph breaks and gives the same results."""

from __future__ import annotations

import pytest
import torch

from conftest import make_case
from encouraging_loss import EncouragingLoss, encouraging_loss


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
