"""Imbalanced (long-tailed) classification: CE, re-weighting, DRW, focal, LDAM, logit adjustment
and encouraging-loss variants on a long-tailed view of an image dataset.

Reads top-down: presets → data (long-tailed train view, balanced validation and test) → losses
→ one (loss, seed) run: train (deferred re-weighting) → balanced, group and cRT accuracy → report.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .. import data as lab_data
from .. import diagnostics, io, losses
from ..experiment import Options, Prepared
from ..losses import FAMILIES, Family, LossSpec
from ..trainer import TrainConfig, resolve_device
from . import ClassificationTask, PaperRow, PaperSetting, apply_options, split_sizes

PROFILES = ("exp", "step")
DRW_FAMILIES = ("ce", "el", "focal", "ldam")
SUGGESTED_LOSSES = "ce,cb-ce,ce-drw,focal,ldam-drw,la,el,el:bonus_weight=balanced,el-drw"


# --- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one preset builds the long-tailed data and trains (options resolved into it).

    Attributes:
        n_max, imbalance_ratio, profile: see :func:`long_tail_counts`.
        val_per_class, test_per_class: balanced validation images per class (training images
            left out of the long-tailed view), balanced test images (``None``: all).
        train, dataset, model: how it trains (``mlp``, ``cnn`` or ``resnet18``), on what.
        drw_start: fraction of training after which ``*-drw`` losses switch on class weights.
        diagnostics_train: training images used for cRT features (the first of the LT view).
        threads: CPU threads (``None`` = torch's default).
    """

    n_max: int
    val_per_class: int
    test_per_class: int | None
    train: TrainConfig
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    imbalance_ratio: float = 100.0
    profile: str = "exp"
    drw_start: float = 0.8
    diagnostics_train: int = 20000
    threads: int | None = 1


# Cao et al.'s schedule: 5 warm-up epochs, the lr times 0.01 at 80% and again at 90% of training.
_STEPS = {"schedule": "multistep", "milestones": (0.8, 0.9), "gamma": 0.01, "warmup_epochs": 5}
PRESETS: dict[str, Recipe] = {
    # Long-tailed Fashion-MNIST, 2,480 training images: seconds per run on one CPU thread.
    "quick": Recipe(1000, val_per_class=50, test_per_class=300, train=TrainConfig(10, 64)),
    # Five times the quick view (12,403 images), the whole balanced test set; still the MLP.
    "standard": Recipe(5000, val_per_class=100, test_per_class=None, train=TrainConfig(15)),
    # CIFAR-10-LT (Cao et al. 2019's recipe), DRW at epoch 160; run it at ratios 100, 50 and 10.
    "full": Recipe(
        5000,
        # Class 0 keeps all its 5,000 training images, so none are left for validation:
        # 0 holds out a balanced 10% of the test split for model selection instead.
        val_per_class=0,
        test_per_class=None,
        dataset="cifar10",
        model="resnet18",
        threads=None,
        train=TrainConfig(200, lr=0.1, weight_decay=2e-4, augment=True, device="auto", **_STEPS),
    ),
    # The paper's long-tailed setting (iNaturalist 2018, not available offline) on CPU: the
    # standard view (12,403 images, ratio 100) trained twice as long; see ImbalancedTask.paper.
    "paper": Recipe(5000, val_per_class=100, test_per_class=None, train=TrainConfig(30)),
}


