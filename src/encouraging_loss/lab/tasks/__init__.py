"""The lab's tasks: the :class:`Task` protocol and the registry.

A task is one module of this package that defines a :class:`Task` subclass and an instance of
it named ``TASK``; adding a task is that module plus its name in :data:`TASKS`. The runner
(:mod:`..experiment`) does everything tasks share — options, the (loss x seed) loop, resume,
parallel workers, results and the report — and calls the task for what is its own. A task
never imports another task.
"""

from __future__ import annotations

import argparse
from importlib import import_module

from ..experiment import Options, Prepared, RunContext, RunResult
from ..losses import FAMILIES, Family, LossSpec

TASKS = ("image", "imbalanced", "ood", "adversarial", "graph", "translation")
MAIN_JOB = "image"  # the task whose ``main_job`` is ``encouraging-loss reproduce``


class Task:
    """What a task declares and does; a subclass overrides the methods it needs.

    Attributes:
        name: the task's name on the command line.
        summary: one line for ``--help``.
        presets: preset names (``--preset``).
        default_preset: the preset of ``run`` when none is given.
        default_losses: the ``--losses`` of ``run`` when none is given.
        datasets: dataset names it takes (for ``--help``; the first is the default).
        models: model names it takes (for ``--help``).
        loss_families: the loss grammar's families it can build (the lab's, plus its own).
        downloads: whether ``--download`` can fetch its data.
        main_job: for :data:`MAIN_JOB`, the options of ``encouraging-loss reproduce``.
        recipes: the presets' recipes by name, for :meth:`describe_presets`.
    """

    name: str = ""
    summary: str = ""
    presets: tuple[str, ...] = ("quick", "standard", "full")
    default_preset: str = "quick"
    default_losses: str = "ce,el"
    datasets: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    loss_families: dict[str, Family] = FAMILIES
    downloads: bool = False
    main_job: dict | None = None
    recipes: dict = {}

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

        Called once per process (the runner's, and each worker's).

        Raises:
            ValueError: naming a bad option.
        """
        raise NotImplementedError

    def run_one(self, prepared: Prepared, spec: LossSpec, seed: int, run: RunContext) -> RunResult:
        """Build the model and criterion, train with ``run.train(...)``, and measure."""
        raise NotImplementedError

    def lr_for(self, prepared: Prepared, spec: LossSpec) -> float:
        """The learning rate ``spec`` trains with (for ``config["lr_by_loss"]``)."""
        return prepared.config["train"]["lr"]

    def report_spec(self, prepared: Prepared, specs: list[LossSpec]) -> dict | None:
        """The report's layout (see ``report.report_spec``); ``None`` = the image defaults."""
        return None


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
