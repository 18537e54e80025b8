"""Hugging Face with the encouraging loss: tiny random GPT-2, Llama and Qwen2, no download.

The Trainer loss (``compute_loss_func``) and the fused patch (``apply_encouraging_loss``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from encouraging_loss import BonusSchedule, encouraging_loss  # noqa: E402
from encouraging_loss.integrations.huggingface import (  # noqa: E402
    CausalLMEncouragingLoss,
    apply_encouraging_loss,
    causal_lm_encouraging_loss,
    encouraging_causal_lm_loss,
    encouraging_loss_applied,
    remove_encouraging_loss,
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


def test_token_weight_is_shifted_with_the_labels():
    """token_weight (labels' shape) weighs each label: a weighted mean, or the weighted sum
    over num_items_in_batch."""
    logits = torch.randn(3, 7, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 7))
    labels[2, 4] = -100
    weights = torch.rand(3, 7, dtype=torch.float64)
    weights[0, 3] = 0.0
    shifted_logits = logits[:, :-1].reshape(-1, 10)
    shifted_labels = labels[:, 1:].reshape(-1)
    shifted_weights = weights[:, 1:].reshape(-1)
    loss_fn = CausalLMEncouragingLoss(log_end=0.5, label_smoothing=0.1)
    options = dict(log_end=0.5, label_smoothing=0.1, token_weight=shifted_weights)
    mean = encouraging_loss(shifted_logits, shifted_labels, **options)
    torch.testing.assert_close(loss_fn((logits,), labels, token_weight=weights), mean)
    summed = encouraging_loss(shifted_logits, shifted_labels, reduction="sum", **options)
    torch.testing.assert_close(
        loss_fn({"logits": logits}, labels, num_items_in_batch=40, token_weight=weights),
        summed / 40,
    )
    ones = loss_fn((logits,), labels, token_weight=torch.ones(3, 7, dtype=torch.float64))
    torch.testing.assert_close(ones, loss_fn((logits,), labels))
    with pytest.raises(ValueError, match=r"token_weight must be a tensor of the labels' shape"):
        loss_fn((logits,), labels, token_weight=torch.ones(3, 6))
    with pytest.raises(ValueError, match="token_weight must hold finite values >= 0"):
        causal_lm_encouraging_loss(validate_args=True)((logits,), labels,
                                                       token_weight=-torch.ones(3, 7))


def test_z_loss_and_softcap_pass_through():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, 2] = -100
    loss = causal_lm_encouraging_loss(z_loss=1e-3, softcap=4.0)((logits,), labels)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = encouraging_loss(logits.reshape(-1, 11), shifted.reshape(-1), z_loss=1e-3,
                                softcap=4.0)  # fmt: skip
    torch.testing.assert_close(loss, expected)


def test_options_are_validated():
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_encouraging_loss(reduction="sum")
    with pytest.raises(TypeError, match="unknown option"):
        causal_lm_encouraging_loss(logend=0.5)
    with pytest.raises(TypeError, match="unknown option.*return_lse"):
        causal_lm_encouraging_loss(return_lse=True)
    with pytest.raises(ValueError, match="softcap must be in"):
        causal_lm_encouraging_loss(softcap=-1.0)
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


# --- apply_encouraging_loss: the fused loss inside the model -----------------------------------

TINY_VOCAB = 97


def tiny_causal_lm(kind: str, seed: int = 0):
    """A 2-layer, hidden-32, vocabulary-97 causal LM without dropout (forwards are repeatable)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=32, vocab_size=TINY_VOCAB, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32)  # fmt: skip
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    raise ValueError(kind)


KINDS = ["gpt2", "llama", "qwen2"]


