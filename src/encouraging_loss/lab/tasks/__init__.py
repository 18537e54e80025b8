"""The lab's tasks: the :class:`Task` protocol, the classification template and the registry.

A task is a module of this package with a :class:`Task` instance named ``TASK`` and its name in
:data:`TASKS`. The runner (:mod:`..experiment`) does what tasks share (options, the (loss x seed)
loop, resume, workers, results, the report) and calls the task for the rest. A task never
imports another task.
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
# The paper's repository's EL "log_end=1" is log(1 − p) with 1 − p clamped at 1e-5; the lab's
# el:log_end=1 is the exact, unbounded log bonus (it diverges in the OOD and adversarial
# recipes). log_end = 1 − 1e-5 is the paper's bonus up to that clamp, and bounded past it.
PAPER_CLAMPED_EL = "el:log_end=0.99999"


@dataclass(frozen=True)
class PaperRow:
    """One number the paper reports for a setting, and our metric compared with it.

    Attributes:
        label: what is measured, e.g. ``"PGD accuracy at ε = 0.3 (%)"``.
        metric: a key of each run's ``metrics``.
        baseline, treatment: the losses compared (the verdict reads their per-seed differences).
        paper: ``(baseline, treatment)`` as the paper reports them; ``None`` where it has none.
        scale: our metric times ``scale`` is in the paper's unit (100 for accuracy in %).
        direction: the sign of the difference the paper claims; ``None`` = that of ``paper``'s.
    """

    label: str
    metric: str
    baseline: str = "ce"
    treatment: str = "el"
    paper: tuple[float, float] | None = None
    scale: float = 100.0
    direction: int | None = None

    @classmethod
    def clamped_el(cls, label: str, metric: str, paper=None, direction=None) -> PaperRow:
        """A row of CE against :data:`PAPER_CLAMPED_EL`, the paper's clamped log bonus."""
        return cls(label, metric, treatment=PAPER_CLAMPED_EL, paper=paper, direction=direction)


@dataclass(frozen=True)
class PaperSetting:
    """One of the paper's settings as a task reproduces it: a row group of the paper page.

    Attributes:
        name: the setting, e.g. ``"MNIST, small CNN, FGSM/PGD (torchattacks demo)"``.
        losses: the ``--losses`` of its runs.
        runs: the :class:`~..experiment.Options` fields of its run at each page preset
            (``quick``, ``cpu``, ``gpu``); a preset it lacks reads "not run here: needs a GPU".
        rows: the paper's numbers compared.
        departures: how our setup departs from the paper's, in one or two sentences.
        cost_case: the ``benchmarks/bench_presets.py`` case timing one run of its largest
            recipe (shown for a setting the page does not run).
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
        name, summary: the task's name on the command line; its line of ``--help``.
        default_preset, default_losses: ``run``'s ``--preset`` and ``--losses`` when not given.
        datasets, models: the names it takes (for ``--help``; the first dataset is the default).
        loss_families: the loss grammar's families it can build (the lab's, plus its own).
        downloads: whether ``--download`` can fetch its data.
        main_job: for :data:`MAIN_JOB`, the options of ``encouraging-loss reproduce``.
        recipes: the presets' recipes by name, for :meth:`describe_presets`.
        ship_prepared: whether workers receive :meth:`prepare`'s result pickled rather than
            preparing it again.
        paper: the paper's settings it reproduces (``encouraging-loss paper``).
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
        """Seeds per loss when ``--seeds`` is not given: the preset recipe's ``seeds``, else 1."""
        return getattr(self.recipes.get(preset), "seeds", 1)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add the task's own options to its group of the ``run`` parser."""

    def describe_recipe(self, recipe) -> str:
        """One ``--help`` line of a preset's recipe (see :meth:`describe_presets`)."""
        return ""

    def describe_presets(self) -> str:
        """Lines for ``--help``: each preset's recipe (``recipes``, :meth:`describe_recipe`)."""
        return "\n".join(f"{name}: {self.describe_recipe(r)}" for name, r in self.recipes.items())

    def prepare(self, options: Options) -> Prepared:
        """Resolve the preset with the options, set the threads, and load the data (once, in
        the runner; see :attr:`ship_prepared`).

        Raises:
            ValueError: naming a bad option.
        """
        raise NotImplementedError

    def run_one(self, prepared: Prepared, spec: LossSpec, seed: int, run: RunContext) -> RunResult:
        """Build the model and criterion, train with ``run.train(...)``, and measure.

        A ``run.tuning`` run must not read the test set (tuning compares ``val_accuracy``).
        """
        raise NotImplementedError

    def lr_for(self, prepared: Prepared, spec: LossSpec) -> float:
        """The learning rate ``spec`` trains with (for ``config["lr_by_loss"]``)."""
        return prepared.config["train"]["lr"]

    def report_spec(self, prepared: Prepared, specs: list[LossSpec]) -> dict | None:
        """The report's layout (see ``report.report_spec``); ``None`` = the image defaults."""
        return None


