"""The lab's tasks: the :class:`Task` protocol and the registry.

A task is one module of this package that defines a :class:`Task` subclass and an instance of
it named ``TASK``; adding a task is that module plus its name in :data:`TASKS`. The runner
(:mod:`..experiment`) does everything tasks share — options, the (loss x seed) loop, resume,
parallel workers, results and the report — and calls the task for what is its own. A task
never imports another task.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from importlib import import_module

from torch import nn

from .. import data as lab_data
from .. import diagnostics, io
from ..experiment import Options, Prepared, RunContext, RunResult
from ..losses import FAMILIES, Family, LossSpec, build_criterion
from ..models import MODELS, build_model
from ..trainer import TrainConfig, set_seed

TASKS = ("image", "imbalanced", "ood", "adversarial", "graph", "translation")
MAIN_JOB = "image"  # the task whose ``main_job`` is ``encouraging-loss reproduce``


@dataclass(frozen=True)
class PaperRow:
    """One number the paper reports for a setting, and the metric of ours compared with it.

    Attributes:
        label: what is measured, e.g. ``"PGD accuracy at ε = 0.3 (%)"``.
        metric: our metric (a key of each run's ``metrics`` in ``results.json``).
        baseline, treatment: the two losses compared (specs from the setting's ``losses``);
            the verdict reads their per-seed ``treatment − baseline`` differences.
        paper: ``(baseline, treatment)`` as the paper reports them; ``None`` where it has none.
        scale: our metric times ``scale`` is in the paper's unit (100 for accuracy in %).
        direction: the sign of the difference the paper claims; ``None`` = the sign of
            ``paper[1] − paper[0]``.
    """

    label: str
    metric: str
    baseline: str = "ce"
    treatment: str = "el"
    paper: tuple[float, float] | None = None
    scale: float = 100.0
    direction: int | None = None


@dataclass(frozen=True)
class PaperSetting:
    """One of the paper's settings as a task reproduces it: a row group of the paper page.

    Attributes:
        name: the setting, e.g. ``"MNIST, small CNN, FGSM/PGD (torchattacks demo)"``.
        losses: the ``--losses`` of its runs.
        runs: for each page preset (``quick``, ``cpu``, ``gpu``) the setting runs at, the
            :class:`~..experiment.Options` fields of that run (``preset``, ``seeds``,
            ``dataset``, ``epochs``, ``extra`` ...); a page preset it lacks marks the setting
            "not run here: needs a GPU" at that preset.
        rows: the paper's numbers compared.
        departures: how our setup departs from the paper's, in one or two sentences.
        cost_case: the case of ``benchmarks/bench_presets.py`` that times one run of the
            setting's largest recipe here (the page shows it for a setting it does not run).
    """

    name: str
    losses: str
    runs: dict[str, dict]
    rows: tuple[PaperRow, ...]
    departures: str = ""
    cost_case: str | None = None


class Task:
    """What a task declares and does; a subclass overrides the methods it needs.

    Attributes:
        name: the task's name on the command line.
        summary: one line for ``--help``.
        default_preset: the preset of ``run`` when none is given.
        default_losses: the ``--losses`` of ``run`` when none is given.
        datasets: dataset names it takes (for ``--help``; the first is the default).
        models: model names it takes (for ``--help``).
        loss_families: the loss grammar's families it can build (the lab's, plus its own).
        downloads: whether ``--download`` can fetch its data.
        main_job: for :data:`MAIN_JOB`, the options of ``encouraging-loss reproduce``.
        recipes: the presets' recipes by name, for :meth:`describe_presets`.
        ship_prepared: whether worker processes receive :meth:`prepare`'s result pickled
            (faster than preparing again) rather than preparing it themselves.
        paper: the paper's settings this task reproduces (``encouraging-loss paper``).
    """

    name: str = ""
    summary: str = ""
    default_preset: str = "quick"
    default_losses: str = "ce,el"
    datasets: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    loss_families: dict[str, Family] = FAMILIES
    downloads: bool = False
    main_job: dict | None = None
    recipes: dict = {}
    ship_prepared: bool = True
    paper: tuple[PaperSetting, ...] = ()

    @property
    def presets(self) -> tuple[str, ...]:
        """Preset names: the ``recipes``' keys unless a task says otherwise."""
        return tuple(self.recipes)

    def default_seeds(self, preset: str) -> int:
        """Seeds per loss when ``--seeds`` is not given."""
        return 1

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add the task's own options to its group of the ``run`` parser."""

    def describe_recipe(self, recipe) -> str:
        """One ``--help`` line of a preset's recipe (see :meth:`describe_presets`)."""
        return ""

    def describe_presets(self) -> str:
        """Lines for ``--help``: each preset's recipe (``recipes``, :meth:`describe_recipe`)."""
        return "\n".join(f"{name}: {self.describe_recipe(r)}" for name, r in self.recipes.items())

    def prepare(self, options: Options) -> Prepared:
        """Resolve the preset with the options, set the threads, and load the data.

        Called once, by the runner; its workers receive the result pickled (see
        :attr:`ship_prepared`; a result that cannot be pickled is prepared again in each).

        Raises:
            ValueError: naming a bad option.
        """
        raise NotImplementedError

    def run_one(self, prepared: Prepared, spec: LossSpec, seed: int, run: RunContext) -> RunResult:
        """Build the model and criterion, train with ``run.train(...)``, and measure.

        ``run.lr``, when set, is the learning rate to train with; a ``run.tuning`` run must not
        read the test set (its record's ``val_accuracy`` is what tuning compares).
        """
        raise NotImplementedError

    def lr_for(self, prepared: Prepared, spec: LossSpec) -> float:
        """The learning rate ``spec`` trains with (for ``config["lr_by_loss"]``)."""
        return prepared.config["train"]["lr"]

    def report_spec(self, prepared: Prepared, specs: list[LossSpec]) -> dict | None:
        """The report's layout (see ``report.report_spec``); ``None`` = the image defaults."""
        return None


class ClassificationTask(Task):
    """A task that trains one classifier per (loss, seed): :meth:`run_one` is the template.

    ``prepared.state`` starts with the recipe (its ``train`` and ``model``) and, unless
    :meth:`splits` is overridden, the ``data.Splits`` every run shares. A run seeds torch,
    builds the model (:meth:`build`), trains it on ``spec``'s criterion with the task's
    :meth:`train_hooks` (and, unless it is a tuning run, ``run.tuning``, :meth:`epoch_hook`),
    and, unless it diverged or is a tuning run, lets :meth:`measure` fill the result.

    Attributes:
        record_fields: fields each run's record adds (``None`` when it diverged).
        models: the lab's models (:data:`..models.MODELS`) unless the task has its own.
    """

    record_fields: tuple[str, ...] = ()
    models: tuple[str, ...] = MODELS

    def run_one(self, prepared: Prepared, spec: LossSpec, seed: int, run: RunContext) -> RunResult:
        config = run.config(replace(prepared.state[0].train, lr=self.lr_for(prepared, spec)))
        set_seed(seed, config.deterministic)
        splits = self.splits(prepared, seed)
        model, batches = self.build(prepared, splits)
        criterion = build_criterion(spec, prepared.class_counts, self.loss_families)
        hooks = self.train_hooks(prepared, spec, model, criterion, config)
        epoch_hook = None if run.tuning else self.epoch_hook(prepared, splits, run)
        if epoch_hook is not None:  # tuning runs never read the test set, even per epoch
            hooks["epoch_hook"] = epoch_hook
        outcome = run.train(model, criterion, batches, config, **hooks)
        result = RunResult(outcome, extra=dict.fromkeys(self.record_fields))
        if not outcome.diverged and not run.tuning:  # tuning never reads the test set
            self.measure(prepared, result, model, splits, run)
        return result

    def splits(self, prepared: Prepared, seed: int):
        """The ``data.Splits`` of seed ``seed``'s runs (default: ``prepared.state[1]``)."""
        return prepared.state[1]

    def build(self, prepared: Prepared, splits) -> tuple[nn.Module, object]:
        """``(model, batches)``: the freshly seeded model and what it trains on (default: the
        recipe's ``models.build_model`` and ``splits``)."""
        model = build_model(prepared.state[0].model, splits.input_shape, splits.num_classes)
        return model, splits

    def train_hooks(self, prepared, spec: LossSpec, model, criterion, config: TrainConfig) -> dict:
        """Keyword hooks of ``run.train`` (``progress_hook``, ``perturb``); default none."""
        return {}

    def epoch_hook(self, prepared: Prepared, splits, run: RunContext):
        """The trainer's ``epoch_hook(model, epoch) -> dict`` of a run that is not a tuning
        run (e.g. test accuracy after every epoch), merged into its history; default none."""
        return None

    def measure(self, prepared: Prepared, result: RunResult, model, splits, run: RunContext):
        """Fill ``result.metrics`` (and :attr:`record_fields`) from the trained model."""
        raise NotImplementedError

    def measure_classifier(self, prepared, result, model, splits, run, train, **options):
        """A :meth:`measure`: the lab's classifier diagnostics of ``model`` into ``result``.

        ``diagnostics.classifier_diagnostics`` on the ``(x, y)`` pair ``train`` and the test split
        (``options`` passed on), the test histograms saved, the reliability bins as
        ``result.extra["reliability"]`` and the last epoch's ``grad_share_well_classified``.
        """
        device, test = next(model.parameters()).device, (splits.test_x, splits.test_y)
        batch_size = prepared.state[0].train.eval_batch_size
        result.metrics, test_logits = diagnostics.classifier_diagnostics(
            model, train, test, batch_size, device, run.seed, **options
        )
        arrays = diagnostics.histogram_arrays(test_logits, splits.test_y)
        io.save_arrays(run.out_dir, run.loss, run.seed, **arrays)
        result.extra["reliability"] = diagnostics.calibration(test_logits, splits.test_y)[1]
        last = result.outcome.history[-1]["grad_share_well_classified"]
        result.metrics["grad_share_well_classified_last"] = last


def apply_options(recipe, options: Options, models=MODELS, sizes: bool = True, **fields):
    """``recipe`` with ``--model`` (one of ``models``), ``--train-size`` and ``--test-size`` (as
    ``max_train`` and ``max_test``; ``sizes=False`` where the task gives them its own meaning),
    the training overrides and ``fields`` applied.

    Raises:
        ValueError: naming an unknown model or a bad training override.
    """
    if options.model not in (None, *models):
        raise ValueError(f"model: unknown model {options.model!r}; known: {', '.join(models)}")
    given = {"max_train": options.train_size, "max_test": options.test_size} if sizes else {}
    fields.update((key, value) for key, value in given.items() if value is not None)
    train = options.train_config(recipe.train)
    return replace(recipe, model=options.model or recipe.model, train=train, **fields)


def run_config(options: Options, recipe, **entries) -> dict:
    """``results["config"]`` of a classification task: preset, model, train, then ``entries``."""
    return dict(preset=options.preset, model=recipe.model, train=asdict(recipe.train), **entries)


def load_splits(dataset: str, options: Options, recipe):
    """``data.load_splits`` of ``dataset`` from ``--data-root``, limited by the recipe's
    ``max_train``, ``max_test`` and ``val_fraction``: ``(ImageDataset, Splits)``."""
    limits = recipe.max_train, recipe.max_test, recipe.val_fraction
    return lab_data.load_splits(dataset, options.data_root, *limits)


def split_sizes(splits) -> dict[str, int]:
    """``{"n_train", "n_val", "n_test"}``: the examples of each of ``splits``."""
    return {f"n_{p}": len(getattr(splits, f"{p}_y")) for p in ("train", "val", "test")}


def load_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        ValueError: for a name not in :data:`TASKS`.
    """
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; known: {', '.join(TASKS)}")
    task = import_module(f"{__name__}.{name}").TASK
    if not isinstance(task, Task):
        raise TypeError(f"task: {__name__}.{name}.TASK is not a Task")
    return task