def lm_batch(batch=3, sequence=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY_VOCAB, (batch, sequence), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return input_ids, labels


def shifted_reference(logits, labels, num_items_in_batch=None, **options):
    """What the patch must equal: the materialised logits through encouraging_loss."""
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    flat_labels = labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return encouraging_loss(flat_logits, flat_labels, **options)
    return encouraging_loss(flat_logits, flat_labels, reduction="sum", **options) / (
        num_items_in_batch
    )


def loss_and_grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


def assert_grads_close(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


TIGHT = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options, num_items_in_batch",
    [({}, None), ({"log_end": 0.5, "label_smoothing": 0.1}, None), ({"log_end": 1.0}, 19),
     ({}, "tensor")],
)  # fmt: skip
def test_patched_loss_and_gradients_equal_the_materialised_loss(kind, options, num_items_in_batch):
    model = tiny_causal_lm(kind).train()
    input_ids, labels = lm_batch()
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(21)
    expected, expected_grads = loss_and_grads(
        model,
        lambda: shifted_reference(model(input_ids=input_ids).logits, labels, num_items_in_batch,
                                  **options),
    )  # fmt: skip
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    patch = apply_encouraging_loss(model, chunk_size=8, **options)  # several chunks
    outputs = []

    def patched_loss():
        outputs.append(model(input_ids=input_ids, labels=labels, **extra))
        return outputs[-1].loss

    loss, grads = loss_and_grads(model, patched_loss)
    assert outputs[0].logits is None and outputs[0].loss.dtype == torch.float32
    assert type(outputs[0]).__name__.startswith("CausalLMOutput")
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert_grads_close(grads, expected_grads, **TIGHT)
    patch.remove()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_items_in_batch", [None, 17])
def test_bonus_scale_zero_patch_is_the_models_own_cross_entropy(kind, num_items_in_batch):
    model = tiny_causal_lm(kind).train()
    input_ids, labels = lm_batch()
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    expected, expected_grads = loss_and_grads(
        model, lambda: model(input_ids=input_ids, labels=labels, **extra).loss
    )
    with encouraging_loss_applied(model, bonus_scale=0.0):
        loss, grads = loss_and_grads(
            model, lambda: model(input_ids=input_ids, labels=labels, **extra).loss
        )
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert_grads_close(grads, expected_grads, **TIGHT)


def test_mixture_of_experts_aux_loss_is_added_as_the_model_adds_it():
    config = transformers.MixtralConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).train()
    input_ids, labels = lm_batch()
    expected, expected_grads = loss_and_grads(
        model, lambda: model(input_ids=input_ids, labels=labels).loss
    )
    with encouraging_loss_applied(model, bonus_scale=0.0):
        outputs = model(input_ids=input_ids, labels=labels)
        assert outputs.aux_loss is not None and outputs.logits is None
        loss, grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert_grads_close(grads, expected_grads, **TIGHT)


def test_gradient_checkpointing():
    model = tiny_causal_lm("qwen2").train()
    input_ids, labels = lm_batch()
    expected, expected_grads = loss_and_grads(
        model, lambda: shifted_reference(model(input_ids=input_ids).logits, labels)
    )
    # transformers 5 renamed it; older releases only have gradient_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    with encouraging_loss_applied(model):
        loss, grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert_grads_close(grads, expected_grads, **TIGHT)


