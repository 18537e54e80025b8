"""Early stopping (``TrainConfig.patience``): when it stops, that it is off by default, that
``stop_after_epochs`` + resume stop at the same epoch, and its validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from encouraging_loss.lab.losses import build_criterion
from encouraging_loss.lab.trainer import ClassificationBatches, TrainConfig, set_seed, train

# Validation accuracy of epochs 1, 2, ...: the best is epoch 2 (epoch 5 only ties it).
SCRIPT = (0.5, 0.6, 0.55, 0.6, 0.6, 0.58, 0.9, 0.9, 0.9, 0.9)


class ScriptedBatches(ClassificationBatches):
    """Real training batches whose validation accuracy of epoch ``e`` is ``SCRIPT[e - 1]``;
    ``done`` epochs already trained (a resumed run)."""

    def __init__(self, splits, done: int = 0):
        super().__init__(splits)
        self.epoch = done

    def validate(self, model, batch_size, device):
        self.epoch += 1
        return {"val_accuracy": SCRIPT[self.epoch - 1], "val_nll": 1.0}


@pytest.fixture(scope="module")
def splits():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    return SimpleNamespace(train_x=x, train_y=y, val_x=x[:8], val_y=y[:8])


def _train(splits, patience, done: int = 0, **options):
    set_seed(0)
    model = nn.Linear(5, 3)
    config = TrainConfig(epochs=len(SCRIPT), batch_size=10, patience=patience)
    batches = ScriptedBatches(splits, done)
    return train(model, build_criterion("ce"), batches, config, progress=False, **options)


def test_training_ends_patience_epochs_after_the_best(splits):
    result = _train(splits, patience=3)
    # Best epoch 2; epochs 3, 4, 5 bring no strictly better accuracy: stop after epoch 5.
    assert len(result.history) == 5 and result.best_epoch == 2 and result.stopped_early
    assert result.best_val_accuracy == 0.6 and not result.interrupted
    late = _train(splits, patience=5)  # epoch 7 improves before patience runs out
    assert late.best_epoch == 7 and len(late.history) == 10 and not late.stopped_early


def test_off_by_default(splits):
    result = _train(splits, patience=None)
    assert len(result.history) == len(SCRIPT) and not result.stopped_early


def test_resumed_run_stops_at_the_same_epoch(splits, tmp_path):
    whole = _train(splits, patience=3, checkpoint_path=tmp_path / "whole.pt")
    path = tmp_path / "part.pt"
    first = _train(splits, patience=3, checkpoint_path=path, stop_after_epochs=3)
    assert first.interrupted and len(first.history) == 3
    resumed = _train(splits, patience=3, done=3, checkpoint_path=path, resume=True)
    assert resumed.history == whole.history and resumed.stopped_early
    # Interrupted exactly at the stopping epoch: done, not interrupted; a resume trains no more.
    path = tmp_path / "at_stop.pt"
    at_stop = _train(splits, patience=3, checkpoint_path=path, stop_after_epochs=5)
    assert not at_stop.interrupted and at_stop.history == whole.history
    again = _train(splits, patience=3, done=5, checkpoint_path=path, resume=True)
    assert again.history == whole.history and again.best_epoch == 2
    weights = [p.detach().clone() for p in again.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights, whole.model.parameters(), strict=True))


@pytest.mark.parametrize("patience", [0, -1, 2.5, "3"])
def test_patience_is_validated(patience):
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=patience).validate()
