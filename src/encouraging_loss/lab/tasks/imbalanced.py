"""Imbalanced (long-tailed) classification: CE, re-weighting, DRW, focal, LDAM, logit adjustment
and encouraging-loss variants on a long-tailed view of an image dataset.

Reads top-down: presets → data (long-tailed train view, balanced validation and test) → for
each loss and seed: criterion → model → train (with deferred re-weighting) → diagnostics
(balanced accuracy, many/medium/few accuracy, cRT) → report.

Loss names (``--losses``), besides the lab's ``ce``, ``el:...``, ``focal:...``:

- ``cb-ce[:beta]``: CE with class-balanced weights from the effective number
  (Cui et al. 2019), ``w_c ∝ (1 − β) / (1 − β^{n_c})``, β = 0.9999, normalised to mean 1.
- ``FAMILY-drw[:...]`` for ``ce``, ``el``, ``focal``, ``ldam``: deferred re-weighting (Cao et
  al. 2019): unweighted until ``--drw-start`` of training (default 0.8), class-balanced
  weights (β = 0.9999) after.
- ``ldam[:max_margin=0.5,s=1]``: LDAM, CE on ``s (z − Δ_y e_y)`` with ``Δ_c ∝ n_c^{−1/4}`` and
  ``max Δ = max_margin``. The lab's models have a plain linear head (no cosine classifier), so
  the default scale is ``s = 1``.
- ``la[:tau=1]``: logit-adjusted loss (Menon et al. 2021), CE on ``z + τ log π``; prediction
  uses the plain logits.
- ``el:bonus_weight=balanced``: the class-weighted bonus — per-class bonus weights equal to the
  class-balanced weights above (mean 1), so tail classes get a larger bonus;
  ``el:bonus_start=0.5`` gives the bonus only where ``p_y > 0.5``. Both combine with ``el-drw``.

Many/medium/few: the CIFAR-100-LT / ImageNet-LT convention (many > 100, few < 20 training
images with 500 in the largest class) scaled to the largest class ``n_max``: a class is *many*
when ``n_c > n_max / 5``, *few* when ``n_c < n_max / 25``, else *medium*. For exponential
profiles with ratio 100 this puts 4 / 3 / 3 of 10 classes in many / medium / few.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encouraging_loss import EncouragingLoss

from .. import data as lab_data
from .. import diagnostics, report, runs
from ..losses import _FAMILIES as BASE_FAMILIES
from ..losses import LossSpec, build_criterion, parse_loss_list
from ..models import build_model
from ..trainer import TrainConfig, finish_distributed, rank, resolve_device, set_seed, train

TASK = "imbalanced"
PROFILES = ("exp", "step")
DRW_FAMILIES = ("ce", "el", "focal", "ldam")
# family -> (main parameter, {parameter: type}, defaults), as in lab.losses.
EXTRA_FAMILIES: dict[str, tuple[str, dict[str, type], dict[str, object]]] = {
    "cb-ce": ("beta", {"beta": float}, {"beta": 0.9999}),
    "ldam": ("max_margin", {"max_margin": float, "s": float}, {"max_margin": 0.5, "s": 1.0}),
    "la": ("tau", {"tau": float}, {"tau": 1.0}),
    "el": (
        BASE_FAMILIES["el"][0],
        {**BASE_FAMILIES["el"][1], "bonus_weight": str},
        dict(BASE_FAMILIES["el"][2]),
    ),
}
for _family in DRW_FAMILIES:
    EXTRA_FAMILIES[f"{_family}-drw"] = EXTRA_FAMILIES.get(_family) or BASE_FAMILIES[_family]
BONUS_WEIGHTS = ("none", "balanced")
SUGGESTED_LOSSES = (
    "ce,cb-ce,ce-drw,focal,ldam-drw,la,el,el:bonus_weight=balanced,el:bonus_start=0.5,el-drw"
)


# --- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one preset builds the long-tailed data and trains.

    Attributes:
        dataset: source dataset name.
        model: ``mlp``, ``cnn`` or ``resnet18``.
        n_max: training images of the largest class.
        imbalance_ratio: ``n_max / n_min``.
        profile: ``exp`` (exponential decay over classes) or ``step`` (half the classes get
            ``n_max``, half ``n_max / ratio``).
        val_per_class: balanced validation images per class, drawn from training images left
            out of the long-tailed view (used for model selection only).
        test_per_class: balanced test images per class; ``None`` = the whole test split.
        drw_start: fraction of training after which ``*-drw`` losses switch on class weights.
        train: optimiser/schedule settings.
        diagnostics_train: training images used for cRT features (the first of the LT view).
        threads: CPU threads (``None`` = torch's default).
    """

    dataset: str
    model: str
    n_max: int
    imbalance_ratio: float
    profile: str
    val_per_class: int
    test_per_class: int | None
    drw_start: float
    train: TrainConfig
    diagnostics_train: int = 20000
    threads: int | None = 1


