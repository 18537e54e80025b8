"""Bad inputs raise a clear error that names the argument and the expected form."""

from __future__ import annotations

import pytest
import torch

from encouraging_loss import (
    BonusSchedule,
    EncouragingLoss,
    binary_encouraging_loss_with_logits,
    encouraging_loss,
    focal_loss,
    poly1_loss,
)

LOGITS = torch.randn(4, 3)
TARGET = torch.tensor([0, 2, 1, 0])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(target=torch.tensor([0, 3, 1, 0])), ValueError, "target holds class index 3"),
        (dict(target=torch.tensor([0, -1, 1, 0])), ValueError, "outside"),
        (dict(target=torch.tensor([0, 1, 1])), ValueError, "must have shape"),
        (dict(target=torch.tensor([[0], [1], [1], [0]])), ValueError, "must have shape"),
        (dict(target=torch.rand(4, 2)), ValueError, "probability targets must have"),
        (dict(target=torch.tensor([True, False, True, True])), TypeError, "target must hold"),
        (dict(target=[0, 1, 2, 0]), TypeError, "target must be a torch.Tensor"),
        (dict(input=torch.tensor([[1, 2, 3]] * 4)), TypeError, "input must be a floating"),
        (dict(input=torch.tensor(1.0)), ValueError, "input must have shape"),
        (dict(input=torch.randn(4, 0), target=torch.zeros(4, dtype=torch.long)), ValueError,
         "at least one class"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must be a 1-D tensor .* \(3,\)"),
        (dict(weight=torch.ones(3, 1)), ValueError, "weight must be a 1-D"),
        (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "weight must be a floating"),
        (dict(bonus_weight=torch.ones(2)), ValueError, "bonus_weight must be a 1-D"),
        (dict(log_end=0.0), ValueError, r"log_end must be in \(0.0, 1.0\]"),
        (dict(log_end=1.5), ValueError, "log_end must be in"),
        (dict(log_end="0.5"), TypeError, "log_end must be a real number"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
        (dict(label_smoothing=1.1), ValueError, "label_smoothing must be in"),
        (dict(bonus="square"), ValueError, "bonus must be one of 'log', 'power'"),
        (dict(bonus_gamma=0.0), ValueError, "bonus_gamma must be in"),
        (dict(bonus_start=1.0), ValueError, "bonus_start must be in"),
        (dict(bonus_scale=float("nan")), ValueError, "bonus_scale must be finite"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none'"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(validate_args=1), TypeError, "validate_args must be a bool"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    arguments = dict(input=LOGITS, target=TARGET)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        encouraging_loss(**arguments)


def test_ignore_index_is_not_out_of_range():
    encouraging_loss(LOGITS, torch.tensor([0, 7, 1, 0]), ignore_index=7)


def test_range_check_can_be_switched_off():
    # With validate_args=False nothing reads the target's values (no device sync); torch's own
    # indexing still refuses an out-of-range class on CPU.
    with pytest.raises((RuntimeError, IndexError)):
        encouraging_loss(LOGITS, torch.tensor([0, 3, 1, 0]), validate_args=False)


def test_module_checks_options_when_built():
    with pytest.raises(ValueError, match="log_end"):
        EncouragingLoss(log_end=2.0)
    with pytest.raises(ValueError, match="bonus must be one of"):
        EncouragingLoss(bonus="exp")
    with pytest.raises(TypeError, match="bonus_scale must be a number or a BonusSchedule"):
        EncouragingLoss(bonus_scale=lambda t: t)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(final=float("inf")), ValueError, "final must be finite"),
        (dict(start=1.5), ValueError, "start must be in"),
        (dict(ramp=-0.1), ValueError, "ramp must be in"),
        (dict(shape="quadratic"), ValueError, "shape must be one of"),
    ],
)
def test_schedule_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BonusSchedule(**kwargs)


def test_schedule_call_arguments():
    schedule = BonusSchedule()
    with pytest.raises(ValueError, match="progress must be in"):
        schedule(1.5)
    with pytest.raises(ValueError, match="num_epochs must be positive"):
        schedule.at_epoch(0, 0)
    with pytest.raises(ValueError, match="epoch must be in"):
        schedule.at_epoch(11, 10)


def test_peer_and_binary_arguments():
    with pytest.raises(ValueError, match="focal_loss takes class-index targets"):
        focal_loss(LOGITS, torch.rand(4, 3))
    with pytest.raises(ValueError, match="gamma must be in"):
        focal_loss(LOGITS, TARGET, gamma=-1.0)
    with pytest.raises(ValueError, match="target holds class index 5"):
        poly1_loss(LOGITS, torch.tensor([0, 5, 1, 0]))
    with pytest.raises(ValueError, match="target must have the input's shape"):
        binary_encouraging_loss_with_logits(LOGITS, torch.rand(4, 2))
    with pytest.raises(TypeError, match="target must be a floating"):
        binary_encouraging_loss_with_logits(LOGITS, TARGET)
    with pytest.raises(ValueError, match="base must be one of"):
        binary_encouraging_loss_with_logits(LOGITS, torch.rand(4, 3), base="hinge")
    with pytest.raises(ValueError, match="alpha must be in"):
        binary_encouraging_loss_with_logits(LOGITS, torch.rand(4, 3), alpha=1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        binary_encouraging_loss_with_logits(LOGITS, torch.rand(4, 3), weight=torch.ones(2))