class ClassificationTask(Task):
    """A task that trains one classifier per (loss, seed); :meth:`prepare` and :meth:`run_one`
    are the templates.

    :meth:`prepare` resolves the recipe (:meth:`resolve_recipe`, which has ``dataset``,
    ``threads``, ``model`` and ``train``), sets the threads and lets :meth:`load` read the data;
    ``prepared.state`` is the recipe, then what :meth:`load` returned (by default the
    ``data.Splits`` every run shares). A run seeds torch, builds the model (:meth:`build`),
    trains it with :meth:`train_hooks` (and, but in tuning runs, :meth:`epoch_hook`) and,
    unless it diverged or is a tuning run, lets :meth:`measure` fill the result.

    Attributes:
        record_fields: fields each run's record adds (``None`` when it diverged).
        models: the lab's models (:data:`..models.MODELS`) unless the task has its own.
        dataset_in_out_name: the output folder is ``{task}-{preset}-{dataset}``, not
            ``{task}-{preset}``.
    """

    record_fields: tuple[str, ...] = ()
    models: tuple[str, ...] = MODELS
    dataset_in_out_name: bool = False

    def resolve_recipe(self, options: Options):
        """The preset's recipe with the options applied.

        Raises:
            ValueError: naming a bad option.
        """
        raise NotImplementedError

    def load(self, options: Options, recipe) -> tuple[dict, tuple]:
        """Read the data: ``(entries, state)``, the config's entries after preset, model and
        train (:func:`run_config`) and what ``prepared.state`` holds after the recipe."""
        raise NotImplementedError

    def prepare(self, options: Options) -> Prepared:
        recipe = self.resolve_recipe(options)
        threads = options.apply_threads(recipe.threads)
        entries, state = self.load(options, recipe)
        config = run_config(options, recipe, **entries)
        out_name = f"{self.name}-{options.preset}"
        if self.dataset_in_out_name:
            out_name += f"-{recipe.dataset}"
        return Prepared(recipe.dataset, out_name, config, (recipe, *state), threads)

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
        recipe's model and ``splits``)."""
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
        """A :meth:`measure`: ``diagnostics.classifier_diagnostics`` on the ``(x, y)`` pair
        ``train`` and the test split (``options`` passed on), the test histograms saved, the
        reliability bins in ``result.extra`` and the last epoch's gradient share."""
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
    ``max_train`` and ``max_test``, unless ``sizes=False``), the training overrides and
    ``fields``.

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


def load_splits(options: Options, recipe):
    """``(ImageDataset, Splits)`` of the recipe's ``dataset`` from ``--data-root``, limited by
    its ``max_train``, ``max_test`` and ``val_fraction``."""
    limits = recipe.max_train, recipe.max_test, recipe.val_fraction
    return lab_data.load_splits(recipe.dataset, options.data_root, *limits)


def split_sizes(splits) -> dict[str, int]:
    """``{"n_train", "n_val", "n_test"}``: the examples of each of ``splits``."""
    return {f"n_{p}": len(getattr(splits, f"{p}_y")) for p in ("train", "val", "test")}


def data_config(source, splits, **entries) -> dict:
    """``config["data"]``: the data's ``source``, the :func:`split_sizes`, then ``entries``."""
    return {"source": str(source), **split_sizes(splits), **entries}


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
