"""The experiment runner: one options type, the (loss x seed) loop, resume records, results.

``run_experiment(options)`` is what ``encouraging-loss run TASK`` does for every task:

1. the task resolves its preset and loads its data once (:meth:`Task.prepare`);
2. each (loss, seed) run not already recorded in ``OUT/runs/`` trains and is measured by the
   task (:meth:`Task.run_one`) — in this process (``--jobs 1``) or in worker processes that
   receive the prepared data (or prepare the task once each where it cannot be pickled) and
   run one (loss, seed) at a time. A run's result depends only
   on its loss and seed, so both give the same records;
3. every finished run's record is saved as soon as it ends (``--resume`` reuses it); a failed
   run is reported and left out, the others are kept; a diverged run is a result;
4. ``results.json``, ``results.csv``, plots and ``report.md`` are written.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import io, report
from .distributed import finish_distributed, rank, resolve_device, world_size
from .losses import LossSpec, baselines, build_criterion, parse_loss_list
from .trainer import TrainConfig, TrainResult, train


@dataclass
class Options:
    """Everything one ``encouraging-loss run`` invocation asks for.

    ``None`` fields fall back to the task's preset; ``extra`` holds the task's own options
    (``--ood-sets``, ``--epsilons`` ...), keyed by argparse ``dest``.
    """

    task: str = "image"
    losses: str | None = None
    seeds: int | None = None
    preset: str | None = None
    dataset: str | None = None
    model: str | None = None
    data_root: str | None = None
    download: bool = False
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
    jobs: int | None = None
    tune: str | None = None
    tune_grid: str | None = None
    tune_seeds: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args, **defaults) -> Options:
        """Options from a parsed command line (``defaults`` fill what it leaves ``None``).

        Every argparse value that is not a field goes to ``extra``.
        """
        names = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in vars(args).items() if k != "command"}
        known = {k: v for k, v in values.items() if k in names}
        known.update({k: v for k, v in defaults.items() if known.get(k) is None})
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})

    def get(self, name: str, default=None):
        """A task-specific option, or ``default`` when it was not given."""
        value = self.extra.get(name)
        return default if value is None else value

    def validate(self, presets) -> None:
        """Check the options every task shares.

        Raises:
            ValueError: naming the bad option.
        """
        if self.preset not in presets:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known: {', '.join(presets)}")
        for low, names in (
            (1, ("seeds", "jobs", "stop_after_epochs", "tune_seeds")),
            (0, ("threads",)),
            (10, ("train_size", "test_size")),
        ):
            for name in names:
                value = getattr(self, name)
                if value is not None and value < low:
                    raise ValueError(f"{name}: must be at least {low}, got {value}")
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ValueError(f"data_root: {self.data_root} is not a folder")
        if self.device is not None:
            resolve_device(self.device)  # a missing GPU is a usage error, not N failed runs
        if self.tune not in (None, *TUNABLE):
            raise ValueError(f"tune: expected one of {', '.join(TUNABLE)}, got {self.tune!r}")
        if self.tune and self.lr is not None:
            raise ValueError("lr: --lr fixes the learning rate that --tune lr picks; give one")
        if (self.tune_grid or self.tune_seeds) and not self.tune:
            raise ValueError("tune: --tune-grid and --tune-seeds need --tune lr")
        self.tune_values(1.0)  # a bad grid fails before any run

    def tune_values(self, base_lr: float) -> list[float]:
        """The learning rates ``--tune lr`` tries: ``--tune-grid``, else :data:`TUNE_FACTORS`
        times the preset's rate ``base_lr``; ascending, the same for every loss.

        Raises:
            ValueError: if ``--tune-grid`` is not a comma-separated list of positive numbers.
        """
        if self.tune_grid is None:
            return [float(f"{base_lr * factor:.6g}") for factor in TUNE_FACTORS]
        try:
            values = sorted({float(v) for v in self.tune_grid.split(",")})
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(
                f"tune_grid: expected comma-separated positive numbers, got {self.tune_grid!r}"
            )
        return values

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """A preset's training configuration with the command-line overrides applied.

        Raises:
            ValueError: naming an invalid field.
        """
        overrides = {k: getattr(self, k) for k in TRAIN_OVERRIDES if getattr(self, k) is not None}
        config = replace(base, **overrides, amp=base.amp and self.amp)
        config.validate()
        return config

    def apply_threads(self, preset_threads: int | None) -> int | None:
        """Set torch's CPU threads: ``--threads`` (0 = torch default) over the preset's value."""
        threads = preset_threads if self.threads is None else (self.threads or None)
        if threads is not None:
            torch.set_num_threads(threads)
        return threads


# What --tune can pick, and the default grid: these factors times the preset's learning rate.
TUNABLE = ("lr",)
TUNE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)

# The options that override the preset's TrainConfig field of the same name (``amp`` combines).
TRAIN_OVERRIDES = tuple(
    f.name for f in fields(Options) if f.name in {t.name for t in fields(TrainConfig)} - {"amp"}
)


@dataclass
class Prepared:
    """A task's resolved preset and loaded data, shared by all its (loss, seed) runs.

    Attributes:
        dataset: the dataset's name (``results["dataset"]``).
        out_name: the default output folder, under ``runs/``.
        config: the task's part of ``results["config"]`` (preset, model, train, data ...).
        state: whatever else the task's runs need (recipe, splits ...).
        threads: CPU threads each run uses (``None`` = torch's default; such presets run with
            ``--jobs 1`` unless asked otherwise).
        class_counts: per-class training counts, for losses that need them.
    """

    dataset: str
    out_name: str
    config: dict
    state: Any = None
    threads: int | None = None
    class_counts: list[int] | None = None


@dataclass(frozen=True)
class Run:
    """One (loss, seed) run to do: where it writes and, when tuning chose it, its learning rate.

    ``tuning`` runs (``--tune``) are scored on validation only: the task skips the test set.
    """

    spec: LossSpec
    seed: int
    out_dir: Path
    lr: float | None = None
    tuning: bool = False


@dataclass
class RunContext:
    """Where one (loss, seed) run writes, and how it trains (given to :meth:`Task.run_one`).

    Attributes:
        lr: the learning rate the run must train with (``None``: the task's own).
        tuning: a tuning run: train and validate, never read the test set.
    """

    out_dir: Path
    loss: str
    seed: int
    resume: bool = False
    stop_after_epochs: int | None = None
    progress: bool = True
    lr: float | None = None
    tuning: bool = False

    def config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this run's seed and, when set, its learning rate."""
        return replace(config, seed=self.seed, lr=config.lr if self.lr is None else self.lr)

    def train(self, model, criterion, data, config: TrainConfig, **hooks) -> TrainResult:
        """:func:`trainer.train` with this run's :meth:`config`, checkpoint, resume, stop and
        progress bar."""
        return train(
            model,
            criterion,
            data,
            self.config(config),
            checkpoint_path=io.checkpoint_path(self.out_dir, self.loss, self.seed),
            resume=self.resume,
            stop_after_epochs=self.stop_after_epochs,
            progress=self.progress,
            description=f"{self.loss} seed {self.seed}",
            **hooks,
        )


@dataclass
class RunResult:
    """What a task's run returns: the training outcome and the task's measurements.

    Attributes:
        outcome: :func:`trainer.train`'s result (with the learning rate it trained with).
        metrics: measurements of the trained model (empty when it diverged).
        extra: further fields of the run's record (e.g. ``reliability``).
    """

    outcome: TrainResult
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def record(self, loss: str, seed: int) -> dict:
        """The run's record, as saved in ``runs/`` and ``results.json``."""
        return {
            "loss": loss,
            "seed": seed,
            "status": "diverged" if self.outcome.diverged else "ok",
            "lr": self.outcome.lr,
            "metrics": {**self.outcome.outcome_metrics(), **self.metrics},
            "history": self.outcome.history,
            **self.extra,
            "train_seconds": self.outcome.train_seconds,
        }


class Interrupted(Exception):
    """A run stopped on purpose (``--stop-after-epochs``); ``--resume`` continues it."""


def run_experiment(options: Options) -> dict | None:
    """Run every (loss, seed) of a task and write the report.

    Returns:
        The results (``None`` on ranks other than 0).

    Raises:
        ValueError: for bad options or loss names.
        Interrupted: after ``stop_after_epochs`` epochs of a run.
        data.DatasetNotFoundError: if a dataset is missing.
    """
    from .tasks import load_task

    if not isinstance(options, Options):
        raise ValueError(f"options: expected Options, got {type(options).__name__}")
    task = load_task(options.task)
    options = replace(
        options,
        preset=options.preset or task.default_preset,
        losses=options.losses or task.default_losses,
    )
    options.validate(task.presets)
    specs = parse_loss_list(options.losses, task.loss_families)
    seeds = list(range(options.seeds or task.default_seeds(options.preset)))
    started = time.perf_counter()
    prepared = task.prepare(options)
    for spec in specs:  # fail on a loss this task cannot build before any run starts
        build_criterion(spec, prepared.class_counts, task.loss_families)
    out_dir = Path(options.out or f"runs/{prepared.out_name}")
    if rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    lr_by_loss = {s.name: task.lr_for(prepared, s) for s in specs}
    tuning, failed = None, []
    with _Workers(task, prepared, options) as workers:  # one pool for tuning and final runs
        if options.tune:
            tuning, failed = _tune(workers, specs, out_dir)
            lr_by_loss = {name: chosen["lr"] for name, chosen in tuning["by_loss"].items()}
        runs = [
            Run(s, seed, out_dir, lr_by_loss[s.name] if tuning else None)
            for s in specs
            for seed in seeds
        ]
        records, jobs, failed_final = _run_all(workers, runs)
    failed += failed_final
    finish_distributed()
    if rank() != 0:
        return None

    config = {
        **prepared.config,
        "losses": [s.name for s in specs],
        "loss_specs": {s.name: s.to_dict() for s in specs},
        "baselines": baselines(specs),
        "lr_by_loss": lr_by_loss,
        "seeds": seeds,
        "out": str(out_dir),
        "jobs": jobs,
        "world_size": world_size(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": prepared.threads or torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - started,
    }
    # What the results cost, over every invocation that built them (--resume adds to it).
    config["wall_seconds_total"] = config["wall_seconds"] + _earlier_wall_seconds(out_dir, options)
    if tuning:
        config["tuning"] = tuning
    if failed:
        config["failed_runs"] = failed
    results = {
        "task": task.name,
        "dataset": prepared.dataset,
        "config": config,
        "runs": [records[i] for i in range(len(runs)) if i in records],
    }
    spec = task.report_spec(prepared, specs)
    if spec is not None:
        results["report"] = spec
    report.write_report(out_dir, results)
    return results


def _earlier_wall_seconds(out_dir: Path, options: Options) -> float:
    """The wall time of the invocations before this ``--resume`` one (0 without one)."""
    path = out_dir / "results.json"
    if not options.resume or not path.is_file():
        return 0.0
    config = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    return float(config.get("wall_seconds_total", config.get("wall_seconds", 0.0)))


def _tune(workers: _Workers, specs, out_dir: Path):
    """``--tune lr``: every loss trains at every rate of the same grid on the tuning seeds and
    keeps the rate of the best mean validation accuracy (the test set is not read).

    A rate where any tuning run diverged or failed scores nothing; where every rate did, the
    smallest is kept (``all_diverged``); of equal scores, the smaller rate. Runs are saved
    under ``OUT/tuning/lr=<rate>/``.

    Returns:
        ``(tuning, failed)``: ``results["config"]["tuning"]`` and the failed tuning runs.
    """
    options = workers.options
    grid = options.tune_values(workers.prepared.config["train"]["lr"])
    seeds = list(range(options.tune_seeds or 1))
    runs = [
        Run(s, seed, out_dir / "tuning" / f"lr={lr:g}", lr, tuning=True)
        for s in specs
        for lr in grid
        for seed in seeds
    ]
    records, _, failed = _run_all(workers, runs)
    by_loss = {}
    for spec in specs:
        scores = {}  # rate -> mean validation accuracy, None where a run diverged or failed
        for lr in grid:
            found = [records.get(i) for i, r in enumerate(runs) if r.spec is spec and r.lr == lr]
            scores[lr] = None
            if all(found) and all(r["status"] == "ok" for r in found):
                scores[lr] = sum(r["metrics"]["val_accuracy"] for r in found) / len(found)
        kept = [lr for lr in grid if scores[lr] is not None]
        by_loss[spec.name] = {
            "lr": max(kept, key=scores.get) if kept else grid[0],
            "val_accuracy": {f"{lr:g}": score for lr, score in scores.items()},
            "diverged_or_failed": [lr for lr in grid if scores[lr] is None],
            "all_diverged": not kept,
        }
    config = {"parameter": "lr", "grid": grid, "seeds": seeds, "metric": "val_accuracy"}
    return {**config, "by_loss": by_loss}, failed


class _Workers:
    """An experiment's task, prepared data and options, and its worker pool: started by the
    first phase that runs in parallel and kept for the next (tuning, then the final runs)."""

    def __init__(self, task, prepared: Prepared, options: Options):
        self.task, self.prepared, self.options = task, prepared, options
        self._stack, self._pool, self.size, self.broken = ExitStack(), None, 0, False

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # the pool shuts down before its folder is removed

    def pool(self, jobs: int) -> ProcessPoolExecutor:
        if self._pool is None or self.broken:  # a crashed worker breaks its whole pool
            self.broken = False
            folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="el-")))
            context = multiprocessing.get_context("spawn")  # no fork of a process with threads
            shipped = _ship(self.task, self.prepared, folder)
            pool = ProcessPoolExecutor(jobs, context, _worker_init, (self.options, shipped))
            self._pool, self.size = self._stack.enter_context(pool), jobs
        return self._pool


