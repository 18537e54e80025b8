"""Image classification: CE vs EL on Fashion-MNIST, MNIST or CIFAR-10.

Reads top-down: presets → data → one (loss, seed) run: model → train → diagnostics → report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import data as lab_data
from ..experiment import Options, Prepared
from ..losses import LossSpec
from ..trainer import TrainConfig, predict_logits
from . import ClassificationTask, PaperRow, PaperSetting, apply_options, data_config, load_splits

REPRODUCE_LOSSES = "ce,el,el:log_end=1,ls-ce:0.1,ls-el:0.1"
_SGD_NOTE = (
    "SGD momentum 0.9 with lr {lr:g} for every loss: one learning rate keeps the comparison "
    "paired (same seed = same initialisation and batches). EL's conservative bonus "
    "(log_end < 1) is bounded below and, like CE's, its gradient vanishes as p_y -> 1, so "
    "CE's rate suits it. el:log_end=1 is kept at the same rate on purpose: its plain log bonus is "
    "unbounded below (the loss falls linearly in the logit gap and its gradient never vanishes), "
    "so at CE's rate it is expected to diverge, and the divergence is the result reported. "
    "Compare it at other settings with --lr or --clip-grad-norm."
)


@dataclass(frozen=True)
class Recipe:
    """How one preset trains on one dataset.

    Attributes:
        model, train: ``mlp``, ``cnn`` or ``resnet18``; optimiser and schedule.
        max_train, max_test: train examples (a fixed random subset, validation included), test
            examples scored; None = all.
        lr_by_loss: learning-rate overrides by loss name or family (``"el:log_end=1"``, ``"el"``).
        lr_note: why these learning rates (default: the note of one SGD rate for every loss).
        diagnostics_train: training examples used for probe/cRT features and train diagnostics.
        val_fraction: share of the training subset held out for model selection.
        threads: CPU threads (``None`` = torch's default). The CPU presets use 1: on a busy
            2-core machine two spinning threads measured ~50x slower per epoch than one.
        best_test_over_epochs: also score the test set after every epoch (not in tuning runs)
            for ``best_test_accuracy_over_epochs``, the paper's optimistic protocol.
        dataset: the dataset (the preset table's key, set by :func:`resolve_recipe`).
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
    best_test_over_epochs: bool = False
    dataset: str = ""

    def __post_init__(self):
        if not self.lr_note:  # a frozen dataclass: set once, at construction
            object.__setattr__(self, "lr_note", _SGD_NOTE.format(lr=self.train.lr))


_GPU = {"diagnostics_train": 50000, "threads": None}
_CIFAR_RESNET = Recipe(
    "resnet18",
    None,
    None,
    TrainConfig(200, lr=0.1, augment=True, device="auto"),
    lr_note=(
        "The standard CIFAR ResNet-18 recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine, "
        "200 epochs, crop+flip) for every loss, as in the paper's setting adapted; "
        "el:log_end=1 may diverge at 0.1 and is then reported as diverged — rerun it "
        "with --clip-grad-norm 5 or --lr 0.05."
    ),
    **_GPU,
)
# Evaluation batches of 256: the small CNN's forward pass on one thread measured twice as fast
# as at 1,024 (cache), which matters where the whole test set is scored after every epoch.
_PAPER_TRAIN = TrainConfig(4, eval_batch_size=256)
_PAPER_CPU = {
    "best_test_over_epochs": True,
    "lr_note": "lr 0.05 for every loss unless --tune lr picks one per loss (the paper page "
    "tunes every loss over the same grid, on validation).",
}
PRESETS: dict[str, dict[str, Recipe]] = {  # a preset's first dataset is its default
    # ≤ 3 minutes for `reproduce --preset quick` on 2 CPU cores (5 losses × 3 seeds).
    "quick": {
        "fashion-mnist": Recipe("mlp", 10000, 5000, TrainConfig(5)),
        "mnist": Recipe("mlp", 10000, 5000, TrainConfig(5)),
        "cifar10": Recipe("cnn", 5000, 5000, TrainConfig(5)),
    },
    # ≤ 10 minutes for `reproduce` on 2 CPU cores.
    "standard": {
        "fashion-mnist": Recipe("mlp", None, None, TrainConfig(8), diagnostics_train=10000),
        "mnist": Recipe("mlp", None, None, TrainConfig(10), diagnostics_train=20000),
        "cifar10": Recipe(
            "cnn", 20000, None, TrainConfig(10, augment=True), diagnostics_train=20000
        ),
    },
    # GPU recipes (not timed on this machine).
    "full": {
        "cifar10": _CIFAR_RESNET,
        "mnist": Recipe("cnn", None, None, TrainConfig(30, device="auto"), **_GPU),
        "fashion-mnist": Recipe("cnn", None, None, TrainConfig(30, device="auto"), **_GPU),
    },
    # The paper's MNIST and CIFAR-10 settings (see ImageTask.paper): test accuracy after every
    # epoch as well. The CPU recipes are the small CNN on 10,000 training digits (all our MNIST
    # has) for 4 epochs, lr 0.05 at batch 128 (the paper's 0.1 at 256, scaled linearly).
    "paper": {
        "mnist": Recipe("cnn", None, None, _PAPER_TRAIN, **_PAPER_CPU),
        "fashion-mnist": Recipe("cnn", 10000, None, _PAPER_TRAIN, **_PAPER_CPU),
        "cifar10": replace(_CIFAR_RESNET, best_test_over_epochs=True),  # GPU, as full's
    },
}
# The paper's MNIST used the plain log bonus (log_end = 1, per the project's notes on the paper).
# On the lab's CNN it collapsed to chance after its first epoch at every rate of the tuning
# grid (measured here), so the conservative bonus (log_end 0.75) is compared as well.
PAPER_MNIST_LOSSES = "ce,el:log_end=1,el"
# The quick page's runs: the pipeline end to end in seconds (numbers meaningless).
_PAPER_QUICK = {"preset": "paper", "seeds": 2, "epochs": 1, "train_size": 300, "test_size": 100}
# A GPU's run of the MNIST-sized settings: the paper's 100 epochs at batch 256, torch's threads.
_PAPER_GPU = {"preset": "paper", "seeds": 5, "epochs": 100, "batch_size": 256}
_PAPER_GPU |= {"device": "auto", "threads": 0}


def _paper_rows(
    treatment: str, paper_best: tuple[float, float] | None = None, what: str = ""
) -> tuple[PaperRow, ...]:
    """An image setting's two rows for ``treatment`` vs CE: the best test accuracy over epochs
    (the paper's numbers ``paper_best``) and the validation-selected one; ``what`` names the
    treatment in the labels."""
    return (
        PaperRow(
            f"best test accuracy over epochs (%; the paper's optimistic protocol){what}",
            "best_test_accuracy_over_epochs",
            treatment=treatment,
            paper=paper_best,
            direction=None if paper_best else +1,
        ),
        PaperRow(
            f"test accuracy of the validation-selected epoch (%){what}",
            "test_accuracy",
            treatment=treatment,
            direction=+1,
        ),
    )


_CONSERVATIVE = ", conservative bonus (log_end 0.75)"
PAPER_SETTINGS = (
    PaperSetting(
        "MNIST, small CNN (paper: 10-conv PReLU/BN net)",
        PAPER_MNIST_LOSSES,
        {
            "quick": {**_PAPER_QUICK, "dataset": "mnist"},
            "cpu": {"preset": "paper", "dataset": "mnist", "seeds": 3},
            "gpu": {**_PAPER_GPU, "dataset": "mnist"},
        },
        (
            *_paper_rows("el:log_end=1", (99.42, 99.56), ", plain log bonus (the paper's)"),
            *_paper_rows("el", None, _CONSERVATIVE),
        ),
        "The lab's 2-conv BN/ReLU CNN instead of the paper's 10-conv PReLU/BN net; 10,000 "
        "training digits (9,000 + 1,000 validation; the other 50,000 are not available "
        "offline) instead of 60,000; 4 epochs at lr 0.05, batch 128 (the paper: 100 epochs, "
        "0.1 at 256) on CPU, the learning rate tuned per loss on validation; 3 seeds. The "
        "paper's plain log bonus collapsed to chance after its first epoch here at every rate "
        "tried, so the conservative bonus is compared too (no paper number).",
    ),
    PaperSetting(
        "Fashion-MNIST, small CNN (the MNIST recipe; not in the paper)",
        "ce,el",
        {
            "quick": {**_PAPER_QUICK, "dataset": "fashion-mnist"},
            "cpu": {"preset": "paper", "dataset": "fashion-mnist", "seeds": 3},
            "gpu": {**_PAPER_GPU, "dataset": "fashion-mnist"},
        },
        _paper_rows("el", None, _CONSERVATIVE),
        "Not a setting of the paper: the MNIST recipe on a harder set of the same size (10,000 "
        "of the 60,000 training images; the full test set), with the conservative bonus only "
        "(the plain one collapses on MNIST).",
    ),
    PaperSetting(
        "CIFAR-10, ResNet-18",
        "ce,el",
        {
            # The pipeline end to end in seconds: the small CNN stands in for ResNet-18.
            "quick": {**_PAPER_QUICK, "dataset": "cifar10", "model": "cnn", "threads": 1},
            "gpu": {"preset": "paper", "dataset": "cifar10", "seeds": 3},
        },
        _paper_rows("el", None, _CONSERVATIVE),
        "ResNet-18 with the CIFAR stem, 200 epochs of SGD 0.1, cosine, crop+flip (a GPU run, "
        "not run here); EL with the conservative bonus log_end = 0.75 (the core's choice for "
        "high-accuracy tasks); the paper's CIFAR-10 numbers are not recorded here.",
        cost_case="image-cifar10",
    ),
)
LR_HELP = (
    "Every loss uses its recipe's lr unless listed: one rate keeps the comparison paired; "
    "el:log_end=1 (unbounded bonus) may diverge at it, which is reported as a result. "
    "--lr and --clip-grad-norm change it for all losses."
)


def best_test_accuracy_over_epochs(history: list[dict]) -> float | None:
    """The best per-epoch ``test_accuracy`` of a run's ``history``; ``None`` if some epoch was
    not scored (e.g. resumed from a run that did not score them).

    Raises:
        ValueError: for an empty history or one that is not a list of dicts.
    """
    if not (isinstance(history, list) and history and all(isinstance(h, dict) for h in history)):
        raise ValueError(f"history: expected a non-empty list of epoch dicts, got {history!r}")
    scores = [h.get("test_accuracy") for h in history]
    return None if None in scores else max(scores)


def resolve_recipe(options: Options) -> Recipe:
    """The preset's recipe for ``--dataset`` with the options applied.

    Raises:
        ValueError: for a dataset the preset has no recipe for, or a bad option.
    """
    recipes = PRESETS[options.preset]
    dataset = options.dataset or next(iter(recipes))
    if dataset not in recipes:
        raise ValueError(
            f"dataset: preset {options.preset!r} has no recipe for {dataset!r}; "
            f"it has: {', '.join(recipes)}"
        )
    recipe = recipes[dataset]
    if options.lr is not None:  # an explicit --lr applies to every loss
        note = "--lr given on the command line, used for every loss"
        recipe = replace(recipe, lr_by_loss={}, lr_note=note)
    return apply_options(recipe, options, dataset=dataset)


class ImageTask(ClassificationTask):
    """Image classification (the project's main job: ``encouraging-loss reproduce``)."""

    name = "image"
    summary = "image classification: Fashion-MNIST, MNIST or CIFAR-10 (MLP, CNN, ResNet-18)"
    datasets = lab_data.DATASETS[:2] + ("cifar10",)
    recipes = {
        f"{p}/{dataset}": r for p, by_data in PRESETS.items() for dataset, r in by_data.items()
    }
    resolve_recipe = staticmethod(resolve_recipe)
    downloads = True
    main_job = {
        "summary": "CE vs EL on Fashion-MNIST, 3 seeds",
        "description": f"Run the image task on Fashion-MNIST with {REPRODUCE_LOSSES} and 3 "
        "seeds, print the table and write the report (default --out runs/reproduce).",
        "losses": REPRODUCE_LOSSES,
        "dataset": "fashion-mnist",
        "out": "runs/reproduce",
        "preset": "standard",
        "seeds": 3,
    }
    presets = tuple(PRESETS)
    paper = PAPER_SETTINGS
    record_fields = ("reliability",)
    dataset_in_out_name = True

    def load(self, options: Options, recipe: Recipe) -> tuple[dict, tuple]:
        dataset, splits = load_splits(options, recipe)
        data = data_config(dataset.source, splits, val_fraction=recipe.val_fraction)
        data["diagnostics_train"] = recipe.diagnostics_train
        entries = {"lr_note": recipe.lr_note, "data": data}
        if recipe.best_test_over_epochs:  # only where on: older presets' results stay as they were
            entries["best_test_over_epochs"] = True
        return entries, (splits,)

    def measure(self, prepared, result, model, splits, run) -> None:
        """Diagnostics on train (the recipe's ``diagnostics_train``) and test, with cRT."""
        recipe = prepared.state[0]
        n_diag = min(recipe.diagnostics_train, len(splits.train_y))
        train = splits.train_x[:n_diag], splits.train_y[:n_diag]
        self.measure_classifier(
            prepared, result, model, splits, run, train, retrain_classifier=True
        )
        if recipe.best_test_over_epochs:
            best = best_test_accuracy_over_epochs(result.outcome.history)
            result.metrics["best_test_accuracy_over_epochs"] = best

    def epoch_hook(self, prepared, splits, run):
        """With the recipe's ``best_test_over_epochs``: the test accuracy after every epoch."""
        recipe = prepared.state[0]
        if not recipe.best_test_over_epochs:
            return None
        batch_size = recipe.train.eval_batch_size

        def test_accuracy(model, epoch: int) -> dict:
            device = next(model.parameters()).device
            logits = predict_logits(model, splits.test_x, batch_size, device)
            return {"test_accuracy": (logits.argmax(1) == splits.test_y).float().mean().item()}

        return test_accuracy

    def lr_for(self, prepared: Prepared, spec: LossSpec) -> float:
        """The recipe's learning rate for ``spec``: by name, then family, else the base rate.

        Raises:
            ValueError: if ``spec`` is not a :class:`LossSpec`.
        """
        if not isinstance(spec, LossSpec):
            raise ValueError(f"spec: expected a LossSpec, got {type(spec).__name__}")
        recipe = prepared.state[0]
        for key in (spec.name, spec.family):
            if key in recipe.lr_by_loss:
                return recipe.lr_by_loss[key]
        return recipe.train.lr

    def describe_recipe(self, r) -> str:
        t = r.train
        return (
            f"{r.model}, train {r.max_train or 'all'}, test {r.max_test or 'all'}, {t.epochs} "
            f"epochs, batch {t.batch_size}, {t.optimizer} lr {t.lr:g} ({t.schedule})"
            + "".join(f", {loss} lr {lr:g}" for loss, lr in r.lr_by_loss.items())
            + (", test accuracy after every epoch" if r.best_test_over_epochs else "")
        )

    def describe_presets(self) -> str:
        return f"{super().describe_presets()}\n{LR_HELP}"


TASK = ImageTask()
