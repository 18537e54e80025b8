"""The training loop's pieces: schedules, optimizers, clipping, bonus schedules, augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from encouraging_loss import BonusSchedule, EncouragingLoss
from encouraging_loss.lab import data
from encouraging_loss.lab.data import random_crop_flip
from encouraging_loss.lab.losses import build_criterion
from encouraging_loss.lab.models import build_model
from encouraging_loss.lab.trainer import (
    ClassificationBatches,
    TrainConfig,
    learning_rate,
    set_seed,
    train,
)


@pytest.fixture(scope="module")
def tiny_splits(data_root):
    dataset = data.load_dataset("fashion-mnist", data_root, max_train=300, max_test=100)
    return data.make_splits(dataset)


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=1.0, schedule="cosine")
    assert learning_rate(cosine, 0, 100, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 50, 100, 10) == pytest.approx(0.5)
    steps = TrainConfig(lr=1.0, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [learning_rate(steps, s, 100, 10) for s in (0, 49, 50, 75)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01]
    )
    warm = TrainConfig(lr=1.0, schedule="constant", warmup_epochs=1)
    assert learning_rate(warm, 0, 100, 10) == pytest.approx(0.1)
    assert learning_rate(warm, 10, 100, 10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("optimizer", "adam"),
        ("lr", -1.0),
        ("schedule", "step"),
        ("clip_grad_norm", 0.0),
        ("milestones", (1.5,)),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


def test_adamw_multistep_clipping_and_bonus_schedule(tiny_splits):
    set_seed(0)
    model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
    criterion = EncouragingLoss(bonus_scale=BonusSchedule(final=1.0, start=0.5))
    config = TrainConfig(
        epochs=3,
        batch_size=50,
        optimizer="adamw",
        lr=1e-3,
        schedule="multistep",
        clip_grad_norm=1.0,
    )
    result = train(
        model,
        criterion,
        tiny_splits,
        config,
        progress=False,
    )
    assert not result.diverged and len(result.history) == 3
    assert result.history[0]["bonus_scale"] == 0.0  # bonus off in the first half
    assert result.history[-1]["bonus_scale"] == pytest.approx(1.0)
    assert 1 <= result.best_epoch <= 3
    assert result.best_val_accuracy == max(h["val_accuracy"] for h in result.history)


def test_same_seed_same_result(tiny_splits):
    def once():
        set_seed(3)
        model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
        return train(
            model,
            build_criterion("ce"),
            tiny_splits,
            TrainConfig(epochs=1, batch_size=64, seed=3),
            progress=False,
        ).history

    assert once() == once()


def test_divergence_stops_cleanly(tiny_splits):
    set_seed(0)
    model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
    result = train(
        model,
        build_criterion("ce"),
        tiny_splits,
        TrainConfig(epochs=2, batch_size=30, lr=1e4, schedule="constant"),
        progress=False,
    )
    assert result.diverged and result.diverged_step >= 1 and result.diverged_epoch == 1
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_random_crop_flip_keeps_shape_and_content():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape
    again = random_crop_flip(images, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="images"):
        random_crop_flip(images[0], torch.Generator())


class _CountingBatches(ClassificationBatches):
    """A task's own batches: the default ones, counting the loss hook's calls."""

    calls = 0

    def loss(self, step):
        type(self).calls += 1
        return super().loss(step)


def test_task_batches_drive_the_same_loop(tiny_splits):
    def once(data):
        set_seed(1)
        model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
        config = TrainConfig(epochs=2, batch_size=50, seed=1)
        return train(model, build_criterion("el"), data, config, progress=False).history

    batches = _CountingBatches(tiny_splits)
    assert once(batches) == once(tiny_splits)
    assert _CountingBatches.calls == 2 * (len(tiny_splits.train_y) // 50)
    with pytest.raises(ValueError, match="perturb"):
        train(
            build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes),
            build_criterion("ce"),
            batches,
            TrainConfig(epochs=1),
            perturb=lambda model, x, y: x,
            progress=False,
        )


def test_epoch_hook_entries_join_the_history_and_leave_training_unchanged(tiny_splits):
    calls = []

    def hook(model, epoch):
        calls.append((epoch, model.training))
        return {"probe": float(epoch)}

    def once(**hooks):
        set_seed(4)
        model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
        config = TrainConfig(epochs=2, batch_size=64, seed=4)
        return train(model, build_criterion("ce"), tiny_splits, config, progress=False, **hooks)

    plain, hooked = once(), once(epoch_hook=hook)
    assert calls == [(1, True), (2, True)]
    assert [h.pop("probe") for h in hooked.history] == [1.0, 2.0]
    assert hooked.history == plain.history  # the hook changes nothing else


@pytest.mark.parametrize(
    ("hook", "match"),
    [(3, "callable"), (lambda model, epoch: {"val_accuracy": 1.0}, "new history keys")],
)
def test_epoch_hook_validation(tiny_splits, hook, match):
    model = build_model("mlp", tiny_splits.input_shape, tiny_splits.num_classes)
    with pytest.raises(ValueError, match=match):
        train(
            model,
            build_criterion("ce"),
            tiny_splits,
            TrainConfig(epochs=1, batch_size=64),
            epoch_hook=hook,
            progress=False,
        )
