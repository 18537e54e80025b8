"""The complete fine-tuning script of docs/integrations.md runs as written.

This machine has no network, so the two downloads (tokenizer and model) are replaced by a
word-level tokenizer built in memory and a randomly initialised 2-layer Llama, and the
training arguments are shrunk to four CPU steps; every other line of the script runs verbatim.
A changed script fails here until the replacements below are updated with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
HEADING = "### Large vocabularies: the fused loss inside the model (`apply_encouraging_loss`)"

# Each downloading (or GPU-sized) line of the script and what stands in for it here.
REPLACEMENTS = {
    "tokenizer = transformers.AutoTokenizer.from_pretrained(name)": "tokenizer = local_tokenizer()",
    "model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)"
    "  # torch_dtype= < 4.56": "model = local_model(len(tokenizer))",
    '    output_dir="out",': "    output_dir=str(out), use_cpu=True, max_steps=4, logging_steps=1,",
    "    per_device_train_batch_size=8,": "    per_device_train_batch_size=2,",
    "    gradient_accumulation_steps=4,   # exact: the loss is divided by the accumulated token "
    "count": "    gradient_accumulation_steps=2,",
    'trainer.save_model("out/final")      # the weights are unchanged by the patch: save as usual':
    'trainer.save_model(str(out / "final"))',
}


def finetuning_script() -> str:
    """The first python block after the heading that trains with the patch."""
    text = DOC.read_text(encoding="utf-8")
    assert HEADING in text, "docs/integrations.md lost the fine-tuning section"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING) :], re.S)
    assert block is not None
    return block.group(1)


def local_tokenizer():
    """A word-level tokenizer of the script's texts, with a pad token (no download)."""
    words = "the encouraging loss keeps rewarding confident predictions . ..."
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words.split())}}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )


def local_model(vocab_size: int):
    """A randomly initialised 2-layer Llama in bfloat16, as the script loads its model."""
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def test_the_finetuning_script_runs_as_written(tmp_path):
    script = finetuning_script()
    for line, replacement in REPLACEMENTS.items():
        assert line in script, f"the script no longer has the line {line!r}: update REPLACEMENTS"
        script = script.replace(line, replacement)
    assert "from_pretrained" not in script
    namespace = {"local_tokenizer": local_tokenizer, "local_model": local_model, "out": tmp_path}
    exec(compile(script, str(DOC), "exec"), namespace)  # noqa: S102 - the documented script
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.state.global_step == 4
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # logged, finite
    assert namespace["patch"].options.bonus_scale == 1.0  # the callback stepped the schedule in
    batch = namespace["collator"]([namespace["train_dataset"][0]])
    restored = model.train()(**{k: v.to(model.device) for k, v in batch.items()})
    assert restored.logits is not None  # patch.remove(): the model's own forward and loss again
    assert (tmp_path / "final" / "config.json").is_file()
