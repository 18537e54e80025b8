"""The translation task's presets, its own options and how they resolve into a recipe."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from ...experiment import Options
from ...losses import LossSpec
from ...trainer import TrainConfig

DATASET = "multi30k"
SOURCE_LANG, TARGET_LANG = "de", "en"
DEFAULT_LOSSES = "ls-ce:0.1,ls-el:0.1,log_end=0.5"
FUSED_LINEAR_MODES = ("auto", "on", "off")
# ``--fused-linear auto`` switches the fused path on from this target vocabulary size: below it
# a batch's (tokens x vocabulary) logits are small next to the Transformer's own activations.
FUSED_LINEAR_MIN_VOCAB = 8192
# Loss families the fused path computes: EL, and CE as EL with bonus scale 0.
FUSED_LINEAR_FAMILIES = ("ce", "ls-ce", "el", "ls-el")


@dataclass(frozen=True)
class TranslationRecipe:
    """How one preset trains, with the command-line options resolved into it.

    Attributes:
        max_train, max_test, max_val: training pairs (a fixed random subset, seed 0), test
            pairs decoded and scored, validation pairs scored each epoch; ``None`` = all
            (29,000 / 1,000 / 1,014).
        vocab_size: joint BPE vocabulary size (specials included).
        d_model, heads, encoder_layers, decoder_layers, feedforward, dropout: the Transformer.
        train: optimiser and schedule (seed filled in per run).
        share_embeddings: one embedding matrix for source, target and output projection.
        max_tokens: sentences are cut to this many BPE tokens (specials included).
        beam, length_penalty: beam size of the reported BLEU; GNMT length-penalty exponent α
            (the score is divided by ``((5 + len) / 6) ** α``).
        seeds, threads: default number of seeds; torch CPU threads (``None`` = torch's default).
        fused_linear: ``--fused-linear`` (one of :data:`FUSED_LINEAR_MODES`).
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
    fused_linear: str = "auto"


def _adamw(epochs: int, batch_size: int, **kwargs) -> TrainConfig:
    """AdamW, weight decay 1e-4, warm-up then cosine decay, gradient-norm clip 1: every preset."""
    adamw = {"optimizer": "adamw", "weight_decay": 1e-4, "clip_grad_norm": 1.0}
    return TrainConfig(epochs, batch_size, eval_batch_size=128, **adamw, **kwargs)


# fmt: off
PRESETS: dict[str, TranslationRecipe] = {
    # ≤ 6 minutes on 2 CPU cores for the default 2 losses × 1 seed. A tiny model on a subset:
    # BLEU is far below the paper's (that needs the full preset); the pipeline is what it shows.
    "quick": TranslationRecipe(
        max_train=4000, max_test=300, max_val=200, vocab_size=2000,
        d_model=128, heads=4, encoder_layers=2, decoder_layers=2, feedforward=256, dropout=0.1,
        train=_adamw(3, 64, lr=2e-3, warmup_epochs=0.5),
    ),
    # GPU recipe: all 29,000 pairs, a 512-wide 3+3-layer Transformer, 3 seeds.
    "full": TranslationRecipe(
        max_train=None, max_test=None, max_val=None, vocab_size=10000,
        d_model=512, heads=8, encoder_layers=3, decoder_layers=3, feedforward=2048, dropout=0.2,
        train=_adamw(40, 128, lr=5e-4, warmup_epochs=2.0, device="auto"),
        max_tokens=100, seeds=3, threads=None,
    ),
    # The paper's comparison at the largest size 2 CPU cores run in ~12 minutes with --tune lr
    # (8 tuning runs + 2 losses x 2 seeds): the quick model on 8,000 pairs, 2 epochs of
    # batch 32 (500 updates). Far below the paper's BLEU; see docs/lab-graph-translation.md.
    "paper": TranslationRecipe(
        max_train=8000, max_test=500, max_val=200, vocab_size=2000,
        d_model=128, heads=4, encoder_layers=2, decoder_layers=2, feedforward=256, dropout=0.1,
        train=_adamw(2, 32, lr=2e-3, warmup_epochs=0.25), seeds=2,
    ),
    # The paper's model size (fairseq's transformer_iwslt_de_en: d=512, 6+6 layers, 4 heads,
    # FF 1024, dropout 0.3, lr 5e-4, joint BPE 10,000) on all of Multi30k: a GPU recipe.
    "paper-gpu": TranslationRecipe(
        max_train=None, max_test=None, max_val=None, vocab_size=10000,
        d_model=512, heads=4, encoder_layers=6, decoder_layers=6, feedforward=1024, dropout=0.3,
        train=_adamw(50, 128, lr=5e-4, warmup_epochs=4.0, device="auto"),
        max_tokens=100, seeds=3, threads=None,
    ),
}
# fmt: on


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--fused-linear`` and ``--val-size`` to the task's group of the ``run`` parser."""
    group.add_argument(
        "--fused-linear",
        choices=FUSED_LINEAR_MODES,
        help="train CE/EL losses through the core's fused linear + EL (decoder states and the "
        "output weight in, no tokens x vocabulary logits for the loss): auto = on from a target "
        f"vocabulary of {FUSED_LINEAR_MIN_VOCAB} tokens, for the CE/EL losses only. "
        "Default: auto",
    )
    val_help = "validation pairs scored each epoch (a fixed random subset; default: the preset's)"
    group.add_argument("--val-size", type=int, metavar="N", help=val_help)


def use_fused_linear(mode: str, spec: LossSpec, vocab_size: int) -> bool:
    """Whether ``spec`` trains through the fused linear + EL path (else materialised logits).

    ``mode`` is ``"on"``, ``"off"`` or ``"auto"``: on for CE and EL from a target
    ``vocab_size`` of :data:`FUSED_LINEAR_MIN_VOCAB`.

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


def preset_recipe(name: str) -> TranslationRecipe:
    """The recipe of preset ``name``.

    Raises:
        ValueError: naming ``preset`` for a name not in :data:`PRESETS`.
    """
    if name not in PRESETS:
        raise ValueError(f"preset: translation has presets {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def resolve_recipe(options: Options) -> TranslationRecipe:
    """The preset's recipe with the invocation's options (``preset`` set) applied.

    Raises:
        ValueError: naming the first bad option.
    """
    if not isinstance(options, Options):
        raise ValueError(f"options: expected Options, got {type(options).__name__}")
    recipe = preset_recipe(options.preset)
    if options.dataset not in (None, DATASET):
        raise ValueError(f"dataset: translation runs on {DATASET!r}, got {options.dataset!r}")
    if options.model not in (None, "transformer"):
        raise ValueError(f"model: translation has 'transformer' only, got {options.model!r}")
    val_size = options.get("val_size")
    if val_size is not None and val_size < 10:
        raise ValueError(f"val_size: must be at least 10 sentence pairs, got {val_size}")
    return replace(
        recipe,
        max_train=options.train_size if options.train_size is not None else recipe.max_train,
        max_test=options.test_size if options.test_size is not None else recipe.max_test,
        max_val=val_size if val_size is not None else recipe.max_val,
        train=options.train_config(recipe.train),
        fused_linear=options.get("fused_linear", "auto"),  # checked by use_fused_linear
    )


def describe_presets() -> str:
    """One line per preset (for ``--help``)."""
    return "\n".join(
        f"translation {name}/{DATASET}: transformer d{r.d_model} {r.encoder_layers}+"
        f"{r.decoder_layers} layers, BPE {r.vocab_size}, train {r.max_train or 'all'} pairs, "
        f"{r.seeds} seed(s), {r.train.epochs} epochs, batch {r.train.batch_size}, "
        f"{r.train.optimizer} lr {r.train.lr:g}"
        for name, r in PRESETS.items()
    )
