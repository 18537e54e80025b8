"""Modules delegate to the functions; schedules step the bonus."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_case
from encouraging_loss import (
    BinaryEncouragingLoss,
    BonusSchedule,
    EncouragingLoss,
    FocalLoss,
    Poly1Loss,
    binary_encouraging_loss_with_logits,
    encouraging_loss,
    focal_loss,
    poly1_loss,
)


@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, log_end=0.5, bonus_scale=0.7),
    dict(bonus="power", bonus_gamma=2.0, reduction="none"),
    dict(bonus="cosine", bonus_start=0.3, reduction="sum", ignore_index=2),
])
def test_module_equals_function(options):
    logits, target = make_case((6,), 4, dtype=torch.float32)
    weight, bonus_weight = torch.rand(4) + 0.1, torch.rand(4) + 0.1
    module = EncouragingLoss(weight, bonus_weight=bonus_weight, **options)
    expected = encouraging_loss(logits, target, weight, bonus_weight=bonus_weight, **options)
    torch.testing.assert_close(module(logits, target), expected)


@pytest.mark.parametrize("options", [dict(z_loss=1e-3), dict(softcap=2.0, reduction="none")])
def test_module_logit_terms_and_lse(options):
    logits, target = make_case((6,), 4, dtype=torch.float32, ignore_fraction=0.3)
    module = EncouragingLoss(label_smoothing=0.1, return_lse=True, **options)
    value, lse = module(logits, target)
    expected = encouraging_loss(logits, target, label_smoothing=0.1, **options)
    torch.testing.assert_close(value, expected)
    assert lse.shape == (6,) and module.keyword_options()["z_loss"] == options.get("z_loss", 0.0)
    module.z_loss = 0.5
    torch.testing.assert_close(
        module(logits, target)[0],
        encouraging_loss(logits, target, label_smoothing=0.1, **{**options, "z_loss": 0.5}),
    )
    with pytest.raises(ValueError, match="z_loss must be in"):
        module.z_loss = -0.1
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        EncouragingLoss(return_lse=None)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, reduction="none")])
def test_module_takes_token_weight_per_call(options):
    logits, target = make_case((6, 2), 4, dtype=torch.float32, ignore_fraction=0.2)
    weight, token_weight = torch.rand(4) + 0.1, torch.rand(6, 2)
    module = EncouragingLoss(weight, **options)
    expected = encouraging_loss(logits, target, weight, token_weight=token_weight, **options)
    torch.testing.assert_close(module(logits, target, token_weight), expected)
    torch.testing.assert_close(module(logits, target, token_weight=None),
                               encouraging_loss(logits, target, weight, **options))


def test_module_takes_cross_entropy_positional_arguments():
    logits, target = make_case((6,), 4, dtype=torch.float32)
    weight = torch.rand(4) + 0.1
    ours = EncouragingLoss(weight, None, 1, None, "sum", 0.2, bonus_scale=0.0)
    theirs = torch.nn.CrossEntropyLoss(weight, None, 1, None, "sum", 0.2)
    torch.testing.assert_close(ours(logits, target), theirs(logits, target))
    legacy = EncouragingLoss(size_average=False, bonus_scale=0.0)
    assert legacy.reduction == "sum"


def test_module_buffers_move_and_save():
    module = EncouragingLoss(torch.ones(3), bonus_weight=torch.full((3,), 2.0))
    state = module.state_dict()
    assert set(state) == {"weight", "bonus_weight"}
    restored = EncouragingLoss(torch.zeros(3), bonus_weight=torch.zeros(3))
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.bonus_weight, torch.full((3,), 2.0))
    assert module.double().weight.dtype == torch.float64
    assert "log_end=0.75" in repr(module)


def test_schedule_steps_the_module():
    criterion = EncouragingLoss(
        bonus_scale=BonusSchedule(final=1.0, start=0.5, ramp=0.5, shape="linear"),
        log_end=BonusSchedule(initial=1.0, final=0.5, start=0.0, ramp=1.0),
    )
    logits, target = make_case((5,), 3, dtype=torch.float32)
    assert criterion.bonus_scale == 0.0 and criterion.log_end == 1.0
    torch.testing.assert_close(criterion(logits, target), F.cross_entropy(logits, target))
    criterion.step(0.75)
    assert criterion.bonus_scale == pytest.approx(0.5) and criterion.log_end == pytest.approx(0.625)
    expected = encouraging_loss(logits, target, bonus_scale=0.5, log_end=0.625)
    torch.testing.assert_close(criterion(logits, target), expected)
    criterion.step(1.0)
    assert criterion.bonus_scale == 1.0


@pytest.mark.parametrize("shape", ["linear", "exp", "cosine", "step"])
def test_schedule_shapes_are_monotone_ramps(shape):
    schedule = BonusSchedule(final=2.0, start=0.2, ramp=0.5, shape=shape, initial=0.5)
    values = [schedule(t / 100) for t in range(101)]
    assert values[0] == 0.5 and values[19] == 0.5 and values[-1] == 2.0
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert schedule(0.7) == 2.0
    if shape == "step":
        assert schedule(0.2) == 2.0
    if shape == "linear":
        assert schedule(0.45) == pytest.approx(0.5 + 1.5 * 0.5)
    if shape == "cosine":
        assert schedule(0.45) == pytest.approx(0.5 + 1.5 * 0.5)
    if shape == "exp":
        assert schedule(0.45) == pytest.approx(0.5 + 1.5 * math.exp(-5 * 0.25))
    assert schedule.at_epoch(5, 10) == schedule(0.5)


def test_peer_modules_equal_functions():
    logits, target = make_case((6,), 4, dtype=torch.float32)
    weight = torch.rand(4) + 0.1
    torch.testing.assert_close(FocalLoss(1.5, weight)(logits, target),
                               focal_loss(logits, target, 1.5, weight))
    torch.testing.assert_close(Poly1Loss(0.5, weight, label_smoothing=0.1)(logits, target),
                               poly1_loss(logits, target, 0.5, weight, label_smoothing=0.1))
    labels = (torch.rand(6, 4) > 0.5).float()
    module = BinaryEncouragingLoss(reduction="sum", base="focal", alpha=0.25)
    torch.testing.assert_close(
        module(logits, labels),
        binary_encouraging_loss_with_logits(logits, labels, reduction="sum", base="focal",
                                            alpha=0.25),
    )