# The paper's comparisons: EL, its class-weighted bonus and DRW with the bonus against CE.
PAPER_LOSSES = "ce,el,el:bonus_weight=balanced,ce-drw,el-drw"
_PAPER_QUICK = {"preset": "paper", "seeds": 2, "epochs": 1, "train_size": 300, "test_size": 100}
_PAPER_NOTE = (
    "The balanced test set makes test accuracy the balanced accuracy; cRT re-trains the last "
    "layer on frozen features with class-balanced sampling (10 epochs, plain CE)."
)
_BALANCED_ROW = PaperRow("balanced test accuracy (%)", "test_accuracy", direction=+1)
_DECOUPLING_ROWS = (  # DRW with the bonus, and cRT: the paper's "decoupling" argument
    PaperRow(
        "DRW with the bonus vs DRW: balanced test accuracy (%)",
        "test_accuracy",
        baseline="ce-drw",
        treatment="el-drw",
        direction=+1,
    ),
    PaperRow(
        "cRT on the learned features (decoupling): balanced test accuracy (%)",
        "crt_accuracy",
        direction=+1,
    ),
)
PAPER_SETTINGS = (
    PaperSetting(
        "Long-tailed Fashion-MNIST (ratio 100), MLP (paper: iNaturalist 2018, ResNet-50)",
        PAPER_LOSSES,
        {
            "quick": _PAPER_QUICK,
            "cpu": {"preset": "paper", "seeds": 5},
            # A GPU's run: the small CNN, twice as long (torch's threads).
            "gpu": {"preset": "paper", "seeds": 5, "epochs": 60, "model": "cnn"}
            | {"device": "auto", "threads": 0},
        },
        (
            _BALANCED_ROW,
            PaperRow("few-class (tail) test accuracy (%)", "few_accuracy", direction=+1),
            PaperRow(
                "class-weighted bonus: balanced test accuracy (%)",
                "test_accuracy",
                treatment="el:bonus_weight=balanced",
                direction=+1,
            ),
            *_DECOUPLING_ROWS,
        ),
        "iNaturalist 2018 is not available offline: an exponentially long-tailed view of "
        "Fashion-MNIST (5,000 to 50 images per class, 12,403 in all) with the lab's MLP, 30 "
        "epochs, cosine lr tuned per loss on a balanced validation set; the paper reports no "
        f"number for this view. {_PAPER_NOTE}",
    ),
    PaperSetting(
        "CIFAR-10-LT (ratio 100), ResNet-18",
        PAPER_LOSSES,
        {
            # No quick run: decoding the 60,000 JPEGs alone (the long-tailed view is drawn from
            # all of them) took 11.5 s of CPU, and 30 tiny runs made it ~40 s on 2 cores.
            "gpu": {"preset": "full", "seeds": 3},
        },
        (_BALANCED_ROW, *_DECOUPLING_ROWS),
        "Cao et al.'s CIFAR-10-LT recipe (ResNet-18 with the CIFAR stem instead of ResNet-32, "
        "200 epochs, DRW at epoch 160, validation held out of the test split): a GPU run, not "
        f"run here. {_PAPER_NOTE}",
        cost_case="imbalanced",  # bench_presets.py times the full preset: this recipe
    ),
)


