"""What each lab preset costs on this machine: one epoch of the real recipe, timed, projected.

Usage::

    python benchmarks/bench_presets.py --data-root ../shared/data            # every full preset
    python benchmarks/bench_presets.py --data-root DIR --cases image-mnist,ood
    python benchmarks/bench_presets.py --data-root DIR --preset quick        # check the method

Each case runs ``encouraging-loss run TASK --preset PRESET --epochs 1 --seeds 1 --losses ce`` in a
fresh process (the preset's data, model, batch size, optimiser and evaluation; one epoch instead of
the preset's E) and reads the run's ``train_seconds`` (one epoch of training with its validation
pass) from ``results.json``; the rest of the process's wall time is data loading, evaluation,
diagnostics and the report. The projected cost of one (loss, seed) run of the preset is

    E x train_seconds x (preset's training examples / examples trained on)
      + rest x (test examples of the preset / test examples scored)

(the factors are 1 unless a case trains or scores on fewer examples than the preset to stay
short, as the CIFAR-10 ResNet-18 cases do: an epoch, evaluation and attacks are linear in the
examples, data loading is not, so the projection errs high). A comparison of L losses x S seeds
costs L x S such runs. Peak memory is the child's peak resident set size. Results go to
``benchmarks/results/bench_presets.json`` (atomically, after each case).

The measurements are of this machine (CPU, torch's default threads unless the preset sets them);
on a GPU the presets run far faster, and nothing here measures that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch
from _measure import write_json_atomically

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "bench_presets.json"
)


@dataclass(frozen=True)
class Case:
    """One preset to time: its command-line words and where its recipe lives."""

    task: str
    arguments: tuple[str, ...] = ()
    preset: str | None = None  # this preset instead of --preset (the paper's GPU recipes)
    dataset: str | None = None  # image only: the PRESETS[preset][dataset] key
    test_size: int | None = None  # score this many test examples instead of all ...
    full_test: int | None = None  # ... of the split's this many, the preset's (then scaled)
    train_size: int | None = None  # train on this many examples instead of ...
    full_train: int | None = None  # ... the preset's this many (then the epoch is scaled)


# Cheapest first, so that an interrupted run has measured the most cases.
CASES = {
    "graph": Case("graph"),
    "image-mnist": Case("image", ("--dataset", "mnist"), dataset="mnist"),
    "ood": Case("ood"),
    "image-fashion-mnist": Case("image", ("--dataset", "fashion-mnist"), dataset="fashion-mnist"),
    # CIFAR-10-LT (ratio 100: 12,406 training images) with ResNet-18: a fifth is timed, scaled.
    "imbalanced": Case("imbalanced", train_size=2500, full_train=12406),
    # Beam search over Multi30k's 1,000 test2016 sentences with the 512-wide model is slow here.
    "translation": Case("translation", test_size=100, full_test=1000),
    # ResNet-18 on all 50,000 CIFAR-10 training images takes tens of minutes an epoch here: a
    # tenth of them is timed and the epoch scaled (CIFAR-10: 50,000 train, 10,000 test images).
    "image-cifar10": Case("image", ("--dataset", "cifar10"), dataset="cifar10",
                          train_size=5000, full_train=50000),
    # Three attacks at every ε of the grid: about 84 forward-backward passes per test image.
    "adversarial": Case("adversarial", test_size=200, full_test=10000,
                        train_size=5000, full_train=50000),
}


def recipe_of(case: Case, preset: str):
    module = import_module(f"encouraging_loss.lab.tasks.{case.task}")
    recipe = module.PRESETS[case.preset or preset]
    return recipe[case.dataset] if case.dataset is not None else recipe


def run_case(name: str, case: Case, args, scratch: str) -> dict:
    out = os.path.join(scratch, name)
    command = [
        sys.executable, "-m", "encouraging_loss.lab", "run", case.task, *case.arguments,
        "--preset", case.preset or args.preset, "--epochs", "1", "--seeds", "1", "--losses", "ce",
        "--data-root", args.data_root, "--out", out, "--no-progress",
    ]  # fmt: skip
    if case.test_size is not None:
        command += ["--test-size", str(case.test_size)]
    if case.train_size is not None:
        command += ["--train-size", str(case.train_size)]
    if args.device:
        command += ["--device", args.device]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    log_path = os.path.join(scratch, f"{name}.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        # wait4: this child's own resource usage (ru_maxrss: its peak resident set, in KiB).
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    peak_rss = usage.ru_maxrss * 1024
    if child.returncode != 0:
        print(Path(log_path).read_text(encoding="utf-8")[-3000:])
        return {"case": name, "command": command, "error": f"exit status {child.returncode}"}
    results = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))
    record = results["runs"][0]
    train_seconds = float(record["train_seconds"])
    data = results["config"].get("data", {})
    recipe = recipe_of(case, args.preset)
    epochs = int(recipe.train.epochs)
    scored = data.get("n_test")
    recipe_test = getattr(recipe, "max_test", None)
    preset_scores = recipe_test if recipe_test is not None else case.full_test
    scale = preset_scores / scored if case.test_size and preset_scores and scored else 1.0
    train_scale = case.full_train / case.train_size if case.train_size else 1.0
    rest = max(wall - train_seconds, 0.0)
    projected = epochs * train_seconds * train_scale + rest * scale
    return {
        "case": name,
        "task": case.task,
        "command": " ".join(["encouraging-loss", *command[3:]]),
        "preset_epochs": epochs,
        "n_train": data.get("n_train"),
        "n_test_scored": scored,
        "test_scale": scale,
        "train_scale": train_scale,
        "epoch_train_seconds": train_seconds,
        "rest_seconds": rest,
        "wall_seconds": wall,
        "projected_run_seconds": projected,
        "peak_rss_bytes": peak_rss,
        "status": record.get("status"),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="folder of datasets by name")
    parser.add_argument("--preset", default="full", choices=["quick", "standard", "full"])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated; default all")
    parser.add_argument("--device", default="cpu", help="passed to --device (default cpu)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(CASES)}")
    args.names = names
    return args


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, preset {args.preset}")  # fmt: skip
    rows = []
    payload = {
        "benchmark": "bench_presets",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "preset": args.preset,
        "results": rows,
    }
    with tempfile.TemporaryDirectory(prefix="bench_presets_") as scratch:
        for name in args.names:
            rows.append(run_case(name, CASES[name], args, scratch))
            write_json_atomically(args.out, payload)  # each case kept as soon as it is measured
            row = rows[-1]
            if "error" in row:
                print(f"  {name}: {row['error']}")
                continue
            print(
                f"  {name}: one epoch {row['epoch_train_seconds']:.1f} s "
                f"({row['n_train']} train"
                + (f", x{row['train_scale']:.0f} for the preset's"
                   if row["train_scale"] != 1.0 else "")
                + f"), rest {row['rest_seconds']:.1f} s"
                + (f" (x{row['test_scale']:.0f} for the full test set)"
                   if row["test_scale"] != 1.0 else "")
                + f"; x{row['preset_epochs']} epochs -> {hours(row['projected_run_seconds'])} "
                f"per (loss, seed); peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )  # fmt: skip
    write_json_atomically(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
