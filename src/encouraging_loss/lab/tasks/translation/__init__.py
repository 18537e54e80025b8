"""Machine translation: label-smoothed CE vs label-smoothed EL on Multi30k German→English.

Reads top-down: :mod:`.recipes` (presets) → :mod:`.data` (raw Multi30k, a joint BPE vocabulary
learned with ``tokenizers`` on the training pairs and saved with the run) → :mod:`.model` (a
Transformer encoder-decoder, shared embeddings) → :mod:`.steps` (teacher-forced batches for
the one trainer, padding ignored) → :mod:`.decoding` (greedy and beam search, ``sacrebleu``
BLEU) → one (loss, seed) run, here: train → diagnostics (token accuracy, CE-part perplexity,
token margins and energies, BLEU) → report spec.

The paper's recipe is label smoothing 0.1 with EL (``log_end=0.5``): ``ls-ce:0.1`` vs
``ls-el:0.1,log_end=0.5``. EL changes the loss scale, so loss values are never compared across
losses: the reported perplexity is ``exp`` of the plain CE of the same logits. Large target
vocabularies train through the core's fused linear + EL path (``--fused-linear``: no
``(tokens, vocabulary)`` logits tensor). Needs ``tokenizers`` and ``sacrebleu``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ... import diagnostics
from ... import io as lab_io
from ...experiment import Options, Prepared, RunContext, RunResult
from ...losses import LossSpec, build_criterion, parse_loss_list
from ...report import table_columns
from ...trainer import rank, set_seed
from .. import PaperRow, PaperSetting, Task
from . import data, recipes
from .decoding import bleu, bleu_signature, translate
from .model import Seq2SeqTransformer
from .recipes import DATASET, FUSED_LINEAR_MIN_VOCAB, PRESETS, TranslationRecipe, use_fused_linear
from .steps import TranslationBatches, evaluate, fused_loss_options

TABLE_METRICS = table_columns(
    ("bleu", "BLEU (beam)", True),
    ("bleu_greedy", "BLEU (greedy)", True),
    ("token_accuracy", "token acc", True),
    ("ppl", "CE ppl", False),
    "margin_mean",
    "energy_mean",
    "grad_share_well_classified_last",
    margin_mean="token margin",
    energy_mean="token energy −lse",
)
TABLE_NOTE = (
    "Mean ± std over seeds. BLEU: sacrebleu on detokenised output against the raw references "
    "(signature in the configuration below); beam {beam} with length penalty α={alpha:g}, and "
    "greedy. token acc and CE ppl: teacher-forced on the test pairs, ppl = exp(plain CE of the "
    "same logits) for every loss (EL's own loss value is never compared). token margin / "
    "energy: z_y − max_{{j≠y}} z_j and −logsumexp(z) per target token; grad share = share of the "
    "per-token logit-gradient norm from tokens with p_y > 0.5 in the last epoch."
)

# The paper's NMT comparison (IWSLT14 de-en, which is not available offline) on Multi30k.
PAPER_LOSSES = "ls-ce:0.1,ls-el:0.1,log_end=0.5"
PAPER_SETTING = PaperSetting(
    name="Multi30k de→en Transformer, label-smoothed CE vs EL (the paper: IWSLT14 de→en)",
    losses=PAPER_LOSSES,
    runs={
        # 64 pairs (2 updates), 10 validation and test sentences: the pipeline only (BLEU ≈ 0).
        "quick": dict(
            preset="paper", seeds=2, epochs=1, train_size=64, test_size=10, extra={"val_size": 10}
        ),
        "cpu": dict(preset="paper", seeds=3),
        "gpu": dict(preset="paper-gpu", seeds=3),
    },
    rows=(
        PaperRow(
            "BLEU (beam 5)",
            "bleu",
            "ls-ce:0.1",
            "ls-el:0.1,log_end=0.5",
            paper=(35.09, 35.50),
            scale=1.0,
        ),
    ),
    departures=(
        "Multi30k (29,000 training pairs, test_2016_flickr) instead of IWSLT14 de→en, which is "
        "not available offline, so BLEU is not comparable with the paper's; our BPE, "
        "Transformer and trainer instead of fairseq's (AdamW, warm-up + cosine instead of "
        "inverse-sqrt, gradient clip 1); the cpu run is a small model trained for 500 updates "
        "(BLEU about 12); paper-gpu has the paper's model size (d=512, 6+6 layers)."
    ),
)

PARTS = ("train", "val", "test")
BPE_KIND = "joint BPE (tokenizers), learned on the training pairs used"
MODEL_FIELDS = ("d_model", "heads", "encoder_layers", "decoder_layers", "feedforward", "dropout")


def _measure(model, tokenizer, test, recipe: TranslationRecipe, run: RunContext):
    """Teacher-forced token metrics, greedy and beam BLEU, saved hypotheses and arrays."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    batch, beam, alpha = recipe.train.eval_batch_size, recipe.beam, recipe.length_penalty
    forced = evaluate(model, test, batch, device, collect=True)
    greedy = translate(model, tokenizer, test, device, 1, 0.0, batch)
    beamed = translate(model, tokenizer, test, device, beam, alpha, batch)
    bleu_greedy, _ = bleu(greedy, test.references)
    bleu_beam, signature = bleu(beamed, test.references)
    slug = lab_io.run_slug(run.loss, run.seed)
    for kind, lines in (("greedy", greedy), (f"beam{beam}", beamed)):
        path = run.out_dir / "translations" / f"{slug}.{kind}.{recipes.TARGET_LANG}"
        lab_io.atomic_write_text(path, "\n".join(lines) + "\n")
    arrays = {name: forced[name].numpy() for name in ("margin", "energy", "energy_true")}
    lab_io.save_arrays(run.out_dir, run.loss, run.seed, **arrays)
    metrics = {"bleu": bleu_beam, "bleu_greedy": bleu_greedy}
    metrics.update(token_accuracy=forced["token_accuracy"], test_ce=forced["ce"], ppl=forced["ppl"])
    metrics["test_tokens"] = forced["tokens"]
    for name in ("margin", "energy", "energy_true"):
        metrics.update(diagnostics.summarize(forced[name], name))
    metrics["measure_seconds"] = time.perf_counter() - started
    return metrics, signature