PRESETS: dict[str, Recipe] = {
    # Long-tailed Fashion-MNIST, 2,480 training images: seconds per run on one CPU thread.
    "quick": Recipe(
        dataset="fashion-mnist",
        model="mlp",
        n_max=1000,
        imbalance_ratio=100.0,
        profile="exp",
        val_per_class=50,
        test_per_class=300,
        drw_start=0.8,
        train=TrainConfig(
            epochs=10, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine"
        ),
    ),
    # Five times the quick view (12,403 images), the whole balanced test set; still the MLP.
    "standard": Recipe(
        dataset="fashion-mnist",
        model="mlp",
        n_max=5000,
        imbalance_ratio=100.0,
        profile="exp",
        val_per_class=100,
        test_per_class=None,
        drw_start=0.8,
        train=TrainConfig(
            epochs=15,
            batch_size=128,
            optimizer="sgd",
            lr=0.05,
            weight_decay=5e-4,
            schedule="cosine",
        ),
    ),
    # CIFAR-10-LT (Cao et al. 2019's recipe): 200 epochs, step decay at 160 and 180, DRW at 160.
    # Run it with --imbalance-ratio 100, 50 and 10.
    "full": Recipe(
        dataset="cifar10",
        model="resnet18",
        n_max=5000,
        imbalance_ratio=100.0,
        profile="exp",
        # Class 0 keeps all its 5,000 training images, so none are left for validation:
        # 0 holds out a balanced 10% of the test split for model selection instead.
        val_per_class=0,
        test_per_class=None,
        drw_start=0.8,
        threads=None,
        train=TrainConfig(
            epochs=200,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            weight_decay=2e-4,
            schedule="multistep",
            milestones=(0.8, 0.9),
            gamma=0.01,
            warmup_epochs=5,
            augment=True,
            device="auto",
        ),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this task's options to the ``run`` parser."""
    group = parser.add_argument_group(
        "imbalanced task",
        f"long-tailed data; losses e.g. {SUGGESTED_LOSSES}",
    )
    group.add_argument(
        "--imbalance-ratio",
        type=float,
        metavar="R",
        help="largest / smallest class size of the long-tailed view (default 100)",
    )
    group.add_argument("--profile", choices=PROFILES, help="long-tail profile (default exp)")
    group.add_argument("--n-max", type=int, metavar="N", help="images of the largest class")
    group.add_argument(
        "--drw-start",
        type=float,
        metavar="F",
        help="fraction of training after which *-drw losses re-weight (default 0.8)",
    )


# --- data ------------------------------------------------------------------------------------
def long_tail_counts(
    num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "exp"
) -> list[int]:
    """Per-class training counts of a long-tailed view.

    Args:
        num_classes: number of classes, at least 2.
        n_max: images of class 0 (the largest), at least 1.
        imbalance_ratio: ``n_max / n_min``, at least 1.
        profile: ``"exp"``: ``n_c = n_max · ratio^(−c/(C−1))``; ``"step"``: the first
            ``C // 2`` classes get ``n_max``, the rest ``n_max / ratio``.

    Returns:
        Counts (each at least 1), largest first.

    Raises:
        ValueError: naming an invalid argument.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes: must be at least 2, got {num_classes}")
    if n_max < 1:
        raise ValueError(f"n_max: must be at least 1, got {n_max}")
    if not (math.isfinite(imbalance_ratio) and imbalance_ratio >= 1):
        raise ValueError(f"imbalance_ratio: must be at least 1, got {imbalance_ratio}")
    if profile == "exp":
        counts = [n_max * imbalance_ratio ** (-c / (num_classes - 1)) for c in range(num_classes)]
    elif profile == "step":
        counts = [
            n_max if c < num_classes // 2 else n_max / imbalance_ratio for c in range(num_classes)
        ]
    else:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    return [max(1, int(n)) for n in counts]


def class_groups(counts: list[int]) -> dict[str, list[int]]:
    """Many / medium / few classes: ``n_c > n_max/5``, ``n_c < n_max/25``, the rest medium.

    Args:
        counts: per-class training counts.

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}`` class indices.
    """
    n_max = max(counts)
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        if n > n_max / 5:
            groups["many"].append(c)
        elif n < n_max / 25:
            groups["few"].append(c)
        else:
            groups["medium"].append(c)
    return groups


def _balanced_take(labels: np.ndarray, per_class: int | None, rng, exclude=None) -> np.ndarray:
    chosen = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude, assume_unique=True)
        pool = rng.permutation(pool)
        chosen.append(pool if per_class is None else pool[:per_class])
    return np.sort(np.concatenate(chosen))


def long_tailed_splits(data: lab_data.ImageDataset, recipe: Recipe, seed: int = 0):
    """Long-tailed training view, balanced validation (left-out train images), balanced test.

    Args:
        data: the full dataset.
        recipe: the resolved recipe (``n_max``, ``imbalance_ratio``, ``profile``...).
        seed: seed of which images are drawn (fixed so every loss and seed sees the same data).

    Returns:
        ``(splits, counts)``: standardised :class:`lab_data.Splits` and per-class train counts.

    Raises:
        ValueError: if a class has too few training images for the requested view.
    """
    labels = data.train_labels
    num_classes = len(data.classes)
    counts = long_tail_counts(num_classes, recipe.n_max, recipe.imbalance_ratio, recipe.profile)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c, n in enumerate(counts):
        pool = rng.permutation(np.flatnonzero(labels == c))
        if len(pool) < n + recipe.val_per_class:
            raise ValueError(
                f"n_max: class {c} of {data.name} has {len(pool)} training images, fewer than "
                f"{n} + {recipe.val_per_class} validation"
            )
        train_idx.append(pool[:n])
        val_idx.append(pool[n : n + recipe.val_per_class])
    train_idx = rng.permutation(np.concatenate(train_idx))
    val_idx = np.sort(np.concatenate(val_idx))
    test_idx = _balanced_take(data.test_labels, recipe.test_per_class, rng)
    if len(val_idx) == 0:
        # No training images to spare (full CIFAR-10 classes hold exactly 5,000): hold out a
        # balanced 10% of the test split for model selection and score on the rest.
        per_class = max(1, len(test_idx) // (10 * num_classes))
        val_idx_test = _balanced_take(data.test_labels[test_idx], per_class, rng)
        val_x_images = data.test_images[test_idx[val_idx_test]]
        val_y = data.test_labels[test_idx[val_idx_test]]
        test_idx = np.delete(test_idx, val_idx_test)
    else:
        val_x_images, val_y = data.train_images[val_idx], labels[val_idx]
    train_x = lab_data.to_tensor(data.train_images[train_idx])
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    splits = lab_data.Splits(
        train_x=(train_x - mean) / std,
        train_y=torch.from_numpy(labels[train_idx].astype(np.int64)),
        val_x=(lab_data.to_tensor(val_x_images) - mean) / std,
        val_y=torch.from_numpy(val_y.astype(np.int64)),
        test_x=(lab_data.to_tensor(data.test_images[test_idx]) - mean) / std,
        test_y=torch.from_numpy(data.test_labels[test_idx].astype(np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )
    return splits, counts


# --- losses ----------------------------------------------------------------------------------
def class_balanced_weights(counts: list[int], beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples (Cui et al. 2019).

    Args:
        counts: per-class training counts (each at least 1).
        beta: in ``[0, 1)``; ``w_c ∝ (1 − β) / (1 − β^{n_c})``.

    Returns:
        ``(C,)`` float32 weights with mean 1.

    Raises:
        ValueError: naming ``beta`` or ``counts`` when out of range.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta: must be in [0, 1), got {beta}")
    if not counts or min(counts) < 1:
        raise ValueError(f"counts: every class needs at least one image, got {counts}")
    n = torch.tensor(counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - beta**n)
    return (weights / weights.mean()).float()


class LDAMLoss(nn.Module):
    """LDAM (Cao et al. 2019): cross-entropy on ``s (z − Δ_y e_y)``, ``Δ_c ∝ n_c^{−1/4}``.

    Args:
        counts: per-class training counts.
        max_margin: the largest margin (of the rarest class), positive.
        s: logit scale, positive.
        weight: optional class weights (DRW replaces this buffer late in training).
    """

    def __init__(self, counts: list[int], max_margin: float = 0.5, s: float = 1.0, weight=None):
        super().__init__()
        if not max_margin > 0:
            raise ValueError(f"max_margin: must be positive, got {max_margin}")
        if not s > 0:
            raise ValueError(f"s: must be positive, got {s}")
        margins = torch.tensor(counts, dtype=torch.float64) ** -0.25
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("weight", weight)
        self.s = s

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LDAM loss of a batch."""
        shifted = (
            logits - nn.functional.one_hot(target, logits.shape[1]) * self.margins[target, None]
        )
        return nn.functional.cross_entropy(self.s * shifted, target, weight=self.weight)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on ``z + τ log π``.

    Args:
        counts: per-class training counts (give the prior ``π``).
        tau: temperature of the adjustment, non-negative.
    """

    def __init__(self, counts: list[int], tau: float = 1.0):
        super().__init__()
        if tau < 0:
            raise ValueError(f"tau: must be non-negative, got {tau}")
        prior = torch.tensor(counts, dtype=torch.float64)
        self.register_buffer("adjustment", (tau * torch.log(prior / prior.sum())).float())
        self.register_buffer("weight", None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean logit-adjusted loss of a batch."""
        return nn.functional.cross_entropy(logits + self.adjustment, target, weight=self.weight)


def build_imbalanced_criterion(spec: LossSpec, counts: list[int]) -> tuple[nn.Module, bool]:
    """Build the criterion of one loss name for these class counts.

    Args:
        spec: a parsed loss (families of :data:`EXTRA_FAMILIES` or the lab's own).
        counts: per-class training counts.

    Returns:
        ``(criterion, drw)``: ``drw`` says whether class weights switch on late in training.

    Raises:
        ValueError: for an unknown ``bonus_weight`` or parameters out of range.
    """
    family = spec.family.removesuffix("-drw")
    drw = spec.family.endswith("-drw")
    p = dict(spec.params)
    if family == "cb-ce":
        return nn.CrossEntropyLoss(weight=class_balanced_weights(counts, float(p["beta"]))), False
    if family == "ldam":
        return LDAMLoss(counts, float(p["max_margin"]), float(p["s"])), drw
    if family == "la":
        return LogitAdjustedLoss(counts, float(p["tau"])), drw
    if family == "el":
        bonus_weight = str(p.pop("bonus_weight", "none"))
        if bonus_weight not in BONUS_WEIGHTS:
            raise ValueError(
                f"bonus_weight: expected one of {BONUS_WEIGHTS} in {spec.name!r}, "
                f"got {bonus_weight!r}"
            )
        kwargs = {
            k: p[k]
            for k in ("log_end", "bonus_scale", "bonus", "bonus_start", "label_smoothing")
            if k in p
        }
        unsupported = set(p) - set(kwargs)
        if unsupported:
            raise ValueError(f"losses: {spec.name!r}: {sorted(unsupported)} not supported here")
        weights = class_balanced_weights(counts) if bonus_weight == "balanced" else None
        return EncouragingLoss(bonus_weight=weights, **kwargs), drw
    return build_criterion(LossSpec(spec.name, family, p)), drw


def drw_hook(criterion: nn.Module, counts: list[int], start: float, device: torch.device):
    """Progress hook of deferred re-weighting: no class weights before ``start``, CB after.

    A pure function of progress, so resumed runs switch at the same step.
    """
    weights = class_balanced_weights(counts).to(device)

    def hook(progress: float) -> None:
        criterion.weight = weights if progress >= start else None

    return hook


# --- task ------------------------------------------------------------------------------------
def resolve_recipe(options: runs.TaskOptions) -> Recipe:
    """The preset's recipe with command-line overrides applied.

    Raises:
        ValueError: naming a bad option.
    """
    runs.check_common(options, PRESETS)
    recipe = PRESETS[options.preset]
    ratio = options.get("imbalance_ratio", recipe.imbalance_ratio)
    n_max = options.get("n_max", recipe.n_max)
    drw_start = options.get("drw_start", recipe.drw_start)
    if not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"imbalance_ratio: must be at least 1, got {ratio}")
    if n_max < 1:
        raise ValueError(f"n_max: must be at least 1, got {n_max}")
    if not 0.0 <= drw_start <= 1.0:
        raise ValueError(f"drw_start: must be in [0, 1], got {drw_start}")
    test_per_class = recipe.test_per_class
    if options.test_size is not None:
        test_per_class = max(1, options.test_size // 10)
    return replace(
        recipe,
        dataset=options.dataset or recipe.dataset,
        model=options.model or recipe.model,
        imbalance_ratio=float(ratio),
        profile=options.get("profile", recipe.profile),
        n_max=int(n_max),
        drw_start=float(drw_start),
        test_per_class=test_per_class,
        train=runs.override_train(recipe.train, options),
    )


def run_from_args(args: argparse.Namespace) -> tuple[dict | None, Path]:
    """Entry point of ``encouraging-loss run imbalanced`` (see :func:`run_imbalanced`)."""
    options = runs.TaskOptions.from_args(args)
    return run_imbalanced(options), output_dir(options)


def output_dir(options: runs.TaskOptions) -> Path:
    """``--out`` or ``runs/imbalanced-<preset>``."""
    return Path(options.out or f"runs/{TASK}-{options.preset}")


def run_imbalanced(options: runs.TaskOptions) -> dict | None:
    """Train every loss and seed on the long-tailed view and write the report.

    Args:
        options: parsed options.

    Returns:
        The results (``None`` on ranks other than 0 or after ``--stop-after-epochs``).

    Raises:
        ValueError: for bad options or loss names.
        lab_data.DatasetNotFoundError: if the dataset is missing.
    """
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses, EXTRA_FAMILIES)
    recipe = resolve_recipe(options)
    out_dir = output_dir(options)
    runs.apply_threads(recipe.threads, options)
    started = time.perf_counter()

    # --- data ----------------------------------------------------------------------------
    dataset = lab_data.load_dataset(recipe.dataset, options.data_root)
    splits, counts = long_tailed_splits(dataset, recipe)
    if options.train_size is not None:  # a smaller view with the same profile, for tests
        keep = torch.arange(min(options.train_size, len(splits.train_y)))
        splits = replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])
        counts = torch.bincount(splits.train_y, minlength=splits.num_classes).clamp_min(1).tolist()
    groups = class_groups(counts)
    config = runs.base_config(
        options,
        recipe.model,
        recipe.train,
        {
            "source": str(dataset.source),
            "profile": recipe.profile,
            "imbalance_ratio": recipe.imbalance_ratio,
            "n_max": recipe.n_max,
            "train_counts": counts,
            "n_train": len(splits.train_y),
            "n_val": len(splits.val_y),
            "n_test": len(splits.test_y),
            "groups": groups,
            "group_rule": "many: n_c > n_max/5; few: n_c < n_max/25; medium: the rest",
        },
    )
    config.update(
        losses=[s.name for s in specs],
        drw_start=recipe.drw_start,
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
                record = _train_and_measure(spec, seed, recipe, splits, counts, out_dir, options)
                if record == "interrupted":
                    finish_distributed()
                    return None
            if record is not None:
                records.append(record)
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    names = [s.name for s in specs]
    results = {
        "task": TASK,
        "dataset": f"{recipe.dataset}-lt",
        "config": config,
        "runs": records,
        "report": _report_spec(names, recipe, groups),
    }
    if rank() == 0:
        report.write_report(out_dir, results)
    return results if rank() == 0 else None


def _train_and_measure(spec, seed, recipe, splits, counts, out_dir, options):
    """Train one (loss, seed) run and measure it; ``"interrupted"`` after a deliberate stop."""
    train_config = replace(recipe.train, seed=seed)
    set_seed(seed, train_config.deterministic)
    model = build_model(recipe.model, splits.input_shape, splits.num_classes)
    criterion, drw = build_imbalanced_criterion(spec, counts)
    device = resolve_device(train_config.device)
    criterion.to(device)  # class weights, margins and priors live next to the logits
    outcome = train(
        model,
        criterion,
        splits,
        train_config,
        progress_hook=drw_hook(criterion, counts, recipe.drw_start, device) if drw else None,
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
        metrics.update(_measure(model, splits, counts, recipe, train_config, out_dir, spec, seed))
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


def group_accuracies(predictions: torch.Tensor, labels: torch.Tensor, groups: dict) -> dict:
    """Accuracy over all test images and over the classes of each group.

    Args:
        predictions: ``(N,)`` predicted classes.
        labels: ``(N,)`` true classes.
        groups: output of :func:`class_groups`.

    Returns:
        ``test_accuracy`` and ``{many,medium,few}_accuracy`` (``None`` for an empty group).
    """
    correct = (predictions == labels).float()
    out = {"test_accuracy": correct.mean().item()}
    for name, classes in groups.items():
        mask = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
        out[f"{name}_accuracy"] = correct[mask].mean().item() if mask.any() else None
    return out


def _measure(model, splits, counts, recipe, config, out_dir, spec, seed) -> dict:
    """Balanced test accuracy, per-group accuracy, per-class accuracy, cRT, margins."""
    device = next(model.parameters()).device
    groups = class_groups(counts)
    n_diag = min(recipe.diagnostics_train, len(splits.train_y))
    train_features, _ = diagnostics.extract_features(
        model, splits.train_x[:n_diag], config.eval_batch_size, device
    )
    test_features, test_logits = diagnostics.extract_features(
        model, splits.test_x, config.eval_batch_size, device
    )
    predictions = test_logits.argmax(1)
    metrics = group_accuracies(predictions, splits.test_y, groups)
    for c in range(splits.num_classes):
        mask = splits.test_y == c
        metrics[f"class_accuracy/{c}"] = (predictions[mask] == c).float().mean().item()
    test = diagnostics.logit_diagnostics(test_logits, splits.test_y)
    metrics.update(
        test_nll=test["nll"],
        margin_mean=test["margin_mean"],
        energy_mean=test["energy_mean"],
        ece=test["ece"],
        crt_accuracy=diagnostics.classifier_retraining_accuracy(
            train_features, splits.train_y[:n_diag], test_features, splits.test_y, seed=seed
        ),
    )
    energy_true, energy_free = diagnostics.energies(test_logits, splits.test_y)
    report.save_arrays(
        out_dir,
        spec.name,
        seed,
        margin=diagnostics.margins(test_logits, splits.test_y).numpy(),
        energy=energy_free.numpy(),
        energy_true=energy_true.numpy(),
    )
    return metrics


def _report_spec(losses: list[str], recipe: Recipe, groups: dict) -> dict:
    """Table, comparisons and the paper's direction for the report."""
    comparisons = [[loss, "ce"] for loss in losses if loss != "ce"]
    el_losses = [loss for loss in losses if loss.startswith("el")]
    claim_pairs = [[loss, "ce"] for loss in el_losses]
    if "ce-drw" in losses:
        claim_pairs += [[loss, "ce-drw"] for loss in el_losses if loss.startswith("el-drw")]
        comparisons += [[loss, "ce-drw"] for loss in el_losses if loss.startswith("el-drw")]
    sizes = {name: len(classes) for name, classes in groups.items()}
    return {
        "title": f"imbalanced: long-tailed {recipe.dataset} ({recipe.profile}, ratio "
        f"{recipe.imbalance_ratio:g}, largest class {recipe.n_max})",
        "table": [
            ["test_accuracy", "test acc", True],
            ["many_accuracy", "many", True],
            ["medium_accuracy", "medium", True],
            ["few_accuracy", "few", True],
            ["crt_accuracy", "cRT acc", True],
            ["margin_mean", "margin", True],
            ["ece", "ECE", False],
        ],
        "claims": [
            ["accuracy higher", "test_accuracy", +1, "balanced test accuracy is higher"],
            ["tail accuracy higher", "few_accuracy", +1, "few-class test accuracy is higher"],
        ],
        "comparisons": comparisons,
        "claim_pairs": claim_pairs,
        "notes": [
            "Mean ± std over seeds (balanced test set; model selected on a balanced validation "
            "set cut from training images outside the long-tailed view). Groups by training "
            f"images: many n_c > n_max/5 ({sizes['many']} classes), few n_c < n_max/25 "
            f"({sizes['few']} classes), medium the rest ({sizes['medium']} classes). cRT = "
            "last layer re-trained with class-balanced sampling on frozen features. "
            "*-drw losses switch on class-balanced weights (β = 0.9999) at "
            f"{recipe.drw_start:g} of training."
        ],
        "plots": [
            ["accuracy curves", "accuracy_curves.png"],
            ["margin histogram", "margin_hist.png"],
        ],
        "curves": [],
    }
