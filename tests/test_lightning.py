"""PyTorch Lightning trains a LightningModule with EncouragingLoss (a few CPU steps)."""

from __future__ import annotations

import pytest
import torch

lightning = pytest.importorskip("lightning")

from encouraging_loss import BonusSchedule, EncouragingLoss  # noqa: E402


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16, 4)
        self.criterion = EncouragingLoss(
            log_end=0.75, bonus_scale=BonusSchedule(final=1.0, start=0.5)
        )
        self.losses = []

    def on_train_epoch_start(self):
        self.criterion.step(self.current_epoch / self.trainer.max_epochs)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        loss = self.criterion(self.net(inputs), target)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lightning_trains_with_encouraging_loss(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(64, 16)
    target = (inputs[:, :4]).argmax(1)  # a learnable rule
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, target),
                                         batch_size=16)
    model = Classifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = lightning.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, loader)
    assert trainer.global_step == 16
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert model.criterion.bonus_scale == 1.0  # the schedule reached the bonus at epoch 2 of 4
    with torch.no_grad():
        accuracy = (model.net(inputs).argmax(1) == target).float().mean().item()
    assert accuracy > 0.5  # chance is 0.25
