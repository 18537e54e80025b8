"""Hugging Face Trainer with the encouraging loss: a tiny random GPT-2, no download."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from encouraging_loss import encouraging_loss  # noqa: E402
from encouraging_loss.integrations.huggingface import (  # noqa: E402
    CausalLMEncouragingLoss,
    causal_lm_encouraging_loss,
    encouraging_causal_lm_loss,
)

VOCAB, SEQUENCE = 128, 12


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def random_batch(batch=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, SEQUENCE), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[1, -4:] = -100  # padding
    return input_ids, labels


@pytest.mark.parametrize("num_items_in_batch", [None, 31, "tensor"])
def test_bonus_scale_zero_is_the_models_own_loss(num_items_in_batch):
    model = tiny_gpt2().eval()  # no dropout: two forward passes must agree
    input_ids, labels = random_batch()
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(31)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    expected = model(input_ids=input_ids, labels=labels, **kwargs).loss
    outputs = model(input_ids=input_ids)
    loss_fn = causal_lm_encouraging_loss(bonus_scale=0.0)
    torch.testing.assert_close(loss_fn(outputs, labels, num_items_in_batch), expected)


def test_shift_and_normalisation_match_encouraging_loss():
    """The loss is EL of logits[:, t] against labels[:, t + 1]; sum / num_items when given."""
    logits = torch.randn(3, 7, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 7))
    labels[2, 4] = -100
    shifted_logits = logits[:, :-1].reshape(-1, 10)
    shifted_labels = labels[:, 1:].reshape(-1)
    loss_fn = CausalLMEncouragingLoss(log_end=0.5, label_smoothing=0.1)
    mean = encouraging_loss(shifted_logits, shifted_labels, log_end=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss_fn((logits,), labels), mean)
    summed = encouraging_loss(shifted_logits, shifted_labels, log_end=0.5, label_smoothing=0.1,
                              reduction="sum")
    torch.testing.assert_close(loss_fn({"logits": logits}, labels, num_items_in_batch=40),
                               summed / 40)
    assert encouraging_causal_lm_loss(logits, labels).shape == ()


def test_options_are_validated():
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_encouraging_loss(reduction="sum")
    with pytest.raises(TypeError, match="unknown option"):
        causal_lm_encouraging_loss(logend=0.5)
    with pytest.raises(ValueError, match="log_end"):
        causal_lm_encouraging_loss(log_end=1.5)
    loss_fn = causal_lm_encouraging_loss()
    with pytest.raises(TypeError, match="outputs must be"):
        loss_fn(object(), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="num_items_in_batch"):
        loss_fn(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), num_items_in_batch=2.0)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, size=32, seed=2):
        generator = torch.Generator().manual_seed(seed)
        # A learnable pattern: every sequence counts up from a random start.
        starts = torch.randint(0, VOCAB, (size, 1), generator=generator)
        self.tokens = (starts + torch.arange(SEQUENCE)) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index].clone()}


def test_trainer_steps_reduce_the_loss(tmp_path):
    model = tiny_gpt2()
    model.eval()
    data = RandomTokens()
    input_ids = data.tokens
    with torch.no_grad():
        before = CausalLMEncouragingLoss(bonus_scale=0.0)(model(input_ids=input_ids), input_ids)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data,
        compute_loss_func=causal_lm_encouraging_loss(log_end=0.75),
    )  # fmt: skip
    trainer.train()  # switches the model to training mode
    model.eval()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    with torch.no_grad():
        after = CausalLMEncouragingLoss(bonus_scale=0.0)(model(input_ids=input_ids), input_ids)
    assert after < before  # the cross-entropy of the training data went down
