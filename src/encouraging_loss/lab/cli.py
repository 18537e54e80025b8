"""The ``encouraging-loss`` command line: ``run``, ``reproduce`` and ``report``.

Every failure the user can fix (missing dataset, unknown loss or task, bad option) ends with a
non-zero exit status and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from pathlib import Path

from .tasks import TASKS

PROG = "encouraging-loss"
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=("quick", "standard", "full"),
        help="recipe size: quick (≤3 min on 2 CPU cores for reproduce), standard (≤10 min), "
        f"full (GPU recipes: CIFAR-10 ResNet-18, MNIST CNN). Default: {default_preset}",
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder holding datasets by name (DIR/fashion-mnist, DIR/mnist, DIR/cifar10...); "
        "default $ENCOURAGING_LOSS_DATA or ~/.cache/encouraging-loss/data; Fashion-MNIST is also "
        "found at /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download a missing dataset into the data root with torchvision (needs internet "
        "and torchvision; never done implicitly)",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder for results and report")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out: finished (loss, seed) runs are reused and an "
        "unfinished one restarts from its last epoch checkpoint, ending with identical metrics",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or auto (default: the preset's; cpu for quick and "
        "standard, auto for full)",
    )
    parser.add_argument(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="disable bfloat16 autocast on CUDA (never used on CPU)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (0 = torch default). Default: the preset's — 1 for quick and "
        "standard (small models; extra threads mostly spin on a busy machine), torch's for full",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (one sub-command per job).

    Returns:
        The parser.
    """
    from .tasks.graph import describe_presets as graph_presets
    from .tasks.image import REPRODUCE_LOSSES, describe_presets
    from .tasks.translation import describe_presets as translation_presets

    parser = _OneLineParser(
        prog=PROG,
        description="Reproducible cross-entropy vs encouraging-loss experiments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets and the learning rate each uses:\n"
        + "\n".join((describe_presets(), graph_presets(), translation_presets())),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    run = commands.add_parser(
        "run",
        help="train a task with several losses and seeds, then write the report",
        description="Train TASK with each loss and seed, measure the paper's three claims "
        "(margin, energy, representation) and calibration, and write results.json, "
        "results.csv, plots and report.md into --out.",
    )
    run.add_argument("task", metavar="TASK", help=f"task to run: {', '.join(TASKS)}")
    run.add_argument(
        "--losses",
        help="comma-separated loss names with parameters, e.g. ce,el,el:log_end=1,ls-ce:0.1,"
        "ls-el:0.1,focal:gamma=2,poly1:epsilon=1,el:log_end=0.5,bonus_scale=0.5; "
        "el:ramp=0.5,start=0.1,shape=cosine schedules the bonus scale. Default: ce,el for image; "
        "ce,el:log_end=0.5,start=0.5,ramp=0.2 for graph (bonus enabled late); "
        "ls-ce:0.1,ls-el:0.1,log_end=0.5 for translation",
    )
    run.add_argument(
        "--seeds",
        type=_positive_int,
        help="number of seeds (0..N-1) per loss; default: the task's (1 for image; "
        "3 quick / 10 full for graph; 1 quick / 3 full for translation)",
    )
    run.add_argument(
        "--dataset",
        help="dataset; image: fashion-mnist, mnist or cifar10 (default fashion-mnist, cifar10 "
        "for --preset full); graph: PROTEINS (default), MUTAG, ENZYMES, AIDS, Mutagenicity; "
        "translation: multi30k (default)",
    )
    run.add_argument(
        "--model",
        help="architecture (default: the preset's); image: mlp, cnn, resnet18; graph: gin, gcn; "
        "translation: transformer",
    )
    run.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate for every loss (overrides the preset's per-loss rates)",
    )
    run.add_argument(
        "--clip-grad-norm",
        type=_positive_float,
        metavar="MAX",
        help="clip the global gradient norm to MAX (default: no clipping)",
    )
    run.add_argument("--epochs", type=_positive_int, help="epochs (default: the preset's)")
    run.add_argument("--batch-size", type=_positive_int, help="global batch size")
    run.add_argument("--optimizer", choices=("sgd", "adamw"), help="optimizer")
    run.add_argument(
        "--schedule", choices=("cosine", "multistep", "constant"), help="learning-rate schedule"
    )
    run.add_argument("--weight-decay", type=float, help="weight decay")
    run.add_argument(
        "--train-size",
        type=_positive_int,
        help="use a fixed random subset of this many train examples (val included)",
    )
    run.add_argument(
        "--test-size",
        type=_positive_int,
        help="score on a fixed random subset of this many test examples",
    )
    run.add_argument(
        "--stop-after-epochs",
        type=_positive_int,
        metavar="K",
        help="stop after K epochs as if killed, keeping the checkpoint (to test --resume)",
    )
    _add_common(run, "quick")
    for task in TASKS:
        # imbalanced, ood and adversarial add their own options in a group of their own.
        module = import_module(f"{__package__}.tasks.{task}")
        if hasattr(module, "add_arguments"):
            module.add_arguments(run)

    reproduce = commands.add_parser(
        "reproduce",
        help="the project's main job: CE vs EL on Fashion-MNIST, 3 seeds",
        description=f"Run the image task on Fashion-MNIST with {REPRODUCE_LOSSES} and 3 seeds, "
        "print the table and write the report (default --out runs/reproduce).",
    )
    reproduce.add_argument(
        "--seeds", type=_positive_int, default=3, help="number of seeds; default 3"
    )
    _add_common(reproduce, "standard")

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


def _run_task(args: argparse.Namespace, task: str, losses: str) -> int:
    from . import data as lab_data
    from .report import summary_table
    from .tasks.image import ImageOptions, run_image
    from .trainer import rank

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if task != "image":
        return _run_other_task(args, task, losses)
    from .models import MODELS

    if getattr(args, "model", None) not in (None, *MODELS):
        raise ValueError(f"model: unknown image model {args.model!r}; known: {', '.join(MODELS)}")
    options = ImageOptions(
        losses=losses or "ce,el",
        seeds=args.seeds if args.seeds is not None else 1,
        preset=args.preset,
        dataset=getattr(args, "dataset", None)
        or ("fashion-mnist" if args.command == "reproduce" else None),
        model=getattr(args, "model", None),
        data_root=args.data_root,
        out=args.out or ("runs/reproduce" if args.command == "reproduce" else None),
        resume=args.resume,
        lr=getattr(args, "lr", None),
        clip_grad_norm=getattr(args, "clip_grad_norm", None),
        epochs=getattr(args, "epochs", None),
        batch_size=getattr(args, "batch_size", None),
        optimizer=getattr(args, "optimizer", None),
        schedule=getattr(args, "schedule", None),
        weight_decay=getattr(args, "weight_decay", None),
        train_size=getattr(args, "train_size", None),
        test_size=getattr(args, "test_size", None),
        device=args.device,
        amp=args.amp,
        threads=args.threads,
        progress=args.progress,
        stop_after_epochs=getattr(args, "stop_after_epochs", None),
    )
    if args.download:
        dataset = options.dataset or "fashion-mnist"
        try:
            lab_data.find_dataset(dataset, options.data_root)
        except lab_data.DatasetNotFoundError:
            lab_data.download(dataset, options.data_root)
    results = run_image(options)
    if results is None and options.stop_after_epochs is not None and rank() == 0:
        print(f"stopped after {options.stop_after_epochs} epoch(s) as asked; rerun with --resume")
    if results is not None:
        print(summary_table(results))
        out = Path(options.out) if options.out else None
        where = out or Path(f"runs/{task}-{options.preset}-{results['dataset']}")
        print(f"report: {where / 'report.md'} ({results['config']['wall_seconds']:.1f} s)")
    return 0


def _run_other_task(args: argparse.Namespace, task: str, losses: str | None) -> int:
    """Run a task other than image: through its ``run_from_args``, or its ``options_from_args``
    and ``run`` (graph, translation)."""
    from importlib import import_module

    from .report import summary_table
    from .trainer import rank

    if args.download:
        raise ValueError(
            f"download: only the image task downloads; place {task} data under "
            "--data-root (see ../shared/data/SOURCES.md)"
        )
    module = import_module(f".tasks.{task}", __package__)
    if hasattr(module, "run_from_args"):  # imbalanced, ood, adversarial
        results, where = module.run_from_args(args)
        if results is not None:
            print(summary_table(results))
            print(f"report: {where / 'report.md'} ({results['config']['wall_seconds']:.1f} s)")
        return 0
    options = module.options_from_args(args)
    results = module.run(options)
    if results is None and options.stop_after_epochs is not None and rank() == 0:
        print(f"stopped after {options.stop_after_epochs} epoch(s) as asked; rerun with --resume")
    if results is not None:
        print(summary_table(results))
        print(
            f"report: {Path(results['config']['out']) / 'report.md'} "
            f"({results['config']['wall_seconds']:.1f} s)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``encouraging-loss``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 for a usage error, missing data or unknown name.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .data import DatasetNotFoundError

    try:
        if args.command == "run":
            return _run_task(args, args.task, args.losses)
        if args.command == "reproduce":
            from .tasks.image import REPRODUCE_LOSSES

            return _run_task(args, "image", REPRODUCE_LOSSES)
        from .report import load_results, rebuild_report, summary_table

        path = rebuild_report(args.dirs, args.out)
        print(summary_table(load_results([path.parent])[0]))
        print(f"report: {path}")
        return 0
    except (DatasetNotFoundError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