def resolve_recipe(options: Options) -> Recipe:
    """The preset's recipe with the command-line overrides applied.

    Raises:
        ValueError: naming a bad option (``imbalance_ratio``, ``n_max``, ``profile`` ...).
    """
    recipe = PRESETS[options.preset]
    ratio = options.get("imbalance_ratio", recipe.imbalance_ratio)
    n_max = options.get("n_max", recipe.n_max)
    drw_start = options.get("drw_start", recipe.drw_start)
    profile = options.get("profile", recipe.profile)
    long_tail_counts(2, n_max, ratio, profile)  # checks the profile's options
    if not 0.0 <= drw_start <= 1.0:
        raise ValueError(f"drw_start: must be in [0, 1], got {drw_start}")
    test_size = options.test_size
    return apply_options(
        recipe,
        options,
        sizes=False,  # --train-size cuts the long-tailed view, --test-size the balanced test set
        dataset=options.dataset or recipe.dataset,
        imbalance_ratio=float(ratio),
        profile=profile,
        n_max=int(n_max),
        drw_start=float(drw_start),
        test_per_class=recipe.test_per_class if test_size is None else max(1, test_size // 10),
    )


# --- data ------------------------------------------------------------------------------------
def long_tail_counts(
    num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "exp"
) -> list[int]:
    """Per-class training counts of a long-tailed view, largest first (each at least 1).

    Args:
        num_classes, n_max: number of classes (≥ 2); images of class 0, the largest (≥ 1).
        imbalance_ratio: ``n_max / n_min``, at least 1.
        profile: ``"exp"``: ``n_c = n_max · ratio^(−c/(C−1))``; ``"step"``: the first
            ``C // 2`` classes get ``n_max``, the rest ``n_max / ratio``.

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
        tail = n_max / imbalance_ratio
        counts = [n_max if c < num_classes // 2 else tail for c in range(num_classes)]
    else:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    return [max(1, int(n)) for n in counts]


def class_groups(counts: list[int]) -> dict[str, list[int]]:
    """Class indices of ``many`` (``n_c > n_max/5``), ``few`` (``n_c < n_max/25``), ``medium``:
    the CIFAR-100-LT convention (many > 100, few < 20 of 500) scaled to the largest of the
    training ``counts`` (ratio 100, exponential: 4 / 3 / 3 of 10 classes).

    Raises:
        ValueError: for no counts.
    """
    if not counts:
        raise ValueError(f"counts: expected per-class training counts, got {counts!r}")
    n_max = max(counts)
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > n_max / 5 else "few" if n < n_max / 25 else "medium"].append(c)
    return groups


def _balanced_take(labels: np.ndarray, per_class: int | None, rng) -> np.ndarray:
    """Sorted indices of ``per_class`` random examples of each class (``None``: all)."""
    chosen = []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(pool if per_class is None else pool[:per_class])
    return np.sort(np.concatenate(chosen))


def long_tailed_splits(data: lab_data.ImageDataset, recipe: Recipe, seed: int = 0):
    """Long-tailed training view, balanced validation (left-out train images), balanced test,
    drawn by ``seed`` (fixed: every loss and seed sees the same data).

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
        held_out = test_idx[val_idx_test]
        val_images, val_y = data.test_images[held_out], data.test_labels[held_out]
        test_idx = np.delete(test_idx, val_idx_test)
    else:
        val_images, val_y = data.train_images[val_idx], labels[val_idx]
    images = (data.train_images[train_idx], val_images, data.test_images[test_idx])
    targets = (labels[train_idx], val_y, data.test_labels[test_idx])
    return lab_data.standardized_splits(images, targets, num_classes), counts


# --- losses ----------------------------------------------------------------------------------
def _check_counts(counts) -> torch.Tensor:
    """``counts`` as float64, checked: one positive count per class."""
    if counts is None or len(counts) == 0 or min(counts) < 1:
        raise ValueError(f"counts: expected positive per-class training counts, got {counts}")
    return torch.tensor(counts, dtype=torch.float64)


class LDAMLoss(nn.Module):
    """LDAM (Cao et al. 2019): cross-entropy on ``s (z − Δ_y e_y)``, ``Δ_c ∝ n_c^{−1/4}``, the
    rarest class's ``Δ = max_margin``; ``weight``: class weights (DRW replaces them late)."""

    def __init__(self, counts: list[int], max_margin: float = 0.5, s: float = 1.0, weight=None):
        super().__init__()
        if not (max_margin > 0 and s > 0):
            raise ValueError(f"max_margin, s: must be positive, got {max_margin}, {s}")
        margins = _check_counts(counts) ** -0.25
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("weight", weight)
        self.s = s

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LDAM loss of a batch."""
        margins = nn.functional.one_hot(target, logits.shape[1]) * self.margins[target, None]
        return nn.functional.cross_entropy(self.s * (logits - margins), target, weight=self.weight)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on ``z + τ log π``, the prior ``π``
    from the per-class training ``counts`` and the temperature ``tau`` ≥ 0."""

    def __init__(self, counts: list[int], tau: float = 1.0):
        super().__init__()
        if tau < 0:
            raise ValueError(f"tau: must be non-negative, got {tau}")
        prior = _check_counts(counts)
        self.register_buffer("adjustment", (tau * torch.log(prior / prior.sum())).float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean logit-adjusted loss of a batch."""
        return nn.functional.cross_entropy(logits + self.adjustment, target)


def _class_balanced_ce(counts: list[int], beta: float) -> nn.Module:
    return nn.CrossEntropyLoss(weight=losses.class_balanced_weights(counts, beta))


def _counted_family(name: str, main: str, defaults: dict[str, float], make) -> Family:
    """A family of float parameters whose criterion is ``make(class_counts, **params)``."""

    def build(spec: LossSpec, class_counts: list[int] | None) -> nn.Module:
        return make(class_counts, **spec.params)

    return Family(name, main, dict.fromkeys(defaults, float), defaults, build)


# The lab's families plus this task's; ``FAMILY-drw`` builds as FAMILY, and
# :meth:`ImbalancedTask.train_hooks` switches its class weights on late in training.
LOSS_FAMILIES: dict[str, Family] = {
    **FAMILIES,
    "cb-ce": _counted_family("cb-ce", "beta", {"beta": 0.9999}, _class_balanced_ce),
    "ldam": _counted_family("ldam", "max_margin", {"max_margin": 0.5, "s": 1.0}, LDAMLoss),
    "la": _counted_family("la", "tau", {"tau": 1.0}, LogitAdjustedLoss),
}
LOSS_FAMILIES |= {f"{n}-drw": LOSS_FAMILIES[n].with_name(f"{n}-drw") for n in DRW_FAMILIES}


def drw_hook(criterion: nn.Module, counts: list[int], start: float, device: torch.device):
    """Progress hook of deferred re-weighting: no class weights before ``start``, CB after (a
    function of progress alone: resumed runs switch at the same step).

    Raises:
        ValueError: for ``start`` outside [0, 1], or counts that are not positive.
    """
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start: must be in [0, 1], got {start}")
    weights = losses.class_balanced_weights(counts).to(device)

    def hook(progress: float) -> None:
        criterion.weight = weights if progress >= start else None

    return hook


def group_accuracies(predictions: torch.Tensor, labels: torch.Tensor, groups: dict) -> dict:
    """``test_accuracy`` of ``(N,)`` predictions, and ``{group}_accuracy`` over each of
    :func:`class_groups`' ``groups`` (``None`` for an empty group).

    Raises:
        ValueError: if ``predictions`` and ``labels`` differ in shape.
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions: shape {tuple(predictions.shape)} is not labels' shape")
    correct = (predictions == labels).float()
    out = {"test_accuracy": correct.mean().item()}
    for name, classes in groups.items():
        mask = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
        out[f"{name}_accuracy"] = correct[mask].mean().item() if mask.any() else None
    return out


class ImbalancedTask(ClassificationTask):
    """Long-tailed classification: re-weighting, DRW, LDAM, logit adjustment and EL variants."""

    name = "imbalanced"
    summary = "imbalanced classification: long-tailed Fashion-MNIST, MNIST or CIFAR-10"
    loss_families = LOSS_FAMILIES
    datasets = ("fashion-mnist", "mnist", "cifar10")
    recipes = PRESETS
    resolve_recipe = staticmethod(resolve_recipe)
    paper = PAPER_SETTINGS

    def add_arguments(self, group) -> None:
        group.description = f"long-tailed data; losses e.g. {SUGGESTED_LOSSES}"
        add = group.add_argument
        add("--imbalance-ratio", type=float, metavar="R", help="largest / smallest class (100)")
        add("--profile", choices=PROFILES, help="long-tail profile (default exp)")
        add("--n-max", type=int, metavar="N", help="images of the largest class")
        add("--drw-start", type=float, metavar="F", help="when *-drw losses re-weight (0.8)")

    def describe_recipe(self, r) -> str:
        return (
            f"{r.dataset}-LT {r.model}, n_max {r.n_max}, ratio {r.imbalance_ratio:g} "
            f"({r.profile}), {r.train.epochs} epochs, {r.train.optimizer} lr {r.train.lr:g} "
            f"({r.train.schedule}), DRW at {r.drw_start:g}"
        )

    def load(self, options: Options, recipe: Recipe) -> tuple[dict, tuple]:
        dataset = lab_data.load_dataset(recipe.dataset, options.data_root)
        splits, counts = long_tailed_splits(dataset, recipe)
        if options.train_size is not None:  # a smaller view with the same profile, for tests
            keep = torch.arange(min(options.train_size, len(splits.train_y)))
            splits = replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])
            counts = torch.bincount(splits.train_y, minlength=splits.num_classes)
            counts = counts.clamp_min(1).tolist()
        groups = class_groups(counts)
        data = {
            "source": str(dataset.source),
            **{key: getattr(recipe, key) for key in ("profile", "imbalance_ratio", "n_max")},
            "train_counts": counts,
            **split_sizes(splits),
            "groups": groups,
            "group_rule": "many: n_c > n_max/5; few: n_c < n_max/25; medium: the rest",
        }
        return {"data": data, "drw_start": recipe.drw_start}, (splits, groups)

    def prepare(self, options: Options) -> Prepared:
        """Every task's, named ``{dataset}-lt``, with the long-tailed view's class counts."""
        prepared = super().prepare(options)
        counts = prepared.config["data"]["train_counts"]
        return replace(prepared, dataset=f"{prepared.dataset}-lt", class_counts=counts)

    def train_hooks(self, prepared, spec, model, criterion, config) -> dict:
        """Moves ``criterion`` to the device; ``*-drw`` losses re-weight from ``drw_start``."""
        device = resolve_device(config.device)
        criterion.to(device)  # class weights, margins and priors live next to the logits
        if not spec.family.endswith("-drw"):
            return {}
        start, counts = prepared.state[0].drw_start, prepared.class_counts
        return {"progress_hook": drw_hook(criterion, counts, start, device)}

    def measure(self, prepared, result, model, splits, run) -> None:
        """Balanced test accuracy, per-group and per-class accuracy, cRT, margins."""
        recipe, _, groups = prepared.state
        device, batch = next(model.parameters()).device, recipe.train.eval_batch_size
        n_diag = min(recipe.diagnostics_train, len(splits.train_y))
        train_x, test_x = splits.train_x[:n_diag], splits.test_x
        train_features, _ = diagnostics.extract_features(model, train_x, batch, device)
        test_features, test_logits = diagnostics.extract_features(model, test_x, batch, device)
        predictions = test_logits.argmax(1)
        metrics = result.metrics = group_accuracies(predictions, splits.test_y, groups)
        for c in range(splits.num_classes):
            mask = splits.test_y == c
            metrics[f"class_accuracy/{c}"] = (predictions[mask] == c).float().mean().item()
        test = diagnostics.logit_diagnostics(test_logits, splits.test_y)
        metrics["test_nll"] = test["nll"]
        metrics.update((key, test[key]) for key in ("margin_mean", "energy_mean", "ece"))
        metrics["crt_accuracy"] = diagnostics.classifier_retraining_accuracy(
            train_features, splits.train_y[:n_diag], test_features, splits.test_y, seed=run.seed
        )
        arrays = diagnostics.histogram_arrays(test_logits, splits.test_y)
        io.save_arrays(run.out_dir, run.loss, run.seed, **arrays)

    def report_spec(self, prepared: Prepared, specs: list[LossSpec]) -> dict:
        recipe, _, groups = prepared.state
        names = [s.name for s in specs]
        comparisons = [[name, "ce"] for name in names if name != "ce"]
        el_names = [name for name in names if name.startswith("el")]
        claim_pairs = [[name, "ce"] for name in el_names]
        if "ce-drw" in names:  # EL with DRW is also compared with CE with DRW
            drw_pairs = [[name, "ce-drw"] for name in el_names if name.startswith("el-drw")]
            claim_pairs, comparisons = claim_pairs + drw_pairs, comparisons + drw_pairs
        sizes = {name: len(classes) for name, classes in groups.items()}
        return {
            "title": f"imbalanced: long-tailed {recipe.dataset} ({recipe.profile}, ratio "
            f"{recipe.imbalance_ratio:g}, largest class {recipe.n_max})",
            "table": [
                ["test_accuracy", "test acc", True],
                *([f"{group}_accuracy", group, True] for group in groups),
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
        }


TASK = ImbalancedTask()
