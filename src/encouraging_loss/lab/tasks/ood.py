"""Out-of-distribution detection: train on MNIST, tell its test images from other idx sets.

Reads top-down: presets → data (in-distribution splits, out-of-distribution test sets) → for
each loss and seed: model → train → scores (MSP, max logit, energy, optional ODIN) → metrics
(scikit-learn AUROC, AUPR-in, AUPR-out, FPR at 95% TPR) → report.

Every score is "higher = more in-distribution"; in-distribution is the positive class for
AUROC, AUPR-in and FPR95 (the share of OOD images above the threshold that keeps 95% of the
in-distribution test images), OOD is positive for AUPR-out (scored by the negated score).
Metrics are named ``ood/<set>/<score>/<metric>``, e.g. ``ood/fashion-mnist/energy/auroc``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import data as lab_data
from .. import diagnostics, report, runs
from ..losses import build_bonus_schedule, build_criterion, parse_loss_list
from ..models import build_model
from ..trainer import TrainConfig, finish_distributed, rank, resolve_device, set_seed, train

TASK = "ood"
SCORES = ("msp", "max_logit", "energy", "odin")
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


# --- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one preset trains the in-distribution classifier and scores OOD sets.

    Attributes:
        dataset: in-distribution dataset.
        ood_sets: out-of-distribution sets (dataset names or folders of idx files).
        scores: scores to evaluate, from :data:`SCORES`.
        model: ``mlp``, ``cnn`` or ``resnet18``.
        max_train: in-distribution training images (validation included); ``None`` = all.
        max_test: in-distribution test images and images per OOD set; ``None`` = all.
        odin_temperature: ODIN's softmax temperature.
        odin_epsilon: ODIN's input-perturbation size (in standardised input units).
        train: optimiser/schedule settings.
        val_fraction: share of the training images held out for model selection.
        threads: CPU threads (``None`` = torch's default).
    """

    dataset: str
    ood_sets: tuple[str, ...]
    scores: tuple[str, ...]
    model: str
    max_train: int | None
    max_test: int | None
    train: TrainConfig
    odin_temperature: float = 1000.0
    odin_epsilon: float = 0.0014
    val_fraction: float = 0.1
    threads: int | None = 1


PRESETS: dict[str, Recipe] = {
    "quick": Recipe(
        dataset="mnist",
        ood_sets=("fashion-mnist", "notmnist"),
        scores=("msp", "max_logit", "energy"),
        model="mlp",
        max_train=None,  # the 10,000 MNIST training images staged offline
        max_test=2000,
        train=TrainConfig(
            epochs=5, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine"
        ),
    ),
    "standard": Recipe(
        dataset="mnist",
        ood_sets=("fashion-mnist", "notmnist"),
        scores=("msp", "max_logit", "energy", "odin"),
        model="mlp",
        max_train=None,
        max_test=None,
        train=TrainConfig(
            epochs=10,
            batch_size=128,
            optimizer="sgd",
            lr=0.05,
            weight_decay=5e-4,
            schedule="cosine",
        ),
    ),
    "full": Recipe(
        dataset="mnist",
        ood_sets=("fashion-mnist", "notmnist"),
        scores=("msp", "max_logit", "energy", "odin"),
        model="cnn",
        max_train=None,
        max_test=None,
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
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this task's options to the ``run`` parser."""
    group = parser.add_argument_group("ood task", "in-distribution --dataset (default mnist)")
    group.add_argument(
        "--ood-sets",
        metavar="SETS",
        help="comma-separated OOD test sets: dataset names under --data-root (fashion-mnist, "
        "notmnist, mnist) or folders holding t10k idx files. Default fashion-mnist,notmnist",
    )
    group.add_argument(
        "--ood-scores",
        metavar="SCORES",
        help=f"comma-separated scores from {', '.join(SCORES)}. Default msp,max_logit,energy "
        "(quick) or all four",
    )


# --- data ------------------------------------------------------------------------------------
def load_ood_set(name: str, data_root, max_test: int | None, seed: int = 0):
    """Test images of one OOD set, as uint8 images.

    Args:
        name: an idx dataset name under the data root, or a folder holding
            ``t10k-images-idx3-ubyte[.gz]``.
        data_root: the data root.
        max_test: keep a seeded random subset of this many images (``None`` = all).
        seed: seed of the subset.

    Returns:
        ``(label, images)``: the name used in metric names and ``(N, H, W)`` uint8 images.

    Raises:
        ValueError: naming ``ood_sets`` for an unknown name or a non-idx dataset.
    """
    if name in lab_data.IDX_DATASETS:
        folder = lab_data.find_dataset(name, data_root)
        label = name
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        label = folder.name
    else:
        raise ValueError(
            f"ood_sets: {name!r} is neither an idx dataset ({', '.join(lab_data.IDX_DATASETS)}) "
            "nor a folder of idx files"
        )
    images = np.array(lab_data.load_idx_dataset(label, folder).test_images)  # a writable copy
    if max_test is not None and max_test < len(images):
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_test])
        images = images[keep]
    return label, images


