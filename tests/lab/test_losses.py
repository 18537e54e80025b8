"""Loss names → configured criteria."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encouraging_loss import BonusSchedule, EncouragingLoss, FocalLoss, Poly1Loss
from encouraging_loss.lab.losses import (
    UnknownLossError,
    baselines,
    build_criterion,
    parse_loss,
    parse_loss_list,
)


@pytest.mark.parametrize(
    ("name", "family", "params"),
    [
        ("ce", "ce", {}),
        ("el", "el", {}),
        ("el:log_end=1", "el", {"log_end": 1.0}),
        ("el:1", "el", {"log_end": 1.0}),
        ("ls-ce:0.1", "ls-ce", {"label_smoothing": 0.1}),
        ("ls-ce", "ls-ce", {"label_smoothing": 0.1}),
        ("ls-el:0.2", "ls-el", {"label_smoothing": 0.2}),
        ("focal:gamma=2", "focal", {"gamma": 2.0}),
        ("focal", "focal", {"gamma": 2.0}),
        ("el:bonus=power,bonus_gamma=3", "el", {"bonus": "power", "bonus_gamma": 3.0}),
        ("poly1:epsilon=1", "poly1", {"epsilon": 1.0}),
        ("el:log_end=0.5,bonus_scale=0.5", "el", {"log_end": 0.5, "bonus_scale": 0.5}),
        ("EL:log_end = 0.9", "el", {"log_end": 0.9}),
    ],
)
def test_parse_loss(name, family, params):
    spec = parse_loss(name)
    assert spec.family == family
    assert spec.params == params
    assert spec.name == name.strip()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "xent",
        "el:foo=1",
        "el:log_end=abc",
        "focal:gamma=2,3",
        "ls-ce:1.5",
        "ce:gamma=2",
        "el:bonus=square",
        "el:log_end=1.5",
        "el:bonus_weight=heavy",
        "el:start=2",
        "el,ce",
    ],
)
def test_parse_loss_rejects(name):
    with pytest.raises(UnknownLossError):
        parse_loss(name)


def test_unknown_loss_message_lists_families():
    with pytest.raises(UnknownLossError, match="known families: ce, ls-ce, el"):
        parse_loss("hinge")


def test_parse_loss_list_keeps_parameters_with_their_loss():
    specs = parse_loss_list("ce,el,el:log_end=0.5,bonus_scale=0.5,ls-ce:0.1,focal:gamma=2")
    assert [s.name for s in specs] == [
        "ce",
        "el",
        "el:log_end=0.5,bonus_scale=0.5",
        "ls-ce:0.1",
        "focal:gamma=2",
    ]
    assert parse_loss_list("ce, ce ,el")[0].name == "ce"
    assert len(parse_loss_list("ce,ce,el")) == 2


def test_build_criterion_types_and_parameters():
    assert isinstance(build_criterion("ce"), nn.CrossEntropyLoss)
    assert build_criterion("ls-ce:0.1").label_smoothing == pytest.approx(0.1)
    el = build_criterion("el:log_end=1")
    assert isinstance(el, EncouragingLoss) and el.log_end == 1.0
    ls_el = build_criterion("ls-el:0.1")
    assert isinstance(ls_el, EncouragingLoss) and ls_el.label_smoothing == pytest.approx(0.1)
    assert build_criterion("el:log_end=0.5,bonus_scale=0.5").bonus_scale == pytest.approx(0.5)
    assert isinstance(build_criterion("focal:gamma=2"), FocalLoss)
    assert isinstance(build_criterion("poly1:epsilon=1"), Poly1Loss)


def test_every_criterion_gives_a_finite_scalar():
    logits, targets = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for name in (
        "ce",
        "el",
        "el:log_end=1",
        "ls-ce:0.1",
        "ls-el:0.1",
        "focal:gamma=2",
        "poly1:epsilon=1",
    ):
        loss = build_criterion(name)(logits, targets)
        assert loss.ndim == 0 and torch.isfinite(loss), name


def test_el_with_zero_bonus_is_ce():
    logits, targets = torch.randn(16, 4), torch.randint(0, 4, (16,))
    el = build_criterion("el:bonus_scale=0")
    torch.testing.assert_close(el(logits, targets), nn.functional.cross_entropy(logits, targets))


def test_baseline_names():
    assert parse_loss("el").baseline_name == "ce"
    assert parse_loss("ls-el:0.1").baseline_name == "ls-ce:0.1"
    assert parse_loss("ls-ce:0.1").baseline_name == "ls-ce:0.1"


def test_schedules_live_in_the_criterion():
    assert build_criterion("el").bonus_schedule is None
    el = build_criterion("el:ramp=0.5,start=0.1,bonus_scale=0.8")
    assert isinstance(el.bonus_schedule, BonusSchedule) and el.bonus_scale == 0.0
    el.step(1.0)
    assert el.bonus_scale == pytest.approx(0.8)
    scheduled_end = build_criterion("el:log_end=0.75,log_end_from=0.5,log_end_ramp=1")
    assert scheduled_end.log_end == 0.5 and scheduled_end.bonus_schedule is None
    scheduled_end.step(1.0)
    assert scheduled_end.log_end == pytest.approx(0.75)


def test_label_smoothing_one_is_the_cores_range():
    assert build_criterion("ls-ce:1").label_smoothing == 1.0
    assert build_criterion("ls-el:1").label_smoothing == 1.0


def test_bonus_weight_balanced_needs_class_counts():
    spec = parse_loss("el:bonus_weight=balanced")
    with pytest.raises(UnknownLossError, match="class counts"):
        build_criterion(spec)
    weights = build_criterion(spec, class_counts=[90, 9, 1]).bonus_weight
    assert weights.shape == (3,) and weights[0] < weights[1] < weights[2]


def test_baselines_and_stored_spec():
    specs = parse_loss_list("ce,el,ls-ce:0.1,ls-el:0.1,focal")
    assert baselines(specs) == {
        "ce": None,
        "el": "ce",
        "ls-ce:0.1": None,
        "ls-el:0.1": "ls-ce:0.1",
        "focal": "ce",
    }
    assert parse_loss("el:log_end=1").to_dict() == {"family": "el", "params": {"log_end": 1.0}}
