"""Image classification: CE vs EL on Fashion-MNIST, MNIST or CIFAR-10.

Reads top-down: presets → data → for each loss and seed: model → train → diagnostics → report.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import data as lab_data
from .. import diagnostics, report
from ..losses import LossSpec, build_bonus_schedule, build_criterion, parse_loss_list
from ..models import build_model
from ..trainer import TrainConfig, finish_distributed, rank, set_seed, train, world_size

TASK = "image"
REPRODUCE_LOSSES = "ce,el,el:log_end=1,ls-ce:0.1,ls-el:0.1"


@dataclass(frozen=True)
class Recipe:
    """How one preset trains on one dataset.

    Attributes:
        model: ``mlp``, ``cnn`` or ``resnet18``.
        max_train: train examples used (a fixed random subset, validation included); None = all.
        max_test: test examples scored; None = all.
        train: optimiser/schedule settings (seed is filled in per run).
        lr_by_loss: learning-rate overrides by loss name or family (``"el:log_end=1"``, ``"el"``).
        lr_note: why these learning rates.
        diagnostics_train: training examples used for probe/cRT features and train diagnostics.
        val_fraction: share of the training subset held out for model selection.
        threads: CPU threads for torch (``None`` = torch's default). The CPU presets use 1:
            their small models gain little from intra-op threads, and on a busy 2-core machine
            two spinning threads measured ~50x slower per epoch than one.
    """

    model: str
    max_train: int | None
    max_test: int | None
    train: TrainConfig
    lr_by_loss: dict[str, float] = field(default_factory=dict)
    lr_note: str = ""
    diagnostics_train: int = 5000
    val_fraction: float = 0.1
    threads: int | None = 1


_SGD_NOTE = (
    "SGD momentum 0.9 with lr {lr:g} for every loss: one learning rate keeps the comparison "
    "paired (same seed = same initialisation and batches). EL's conservative bonus "
    "(log_end < 1) is bounded below and, like CE's, its gradient vanishes as p_y -> 1, so "
    "CE's rate suits it. el:log_end=1 is kept at the same rate on purpose: its plain log bonus is "
    "unbounded below (the loss falls linearly in the logit gap and its gradient never vanishes), "
    "so at CE's rate it is expected to diverge, and the divergence is the result reported. "
    "Compare it at other settings with --lr or --clip-grad-norm."
)
PRESETS: dict[str, dict[str, Recipe]] = {
    # ≤ 3 minutes for `reproduce --preset quick` on 2 CPU cores (5 losses × 3 seeds).
    "quick": {
        "fashion-mnist": Recipe(
            model="mlp",
            max_train=10000,
            max_test=5000,
            diagnostics_train=5000,
            train=TrainConfig(
                epochs=5,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
        "mnist": Recipe(
            model="mlp",
            max_train=10000,
            max_test=5000,
            diagnostics_train=5000,
            train=TrainConfig(
                epochs=5,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
        "cifar10": Recipe(
            model="cnn",
            max_train=5000,
            max_test=5000,
            diagnostics_train=5000,
            train=TrainConfig(
                epochs=5,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
    },
    # ≤ 10 minutes for `reproduce` on 2 CPU cores.
    "standard": {
        "fashion-mnist": Recipe(
            model="mlp",
            max_train=None,
            max_test=None,
            diagnostics_train=10000,
            train=TrainConfig(
                epochs=8,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
        "mnist": Recipe(
            model="mlp",
            max_train=None,
            max_test=None,
            diagnostics_train=20000,
            train=TrainConfig(
                epochs=10,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
        "cifar10": Recipe(
            model="cnn",
            max_train=20000,
            max_test=None,
            diagnostics_train=20000,
            train=TrainConfig(
                epochs=10,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
                augment=True,
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
    },
    # GPU recipes (not timed on this machine).
    "full": {
        "cifar10": Recipe(
            model="resnet18",
            max_train=None,
            max_test=None,
            diagnostics_train=50000,
            threads=None,
            train=TrainConfig(
                epochs=200,
                batch_size=128,
                optimizer="sgd",
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                schedule="cosine",
                augment=True,
                device="auto",
            ),
            lr_note=(
                "The standard CIFAR ResNet-18 recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine, "
                "200 epochs, crop+flip) for every loss, as in the paper's setting adapted; "
                "el:log_end=1 may diverge at 0.1 and is then reported as diverged — rerun it "
                "with --clip-grad-norm 5 or --lr 0.05."
            ),
        ),
        "mnist": Recipe(
            model="cnn",
            max_train=None,
            max_test=None,
            diagnostics_train=50000,
            threads=None,
            train=TrainConfig(
                epochs=30,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
                device="auto",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
        "fashion-mnist": Recipe(
            model="cnn",
            max_train=None,
            max_test=None,
            diagnostics_train=50000,
            threads=None,
            train=TrainConfig(
                epochs=30,
                batch_size=128,
                optimizer="sgd",
                lr=0.05,
                weight_decay=5e-4,
                schedule="cosine",
                device="auto",
            ),
            lr_note=_SGD_NOTE.format(lr=0.05),
        ),
    },
}
DEFAULT_DATASET = {"quick": "fashion-mnist", "standard": "fashion-mnist", "full": "cifar10"}


@dataclass
class ImageOptions:
    """Everything one ``run image`` invocation needs (filled from the command line).

    ``None`` fields fall back to the preset's recipe.
    """

    losses: str = "ce,el"
    seeds: int = 1
    preset: str = "quick"
    dataset: str | None = None
    model: str | None = None
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
    device: str | None = None
    amp: bool = True
    threads: int | None = None
    progress: bool = True
    stop_after_epochs: int | None = None


def resolve_recipe(options: ImageOptions) -> tuple[str, Recipe]:
    """Pick the preset's recipe for the dataset and apply command-line overrides.

    Args:
        options: parsed options.

    Returns:
        ``(dataset, recipe)``.

    Raises:
        ValueError: for an unknown preset, a dataset the preset has no recipe for, or a bad
            override.
    """
    if options.preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {options.preset!r}; known: {', '.join(PRESETS)}")
    dataset = options.dataset or DEFAULT_DATASET[options.preset]
    recipes = PRESETS[options.preset]
    if dataset not in recipes:
        raise ValueError(
            f"dataset: preset {options.preset!r} has no recipe for {dataset!r}; "
            f"it has: {', '.join(recipes)}"
        )
    if options.seeds < 1:
        raise ValueError(f"seeds: must be at least 1, got {options.seeds}")
    recipe = recipes[dataset]
    train_config = replace(
        recipe.train,
        **{
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
        },
        amp=recipe.train.amp and options.amp,
    )
    train_config.validate()
    if options.threads is not None and options.threads < 0:
        raise ValueError(f"threads: must be >= 0 (0 = torch default), got {options.threads}")
    for name, value in (("train_size", options.train_size), ("test_size", options.test_size)):
        if value is not None and value < 10:
            raise ValueError(f"{name}: must be at least 10, got {value}")
    recipe = replace(
        recipe,
        model=options.model or recipe.model,
        max_train=options.train_size if options.train_size is not None else recipe.max_train,
        max_test=options.test_size if options.test_size is not None else recipe.max_test,
        train=train_config,
        threads=recipe.threads if options.threads is None else (options.threads or None),
        # An explicit --lr applies to every loss.
        lr_by_loss={} if options.lr is not None else dict(recipe.lr_by_loss),
        lr_note="--lr given on the command line, used for every loss"
        if options.lr is not None
        else recipe.lr_note,
    )
    return dataset, recipe


def lr_for(spec: LossSpec, recipe: Recipe) -> float:
    """The learning rate a recipe uses for one loss (by exact name, then family, else base).

    Args:
        spec: parsed loss.
        recipe: the recipe.

    Returns:
        The learning rate.

    Raises:
        ValueError: if ``spec`` is not a :class:`LossSpec`.
    """
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec: expected a LossSpec, got {type(spec).__name__}")
    for key in (spec.name, spec.family):
        if key in recipe.lr_by_loss:
            return recipe.lr_by_loss[key]
    return recipe.train.lr


def run_image(options: ImageOptions) -> dict | None:
    """Run the image task and write the report.

    Args:
        options: see :class:`ImageOptions`.

    Returns:
        The results dict (``None`` on ranks other than 0, or when a run was interrupted on
        purpose with ``stop_after_epochs``).

    Raises:
        ValueError: for bad options or loss names.
        lab_data.DatasetNotFoundError: if the dataset is missing.
    """
    if not isinstance(options, ImageOptions):
        raise ValueError(f"options: expected ImageOptions, got {type(options).__name__}")
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses)
    dataset_name, recipe = resolve_recipe(options)
    out_dir = Path(options.out or f"runs/{TASK}-{options.preset}-{dataset_name}")
    is_main = rank() == 0
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)

    # --- data ----------------------------------------------------------------------------
    started = time.perf_counter()
    dataset = lab_data.load_dataset(
        dataset_name, options.data_root, max_train=recipe.max_train, max_test=recipe.max_test
    )
    splits = lab_data.make_splits(dataset, val_fraction=recipe.val_fraction)
    config = {
        "preset": options.preset,
        "model": recipe.model,
        "losses": [s.name for s in specs],
        "seeds": list(range(options.seeds)),
        "train": asdict(recipe.train),
        "lr_by_loss": {s.name: lr_for(s, recipe) for s in specs},
        "lr_note": recipe.lr_note,
        "data": {
            "source": str(dataset.source),
            "n_train": len(splits.train_y),
            "n_val": len(splits.val_y),
            "n_test": len(splits.test_y),
            "val_fraction": recipe.val_fraction,
            "diagnostics_train": recipe.diagnostics_train,
        },
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
        for seed in range(options.seeds):
            record, interrupted = _train_and_measure(spec, seed, recipe, splits, out_dir, options)
            if interrupted:
                finish_distributed()
                return None  # stopped on purpose (--stop-after-epochs); --resume continues
            if record is not None:
                runs.append(record)
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    results = {"task": TASK, "dataset": dataset_name, "config": config, "runs": runs}
    if is_main:
        report.write_report(out_dir, results)
    return results if is_main else None


def _train_and_measure(
    spec: LossSpec, seed: int, recipe: Recipe, splits, out_dir: Path, options: ImageOptions
) -> tuple[dict | None, bool]:
    """Train one (loss, seed) run, measure it, and save its record; reuse it under --resume.

    Returns:
        ``(record, interrupted)``; ``record`` is ``None`` on ranks other than 0.
    """
    slug = report.run_slug(spec.name, seed)
    record_path = out_dir / "runs" / f"{slug}.json"
    checkpoint_path = out_dir / "checkpoints" / f"{slug}.pt"
    if options.resume and record_path.is_file():
        return json.loads(record_path.read_text(encoding="utf-8")), False

    train_config = replace(recipe.train, seed=seed, lr=lr_for(spec, recipe))
    set_seed(seed, train_config.deterministic)
    model = build_model(recipe.model, splits.input_shape, splits.num_classes)
    criterion = build_criterion(spec)
    outcome = train(
        model,
        criterion,
        splits,
        train_config,
        bonus_schedule=build_bonus_schedule(spec),
        checkpoint_path=checkpoint_path,
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=options.progress,
        description=f"{spec.name} seed {seed}",
    )
    if outcome.interrupted or rank() != 0:
        return None, outcome.interrupted

    metrics: dict = outcome.outcome_metrics()
    reliability = None
    if not outcome.diverged:
        metrics.update(_measure(model, splits, recipe, out_dir, spec.name, seed, train_config))
        reliability = metrics.pop("_reliability")
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
        "reliability": reliability,
        "train_seconds": outcome.train_seconds,
    }
    report.atomic_write_json(record_path, record)
    if checkpoint_path.is_file():
        checkpoint_path.unlink()  # the record now holds everything; checkpoints can be large
    return record, False


def _measure(model, splits, recipe: Recipe, out_dir: Path, loss: str, seed: int, config) -> dict:
    """Diagnostics of a trained (non-diverged) model on train and test."""
    device = next(model.parameters()).device
    batch = config.eval_batch_size
    n_diag = min(recipe.diagnostics_train, len(splits.train_y))
    train_x, train_y = splits.train_x[:n_diag], splits.train_y[:n_diag]
    train_features, train_logits = diagnostics.extract_features(model, train_x, batch, device)
    test_features, test_logits = diagnostics.extract_features(model, splits.test_x, batch, device)
    test = diagnostics.logit_diagnostics(test_logits, splits.test_y)
    metrics = {
        "test_accuracy": test.pop("accuracy"),
        "test_nll": test.pop("nll"),
        **test,
        **diagnostics.logit_diagnostics(train_logits, train_y, prefix="train_"),
        "probe_accuracy": diagnostics.linear_probe_accuracy(
            train_features, train_y, test_features, splits.test_y, seed=seed
        ),
        "crt_accuracy": diagnostics.classifier_retraining_accuracy(
            train_features, train_y, test_features, splits.test_y, seed=seed
        ),
    }
    metrics["_reliability"] = diagnostics.calibration(test_logits, splits.test_y)[1]
    energy_true, energy_free = diagnostics.energies(test_logits, splits.test_y)
    report.save_arrays(
        out_dir,
        loss,
        seed,
        margin=diagnostics.margins(test_logits, splits.test_y).numpy(),
        energy=energy_free.numpy(),
        energy_true=energy_true.numpy(),
    )
    return metrics


def describe_presets() -> str:
    """Human-readable summary of every preset's recipes and learning rates (for ``--help``)."""
    lines = []
    for name, recipes in PRESETS.items():
        for dataset, r in recipes.items():
            t = r.train
            lines.append(
                f"{name}/{dataset}: {r.model}, train {r.max_train or 'all'}, test "
                f"{r.max_test or 'all'}, {t.epochs} epochs, batch {t.batch_size}, {t.optimizer} "
                f"lr {t.lr:g} ({t.schedule})"
                + "".join(f", {loss} lr {lr:g}" for loss, lr in r.lr_by_loss.items())
            )
    lines.append(
        "Every loss uses its recipe's lr unless listed: one rate keeps the comparison paired; "
        "el:log_end=1 (unbounded bonus) may diverge at it, which is reported as a result. "
        "--lr and --clip-grad-norm change it for all losses."
    )
    return "\n".join(lines)