# --- scores and metrics ----------------------------------------------------------------------
def scores_from_logits(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """MSP, maximum logit and negative energy (logsumexp) of each row; higher = more ID.

    Args:
        logits: ``(N, C)`` logits.

    Returns:
        ``{"msp", "max_logit", "energy"}`` float64 arrays.
    """
    logits = logits.double()
    return {
        "msp": logits.softmax(1).max(1).values.numpy(),
        "max_logit": logits.max(1).values.numpy(),
        "energy": torch.logsumexp(logits, 1).numpy(),
    }


def odin_scores(
    model: nn.Module,
    x: torch.Tensor,
    temperature: float,
    epsilon: float,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """ODIN (Liang et al. 2018): MSP at temperature T after a small input step towards it.

    Args:
        model: the classifier.
        x: inputs (standardised as the model expects).
        temperature: softmax temperature, positive.
        epsilon: size of the input step (sign of the gradient), non-negative.
        batch_size: batch size.
        device: where to run.

    Returns:
        ``(N,)`` scores, higher = more in-distribution.
    """
    if not temperature > 0 or epsilon < 0:
        raise ValueError(f"temperature/epsilon: need T > 0 and ε ≥ 0, got {temperature}/{epsilon}")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).requires_grad_(True)
        logits = model(xb).float() / temperature
        loss = nn.functional.cross_entropy(logits, logits.argmax(1))
        (grad,) = torch.autograd.grad(loss, xb)
        with torch.no_grad():
            shifted = model((xb - epsilon * grad.sign()).detach()).float() / temperature
            out.append(shifted.softmax(1).max(1).values.double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR, from scikit-learn.

    Args:
        id_scores: scores of in-distribution images (the positives), higher = more ID.
        ood_scores: scores of OOD images.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}``.

    Raises:
        ValueError: if either array is empty or not finite.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError("id_scores/ood_scores: both must be non-empty")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("id_scores/ood_scores: scores must be finite")
    labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(labels, scores)),
        "aupr_out": float(average_precision_score(1 - labels, -scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


# --- task ------------------------------------------------------------------------------------
def resolve_recipe(options: runs.TaskOptions) -> Recipe:
    """The preset's recipe with command-line overrides applied.

    Raises:
        ValueError: naming a bad option.
    """
    runs.check_common(options, PRESETS)
    recipe = PRESETS[options.preset]
    ood_sets = recipe.ood_sets
    if options.get("ood_sets"):
        ood_sets = tuple(s.strip() for s in options.get("ood_sets").split(",") if s.strip())
        if not ood_sets:
            raise ValueError("ood_sets: name at least one set")
    scores = recipe.scores
    if options.get("ood_scores"):
        scores = tuple(s.strip() for s in options.get("ood_scores").split(",") if s.strip())
        unknown = [s for s in scores if s not in SCORES]
        if unknown or not scores:
            raise ValueError(f"ood_scores: unknown {unknown}; known: {', '.join(SCORES)}")
    dataset = options.dataset or recipe.dataset
    if dataset == "cifar10":
        raise ValueError("dataset: the OOD task needs a 28x28 idx set (mnist or fashion-mnist)")
    return replace(
        recipe,
        dataset=dataset,
        ood_sets=ood_sets,
        scores=scores,
        model=options.model or recipe.model,
        max_train=options.train_size if options.train_size is not None else recipe.max_train,
        max_test=options.test_size if options.test_size is not None else recipe.max_test,
        train=runs.override_train(recipe.train, options),
    )


def output_dir(options: runs.TaskOptions) -> Path:
    """``--out`` or ``runs/ood-<preset>``."""
    return Path(options.out or f"runs/{TASK}-{options.preset}")


def run_from_args(args: argparse.Namespace) -> tuple[dict | None, Path]:
    """Entry point of ``encouraging-loss run ood`` (see :func:`run_ood`)."""
    options = runs.TaskOptions.from_args(args)
    return run_ood(options), output_dir(options)


def run_ood(options: runs.TaskOptions) -> dict | None:
    """Train every loss and seed on the in-distribution set, score OOD sets, write the report.

    Args:
        options: parsed options.

    Returns:
        The results (``None`` on ranks other than 0 or after ``--stop-after-epochs``).

    Raises:
        ValueError: for bad options, loss names or OOD sets.
        lab_data.DatasetNotFoundError: if a dataset is missing.
    """
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses)
    recipe = resolve_recipe(options)
    out_dir = output_dir(options)
    runs.apply_threads(recipe.threads, options)
    started = time.perf_counter()

    # --- data ----------------------------------------------------------------------------
    dataset = lab_data.load_dataset(
        recipe.dataset, options.data_root, max_train=recipe.max_train, max_test=recipe.max_test
    )
    splits = lab_data.make_splits(dataset, val_fraction=recipe.val_fraction)
    ood_x: dict[str, torch.Tensor] = {}
    for name in recipe.ood_sets:
        label, images = load_ood_set(name, options.data_root, recipe.max_test)
        x = lab_data.to_tensor(images)
        if tuple(x.shape[1:]) != splits.input_shape:
            raise ValueError(
                f"ood_sets: {name!r} images are {tuple(x.shape[1:])}, the in-distribution "
                f"set's are {splits.input_shape}"
            )
        ood_x[label] = (x - splits.mean) / splits.std  # the in-distribution standardisation
    config = runs.base_config(
        options,
        recipe.model,
        recipe.train,
        {
            "source": str(dataset.source),
            "n_train": len(splits.train_y),
            "n_val": len(splits.val_y),
            "n_test": len(splits.test_y),
            "ood_sets": {name: len(x) for name, x in ood_x.items()},
        },
    )
    config.update(
        losses=[s.name for s in specs],
        scores=list(recipe.scores),
        odin={"temperature": recipe.odin_temperature, "epsilon": recipe.odin_epsilon},
        lr_by_loss={s.name: recipe.train.lr for s in specs},
    )
    if rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- one training run per loss and seed ----------------------------------------------
    records = []
    for spec in specs:
        for seed in range(options.seeds):
            record = runs.load_record(out_dir, spec.name, seed, options.resume)
            if record is None:
                record = _train_and_measure(spec, seed, recipe, splits, ood_x, out_dir, options)
                if record == "interrupted":
                    finish_distributed()
                    return None
            if record is not None:
                records.append(record)
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    results = {
        "task": TASK,
        "dataset": recipe.dataset,
        "config": config,
        "runs": records,
        "report": _report_spec([s.name for s in specs], recipe, list(ood_x)),
    }
    if rank() == 0:
        report.write_report(out_dir, results)
    return results if rank() == 0 else None


def _train_and_measure(spec, seed, recipe, splits, ood_x, out_dir, options):
    """Train one (loss, seed) run and score it; ``"interrupted"`` after a deliberate stop."""
    train_config = replace(recipe.train, seed=seed)
    set_seed(seed, train_config.deterministic)
    model = build_model(recipe.model, splits.input_shape, splits.num_classes)
    outcome = train(
        model,
        build_criterion(spec),
        splits,
        train_config,
        bonus_schedule=build_bonus_schedule(spec),
        checkpoint_path=runs.checkpoint_path(out_dir, spec.name, seed),
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=options.progress,
        description=f"{spec.name} seed {seed}",
    )
    if outcome.interrupted:
        return "interrupted"
    if rank() != 0:
        return None
    metrics: dict = {
        "diverged": outcome.diverged,
        "best_epoch": outcome.best_epoch,
        "val_accuracy": outcome.best_val_accuracy,
    }
    if not outcome.diverged:
        metrics.update(_measure(model, splits, ood_x, recipe, train_config))
    record = {
        "loss": spec.name,
        "seed": seed,
        "status": "diverged" if outcome.diverged else "ok",
        "lr": train_config.lr,
        "metrics": metrics,
        "history": outcome.history,
        "train_seconds": outcome.train_seconds,
    }
    runs.save_record(out_dir, record)
    return record


def _all_scores(model, x, recipe, config, device) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Every requested score of ``x`` and its logits."""
    _, logits = diagnostics.extract_features(model, x, config.eval_batch_size, device)
    scores = scores_from_logits(logits)
    if "odin" in recipe.scores:
        scores["odin"] = odin_scores(
            model, x, recipe.odin_temperature, recipe.odin_epsilon, config.eval_batch_size, device
        )
    return {name: scores[name] for name in recipe.scores}, logits


def _measure(model, splits, ood_x, recipe, config) -> dict:
    """Test accuracy and energy of the in-distribution set, then every OOD metric."""
    device = resolve_device(config.device)
    id_scores, id_logits = _all_scores(model, splits.test_x, recipe, config, device)
    test = diagnostics.logit_diagnostics(id_logits, splits.test_y)
    metrics = {
        "test_accuracy": test["accuracy"],
        "margin_mean": test["margin_mean"],
        "energy_mean": test["energy_mean"],
    }
    for name, x in ood_x.items():
        scores, logits = _all_scores(model, x, recipe, config, device)
        metrics[f"ood/{name}/energy_mean"] = (-torch.logsumexp(logits.double(), 1)).mean().item()
        for score in recipe.scores:
            for metric, value in ood_metrics(id_scores[score], scores[score]).items():
                metrics[f"ood/{name}/{score}/{metric}"] = value
    return metrics


def _report_spec(losses: list[str], recipe: Recipe, sets: list[str]) -> dict:
    """Table, comparisons and the paper's direction for the report."""
    table = [["test_accuracy", "test acc", True]]
    for name in sets:
        for score in recipe.scores:
            table.append([f"ood/{name}/{score}/auroc", f"{name} {score} AUROC", True])
        table.append(
            [f"ood/{name}/{recipe.scores[0]}/fpr95", f"{name} {recipe.scores[0]} FPR95", False]
        )
    claims = []
    key_score = "energy" if "energy" in recipe.scores else recipe.scores[0]
    for name in sets:
        claims.append(
            [
                f"OOD detection better ({name})",
                f"ood/{name}/{key_score}/auroc",
                +1,
                f"{key_score} AUROC against {name} is higher",
            ]
        )
    return {
        "title": f"ood: {recipe.dataset} against {', '.join(sets)}",
        "table": table,
        "claims": claims,
        "comparisons": [[loss, "ce"] for loss in losses if loss != "ce"],
        "claim_pairs": [[loss, "ce"] for loss in losses if loss.startswith(("el", "ls-el"))],
        "notes": [
            "Mean ± std over seeds. Scores (higher = in-distribution): msp = max softmax "
            "probability, max_logit, energy = logsumexp(z), odin = MSP at T="
            f"{recipe.odin_temperature:g} after an input step ε={recipe.odin_epsilon:g}. "
            "AUROC / AUPR-in treat in-distribution test images as positives; FPR95 = share of "
            "OOD images scored above the threshold keeping 95% of in-distribution images "
            "(lower is better). All metrics per set and score are in results.csv as "
            "ood/<set>/<score>/{auroc,aupr_in,aupr_out,fpr95}.",
            "The paper's argument: EL lowers the energy of in-distribution examples, so the "
            f"energy score should separate them better; the direction line tests {key_score} "
            "AUROC.",
        ],
        "plots": [["accuracy curves", "accuracy_curves.png"]],
        "curves": [],
    }