def test_num_items_in_batch_makes_accumulated_gradients_the_large_batchs():
    """Two micro-batches, each divided by the count of both: the gradient of the mean of both."""
    model = tiny_causal_lm("llama").train()
    input_ids, labels = lm_batch(batch=4)
    apply_encouraging_loss(model)
    _, expected = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    count = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 1), slice(1, 4)):  # unequal token counts: a mean per part would differ
        outputs = model(input_ids=input_ids[part], labels=labels[part], num_items_in_batch=count)
        outputs.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert_grads_close(grads, expected, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_without_labels_the_model_is_unchanged(kind):
    model = tiny_causal_lm(kind)
    input_ids, labels = lm_batch()
    model.eval()
    with torch.no_grad():
        expected_eval = model(input_ids=input_ids, labels=labels)
        expected_generated = model.generate(input_ids[:1, :4], max_new_tokens=5, do_sample=False,
                                            pad_token_id=0)  # fmt: skip
        model.train()
        expected_train = model(input_ids=input_ids).logits
    apply_encouraging_loss(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, expected_train)
        model.eval()
        # Evaluation with labels: the model's own logits and cross-entropy (fuse_in_eval=False).
        evaluated = model(input_ids=input_ids, labels=labels)
        assert torch.equal(evaluated.logits, expected_eval.logits)
        assert torch.equal(evaluated.loss, expected_eval.loss)
        generated = model.generate(input_ids[:1, :4], max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)  # fmt: skip
    assert torch.equal(generated, expected_generated)


def test_fuse_in_eval_tuple_outputs_positional_and_shift_labels():
    model = tiny_causal_lm("llama")
    input_ids, labels = lm_batch()
    model.eval()
    with torch.no_grad():
        expected = shifted_reference(model(input_ids=input_ids).logits, labels)
    apply_encouraging_loss(model, fuse_in_eval=True)
    with torch.no_grad():
        outputs = model(input_ids=input_ids, labels=labels)
        assert outputs.logits is None
        torch.testing.assert_close(outputs.loss, expected, **TIGHT)
        as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], expected, **TIGHT)
        # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache,
        # inputs_embeds, labels, ...): labels passed by position.
        positional = model(input_ids, None, None, None, None, labels)
        torch.testing.assert_close(positional.loss, expected, **TIGHT)
        # Pre-shifted labels (transformers' shift_labels=) are used as they are.
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        garbage = torch.zeros_like(labels)  # ignored when shift_labels is given
        pre_shifted = model(input_ids=input_ids, labels=garbage, shift_labels=shift)
        torch.testing.assert_close(pre_shifted.loss, expected, **TIGHT)


def test_output_projection_with_bias_class_weight_and_autocast():
    model = tiny_causal_lm("llama").train()
    torch.manual_seed(3)
    model.lm_head = torch.nn.Linear(32, TINY_VOCAB, bias=True)
    input_ids, labels = lm_batch()
    class_weight = torch.rand(TINY_VOCAB) + 0.5
    expected, expected_grads = loss_and_grads(
        model,
        lambda: shifted_reference(model(input_ids=input_ids).logits, labels, 23,
                                  weight=class_weight),
    )  # fmt: skip
    with encouraging_loss_applied(model, class_weight=class_weight):
        loss, grads = loss_and_grads(
            model, lambda: model(input_ids=input_ids, labels=labels, num_items_in_batch=23).loss
        )
        assert grads["lm_head.bias"].abs().sum() > 0
        torch.testing.assert_close(loss, expected, **TIGHT)
        assert_grads_close(grads, expected_grads, **TIGHT)
        # Under autocast the projection runs in bfloat16, as the model's lm_head would.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model(input_ids=input_ids, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        materialised = shifted_reference(model(input_ids=input_ids).logits.float(), labels,
                                         weight=class_weight)  # fmt: skip
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.detach(), materialised, rtol=2e-2, atol=2e-2)


def test_remove_and_context_manager_restore_the_model():
    model = tiny_causal_lm("gpt2").train()
    input_ids, labels = lm_batch()
    expected = model(input_ids=input_ids, labels=labels)
    patch = apply_encouraging_loss(model)
    assert "forward" in vars(model) and model(input_ids=input_ids, labels=labels).logits is None
    remove_encouraging_loss(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    restored = model(input_ids=input_ids, labels=labels)
    assert torch.equal(restored.logits, expected.logits)
    assert torch.equal(restored.loss, expected.loss)
    with pytest.raises(ValueError, match="no encouraging loss applied"):
        patch.remove()
    with pytest.raises(RuntimeError, match="boom"), encouraging_loss_applied(model):
        assert model(input_ids=input_ids, labels=labels).logits is None
        raise RuntimeError("boom")
    assert "forward" not in vars(model)
    assert torch.equal(model(input_ids=input_ids, labels=labels).loss, expected.loss)
    # Applying again after the removal works.
    with encouraging_loss_applied(model):
        assert model(input_ids=input_ids, labels=labels).logits is None


def test_schedule_steps_the_bonus_in():
    model = tiny_causal_lm("qwen2").train()
    input_ids, labels = lm_batch()
    with torch.no_grad():
        cross_entropy = model(input_ids=input_ids, labels=labels).loss
        logits = model(input_ids=input_ids).logits
    delayed = BonusSchedule(final=1.0, start=0.5)
    with encouraging_loss_applied(model, bonus_scale=delayed) as patch, torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss,
                                   cross_entropy, **TIGHT)  # fmt: skip
        patch.step(0.6)
        assert patch.options.bonus_scale == 1.0
        torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss,
                                   shifted_reference(logits, labels), **TIGHT)  # fmt: skip