class TranslationTask(Task):
    """Multi30k de→en with a Transformer: BLEU, token accuracy, perplexity, margins, energies."""

    name = "translation"
    summary = "machine translation: Multi30k de→en Transformer, label-smoothed CE vs EL, BLEU"
    presets = tuple(PRESETS)
    default_losses = recipes.DEFAULT_LOSSES
    datasets = (DATASET,)
    models = ("transformer",)
    paper = (PAPER_SETTING,)

    def default_seeds(self, preset: str) -> int:
        return recipes.preset_recipe(preset).seeds

    add_arguments = staticmethod(recipes.add_arguments)
    describe_presets = staticmethod(recipes.describe_presets)

    def prepare(self, options: Options) -> Prepared:
        recipe = recipes.resolve_recipe(options)
        specs = parse_loss_list(options.losses, self.loss_families)
        for spec in specs:  # a bad --fused-linear fails before the data is read
            use_fused_linear(recipe.fused_linear, spec, recipe.vocab_size)
        data.require_module("tokenizers")
        data.require_module("sacrebleu")
        threads = options.apply_threads(recipe.threads)
        raw, source = data.load_multi30k(options.data_root)
        train_pairs = data.subset(raw["train"], recipe.max_train, seed=0)
        test_pairs = data.subset(raw["test"], recipe.max_test, seed=1)
        val_pairs = data.subset(raw["val"], recipe.max_val, seed=2)
        out_name = f"{self.name}-{options.preset}-{DATASET}"
        tokenizer_path = Path(options.out or f"runs/{out_name}") / "tokenizer.json"
        if options.resume and tokenizer_path.is_file():
            tokenizer = data.load_tokenizer(tokenizer_path)
        else:
            # Every process learns the same vocabulary from the same pairs; rank 0 keeps a copy.
            save_to = tokenizer_path if rank() == 0 else None
            sentences = train_pairs[0] + train_pairs[1]
            tokenizer = data.train_tokenizer(sentences, recipe.vocab_size, save_to)
        pairs = (train_pairs, val_pairs, test_pairs)
        splits = [data.encode_pairs(tokenizer, p, recipe.max_tokens) for p in pairs]
        vocab, train = tokenizer.get_vocab_size(), recipe.train
        penalty = f"GNMT ((5+len)/6)^{recipe.length_penalty:g}"
        mode = recipe.fused_linear
        fused = [s.name for s in specs if use_fused_linear(mode, s, vocab)]
        config = {
            "preset": options.preset,
            "model": {
                "kind": "transformer",
                **{name: getattr(recipe, name) for name in MODEL_FIELDS},
                "share_embeddings": recipe.share_embeddings,
            },
            "train": asdict(train),
            "lr_note": (
                f"{train.optimizer} lr {train.lr:g} with {train.warmup_epochs:g} warm-up epochs "
                f"and {train.schedule} decay, gradient-norm clip {train.clip_grad_norm}, for "
                "every loss (paired comparison). Model selection on validation token accuracy."
            ),
            "decoding": {"beam": recipe.beam, "length_penalty": penalty, "greedy": True},
            "data": {
                "source": str(source),
                "direction": f"{recipes.SOURCE_LANG}->{recipes.TARGET_LANG}",
                **{f"n_{part}": len(split) for part, split in zip(PARTS, splits, strict=True)},
                "test_split": data.SPLIT_FILES["test"],
                "vocab": {"kind": BPE_KIND, "size": vocab, "file": "tokenizer.json"},
                "max_tokens": recipe.max_tokens,
            },
            "fused_linear": {"mode": mode, "min_vocab": FUSED_LINEAR_MIN_VOCAB, "losses": fused},
            "bleu_signature": bleu_signature(),
        }
        return Prepared(DATASET, out_name, config, (recipe, tokenizer, splits), threads)

    def run_one(self, prepared: Prepared, spec: LossSpec, seed: int, run: RunContext) -> RunResult:
        recipe, tokenizer, (train_data, val_data, test_data) = prepared.state
        config = run.config(recipe.train)
        set_seed(seed, config.deterministic)
        vocab = tokenizer.get_vocab_size()
        model = Seq2SeqTransformer(
            vocab,
            **{name: getattr(recipe, name) for name in MODEL_FIELDS},
            share_embeddings=recipe.share_embeddings,
            max_positions=2 * recipe.max_tokens + 16,
        )
        criterion = build_criterion(spec)  # ignore_index=-100 (padding) for every family
        fused = use_fused_linear(recipe.fused_linear, spec, vocab)
        if fused:
            fused_loss_options(criterion)  # fail before training, not at the first step
        batches = TranslationBatches(train_data, val_data, fused_linear=fused)
        outcome = run.train(model, criterion, batches, config)
        extra = {"reliability": None, "bleu_signature": None, "fused_linear": fused}
        result = RunResult(outcome, extra=extra)
        if outcome.diverged or outcome.interrupted or run.tuning or rank() != 0:
            return result  # only rank 0 decodes and writes; tuning never reads the test set
        result.metrics, extra["bleu_signature"] = _measure(model, tokenizer, test_data, recipe, run)
        last = outcome.history[-1]["grad_share_well_classified"]
        result.metrics["grad_share_well_classified_last"] = last
        return result

    def report_spec(self, prepared: Prepared, specs: list[LossSpec]) -> dict:
        recipe = prepared.state[0]
        note = TABLE_NOTE.format(beam=recipe.beam, alpha=recipe.length_penalty)
        return {"table": TABLE_METRICS, "notes": [note]}


TASK = TranslationTask()
