"""Margins, energies, calibration and representation probes on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from encouraging_loss.lab import diagnostics


def test_margin_and_energy_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    targets = torch.tensor([0, 1])
    torch.testing.assert_close(diagnostics.margins(logits, targets), torch.tensor([2.0, -3.0]))
    energy_true, energy_free = diagnostics.energies(logits, targets)
    torch.testing.assert_close(energy_true, torch.tensor([-3.0, -2.0]))
    expected = -torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(energy_free, expected)


def test_summary_has_quantiles():
    stats = diagnostics.summarize(torch.arange(101.0), "margin")
    assert stats["margin_mean"] == pytest.approx(50.0)
    assert stats["margin_q50"] == pytest.approx(50.0)
    assert stats["margin_q05"] == pytest.approx(5.0)


def test_ece_zero_when_calibrated_and_positive_when_overconfident():
    # Two-class logits with confidence 0.75 and exactly 75% correct → ECE 0.
    p = 0.75
    logit = math.log(p / (1 - p))
    logits = torch.tensor([[logit, 0.0]] * 4)
    targets = torch.tensor([0, 0, 0, 1])
    ece, bins = diagnostics.calibration(logits, targets)
    assert ece == pytest.approx(0.0, abs=1e-6)
    assert sum(bins["count"]) == 4
    overconfident = torch.tensor([[10.0, 0.0]] * 4)
    assert diagnostics.calibration(overconfident, targets)[0] == pytest.approx(0.25, abs=1e-3)


def test_probes_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=generator) * 4
    labels = torch.arange(300) % 3
    features = centers[labels] + torch.randn(300, 8, generator=generator)
    train, test = slice(0, 200), slice(200, 300)
    probe = diagnostics.linear_probe_accuracy(
        features[train], labels[train], features[test], labels[test]
    )
    crt = diagnostics.classifier_retraining_accuracy(
        features[train], labels[train], features[test], labels[test]
    )
    assert probe > 0.95 and crt > 0.95


def test_input_validation():
    with pytest.raises(ValueError, match="logits"):
        diagnostics.margins(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        diagnostics.margins(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        diagnostics.calibration(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), n_bins=0)


def test_eval_mode_restores_the_training_mode():
    model = torch.nn.Dropout(0.5)
    for training in (True, False):
        model.train(training)
        with diagnostics.eval_mode(model) as inside:
            assert inside is model and not model.training
        assert model.training is training
    with pytest.raises(RuntimeError), diagnostics.eval_mode(model.train()):
        raise RuntimeError("restored on errors too")
    assert model.training
