"""Machine translation: label-smoothed CE vs label-smoothed EL on Multi30k German→English.

Reads top-down: presets → data (raw Multi30k, a joint BPE vocabulary learned with
``tokenizers`` on the training pairs and saved with the run) → model (a Transformer
encoder-decoder from torch building blocks, shared embeddings) → train (teacher forcing,
padding ignored through ``ignore_index``; the lab's optimiser, schedule, seeding, RNG and
atomic-checkpoint helpers) → diagnostics (token accuracy, CE-part perplexity, token margins and
energies, greedy and beam-search BLEU with ``sacrebleu``) → report.

The paper's recipe is label smoothing 0.1 combined with EL (``log_end=0.5``): the loss names
``ls-ce:0.1`` and ``ls-el:0.1,log_end=0.5``. EL changes the loss scale, so losses are never
compared across losses: the reported perplexity is ``exp`` of the plain (unsmoothed) CE of the
same logits, computed separately.

Large target vocabularies train through the core's fused linear + EL path
(:func:`encouraging_loss.linear_encouraging_loss`: decoder states, output weight and targets in,
the loss out, no ``(tokens, vocabulary)`` logits tensor); see ``--fused-linear``.

Needs ``tokenizers`` and ``sacrebleu``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from encouraging_loss import EncouragingLoss, linear_encouraging_loss

from .. import data as lab_data
from .. import diagnostics, report
from ..losses import LossSpec, build_bonus_schedule, build_criterion, parse_loss_list
from ..trainer import (
    TrainConfig,
    TrainResult,
    all_reduce_sum,
    atomic_torch_save,
    finish_distributed,
    init_distributed,
    learning_rate,
    make_optimizer,
    rank,
    resolve_device,
    rng_state,
    set_rng_state,
    set_seed,
    world_size,
)

TASK = "translation"
DATASET = "multi30k"
SOURCE_LANG, TARGET_LANG = "de", "en"
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
DEFAULT_LOSSES = "ls-ce:0.1,ls-el:0.1,log_end=0.5"
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
PAD, UNK, BOS, EOS = range(4)
IGNORE_INDEX = -100
TABLE_METRICS = (
    ("bleu", "BLEU (beam)", True),
    ("bleu_greedy", "BLEU (greedy)", True),
    ("token_accuracy", "token acc", True),
    ("ppl", "CE ppl", False),
    ("margin_mean", "token margin", True),
    ("energy_mean", "token energy −lse", False),
    ("grad_share_well_classified_last", "grad share p_y>0.5", True),
)
FUSED_LINEAR_MODES = ("auto", "on", "off")
# ``--fused-linear auto`` switches the fused path on from this target vocabulary size: below it
# a batch's (tokens x vocabulary) logits are small next to the Transformer's own activations.
FUSED_LINEAR_MIN_VOCAB = 8192
# Loss families the fused path computes: EL, and CE as EL with bonus scale 0.
FUSED_LINEAR_FAMILIES = ("ce", "ls-ce", "el", "ls-el")
# Logits per row chunk when the fused path's training statistics are computed (16 MiB float32).
STATISTICS_CHUNK_LOGITS = 1 << 22


# --- presets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationRecipe:
    """How one preset trains.

    Attributes:
        max_train: training pairs used (a fixed random subset, seed 0); ``None`` = all 29,000.
        max_test: test pairs decoded and scored (a fixed subset); ``None`` = all 1,000.
        max_val: validation pairs scored each epoch for model selection; ``None`` = all 1,014.
        vocab_size: joint BPE vocabulary size (specials included).
        d_model: Transformer width.
        heads: attention heads.
        encoder_layers: encoder depth.
        decoder_layers: decoder depth.
        feedforward: feed-forward width.
        dropout: dropout everywhere.
        share_embeddings: one embedding matrix for source, target and output projection.
        max_tokens: sentences are cut to this many BPE tokens (specials included).
        beam: beam size of the reported BLEU.
        length_penalty: GNMT length-penalty exponent ``alpha`` (``((5 + len) / 6) ** alpha``).
        seeds: default number of seeds.
        train: optimiser and schedule (seed filled in per run).
        threads: torch CPU threads (``None`` = torch's default).
    """

    max_train: int | None
    max_test: int | None
    max_val: int | None
    vocab_size: int
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    feedforward: int
    dropout: float
    train: TrainConfig
    share_embeddings: bool = True
    max_tokens: int = 64
    beam: int = 5
    length_penalty: float = 0.6
    seeds: int = 1
    threads: int | None = 1


PRESETS: dict[str, TranslationRecipe] = {
    # ≤ 6 minutes on 2 CPU cores for the default 2 losses × 1 seed. A tiny model on a subset:
    # BLEU is far below the paper's (that needs the full preset); the pipeline is what it shows.
    "quick": TranslationRecipe(
        max_train=4000,
        max_test=300,
        max_val=200,
        vocab_size=2000,
        d_model=128,
        heads=4,
        encoder_layers=2,
        decoder_layers=2,
        feedforward=256,
        dropout=0.1,
        seeds=1,
        train=TrainConfig(
            epochs=3,
            batch_size=64,
            optimizer="adamw",
            lr=2e-3,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_epochs=0.5,
            clip_grad_norm=1.0,
            eval_batch_size=128,
        ),
    ),
    # GPU recipe: all 29,000 pairs, a 512-wide 3+3-layer Transformer, 3 seeds.
    "full": TranslationRecipe(
        max_train=None,
        max_test=None,
        max_val=None,
        vocab_size=10000,
        d_model=512,
        heads=8,
        encoder_layers=3,
        decoder_layers=3,
        feedforward=2048,
        dropout=0.2,
        seeds=3,
        threads=None,
        max_tokens=100,
        train=TrainConfig(
            epochs=40,
            batch_size=128,
            optimizer="adamw",
            lr=5e-4,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_epochs=2.0,
            clip_grad_norm=1.0,
            device="auto",
            eval_batch_size=128,
        ),
    ),
}


@dataclass
class TranslationOptions:
    """Everything one ``run translation`` invocation needs; ``None`` fields use the preset's."""

    losses: str = DEFAULT_LOSSES
    seeds: int | None = None
    preset: str = "quick"
    data_root: str | None = None
    out: str | None = None
    resume: bool = False
    lr: float | None = None
    clip_grad_norm: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    train_size: int | None = None
    test_size: int | None = None
    val_size: int | None = None
    device: str | None = None
    amp: bool = True
    threads: int | None = None
    progress: bool = True
    stop_after_epochs: int | None = None
    fused_linear: str = "auto"  # one of FUSED_LINEAR_MODES; see use_fused_linear


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this task's options to the ``run`` parser."""
    group = parser.add_argument_group("translation task")
    group.add_argument(
        "--fused-linear",
        choices=FUSED_LINEAR_MODES,
        help="train CE/EL losses through the core's fused linear + EL (decoder states and the "
        "output weight in, no tokens x vocabulary logits for the loss): auto = on from a target "
        f"vocabulary of {FUSED_LINEAR_MIN_VOCAB} tokens, for the CE/EL losses only. "
        "Default: auto",
    )


def options_from_args(args: argparse.Namespace) -> TranslationOptions:
    """Build :class:`TranslationOptions` from the ``run`` sub-command's parsed arguments.

    Args:
        args: parsed arguments of ``encouraging-loss run translation``.

    Returns:
        The options.

    Raises:
        ValueError: for a dataset or model this task does not have.
    """
    if args.dataset not in (None, DATASET):
        raise ValueError(f"dataset: translation runs on {DATASET!r}, got {args.dataset!r}")
    if args.model not in (None, "transformer"):
        raise ValueError(f"model: translation has 'transformer' only, got {args.model!r}")
    return TranslationOptions(
        losses=args.losses or DEFAULT_LOSSES,
        seeds=args.seeds,
        preset=args.preset,
        data_root=args.data_root,
        out=args.out,
        resume=args.resume,
        lr=args.lr,
        clip_grad_norm=args.clip_grad_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        train_size=args.train_size,
        test_size=args.test_size,
        device=args.device,
        amp=args.amp,
        threads=args.threads,
        progress=args.progress,
        stop_after_epochs=args.stop_after_epochs,
        fused_linear=getattr(args, "fused_linear", None) or "auto",
    )


def use_fused_linear(mode: str, spec: LossSpec, vocab_size: int) -> bool:
    """Whether a loss trains through the fused linear + EL path.

    Args:
        mode: ``"on"``, ``"off"`` or ``"auto"`` (on when ``vocab_size`` is at least
            :data:`FUSED_LINEAR_MIN_VOCAB` and the loss is CE or EL).
        spec: the parsed loss.
        vocab_size: the target vocabulary size.

    Returns:
        ``True`` for the fused path, ``False`` for materialised logits.

    Raises:
        ValueError: naming ``fused-linear`` for an unknown mode, or for ``"on"`` with a loss the
            fused path does not compute (anything but CE and EL).
    """
    if mode not in FUSED_LINEAR_MODES:
        raise ValueError(
            f"fused-linear: must be one of {', '.join(FUSED_LINEAR_MODES)}, got {mode!r}"
        )
    fusable = spec.family in FUSED_LINEAR_FAMILIES
    if mode == "on" and not fusable:
        raise ValueError(
            f"fused-linear: 'on' computes CE and EL losses only "
            f"({', '.join(FUSED_LINEAR_FAMILIES)}), not {spec.name!r}; use auto or off"
        )
    if mode == "auto":
        return fusable and vocab_size >= FUSED_LINEAR_MIN_VOCAB
    return mode == "on"


def resolve_recipe(options: TranslationOptions) -> TranslationRecipe:
    """Pick the preset's recipe and apply command-line overrides.

    Args:
        options: parsed options.

    Returns:
        The recipe.

    Raises:
        ValueError: naming the first bad option.
    """
    if options.preset not in PRESETS:
        raise ValueError(
            f"preset: translation has presets {', '.join(PRESETS)}, got {options.preset!r}"
        )
    if options.seeds is not None and options.seeds < 1:
        raise ValueError(f"seeds: must be at least 1, got {options.seeds}")
    for name, value in (
        ("train-size", options.train_size),
        ("test-size", options.test_size),
        ("val_size", options.val_size),
    ):
        if value is not None and value < 10:
            raise ValueError(f"{name}: must be at least 10 sentence pairs, got {value}")
    if options.threads is not None and options.threads < 0:
        raise ValueError(f"threads: must be >= 0 (0 = torch default), got {options.threads}")
    recipe = PRESETS[options.preset]
    overrides = {
        key: value
        for key, value in (
            ("lr", options.lr),
            ("clip_grad_norm", options.clip_grad_norm),
            ("epochs", options.epochs),
            ("batch_size", options.batch_size),
            ("optimizer", options.optimizer),
            ("schedule", options.schedule),
            ("weight_decay", options.weight_decay),
            ("device", options.device),
        )
        if value is not None
    }
    train_config = replace(recipe.train, **overrides, amp=recipe.train.amp and options.amp)
    train_config.validate()
    return replace(
        recipe,
        seeds=options.seeds or recipe.seeds,
        max_train=options.train_size if options.train_size is not None else recipe.max_train,
        max_test=options.test_size if options.test_size is not None else recipe.max_test,
        max_val=options.val_size if options.val_size is not None else recipe.max_val,
        train=train_config,
        threads=recipe.threads if options.threads is None else (options.threads or None),
    )


def describe_presets() -> str:
    """One line per preset (for ``--help``)."""
    lines = []
    for name, r in PRESETS.items():
        t = r.train
        lines.append(
            f"translation {name}/{DATASET}: transformer d{r.d_model} {r.encoder_layers}+"
            f"{r.decoder_layers} layers, BPE {r.vocab_size}, train {r.max_train or 'all'} pairs, "
            f"{r.seeds} seed(s), {t.epochs} epochs, batch {t.batch_size}, {t.optimizer} lr {t.lr:g}"
        )
    return "\n".join(lines)


# --- data --------------------------------------------------------------------------------


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise RuntimeError(
            f"the translation task needs {module}: pip install {module} "
            "(or the project's [lab] extra)"
        ) from error


def load_multi30k(data_root: str | None = None) -> tuple[dict[str, tuple[list, list]], Path]:
    """Read the raw, line-aligned Multi30k de/en files.

    Args:
        data_root: data root holding ``multi30k/`` (``None`` = the lab's default root).

    Returns:
        ``({"train"|"val"|"test": (german, english)}, folder)``; sentences are stripped lines.

    Raises:
        lab_data.DatasetNotFoundError: if a file is missing.
        ValueError: if a split's two files have different line counts.
    """
    files = tuple(
        f"{stem}.{lang}.gz" for stem in SPLIT_FILES.values() for lang in (SOURCE_LANG, TARGET_LANG)
    )
    folder = lab_data.find_data_folder(DATASET, files, data_root)
    splits = {}
    for split, stem in SPLIT_FILES.items():
        sides = []
        for lang in (SOURCE_LANG, TARGET_LANG):
            with gzip.open(folder / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as handle:
                sides.append([line.strip() for line in handle.read().splitlines()])
        if len(sides[0]) != len(sides[1]):
            raise ValueError(
                f"data_root: {folder}/{stem} has {len(sides[0])} German and {len(sides[1])} "
                "English lines"
            )
        splits[split] = (sides[0], sides[1])
    return splits, folder


def subset(pairs: tuple[list, list], limit: int | None, seed: int) -> tuple[list, list]:
    """A fixed random subset of sentence pairs in original order (``None`` = all).

    Args:
        pairs: ``(sources, targets)``.
        limit: pairs kept.
        seed: seed of the choice.

    Returns:
        ``(sources, targets)``.
    """
    if limit is None or limit >= len(pairs[0]):
        return pairs
    keep = torch.randperm(len(pairs[0]), generator=torch.Generator().manual_seed(seed))[:limit]
    keep = sorted(keep.tolist())
    return [pairs[0][i] for i in keep], [pairs[1][i] for i in keep]


def train_tokenizer(sentences: list[str], vocab_size: int, path: Path):
    """Learn a joint BPE vocabulary on training sentences and save it as ``tokenizer.json``.

    Metaspace pre-tokenisation and decoding make decoding the exact inverse on whitespace, so
    hypotheses are detokenised by ``decode`` alone and scored against the raw references.

    Args:
        sentences: training sentences of both languages.
        vocab_size: target vocabulary size (specials included).
        path: where the tokenizer is saved (atomically).

    Returns:
        The ``tokenizers.Tokenizer``.

    Raises:
        ValueError: if ``vocab_size`` is too small.
    """
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size: must exceed {len(SPECIALS)}, got {vocab_size}")
    _require("tokenizers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2, show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer)
    report.atomic_write_text(path, tokenizer.to_str())
    return tokenizer


def load_tokenizer(path: Path):
    """Load a ``tokenizer.json`` saved by :func:`train_tokenizer`."""
    _require("tokenizers")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@dataclass
class Encoded:
    """One split as padded id tensors.

    Attributes:
        src: ``(N, Ls)`` source ids ending in ``</s>``, padded with ``<pad>``.
        tgt: ``(N, Lt)`` target ids ``<s> ... </s>``, padded.
        src_len: ``(N,)`` source lengths.
        tgt_len: ``(N,)`` target lengths.
        references: the raw target sentences (for BLEU).
        sources: the raw source sentences.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    src_len: torch.Tensor
    tgt_len: torch.Tensor
    references: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.src_len)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and target ids of ``index``, trimmed to the batch's longest sentence."""
        ls, lt = int(self.src_len[index].max()), int(self.tgt_len[index].max())
        return self.src[index, :ls], self.tgt[index, :lt]


def encode_pairs(tokenizer, pairs: tuple[list, list], max_tokens: int) -> Encoded:
    """Tokenise sentence pairs into padded tensors (cut to ``max_tokens`` ids).

    Args:
        tokenizer: the run's tokenizer.
        pairs: ``(sources, targets)``.
        max_tokens: longest kept sequence, specials included.

    Returns:
        The :class:`Encoded` split.
    """
    sources, targets = pairs
    src_ids = [e.ids[: max_tokens - 1] + [EOS] for e in tokenizer.encode_batch(sources)]
    tgt_ids = [[BOS] + e.ids[: max_tokens - 2] + [EOS] for e in tokenizer.encode_batch(targets)]

    def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(r) for r in rows])
        out = torch.full((len(rows), int(lengths.max())), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out, lengths

    src, src_len = pad(src_ids)
    tgt, tgt_len = pad(tgt_ids)
    return Encoded(src, tgt, src_len, tgt_len, list(targets), list(sources))


# --- model -------------------------------------------------------------------------------


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The Transformer's fixed sinusoidal position encodings ``(length, width)``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class Seq2SeqTransformer(nn.Module):
    """Pre-norm Transformer encoder-decoder from ``nn.TransformerEncoder/DecoderLayer``.

    Args:
        vocab_size: joint vocabulary size.
        d_model: width.
        heads: attention heads.
        encoder_layers: encoder depth.
        decoder_layers: decoder depth.
        feedforward: feed-forward width.
        dropout: dropout.
        share_embeddings: tie source, target and output embeddings (needs a joint vocabulary).
        max_positions: longest sequence the position table covers.

    Raises:
        ValueError: for non-positive sizes or ``d_model`` not divisible by ``heads``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        feedforward: int = 256,
        dropout: float = 0.1,
        share_embeddings: bool = True,
        max_positions: int = 256,
    ):
        super().__init__()
        for arg, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("heads", heads),
            ("encoder_layers", encoder_layers),
            ("decoder_layers", decoder_layers),
            ("feedforward", feedforward),
        ):
            if value < 1:
                raise ValueError(f"{arg}: must be positive, got {value}")
        if d_model % heads or d_model % 2:
            raise ValueError(f"d_model: {d_model} must be even and divisible by heads={heads}")
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.target_embed = (
            self.embed if share_embeddings else nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        )
        self.register_buffer(
            "positions", sinusoidal_positions(max_positions, d_model), persistent=False
        )
        self.dropout = nn.Dropout(dropout)
        layer = dict(
            d_model=d_model,
            nhead=heads,
            dim_feedforward=feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer),
            encoder_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(d_model)
        )
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        for embedding in {
            id(self.embed): self.embed,
            id(self.target_embed): self.target_embed,
        }.values():
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            with torch.no_grad():
                embedding.weight[PAD].zero_()
        if share_embeddings:
            self.output.weight = self.embed.weight

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        x = embedding(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]]
        return self.dropout(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``(B, Ls, d)`` and the source padding mask ``(B, Ls)``."""
        mask = src == PAD
        return self.encoder(self._embed(self.embed, src), src_key_padding_mask=mask), mask

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder states ``(B, Lt, d)`` for the target prefix ``tgt_in`` (causal)."""
        length = tgt_in.shape[1]
        causal = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=tgt_in.device), diagonal=1
        )
        return self.decoder(
            self._embed(self.target_embed, tgt_in),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == PAD,
            memory_key_padding_mask=src_mask,
        )

    def decode_step(
        self,
        token: torch.Tensor,
        position: int,
        memory: torch.Tensor,
        src_mask: torch.Tensor,
        cache: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One incremental decoder step (inference, eval mode): the state of the newest token.

        Equal to ``decode(prefix)[:, -1]`` (causal attention makes earlier positions
        independent of later ones) at one position's cost instead of the whole prefix: each
        layer caches its normalised inputs, which are the keys and values of its
        self-attention.

        Args:
            token: ``(B,)`` ids at ``position``.
            position: 0-based position of ``token`` (``<s>`` is 0).
            memory: ``(B, Ls, d)`` encoder states.
            src_mask: ``(B, Ls)`` source padding mask.
            cache: what the previous step returned (``None`` at position 0); reorder its rows
                with the beams.

        Returns:
            ``(state (B, d), cache)``.
        """
        x = self.target_embed(token)[:, None] * math.sqrt(self.d_model)
        x = self.dropout(x + self.positions[position])
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            h = layer.norm1(x)
            past = h if cache is None else torch.cat([cache[i], h], dim=1)
            new_cache.append(past)
            x = x + layer.dropout1(layer.self_attn(h, past, past, need_weights=False)[0])
            attended = layer.multihead_attn(
                layer.norm2(x), memory, memory, key_padding_mask=src_mask, need_weights=False
            )[0]
            x = x + layer.dropout2(attended)
            h = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x)))))
            x = x + layer.dropout3(h)
        return self.decoder.norm(x)[:, 0], new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states (the materialised path).

        Training with the fused linear + EL path skips this: it takes the decoder states
        (``forward(..., return_states=True)``) and passes them with ``self.output.weight`` and
        ``self.output.bias`` to :func:`encouraging_loss.linear_encouraging_loss`, which never
        forms the ``(tokens, vocab)`` logits (see :func:`teacher_forced_loss`).
        """
        return self.output(hidden)

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, return_states: bool = False
    ) -> torch.Tensor:
        """Teacher-forced logits ``(B, Lt, vocab)``, or decoder states ``(B, Lt, d)``.

        Args:
            src: ``(B, Ls)`` source ids.
            tgt_in: ``(B, Lt)`` target prefix ids (``<s>`` first).
            return_states: return the decoder states instead of the logits (for the fused
                linear + loss path; going through ``forward`` keeps a DDP wrapper in the loop).
        """
        memory, src_mask = self.encode(src)
        states = self.decode(tgt_in, memory, src_mask)
        return states if return_states else self.logits(states)


# --- decoding ----------------------------------------------------------------------------


def _max_length(src: torch.Tensor, model: Seq2SeqTransformer) -> int:
    longest = int((src != PAD).sum(1).max())
    return min(int(1.5 * longest) + 10, model.positions.shape[0] - 1)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor) -> list[list[int]]:
    """Greedy decoding of a batch of sources.

    Args:
        model: the trained model (call ``eval()`` first).
        src: ``(B, Ls)`` source ids.

    Returns:
        One id list per sentence, without ``<s>``/``</s>``.
    """
    memory, src_mask = model.encode(src)
    ys = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    cache = None
    for position in range(_max_length(src, model)):
        state, cache = model.decode_step(ys[:, -1], position, memory, src_mask, cache)
        logits = model.logits(state)
        logits[:, [PAD, BOS]] = float("-inf")
        step = logits.argmax(-1).masked_fill(done, PAD)
        ys = torch.cat([ys, step[:, None]], dim=1)
        done |= step == EOS
        if bool(done.all()):
            break
    return [_strip(row) for row in ys[:, 1:].tolist()]


def _strip(ids: list[int]) -> list[int]:
    out = []
    for token in ids:
        if token in (EOS, PAD):
            break
        out.append(token)
    return out


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer, src: torch.Tensor, beam: int = 5, alpha: float = 0.6
) -> list[list[int]]:
    """Beam search with a GNMT length penalty, batched over sentences and beams.

    A hypothesis ends when it emits ``</s>`` among the top ``beam`` candidates; its score is
    the summed log-probability divided by :func:`length_penalty`. A sentence stops once it has
    ``beam`` finished hypotheses (or at the length limit, where live beams are finished as is).

    Args:
        model: the trained model (call ``eval()`` first).
        src: ``(B, Ls)`` source ids.
        beam: beam size.
        alpha: length-penalty exponent (0 = no penalty).

    Returns:
        The best hypothesis per sentence, without ``<s>``/``</s>``.

    Raises:
        ValueError: if ``beam < 1`` or ``alpha < 0``.
    """
    if beam < 1:
        raise ValueError(f"beam: must be at least 1, got {beam}")
    if alpha < 0:
        raise ValueError(f"alpha: must be non-negative, got {alpha}")
    batch, device = len(src), src.device
    memory, src_mask = model.encode(src)
    memory = memory.repeat_interleave(beam, dim=0)
    src_mask = src_mask.repeat_interleave(beam, dim=0)
    ys = torch.full((batch * beam, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool)
    max_length = _max_length(src, model)
    cache = None
    for position in range(max_length):
        state, cache = model.decode_step(ys[:, -1], position, memory, src_mask, cache)
        logp = model.logits(state).float().log_softmax(-1)
        logp[:, [PAD, BOS]] = float("-inf")
        vocab = logp.shape[1]
        candidates = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        origin, token = top_index // vocab, top_index % vocab
        is_eos = token == EOS
        # Finished hypotheses: </s> among the first `beam` candidates of an active sentence.
        for b, j in (is_eos[:, :beam] & active.to(device)[:, None]).nonzero().tolist():
            score = top_scores[b, j].item()
            if math.isfinite(score):
                prefix = ys[b * beam + origin[b, j].item(), 1:].tolist()
                finished[b].append((score / length_penalty(len(prefix) + 1, alpha), prefix))
        # Live beams: the best `beam` candidates that do not end the sentence.
        live_scores = top_scores.masked_fill(is_eos, float("-inf"))
        keep_scores, keep = live_scores.topk(beam, dim=1)
        rows = (torch.arange(batch, device=device)[:, None] * beam + origin.gather(1, keep)).view(
            -1
        )
        ys = torch.cat([ys[rows], token.gather(1, keep).view(-1, 1)], dim=1)
        cache = [layer_cache[rows] for layer_cache in cache]
        scores = keep_scores
        for b in range(batch):
            if active[b] and len(finished[b]) >= beam:
                active[b] = False
        if not bool(active.any()):
            break
    out = []
    for b in range(batch):
        if not finished[b]:  # length limit reached without </s>: take the live beams
            for j in range(beam):
                if math.isfinite(scores[b, j].item()):
                    prefix = ys[b * beam + j, 1:].tolist()
                    finished[b].append(
                        (scores[b, j].item() / length_penalty(len(prefix), alpha), prefix)
                    )
        out.append(_strip(max(finished[b], key=lambda item: item[0])[1]) if finished[b] else [])
    return out


def translate(
    model: Seq2SeqTransformer,
    tokenizer,
    data: Encoded,
    device: torch.device,
    beam: int,
    alpha: float,
    batch_size: int,
) -> list[str]:
    """Detokenised translations of every source in ``data`` (``beam=1`` = greedy).

    Sentences are decoded in batches of similar length and returned in the original order.

    Args:
        model: trained model.
        tokenizer: the run's tokenizer (its ``decode`` detokenises).
        data: encoded split.
        device: where to run.
        beam: beam size; 1 uses :func:`greedy_decode`.
        alpha: length penalty of the beam search.
        batch_size: sentences per decoding batch.

    Returns:
        One string per sentence.
    """
    was_training = model.training
    model.eval()
    order = torch.argsort(data.src_len, stable=True)
    rows = max(1, batch_size // beam)
    hypotheses: list[str] = [""] * len(data)
    for start in range(0, len(order), rows):
        index = order[start : start + rows]
        src = data.src[index, : int(data.src_len[index].max())].to(device)
        ids = greedy_decode(model, src) if beam == 1 else beam_search(model, src, beam, alpha)
        for i, row in zip(index.tolist(), ids, strict=True):
            hypotheses[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return hypotheses


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU of detokenised hypotheses against raw references with sacrebleu.

    Args:
        hypotheses: system outputs.
        references: one raw reference per hypothesis.

    Returns:
        ``(score, signature)``.

    Raises:
        ValueError: if the lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses: {len(hypotheses)} sentences for {len(references)} references"
        )
    _require("sacrebleu")
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


# --- train -------------------------------------------------------------------------------


def epoch_batches(lengths: torch.Tensor, batch: int, seed: int, pool: int = 32) -> list:
    """One epoch's batches of pair indices: shuffled, then length-bucketed, then shuffled.

    Pairs are shuffled, cut into pools of ``pool`` batches, sorted by target length inside a
    pool (so a batch pads little: about half the compute of random batches on Multi30k), cut
    into batches, and the batches shuffled. Everything is drawn from a generator seeded by
    ``seed`` (the trainer passes ``(seed, epoch)``), so a resumed run needs no sampler state.
    The last partial batch is dropped, as in the shared trainer.

    Args:
        lengths: ``(N,)`` sequence lengths.
        batch: pairs per batch.
        seed: generator seed.
        pool: batches per sorting pool.

    Returns:
        ``N // batch`` index tensors of ``batch`` pairs each.

    Raises:
        ValueError: if ``batch`` or ``pool`` is not positive, or ``batch > N``.
    """
    if batch < 1 or pool < 1 or batch > len(lengths):
        raise ValueError(f"batch/pool: need 1 <= batch <= {len(lengths)} and pool >= 1")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    order = order[: len(order) - len(order) % batch]
    batches = []
    for start in range(0, len(order), pool * batch):
        chunk = order[start : start + pool * batch]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _shifted_targets(tgt: torch.Tensor) -> torch.Tensor:
    """Flat next-token targets ``(B*T,)`` of ``<s> ... </s>`` ids, pads as ``-100``."""
    return tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, IGNORE_INDEX).reshape(-1)


def _forced_logits(model, src, tgt, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced flat logits ``(B*T, V)`` and targets ``(B*T,)`` (pads = ``-100``)."""
    src, tgt = src.to(device), tgt.to(device)
    logits = model(src, tgt[:, :-1])
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return flat, _shifted_targets(tgt)


