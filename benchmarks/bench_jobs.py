"""Wall time of the main job with worker processes against ``--jobs 1``, in one run.

Runs ``encouraging-loss reproduce`` twice in fresh processes — once with ``--jobs 1``
(in-process, one run after another) and once with ``--jobs N`` (default: the lab's own choice,
the machine's cores for the 1-thread CPU presets) — then prints both wall times, their ratio
against the target (≤ 0.6), and whether every (loss, seed) run's metrics are identical.

    python benchmarks/bench_jobs.py                       # the README main job (preset standard)
    python benchmarks/bench_jobs.py --preset quick --data-root ../shared/data
    python benchmarks/bench_jobs.py --keep runs/bench-jobs   # keep both runs (results, report)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.6


def run_reproduce(out: Path, jobs: str | None, extra: list[str]) -> float:
    """Run the main job into ``out``; return its wall time in seconds."""
    command = [sys.executable, "-m", "encouraging_loss.lab", "reproduce", "--no-progress"]
    command += ["--out", str(out), *extra] + (["--jobs", jobs] if jobs else [])
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def per_run_metrics(out: Path) -> tuple[dict, dict]:
    """Each run's metrics by (loss, seed), and the results' config."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {(r["loss"], r["seed"]): r["metrics"] for r in results["runs"]}, results["config"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("quick", "standard"), help="the main job's preset")
    parser.add_argument("--data-root", metavar="DIR", help="datasets folder")
    parser.add_argument("--jobs", help="worker processes of the parallel run (default: auto)")
    parser.add_argument("--keep", metavar="DIR", help="keep both runs' output under DIR")
    args = parser.parse_args()
    extra = (["--preset", args.preset] if args.preset else []) + (
        ["--data-root", args.data_root] if args.data_root else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
        sequential_s = run_reproduce(Path(tmp) / "jobs1", "1", extra)
        parallel_s = run_reproduce(Path(tmp) / "jobsN", args.jobs, extra)
        sequential, _ = per_run_metrics(Path(tmp) / "jobs1")
        parallel, config = per_run_metrics(Path(tmp) / "jobsN")
    ratio = parallel_s / sequential_s
    same = sequential == parallel
    print(f"encouraging-loss reproduce {' '.join(extra)}".rstrip())
    print(f"--jobs 1: {sequential_s:.1f} s   --jobs {config['jobs']}: {parallel_s:.1f} s")
    verdict = "met" if ratio <= TARGET else "missed"
    print(f"ratio {ratio:.2f} (target <= {TARGET}: {verdict})")
    print(f"per-run metrics identical: {same} ({len(sequential)} runs)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