def tiny_gemma2(softcap=0.3):
    """A tiny Gemma 2, whose forward softcaps its logits after the projection (at ``softcap``,
    small so that the cap bends these logits)."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
        final_logit_softcapping=softcap,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config)


def tiny_cohere():
    """A tiny Cohere model, whose forward scales its logits after the projection."""
    torch.manual_seed(0)
    config = transformers.CohereConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        logit_scale=0.5,
    )  # fmt: skip
    return transformers.CohereForCausalLM(config)


class HeadlessLlama(transformers.LlamaForCausalLM):
    def get_output_embeddings(self):
        return None


def test_bad_inputs_get_clear_errors():
    model = tiny_causal_lm("llama")
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        apply_encouraging_loss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model must be a causal LM"):
        apply_encouraging_loss(model.model)  # the decoder without its head
    headless = HeadlessLlama(model.config)
    with pytest.raises(ValueError, match=r"get_output_embeddings\(\) is None"):
        apply_encouraging_loss(headless)
    with pytest.raises(ValueError, match="reduction"):
        apply_encouraging_loss(model, reduction="sum")
    with pytest.raises(TypeError, match="unknown loss option.*logend"):
        apply_encouraging_loss(model, logend=0.5)
    with pytest.raises(ValueError, match="log_end"):
        apply_encouraging_loss(model, log_end=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        apply_encouraging_loss(model, label_smoothing=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        apply_encouraging_loss(model, chunk_size=0)
    with pytest.raises(ValueError, match="class_weight"):
        apply_encouraging_loss(model, class_weight=torch.ones(5))
    with pytest.raises(TypeError, match="fuse_in_eval"):
        apply_encouraging_loss(model, fuse_in_eval="yes")
    assert "forward" not in vars(model)  # failed applications leave the model alone
    apply_encouraging_loss(model)
    with pytest.raises(ValueError, match="already"):
        apply_encouraging_loss(model, log_end=0.5)
    input_ids, labels = lm_batch()
    model.train()
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(input_ids=input_ids, labels=labels, num_items_in_batch=2.5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, labels=labels, logits_to_keep=1)
    assert "forward" not in vars(model.lm_head)  # the projection is restored after an error
    remove_encouraging_loss(model)
    with pytest.raises(ValueError, match="no encouraging loss"):
        remove_encouraging_loss(tiny_causal_lm("gpt2"))
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, TINY_VOCAB))
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        apply_encouraging_loss(model)


def test_remove_under_a_later_forward_wrapper_passes_through():
    """accelerate wraps model.forward for mixed precision: removal keeps its wrapper."""
    model = tiny_causal_lm("llama").train()
    input_ids, labels = lm_batch()
    expected = model(input_ids=input_ids, labels=labels)
    apply_encouraging_loss(model)
    patched_forward = model.forward
    model.forward = lambda *args, **kwargs: patched_forward(*args, **kwargs)  # a later wrapper
    assert model(input_ids=input_ids, labels=labels).logits is None
    remove_encouraging_loss(model)
    restored = model(input_ids=input_ids, labels=labels)
    assert torch.equal(restored.logits, expected.logits)
    assert torch.equal(restored.loss, expected.loss)
    with encouraging_loss_applied(model):  # applied again, over both
        assert model(input_ids=input_ids, labels=labels).logits is None
    assert torch.equal(model(input_ids=input_ids, labels=labels).loss, expected.loss)


@pytest.mark.parametrize("options", [{}, {"log_end": 0.5, "softcap": 0.3}])
def test_a_softcapping_model_trains_on_its_capped_logits(options):
    """Gemma 2: the fused loss applies the config's cap, the model's own tanh passes through."""
    model = tiny_gemma2().train()
    input_ids, labels = lm_batch()
    capped = model(input_ids=input_ids).logits
    assert 0.2 < capped.abs().max() < 0.3  # the cap bends these logits: tanh(z / c), z / c > 0.8
    reference_options = {k: v for k, v in options.items() if k != "softcap"}
    expected, expected_grads = loss_and_grads(
        model, lambda: shifted_reference(model(input_ids=input_ids).logits, labels,
                                         **reference_options)
    )  # fmt: skip
    with encouraging_loss_applied(model, chunk_size=8, **options) as patch:
        assert patch.options.softcap == 0.3
        loss, grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(loss, expected, **TIGHT)
    assert_grads_close(grads, expected_grads, **TIGHT)
    own, own_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    with encouraging_loss_applied(model, bonus_scale=0.0):
        loss, grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(loss, own, **TIGHT)
    assert_grads_close(grads, own_grads, **TIGHT)


def test_a_softcap_other_than_the_models_is_refused():
    model = tiny_gemma2()
    with pytest.raises(ValueError, match="softcap: the model caps its logits at 0.3"):
        apply_encouraging_loss(model, softcap=30.0)
    assert "forward" not in vars(model)


def test_a_model_that_transforms_its_logits_otherwise_is_refused():
    model = tiny_cohere().train()
    input_ids, labels = lm_batch()
    apply_encouraging_loss(model)
    with pytest.raises(RuntimeError, match="applies .* to its logits"):
        model(input_ids=input_ids, labels=labels)
    assert "forward" not in vars(model.lm_head)
    assert model(input_ids=input_ids).logits.shape == (3, 10, TINY_VOCAB)
    remove_encouraging_loss(model)
    gemma = tiny_gemma2().train()
    original = type(gemma).forward

    def forward_without_its_cap(self, *args, **kwargs):
        self.config.final_logit_softcapping = None  # the forward skips the cap its config had
        try:
            return original(self, *args, **kwargs)
        finally:
            self.config.final_logit_softcapping = 0.3

    gemma.forward = forward_without_its_cap.__get__(gemma)
    apply_encouraging_loss(gemma)
    with pytest.raises(RuntimeError, match="did not apply that cap"):
        gemma(input_ids=input_ids, labels=labels)


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start, the first three tokens unlabelled."""

    def __init__(self, size=16, sequence=10, seed=2):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, TINY_VOCAB, (size, 1), generator=generator)
        self.tokens = (starts + torch.arange(sequence)) % TINY_VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        labels = self.tokens[index].clone()
        labels[:3] = -100
        return {"input_ids": self.tokens[index], "labels": labels}


