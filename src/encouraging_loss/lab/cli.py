"""The ``encouraging-loss`` command line: ``run TASK``, ``reproduce``, ``paper`` and ``report``.

Built from the task registry (:mod:`.tasks`): every task gets a ``run`` sub-command with the
shared options and its own. Every failure the user can fix (missing dataset or extra, unknown
loss or task, bad option) ends with a non-zero exit status and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

PROG = "encouraging-loss"
EXIT_USAGE = 2
EXIT_FAILED_RUNS = 1
# What the lab imports beyond torch (the [lab] extra; graph and translation check their own).
LAB_MODULES = ("numpy", "scipy", "matplotlib", "tqdm", "sklearn")


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, positive: bool, wanted: str):
    """An argparse type: the text as a ``kind`` (> 0 if ``positive``); errors name ``wanted``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = _number(int, True, "a positive integer")
positive_float = _number(float, True, "a positive number")
real = _number(float, False, "a number")


PRESET_HELP = (
    "recipe size: quick (minutes on 2 CPU cores), standard (≤10 min for reproduce), full (GPU "
    "recipes); paper* presets are the paper's settings (`encouraging-loss paper`)"
)


def _add_common(parser, presets, default_preset: str, preset_help=PRESET_HELP, page=False) -> None:
    """The options of every job: preset, data, output, resume, workers, device, threads, tuning
    (``page``: the paper page's, which tunes by default and downloads nothing)."""
    add = parser.add_argument
    add(
        "--preset",
        default=default_preset,
        choices=presets,
        help=f"{preset_help}. Default: {default_preset}",
    )
    add(
        "--data-root",
        metavar="DIR",
        help="folder holding datasets by name (DIR/fashion-mnist, DIR/mnist, DIR/cifar10...); "
        "default $ENCOURAGING_LOSS_DATA or ~/.cache/encouraging-loss/data; Fashion-MNIST is also "
        "found at /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)",
    )
    if not page:
        add(
            "--download",
            action="store_true",
            help="download a missing dataset into the data root with torchvision (needs "
            "internet and torchvision; never done implicitly; image datasets only)",
        )
    add("--out", metavar="DIR", help="output folder for results and report")
    add(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out: finished (loss, seed) runs are reused and an "
        "unfinished one restarts from its last epoch checkpoint, ending with identical metrics",
    )
    add(
        "--jobs",
        type=positive_int,
        metavar="N",
        help="run N (loss, seed) runs at once in worker processes, each with its preset's "
        "threads; the result of each run is the same as with --jobs 1 (in-process). Default: "
        "the machine's cores for the 1-thread CPU presets, else 1",
    )
    add(
        "--device",
        help="cpu, cuda, cuda:N or auto (default: the preset's; cpu for quick and "
        "standard, auto for full)",
    )
    add(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="disable bfloat16 autocast on CUDA (never used on CPU)",
    )
    add("--no-progress", dest="progress", action="store_false", help="hide progress output")
    if page:
        add(
            "--no-tune",
            dest="tune",
            action="store_false",
            help="train every loss at its recipe's learning rate instead of tuning it",
        )
    else:
        add(
            "--tune",
            choices=("lr",),
            help="fair protocol: give every loss the same tuning budget — train it at each "
            "learning rate of --tune-grid on --tune-seeds seeds, keep the rate with the best "
            "mean validation accuracy (the test set is not read), then run --seeds at that "
            "rate; the grid, the scores and the choice are saved in results.json and shown in "
            "the report",
        )
        add(
            "--tune-grid",
            metavar="LR,LR,...",
            help="learning rates --tune lr tries, the same for every loss (default: the "
            "preset's rate times 0.1, 0.3, 1 and 3)",
        )
    add("--tune-seeds", type=positive_int, metavar="N", help="seeds per tuning run (default 1)")
    add(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads per run (0 = torch default). Default: the preset's — 1 for the "
        "CPU presets (small models; extra threads mostly spin on a busy machine), torch's for full",
    )