def _forced_states(model, src, tgt, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced flat decoder states ``(B*T, d)`` and targets ``(B*T,)`` (pads = ``-100``)."""
    src, tgt = src.to(device), tgt.to(device)
    states = model(src, tgt[:, :-1], return_states=True)
    return states.reshape(-1, states.shape[-1]), _shifted_targets(tgt)


def fused_loss_options(criterion: nn.Module) -> dict:
    """The keywords of :func:`encouraging_loss.linear_encouraging_loss` for ``criterion``'s loss.

    Read at every step, so that a bonus schedule's updates of ``criterion.bonus_scale`` apply.

    Args:
        criterion: an ``nn.CrossEntropyLoss`` (computed as EL with bonus scale 0) or an
            ``EncouragingLoss``, with mean reduction.

    Returns:
        ``class_weight``, ``ignore_index``, ``reduction``, ``label_smoothing`` and the bonus
        options.

    Raises:
        ValueError: naming ``criterion`` for another loss or reduction.
    """
    # Exact types: FocalLoss, Poly1Loss or a subclass may compute something else.
    if type(criterion) is nn.CrossEntropyLoss:
        bonus_options: dict = {"bonus_scale": 0.0}
    elif type(criterion) is EncouragingLoss:
        bonus_options = criterion.keyword_options()
    else:
        raise ValueError(
            "criterion: the fused linear path computes nn.CrossEntropyLoss and EncouragingLoss "
            f"only, got {type(criterion).__name__}"
        )
    if criterion.reduction != "mean":
        raise ValueError(
            f"criterion: the fused linear path needs reduction='mean', got {criterion.reduction!r}"
        )
    return {
        "class_weight": criterion.weight,
        "ignore_index": criterion.ignore_index,
        "reduction": "mean",
        "label_smoothing": criterion.label_smoothing,
        **bonus_options,
    }


def teacher_forced_loss(
    model: Seq2SeqTransformer,
    criterion: nn.Module,
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    fused_linear: bool = False,
    amp: bool = False,
    forward: nn.Module | None = None,
) -> tuple[torch.Tensor, Callable[[], list[float]]]:
    """The training loss of one batch and a function that gives the batch's token statistics.

    Materialised: ``criterion(logits, targets)`` on the flat ``(tokens, vocab)`` logits. Fused:
    the decoder states, ``model.output.weight``/``bias`` and the targets go to
    :func:`encouraging_loss.linear_encouraging_loss` with ``criterion``'s settings, which never
    forms those logits; the same loss within rounding.

    Args:
        model: the model (its output layer is the fused path's projection).
        criterion: the loss (``nn.CrossEntropyLoss`` or ``EncouragingLoss`` for the fused path).
        src: ``(B, Ls)`` source ids.
        tgt: ``(B, Lt)`` target ids ``<s> ... </s>``, padded.
        fused_linear: use the fused linear + EL path.
        amp: run the forward under bfloat16 autocast (CUDA); the fused loss then gets bfloat16
            states and weight, as autocast gives the materialised projection.
        forward: the module the forward runs through: the DDP wrapper of ``model`` under
            ``torchrun``, so that the gradients reach its hooks; ``None`` = ``model``.

    Returns:
        ``(loss, statistics)``. Call ``statistics()`` after ``loss.backward()`` and before the
        optimiser changes the weights: ``[loss x tokens, CE sum, correct tokens, tokens,
        gradient norm of tokens with p_y > 0.5, total gradient norm]`` over non-pad tokens,
        the norms being those of the loss's gradient on each token's logits.

    Raises:
        ValueError: from :func:`fused_loss_options` for a criterion the fused path lacks.
    """
    device = model.output.weight.device
    forward = model if forward is None else forward
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        if fused_linear:
            states, targets = _forced_states(forward, src, tgt, device)
        else:
            flat, targets = _forced_logits(forward, src, tgt, device)
    if not fused_linear:
        flat.retain_grad()
        loss = criterion(flat, targets)
        return loss, lambda: _materialised_statistics(loss, flat, targets)
    options = fused_loss_options(criterion)
    # Outside autocast, with the dtype autocast would give the materialised projection.
    dtype = torch.bfloat16 if amp else model.output.weight.dtype
    weight = model.output.weight.to(dtype)
    bias = None if model.output.bias is None else model.output.bias.to(dtype)
    states = states.to(dtype)
    loss = linear_encouraging_loss(states, weight, targets, bias, **options).float()
    return loss, lambda: _fused_statistics(criterion, states, weight, bias, targets)


def _token_statistics(
    logits: torch.Tensor, gold: torch.Tensor, grad: torch.Tensor
) -> list[torch.Tensor]:
    """CE sum, correct count, and the well-classified and total norms of rows of ``grad``."""
    p_true = logits.softmax(1).gather(1, gold[:, None]).squeeze(1)
    norms = grad.norm(dim=1)
    return [
        nn.functional.cross_entropy(logits, gold, reduction="sum"),
        (logits.argmax(1) == gold).sum(),
        norms[p_true > 0.5].sum(),
        norms.sum(),
    ]


@torch.no_grad()
def _materialised_statistics(
    loss: torch.Tensor, flat: torch.Tensor, targets: torch.Tensor
) -> list[float]:
    """:func:`teacher_forced_loss`'s statistics from the logits and their retained gradient."""
    keep = targets != IGNORE_INDEX
    logits, gold = flat.detach()[keep], targets[keep]
    count = len(gold)
    ce, correct, well, total = (t.item() for t in _token_statistics(logits, gold, flat.grad[keep]))
    return [loss.item() * count, ce, correct, count, well, total]


def _mean_denominator(criterion: nn.Module, gold: torch.Tensor) -> float | torch.Tensor:
    """What a mean-reduced criterion divides the summed loss of targets ``gold`` by."""
    class_weight = getattr(criterion, "weight", None)
    return float(len(gold)) if class_weight is None else class_weight[gold].sum()


@torch.no_grad()
def _fused_statistics(
    criterion: nn.Module,
    states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
) -> list[float]:
    """:func:`teacher_forced_loss`'s statistics from decoder states, in row chunks.

    Each chunk's logits are formed again (``states @ weight.T + bias``, at most
    :data:`STATISTICS_CHUNK_LOGITS` of them) and its loss recomputed with autograd on them,
    scaled by the chunk's share of the batch's mean denominator, so that its gradient is the
    batch loss's gradient on those rows: the materialised path's numbers without its logits.
    """
    keep = targets != IGNORE_INDEX
    states, gold = states.detach()[keep], targets[keep]
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    denominator = _mean_denominator(criterion, gold)
    rows = max(1, STATISTICS_CHUNK_LOGITS // weight.shape[0])
    totals = [torch.zeros((), device=states.device) for _ in range(5)]
    for start in range(0, len(gold), rows):
        chunk_gold = gold[start : start + rows]
        logits = nn.functional.linear(states[start : start + rows], weight, bias).float()
        with torch.enable_grad():
            logits.requires_grad_(True)
            share = _mean_denominator(criterion, chunk_gold) / denominator
            chunk_loss = criterion(logits, chunk_gold) * share
            (grad,) = torch.autograd.grad(chunk_loss, logits)
        parts = [chunk_loss.detach(), *_token_statistics(logits.detach(), chunk_gold, grad)]
        totals = [total + part for total, part in zip(totals, parts, strict=True)]
    loss, ce, correct, well, total = (t.item() for t in totals)
    count = len(gold)
    return [loss * count, ce, int(correct), count, well, total]


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int, device, collect: bool = False) -> dict:
    """Teacher-forced token accuracy and plain CE (``ppl = exp(CE)``) over non-pad tokens.

    Args:
        model: the model.
        data: encoded split.
        batch_size: sentences per batch.
        device: where to run.
        collect: also return per-token margins and energies (``-logsumexp``, ``-z_y``).

    Returns:
        ``{"token_accuracy", "ce", "ppl", "tokens"}`` (+ ``margin``/``energy``/``energy_true``
        tensors when ``collect``).
    """
    was_training = model.training
    model.eval()
    correct = ce_sum = tokens = 0.0
    parts: dict[str, list[torch.Tensor]] = {"margin": [], "energy": [], "energy_true": []}
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        flat, targets = _forced_logits(model, *data.batch(index), device)
        keep = targets != IGNORE_INDEX
        flat, targets = flat[keep], targets[keep]
        correct += (flat.argmax(1) == targets).sum().item()
        ce_sum += nn.functional.cross_entropy(flat, targets, reduction="sum").item()
        tokens += len(targets)
        if collect:
            parts["margin"].append(diagnostics.margins(flat, targets).cpu())
            energy_true, energy_free = diagnostics.energies(flat, targets)
            parts["energy"].append(energy_free.cpu())
            parts["energy_true"].append(energy_true.cpu())
    model.train(was_training)
    ce = ce_sum / max(tokens, 1)
    out = {"token_accuracy": correct / max(tokens, 1), "ce": ce, "ppl": math.exp(min(ce, 50.0))}
    out["tokens"] = int(tokens)
    if collect:
        out.update({k: torch.cat(v) for k, v in parts.items()})
    return out


def train_translation(
    model: Seq2SeqTransformer,
    criterion: nn.Module,
    train_data: Encoded,
    val_data: Encoded,
    config: TrainConfig,
    *,
    bonus_schedule=None,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    description: str = "train",
    fused_linear: bool = False,
) -> TrainResult:
    """Teacher-forced training with model selection on validation token accuracy.

    The same contract as the shared ``trainer.train`` (per-epoch shuffles seeded by
    ``(seed, epoch)``, learning rate a function of the step, atomic per-epoch checkpoints with
    exact resume, divergence detection, ``torchrun`` data parallelism), for batches of padded
    sentence pairs whose loss ignores padding. Under ``torchrun`` each rank averages over its
    own tokens, so the averaged gradient weights ranks equally rather than tokens.

    With ``fused_linear`` the loss comes from the decoder states and the output layer through
    the core's fused linear + EL (:func:`teacher_forced_loss`): the same loss, gradients and
    per-epoch statistics within rounding, without the ``(tokens, vocab)`` logits.

    Args:
        model: freshly initialised model (seed first with ``set_seed``).
        criterion: ``criterion(logits (N, V), targets (N,))`` ignoring ``-100``; for
            ``fused_linear`` an ``nn.CrossEntropyLoss`` or ``EncouragingLoss``.
        train_data: encoded training pairs.
        val_data: encoded validation pairs.
        config: hyper-parameters.
        bonus_schedule: maps progress in ``[0, 1]`` to the criterion's ``bonus_scale``.
        checkpoint_path: per-epoch checkpoint; ``None`` = none.
        resume: continue from ``checkpoint_path`` if it exists.
        stop_after_epochs: return after this many epochs of this call as if killed.
        progress: show a tqdm bar on rank 0.
        description: bar label.
        fused_linear: train through the fused linear + EL path (see :func:`use_fused_linear`).

    Returns:
        A ``trainer.TrainResult`` whose model holds the best validation weights.

    Raises:
        ValueError: for a bad configuration, a checkpoint written for another setup, or a
            criterion the fused path does not compute.
        TypeError: if ``fused_linear`` is not a bool.
    """
    config.validate()
    if not isinstance(fused_linear, bool):
        raise TypeError(
            "fused_linear: expected a bool (use_fused_linear resolves 'auto'/'on'/'off'), "
            f"got {fused_linear!r}"
        )
    if fused_linear:
        fused_loss_options(criterion)  # fail before training, not at the first step
    if resume and checkpoint_path is None:
        raise ValueError("checkpoint_path: resume=True needs a checkpoint path")
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ValueError(f"stop_after_epochs: must be at least 1, got {stop_after_epochs}")
    started = time.perf_counter()
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    world, my_rank = world_size(), rank()
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by {world} processes")
    model.to(device)
    n_train = len(train_data)
    batch = min(config.batch_size, n_train - n_train % world)
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * config.epochs
    ddp_model: nn.Module = model
    if distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(model, config)
    use_amp = config.amp and device.type == "cuda"
    result = TrainResult(model=model)
    best_state: dict | None = None
    start_epoch = global_step = 0
    setup = {"config": asdict(config), "n_train": n_train, "world_batch": batch}
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state["setup"] != setup:
            raise ValueError(f"checkpoint_path: {checkpoint_path} was written for another setup")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        result.history = state["history"]
        result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val"]
        best_state = state["best_state"]
    bar = None
    if progress and my_rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.epochs, initial=start_epoch, desc=description, leave=False)
        except ImportError:
            bar = None

    for epoch in range(start_epoch, config.epochs):
        ddp_model.train()
        batches = epoch_batches(train_data.tgt_len, batch, config.seed * 1_000_003 + epoch)
        # loss*tokens, CE*tokens, correct, tokens, well-classified grad norm, total grad norm
        sums = [0.0] * 6
        diverged = False
        for step_in_epoch in range(steps_per_epoch):
            lr = learning_rate(config, global_step, total_steps, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if bonus_schedule is not None:
                criterion.bonus_scale = float(bonus_schedule(global_step / max(1, total_steps)))
            index = batches[step_in_epoch][my_rank::world]
            # Fused: decoder states through ddp_model (so DDP's hooks see the gradients), then
            # the core's fused linear + EL with model.output; no (tokens x vocabulary) logits.
            loss, statistics = teacher_forced_loss(
                model,
                criterion,
                *train_data.batch(index),
                fused_linear=fused_linear,
                amp=use_amp,
                forward=ddp_model,
            )
            global_step += 1
            finite = torch.isfinite(loss.detach()).float()
            if distributed:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            # Before the step: the fused path's statistics form logits from the output weight.
            sums = [total + part for total, part in zip(sums, statistics(), strict=True)]
            optimizer.step()
        if diverged:
            result.diverged, result.diverged_step = True, global_step
            result.diverged_epoch = epoch + 1
            break
        loss_sum, ce_sum, correct, count, well, total = all_reduce_sum(sums, distributed)
        val = evaluate(model, val_data, config.eval_batch_size, device)
        record = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": lr,
            "train_loss": loss_sum / count,
            "train_ce": ce_sum / count,
            "train_accuracy": correct / count,
            "val_accuracy": val["token_accuracy"],
            "val_nll": val["ce"],
            "val_ppl": val["ppl"],
            "grad_share_well_classified": well / total if total > 0 else 0.0,
            "bonus_scale": (
                float(criterion.bonus_scale) if hasattr(criterion, "bonus_scale") else None
            ),
        }
        result.history.append(record)
        if best_state is None or val["token_accuracy"] > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch + 1, val["token_accuracy"]
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if checkpoint_path is not None and my_rank == 0:
            atomic_torch_save(
                {
                    "setup": setup,
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_val": result.best_val_accuracy,
                    "best_state": best_state,
                },
                checkpoint_path,
            )
        if distributed:
            dist.barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{record['train_ce']:.3f}", val_acc=f"{val['token_accuracy']:.3f}")
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
            result.interrupted = epoch + 1 < config.epochs
            if result.interrupted:
                break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.train_seconds = time.perf_counter() - started
    return result


# --- run ---------------------------------------------------------------------------------


def run(options: TranslationOptions) -> dict | None:
    """Run the translation task for every loss and seed and write the report.

    Args:
        options: see :class:`TranslationOptions`.

    Returns:
        The results dict (``None`` on ranks other than 0, or when stopped on purpose).

    Raises:
        ValueError: for bad options or loss names.
        lab_data.DatasetNotFoundError: if Multi30k is missing.
        RuntimeError: if ``tokenizers`` or ``sacrebleu`` is missing.
    """
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses)
    recipe = resolve_recipe(options)
    for spec in specs:  # a bad --fused-linear fails before the data is read
        use_fused_linear(options.fused_linear, spec, recipe.vocab_size)
    _require("tokenizers")
    _require("sacrebleu")
    out_dir = Path(options.out or f"runs/{TASK}-{options.preset}-{DATASET}")
    is_main = rank() == 0
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)

    # --- data: raw text → BPE learned on the training pairs → padded ids ------------------
    started = time.perf_counter()
    raw, source = load_multi30k(options.data_root)
    train_pairs = subset(raw["train"], recipe.max_train, seed=0)
    test_pairs = subset(raw["test"], recipe.max_test, seed=1)
    val_pairs = subset(raw["val"], recipe.max_val, seed=2)
    tokenizer_path = out_dir / "tokenizer.json"
    if options.resume and tokenizer_path.is_file():
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        # Every rank learns the same vocabulary from the same pairs; rank 0 keeps a copy.
        save_to = tokenizer_path if is_main else out_dir / f".tokenizer.rank{rank()}.json"
        tokenizer = train_tokenizer(train_pairs[0] + train_pairs[1], recipe.vocab_size, save_to)
        if not is_main:
            save_to.unlink()
    train_data = encode_pairs(tokenizer, train_pairs, recipe.max_tokens)
    val_data = encode_pairs(tokenizer, val_pairs, recipe.max_tokens)
    test_data = encode_pairs(tokenizer, test_pairs, recipe.max_tokens)
    config = {
        "preset": options.preset,
        "model": {
            "kind": "transformer",
            "d_model": recipe.d_model,
            "heads": recipe.heads,
            "encoder_layers": recipe.encoder_layers,
            "decoder_layers": recipe.decoder_layers,
            "feedforward": recipe.feedforward,
            "dropout": recipe.dropout,
            "share_embeddings": recipe.share_embeddings,
        },
        "losses": [s.name for s in specs],
        "seeds": list(range(recipe.seeds)),
        "train": asdict(recipe.train),
        "lr_note": (
            f"{recipe.train.optimizer} lr {recipe.train.lr:g} with "
            f"{recipe.train.warmup_epochs:g} warm-up epochs and {recipe.train.schedule} decay, "
            f"gradient-norm clip {recipe.train.clip_grad_norm}, "
            "for every loss (paired comparison). Model selection on validation token accuracy."
        ),
        "decoding": {
            "beam": recipe.beam,
            "length_penalty": f"GNMT ((5+len)/6)^{recipe.length_penalty:g}",
            "greedy": True,
        },
        "data": {
            "source": str(source),
            "direction": f"{SOURCE_LANG}->{TARGET_LANG}",
            "n_train": len(train_data),
            "n_val": len(val_data),
            "n_test": len(test_data),
            "test_split": SPLIT_FILES["test"],
            "vocab": {
                "kind": "joint BPE (tokenizers), learned on the training pairs used",
                "size": tokenizer.get_vocab_size(),
                "file": "tokenizer.json",
            },
            "max_tokens": recipe.max_tokens,
        },
        "fused_linear": {
            "mode": options.fused_linear,
            "min_vocab": FUSED_LINEAR_MIN_VOCAB,
            "losses": [
                s.name
                for s in specs
                if use_fused_linear(options.fused_linear, s, tokenizer.get_vocab_size())
            ],
        },
        "table_metrics": [list(m) for m in TABLE_METRICS],
        "table_note": (
            "Mean ± std over seeds. BLEU: sacrebleu on detokenised output against the raw "
            "references (signature in the configuration below); beam "
            f"{recipe.beam} with length penalty α={recipe.length_penalty:g}, and greedy. token acc "
            "and CE ppl: teacher-forced on the test pairs, ppl = exp(plain CE of the same logits) "
            "for every loss (EL's own loss value is never compared). token margin / energy: "
            "z_y − max_{j≠y} z_j and −logsumexp(z) per target token; grad share = share of the "
            "per-token logit-gradient norm from tokens with p_y > 0.5 in the last epoch."
        ),
        "out": str(out_dir),
        "world_size": world_size(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- one training run per loss and seed ----------------------------------------------
    runs = []
    for spec in specs:
        for seed in range(recipe.seeds):
            record, interrupted = _train_and_measure(
                spec, seed, recipe, tokenizer, (train_data, val_data, test_data), out_dir, options
            )
            if interrupted:
                finish_distributed()
                return None
            if record is not None:
                runs.append(record)
                config["bleu_signature"] = record["bleu_signature"]
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    results = {"task": TASK, "dataset": DATASET, "config": config, "runs": runs}
    if is_main:
        report.write_report(out_dir, results)
    return results if is_main else None


def _train_and_measure(
    spec: LossSpec,
    seed: int,
    recipe: TranslationRecipe,
    tokenizer,
    data: tuple[Encoded, Encoded, Encoded],
    out_dir: Path,
    options: TranslationOptions,
) -> tuple[dict | None, bool]:
    """Train one (loss, seed) run, decode the test set, measure, save its record."""
    train_data, val_data, test_data = data
    slug = report.run_slug(spec.name, seed)
    record_path = out_dir / "runs" / f"{slug}.json"
    checkpoint_path = out_dir / "checkpoints" / f"{slug}.pt"
    if options.resume and record_path.is_file():
        return json.loads(record_path.read_text(encoding="utf-8")), False

    train_config = replace(recipe.train, seed=seed)
    set_seed(seed, train_config.deterministic)
    model = Seq2SeqTransformer(
        tokenizer.get_vocab_size(),
        d_model=recipe.d_model,
        heads=recipe.heads,
        encoder_layers=recipe.encoder_layers,
        decoder_layers=recipe.decoder_layers,
        feedforward=recipe.feedforward,
        dropout=recipe.dropout,
        share_embeddings=recipe.share_embeddings,
        max_positions=2 * recipe.max_tokens + 16,
    )
    criterion = build_criterion(spec)  # ignore_index=-100 (padding) for every family
    fused_linear = use_fused_linear(options.fused_linear, spec, tokenizer.get_vocab_size())
    outcome = train_translation(
        model,
        criterion,
        train_data,
        val_data,
        train_config,
        bonus_schedule=build_bonus_schedule(spec),
        checkpoint_path=checkpoint_path,
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=options.progress,
        description=f"{spec.name} seed {seed}",
        fused_linear=fused_linear,
    )
    if outcome.interrupted or rank() != 0:
        return None, outcome.interrupted

    metrics: dict = outcome.outcome_metrics()
    signature = None
    if not outcome.diverged:
        measured = _measure(model, tokenizer, test_data, recipe, train_config, out_dir, spec, seed)
        signature = measured.pop("_signature")
        metrics.update(measured)
        metrics["grad_share_well_classified_last"] = outcome.history[-1][
            "grad_share_well_classified"
        ]
    record = {
        "loss": spec.name,
        "seed": seed,
        "status": "diverged" if outcome.diverged else "ok",
        "lr": train_config.lr,
        "metrics": metrics,
        "history": outcome.history,
        "reliability": None,
        "bleu_signature": signature,
        "train_seconds": outcome.train_seconds,
        "fused_linear": fused_linear,
    }
    report.atomic_write_json(record_path, record)
    if checkpoint_path.is_file():
        checkpoint_path.unlink()
    return record, False


def _measure(model, tokenizer, test: Encoded, recipe, config, out_dir: Path, spec, seed) -> dict:
    """Teacher-forced token metrics, greedy and beam BLEU, saved hypotheses and arrays."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    forced = evaluate(model, test, config.eval_batch_size, device, collect=True)
    greedy = translate(model, tokenizer, test, device, 1, 0.0, config.eval_batch_size)
    beamed = translate(
        model, tokenizer, test, device, recipe.beam, recipe.length_penalty, config.eval_batch_size
    )
    bleu_greedy, _ = bleu(greedy, test.references)
    bleu_beam, signature = bleu(beamed, test.references)
    slug = report.run_slug(spec.name, seed)
    for kind, lines in (("greedy", greedy), (f"beam{recipe.beam}", beamed)):
        report.atomic_write_text(
            out_dir / "translations" / f"{slug}.{kind}.{TARGET_LANG}", "\n".join(lines) + "\n"
        )
    report.save_arrays(
        out_dir,
        spec.name,
        seed,
        margin=forced["margin"].numpy(),
        energy=forced["energy"].numpy(),
        energy_true=forced["energy_true"].numpy(),
    )
    return {
        "bleu": bleu_beam,
        "bleu_greedy": bleu_greedy,
        "token_accuracy": forced["token_accuracy"],
        "test_ce": forced["ce"],
        "ppl": forced["ppl"],
        "test_tokens": forced["tokens"],
        **diagnostics.summarize(forced["margin"], "margin"),
        **diagnostics.summarize(forced["energy"], "energy"),
        **diagnostics.summarize(forced["energy_true"], "energy_true"),
        "measure_seconds": time.perf_counter() - started,
        "_signature": signature,
    }