@pytest.mark.parametrize("kind, bf16", [("gpt2", False), ("llama", True)])
def test_patched_model_trains_in_the_trainer_without_logits(kind, bf16, tmp_path):
    model = tiny_causal_lm(kind)
    patch = apply_encouraging_loss(model, log_end=0.75)
    head_outputs, forward_kwargs = [], []
    model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: head_outputs.append(type(output).__name__)
    )
    model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_kwargs.append(sorted(kwargs)), with_kwargs=True
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, bf16=bf16,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingTokens())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # Every training forward ran the fused loss (the projection produced no logits) and got the
    # Trainer's count of the accumulated batch's labels.
    assert len(head_outputs) == 6 and set(head_outputs) == {"_SkippedLogits"}
    assert all("labels" in kw and "num_items_in_batch" in kw for kw in forward_kwargs)
    # Evaluation runs the model's own forward: its logits and cross-entropy.
    metrics = trainer.evaluate(CountingTokens(size=4))
    assert head_outputs[6:] == ["Tensor"] and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    # With bf16, accelerate has wrapped model.forward (autocast) over the patch: removal
    # still gives the model its logits and own loss back.
    patch.remove()
    model.train()
    input_ids = CountingTokens().tokens[:2]
    assert model(input_ids=input_ids, labels=input_ids).logits.shape == (2, 10, TINY_VOCAB)