def _run_all(workers: _Workers, runs: list[Run]):
    """Do ``runs`` (here or in the workers), reusing the records ``--resume`` finds.

    Returns:
        ``(records, jobs, failed)``: the finished runs' records by index in ``runs``, the
        worker processes used, and the failed runs.
    """
    options = workers.options
    records = {  # --resume: the runs already recorded (at the rate tuning chose, if it did)
        i: record
        for i, r in enumerate(runs)
        if options.resume
        and (record := io.load_record(r.out_dir, r.spec.name, r.seed))
        and (r.lr is None or record.get("lr") == r.lr)
    }
    pending = {i: r for i, r in enumerate(runs) if i not in records}
    jobs = _jobs(options, workers.prepared, len(pending))
    if jobs > 1:
        return records, workers.size or jobs, _run_parallel(workers, jobs, pending, records)
    task, prepared = workers.task, workers.prepared
    return records, jobs, _run_here(task, prepared, options, pending, records)


def _jobs(options: Options, prepared: Prepared, pending: int) -> int:
    """Worker processes: ``--jobs``, else the cores for 1-thread CPU presets, else 1."""
    if world_size() > 1 or options.stop_after_epochs is not None or pending < 2:
        return 1
    if options.jobs is not None:
        return min(options.jobs, pending)
    if prepared.threads is None:
        return 1
    return max(1, min(pending, (os.cpu_count() or 1) // prepared.threads))


def _run_one(task, prepared: Prepared, options: Options, run: Run, progress: bool):
    """Train and measure one run and save its record (``None`` on ranks other than 0)."""
    spec, seed = run.spec, run.seed
    context = RunContext(
        run.out_dir,
        spec.name,
        seed,
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=progress,
        lr=run.lr,
        tuning=run.tuning,
    )
    result = task.run_one(prepared, spec, seed, context)
    if result.outcome.interrupted:
        raise Interrupted(
            f"{spec.name} seed {seed} after {options.stop_after_epochs} epoch(s) as asked"
        )
    if rank() != 0:
        return None
    record = result.record(spec.name, seed)
    io.save_record(run.out_dir, record)
    return record


def _failure(run: Run, error: BaseException) -> dict:
    line = "".join(traceback.format_exception_only(type(error), error)).strip()
    tuning = f" (tuning, lr {run.lr:g})" if run.tuning else ""
    print(f"run {run.spec.name} seed {run.seed}{tuning} failed: {line}", file=sys.stderr)
    failure = {"loss": run.spec.name, "seed": run.seed, "error": line}
    return {**failure, "tuning_lr": run.lr} if run.tuning else failure


def _run_here(task, prepared, options, pending: dict, records: dict) -> list[dict]:
    """Run the pending runs one after another in this process (records by index)."""
    failed = []
    for i, run in pending.items():
        try:
            record = _run_one(task, prepared, options, run, options.progress)
        except (Interrupted, KeyboardInterrupt):
            finish_distributed()
            raise
        except Exception as error:  # noqa: BLE001 - reported; the other runs go on
            if world_size() > 1:
                raise  # the other ranks would wait for this one forever
            failed.append(_failure(run, error))
            continue
        if record is not None:
            records[i] = record
    return failed


_WORKER: dict = {}


def _ship(task, prepared: Prepared, folder: Path) -> Path | None:
    """``prepared`` pickled into ``folder`` for the workers, or ``None`` where the task says
    not to (``Task.ship_prepared``) or it cannot be pickled.

    Loading the pickle is faster than a worker's own :meth:`Task.prepare` (data decoding and
    splits), and a file rather than the pool's initargs: a large initarg would make each
    worker's start wait for the previous one to read it.
    """
    if not task.ship_prepared:
        return None
    path = folder / "prepared.pickle"
    try:
        with path.open("wb") as file:
            pickle.dump(prepared, file, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):  # e.g. a closure in the state
        return None
    return path


def _worker_init(options: Options, shipped: Path | None) -> None:
    from .tasks import load_task

    task = load_task(options.task)
    if shipped is None:
        prepared = task.prepare(options)
    else:
        with shipped.open("rb") as file:
            prepared = pickle.load(file)
        if prepared.threads is not None:  # what prepare() would have set in this process
            torch.set_num_threads(prepared.threads)
    _WORKER.update(task=task, options=options, prepared=prepared)


def _worker_run(run: Run) -> dict:
    w = _WORKER
    return _run_one(w["task"], w["prepared"], w["options"], run, False)


def _run_parallel(workers: _Workers, jobs: int, pending: dict, records: dict) -> list[dict]:
    """Run the pending runs in the workers' pool (``jobs`` processes if it starts here)."""
    failed, options, pool = [], workers.options, workers.pool(jobs)
    futures = {pool.submit(_worker_run, run): i for i, run in pending.items()}
    if options.progress:
        print(f"{len(futures)} runs in {workers.size} worker processes", file=sys.stderr)
    for finished, future in enumerate(as_completed(futures), 1):
        i = futures[future]
        try:
            record = future.result()
        except Exception as error:  # noqa: BLE001 - reported; the other runs go on
            workers.broken |= isinstance(error, BrokenProcessPool)
            failed.append(_failure(pending[i], error))
            continue
        records[i] = record
        if options.progress:
            tag = f" (tuning, lr {pending[i].lr:g})" if pending[i].tuning else ""
            print(f"[{finished}/{len(futures)}] {_summary(record)}{tag}", file=sys.stderr)
    return failed


def _summary(record: dict) -> str:
    """One line on a finished run, for progress in parallel mode."""
    metrics = record["metrics"]
    shown = "".join(
        f", {k} {metrics[k]:.4f}"
        for k in ("val_accuracy", "test_accuracy")
        if isinstance(metrics.get(k), float)
    )
    return (
        f"{record['loss']} seed {record['seed']}: {record['status']}{shown} "
        f"({record['train_seconds']:.1f} s)"
    )