def _add_training(parser: argparse.ArgumentParser, task) -> None:
    """The options that override a preset's recipe, worded for ``task``."""
    from .trainer import OPTIMIZERS, SCHEDULES

    add = parser.add_argument
    add(
        "--losses",
        help="comma-separated loss names with parameters, e.g. ce,el,el:log_end=1,ls-ce:0.1,"
        "ls-el:0.1,el:bonus=power,bonus_gamma=2,focal:gamma=2,poly1:epsilon=1; "
        "el:ramp=0.5,start=0.1,shape=cosine schedules the bonus scale, "
        "el:log_end_from=0.5,log_end_ramp=1 the log_end. "
        f"Families: {', '.join(task.loss_families)}. Default: {task.default_losses}",
    )
    seeds = ", ".join(f"{p} {task.default_seeds(p)}" for p in task.presets)
    add("--seeds", type=positive_int, help=f"seeds (0..N-1) per loss; default by preset: {seeds}")
    if task.datasets:
        add("--dataset", help=f"dataset: {', '.join(task.datasets)} (default: the preset's)")
    if task.models:
        add("--model", help=f"architecture: {', '.join(task.models)} (default: the preset's)")
    add(
        "--lr",
        type=positive_float,
        help="learning rate for every loss (overrides the preset's per-loss rates)",
    )
    add(
        "--clip-grad-norm",
        type=positive_float,
        metavar="MAX",
        help="clip the global gradient norm to MAX (default: no clipping)",
    )
    add("--epochs", type=positive_int, help="epochs (default: the preset's)")
    add("--batch-size", type=positive_int, help="global batch size")
    add("--optimizer", choices=OPTIMIZERS, help="optimizer")
    add("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    add("--weight-decay", type=real, help="weight decay")
    add(
        "--train-size",
        type=positive_int,
        help="use a fixed random subset of this many train examples (val included)",
    )
    add("--test-size", type=positive_int, help="score on a fixed random subset of this many")
    add(
        "--stop-after-epochs",
        type=positive_int,
        metavar="K",
        help="stop after K epochs as if killed, keeping the checkpoint (to test --resume)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one ``run`` sub-command per registered task."""
    from .tasks import MAIN_JOB, TASKS, load_task

    parser = _OneLineParser(
        prog=PROG, description="Reproducible cross-entropy vs encouraging-loss experiments."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    run = commands.add_parser(
        "run",
        help="train a task with several losses and seeds, then write the report",
        description="Train TASK with each loss and seed, measure the paper's three claims "
        "(margin, energy, representation) and the task's own metrics, and write results.json, "
        "results.csv, plots and report.md into --out. `run TASK --help` lists TASK's options.",
    )
    by_task = run.add_subparsers(dest="task", metavar="TASK", parser_class=_OneLineParser)
    by_task.required = True
    for name in TASKS:
        task = load_task(name)
        parser_for_task = by_task.add_parser(
            name,
            help=task.summary,
            description=task.summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"Presets:\n{task.describe_presets()}",
        )
        _add_training(parser_for_task, task)
        _add_common(parser_for_task, task.presets, task.default_preset)
        task.add_arguments(parser_for_task.add_argument_group(f"{name} task"))

    main_task = load_task(MAIN_JOB)
    job = main_task.main_job or {}
    reproduce = commands.add_parser(
        "reproduce",
        help="the project's main job: " + job.get("summary", main_task.summary),
        description=job.get("description", main_task.summary),
    )
    reproduce.add_argument(
        "--seeds",
        type=positive_int,
        default=job.get("seeds", 3),
        help=f"number of seeds; default {job.get('seeds', 3)}",
    )
    _add_common(reproduce, main_task.presets, job.get("preset", "standard"))
    reproduce.set_defaults(task=MAIN_JOB)

    from .paper import PAGE_PRESETS

    paper = commands.add_parser(
        "paper",
        help="the paper page: each family's paper settings, every loss tuned alike, one "
        "table beside the paper's numbers with verdicts",
        description="Run every task's paper settings (or --tasks) at the page preset, each loss "
        "tuned over the same learning-rate grid on validation, and write DIR/report.md: the "
        "paper's numbers beside ours, the paired difference with its 95% interval and a "
        "verdict, the three claims per setting, and the departures from the paper. Settings "
        "that need a GPU are listed, not run, below --preset gpu.",
    )
    paper.add_argument(
        "--tasks", metavar="A,B", help=f"comma-separated tasks (default: all of {', '.join(TASKS)})"
    )
    page_help = (
        "page size: quick (a smoke run, minutes), cpu (the page on this machine kind: about "
        "90 minutes on 2 cores), gpu (adds the GPU-size settings)"
    )
    _add_common(paper, PAGE_PRESETS, "cpu", page_help, page=True)
    paper.add_argument(
        "--seeds", type=positive_int, help="seeds per loss (default: each setting's)"
    )
    paper.add_argument(
        "--costs",
        metavar="FILE",
        help="results of benchmarks/bench_presets.py: the page quotes what each setting it "
        "does not run (a GPU recipe) costs per run on this machine",
    )

    rebuild = commands.add_parser(
        "report",
        help="rebuild report.md, CSV and plots from saved result folders",
        description="Rebuild the report from one or more folders written by run/reproduce; "
        "several folders are merged (a later folder's run replaces an earlier one).",
    )
    rebuild.add_argument("dirs", nargs="+", metavar="DIR", help="result folders")
    rebuild.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: the single DIR; required for several)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    from . import data as lab_data
    from .experiment import Options, run_experiment
    from .report import summary_table
    from .tasks import load_task

    task = load_task(args.task)
    job = task.main_job if args.command == "reproduce" else None
    options = Options.from_args(args, **{k: v for k, v in (job or {}).items() if k in _JOB_KEYS})
    if options.download:
        if not task.downloads:
            raise ValueError(
                f"download: the {task.name} task does not download; place its data under "
                "--data-root (see ../shared/data/SOURCES.md)"
            )
        dataset = options.dataset or task.datasets[0]
        try:
            lab_data.find_dataset(dataset, options.data_root)
        except lab_data.DatasetNotFoundError:
            lab_data.download(dataset, options.data_root)
    results = run_experiment(options)
    if results is None:
        return 0  # a rank other than 0
    print(summary_table(results))
    config = results["config"]
    print(f"report: {Path(config['out']) / 'report.md'} ({config['wall_seconds']:.1f} s)")
    failed = config.get("failed_runs", [])
    for run in failed:
        print(
            f"{PROG}: run {run['loss']} seed {run['seed']} failed: {run['error']}", file=sys.stderr
        )
    return EXIT_FAILED_RUNS if failed else 0


_JOB_KEYS = ("losses", "dataset", "out", "preset")


def _paper(args: argparse.Namespace, argv: list[str]) -> int:
    from .paper import run_page

    common = {k: v for k, v in vars(args).items() if k not in ("command", "preset", "tasks")}
    common = {k: v for k, v in common.items() if v is not None}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = common.pop("out", "runs/paper")
    path, failed = run_page(args.preset, out, tasks, command=shlex.join([PROG, *argv]), **common)
    print(f"report: {path}")
    for run in failed:
        where = f"{run['setting']}: {run['loss']} seed {run['seed']}"
        print(f"{PROG}: run {where} failed: {run['error']}", file=sys.stderr)
    return EXIT_FAILED_RUNS if failed else 0


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (a broken or hidden install counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``encouraging-loss``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 1 if a run failed (the others are reported), 2 for a usage
        error, missing data or extra, or an unknown name; 130 when interrupted.
    """
    missing = [m for m in LAB_MODULES if not _installed(m)]
    if missing:
        print(
            f'{PROG}: error: the lab needs pip install "encouraging-loss[lab]" '
            f"(missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .experiment import Interrupted

    try:
        if args.command in ("run", "reproduce"):
            return _run(args)
        if args.command == "paper":
            return _paper(args, sys.argv[1:] if argv is None else argv)
        from .report import load_results, rebuild_report, summary_table

        path = rebuild_report(args.dirs, args.out)
        print(summary_table(load_results([path.parent])[0]))
        print(f"report: {path}")
        return 0
    except Interrupted as stopped:
        print(f"stopped {stopped}; rerun with --resume to continue")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # with DatasetNotFoundError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
