"""The label-smoothing path (ops/smoothed.py): its fast rows, its exact rows and its blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import grad_of, reference_loss
from encouraging_loss import encouraging_loss
from encouraging_loss.ops import rowwise, smoothed
from encouraging_loss.ops.index_targets import IndexTargetRows
from encouraging_loss.options import LossOptions

# These test the row paths' label smoothing (ops/smoothed.py): the small-problem path is off.
pytestmark = pytest.mark.usefixtures("rows_path")


def _confident_rows(num_rows, num_classes, dtype, seed=3):
    """Logits where some rows put p > 0.9 on a wrong class, some on the target, some nowhere."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (num_rows,), generator=generator)
    wrong = (target + 1) % num_classes
    rows = torch.arange(num_rows)
    logits[rows[0::3], wrong[0::3]] += 12.0  # confidently wrong: a class past log_end off y
    logits[rows[1::3], target[1::3]] += 12.0  # confidently right
    logits[rows[5::7], wrong[5::7]] += 40.0  # 1 - p of the wrong class far below float32's eps
    target[4::9] = -100
    return logits.to(dtype).requires_grad_(), target


@pytest.mark.parametrize("log_end", [0.75, 0.5, 0.3])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("use_bonus_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_confidently_wrong_rows_match_reference(log_end, use_weight, use_bonus_weight, reduction):
    logits, target = _confident_rows(40, 7, torch.float64)
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(7, generator=generator, dtype=torch.float64) + 0.2 if use_weight else None
    bonus_weight = torch.rand(7, generator=generator, dtype=torch.float64) + 0.2 \
        if use_bonus_weight else None  # fmt: skip
    kwargs = dict(weight=weight, bonus_weight=bonus_weight, label_smoothing=0.2, log_end=log_end,
                  bonus_scale=1.5, reduction=reduction)  # fmt: skip
    value, grad = grad_of(encouraging_loss, logits, target, **kwargs)
    expected, expected_grad = grad_of(reference_loss, logits, target, **kwargs)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("log_end", [0.75, 0.5])
def test_confident_rows_in_low_precision_within_cross_entropy_error(dtype, smoothing, log_end):
    """Rows with p near 1 on the target or elsewhere: the bonus's slope past log_end must not
    magnify the rounding of log p_y beyond torch CE's own error."""
    logits, target = _confident_rows(60, 11, dtype)
    errors = {}
    for name, fn in [("el", encouraging_loss), ("ce", F.cross_entropy)]:
        options = dict(label_smoothing=smoothing, reduction="none")
        extra = dict(log_end=log_end) if name == "el" else {}
        ref_options = dict(options, bonus_scale=0.0) if name == "ce" else dict(options, **extra)
        value, grad = grad_of(fn, logits, target, **options, **extra)
        expected, expected_grad = grad_of(reference_loss, logits.double(), target, **ref_options)
        errors[name] = (
            ((value.double() - expected).abs() / (expected.abs() + 1)).max().item(),
            ((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()).item(),
        )
    eps = torch.finfo(dtype).eps
    assert errors["el"][0] <= errors["ce"][0] + 1e-3 * eps, errors
    assert errors["el"][1] <= errors["ce"][1] + eps, errors


def _value_and_grad(logits, target, **kwargs):
    value, grad = grad_of(encouraging_loss, logits, target, reduction="none", **kwargs)
    return value, grad


@pytest.mark.parametrize("use_weight", [False, True])
def test_exact_rows_everywhere_equal_the_fast_rows(monkeypatch, use_weight):
    """The GPU form (every row exact, no data-dependent subset) gives the CPU form's numbers."""
    logits, target = _confident_rows(50, 9, torch.float32)
    weight = torch.linspace(0.5, 2.0, 9) if use_weight else None
    kwargs = dict(weight=weight, label_smoothing=0.1, log_end=0.75)
    fast = _value_and_grad(logits, target, **kwargs)
    monkeypatch.setattr(smoothed, "_fix_rows", lambda *args: None)
    monkeypatch.setattr(
        smoothed._BonusSums, "__init__", _exact_bonus_sums_init(smoothed._BonusSums.__init__)
    )
    exact = _value_and_grad(logits, target, **kwargs)
    torch.testing.assert_close(exact[0], fast[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exact[1], fast[1], rtol=1e-6, atol=1e-7)


def _exact_bonus_sums_init(original):
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.exact = True

    return init


@pytest.mark.parametrize("block_elements", [7, 30, 1 << 18])
def test_blocks_of_any_size_give_the_same_result(monkeypatch, block_elements):
    logits, target = _confident_rows(37, 10, torch.float32)
    whole = _value_and_grad(logits, target, label_smoothing=0.1)
    monkeypatch.setattr(rowwise, "BLOCK_ELEMENTS", block_elements)
    blocked = _value_and_grad(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(blocked[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(blocked[1], whole[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options,kind",
    [
        (dict(label_smoothing=0.0), "hard"),
        (dict(label_smoothing=0.1), "smoothed"),
        (dict(label_smoothing=0.1, bonus_scale=0.0, log_end=1.0), "smoothed"),
        (dict(label_smoothing=0.1, bonus="none"), "smoothed"),
        (dict(label_smoothing=0.1, log_end=1.0), "dense"),
        (dict(label_smoothing=0.1, bonus_start=0.5), "dense"),
        (dict(label_smoothing=0.1, bonus="power", bonus_gamma=2.0), "dense"),
    ],
)
def test_row_kind_follows_the_options(options, kind):
    rows = IndexTargetRows(torch.tensor([0, 1]), 3, None, None, LossOptions(**options),
                           torch.float32)  # fmt: skip
    assert rows.kind == kind
