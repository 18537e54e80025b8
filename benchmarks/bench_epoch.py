"""Training-epoch time of the main job's losses against CE's, in the same processes.

The main job (``encouraging-loss reproduce``) trains the image task's standard recipe (an MLP
on Fashion-MNIST, SGD, batch 128, one CPU thread per run) with CE, EL, LS-CE and LS-EL. This
script runs that recipe for one epoch per loss:

    encouraging-loss run image --preset standard --epochs 1 --seeds 1 --jobs 1 --threads 1
        --losses ce,el,ls-ce:0.1,ls-el:0.1

``--rounds`` times (default 4), each in a fresh process (the losses one after another in it,
their order rotated between rounds), and reads each run's ``train_seconds`` (the epoch's
training steps and its validation pass) from ``results.json``. It prints, per loss, the median
epoch time over rounds and the paired ratio to CE's (the median over rounds of the loss's time
over CE's in the same process, so load that drifts between rounds hits both), with the target:
EL and LS-EL epochs within 10% of CE's.

    python benchmarks/bench_epoch.py                      # Debian's Fashion-MNIST
    python benchmarks/bench_epoch.py --data-root ../shared/data --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOSSES = ("ce", "el", "ls-ce:0.1", "ls-el:0.1")
TARGET = 1.10
TARGETED = ("el", "ls-el:0.1")


def epoch_seconds(out: Path, losses: list[str], extra: list[str]) -> dict[str, float]:
    """One process of the recipe: each loss's ``train_seconds``."""
    command = [
        sys.executable, "-m", "encouraging_loss.lab", "run", "image", "--preset", "standard",
        "--epochs", "1", "--seeds", "1", "--jobs", "1", "--threads", "1", "--no-progress",
        "--losses", ",".join(losses), "--out", str(out), *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {run["loss"]: run["train_seconds"] for run in results["runs"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", metavar="DIR", help="datasets folder")
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes (default 4)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
    extra = ["--data-root", args.data_root] if args.data_root else []
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            # The order rotates between rounds: no loss always runs first (a cold process).
            order = [*LOSSES[index % len(LOSSES) :], *LOSSES[: index % len(LOSSES)]]
            rounds.append(epoch_seconds(Path(tmp) / f"round{index}", order, extra))
            times = ", ".join(f"{loss} {seconds:.2f} s" for loss, seconds in rounds[-1].items())
            print(f"round {index + 1}: {times}", flush=True)
    print(f"\n{'loss':<10} {'epoch s':>8} {'vs CE':>6}  target")
    missed = []
    for loss in LOSSES:
        median = statistics.median(r[loss] for r in rounds)
        ratio = statistics.median(r[loss] / r["ce"] for r in rounds)
        verdict = "-"
        if loss in TARGETED:
            verdict = f"<= {TARGET}: " + ("met" if ratio <= TARGET else "missed")
            if ratio > TARGET:
                missed.append(loss)
        print(f"{loss:<10} {median:>8.2f} {ratio:>6.2f}  {verdict}")
    print(f"\nverdict: {'all targets met' if not missed else 'missed: ' + ', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
