"""Pinned end-to-end lab runs: record every run's metrics once, compare them after a change.

Each case is a real ``encouraging-loss`` command line on a slice of the staged data, run in a
fresh process (so no thread count or determinism flag leaks between cases). ``--record FILE``
saves the per-(loss, seed) metrics of every case; ``--compare FILE`` reruns the cases and prints,
per case, the largest absolute difference of any metric, and exits 1 if a metric differs by more
than ``--tolerance`` (0 = bit-identical) or a run is missing.

    python benchmarks/pin_lab_runs.py --data-root ../shared/data --record /tmp/pins.json
    python benchmarks/pin_lab_runs.py --data-root ../shared/data --compare /tmp/pins.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--no-progress", "--seeds", "2"]


def cases(data_root: str) -> dict[str, list[str]]:
    """The pinned command lines, by case name (``--data-root`` and ``--out`` added per run)."""
    notmnist = str(Path(data_root) / "notmnist")
    tiny = " ".join(TINY)
    lines = {
        "image": f"run image --losses ce,el,el:log_end=1,ls-el:0.1 {tiny} --train-size 400 "
        "--test-size 200 --epochs 3 --batch-size 32",
        "reproduce-quick": "reproduce --preset quick --seeds 1 --no-progress",
        "imbalanced": f"run imbalanced --losses ce,ce-drw,el:bonus_weight=balanced,ldam-drw {tiny} "
        "--n-max 200 --epochs 2 --test-size 300",
        "ood": f"run ood --losses ce,el {tiny} --train-size 500 --test-size 200 --epochs 2 "
        f"--ood-sets fashion-mnist,{notmnist} --ood-scores msp,max_logit,energy,odin",
        "adversarial": f"run adversarial --losses ce,el {tiny} --train-size 600 --test-size 200 "
        "--epochs 3 --pgd-steps 3 --epsilons 0,0.1",
        "adversarial-train": "run adversarial --losses el --no-progress --train-size 200 "
        "--test-size 100 --epochs 2 --adv-train --epsilons 0,0.1 --attacks pgd --pgd-steps 2",
        "graph": f"run graph --dataset MUTAG {tiny} --train-size 60 --epochs 3 --batch-size 16",
        "translation": "run translation --no-progress --train-size 256 --test-size 24 --epochs 1 "
        "--batch-size 32",
    }
    return {name: line.split() for name, line in lines.items()}


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Flatten the numeric leaves of a metrics dict into ``{dotted.name: float}``."""
    if isinstance(value, bool):
        return {prefix: float(value)}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if str(key).endswith("_seconds"):  # wall-clock times, never reproducible
                continue
            out.update(numbers(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def run_case(argv: list[str], data_root: str, python: str, env: dict) -> dict[str, dict]:
    """Run one case in a fresh process; the metrics of each run by ``loss/seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        lab = [python, "-m", "encouraging_loss.lab"]
        command = [*lab, *argv, "--data-root", data_root, "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {
        f"{run['loss']}/{run['seed']}": {"status": run["status"], **numbers(run["metrics"])}
        for run in results["runs"]
    }


def compare(before: dict, after: dict, tolerance: float) -> tuple[float, list[str]]:
    """Largest absolute metric difference between two cases' runs, and what does not match."""
    problems, largest = [], 0.0
    for key, metrics in before.items():
        if key not in after:
            problems.append(f"run {key} missing")
            continue
        if metrics["status"] != after[key]["status"]:
            problems.append(f"{key}: status {metrics['status']} -> {after[key]['status']}")
        for name, value in metrics.items():
            if name == "status" or name.endswith("_seconds"):  # files recorded before the skip
                continue
            if name not in after[key]:
                problems.append(f"{key}: metric {name} missing")
                continue
            other = after[key][name]
            if math.isnan(value) and math.isnan(other):
                continue
            difference = abs(value - other)
            largest = max(largest, difference)
            if not difference <= tolerance:
                problems.append(f"{key}: {name} {value!r} -> {other!r}")
    return largest, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="the staged data (../shared/data)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", metavar="FILE", help="run the cases and save their metrics")
    action.add_argument("--compare", metavar="FILE", help="rerun and compare with FILE")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed |difference|")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run the lab")
    args = parser.parse_args()
    data_root = str(Path(args.data_root).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chosen = cases(data_root)
    if args.cases:
        chosen = {name: chosen[name] for name in args.cases.split(",")}
    reference = json.loads(Path(args.compare).read_text()) if args.compare else {}
    recorded, failed = {}, False
    for name, argv in chosen.items():
        started = time.perf_counter()
        recorded[name] = run_case(argv, data_root, args.python, env)
        seconds = time.perf_counter() - started
        if args.record:
            print(f"{name}: {len(recorded[name])} runs recorded ({seconds:.0f} s)", flush=True)
            continue
        largest, problems = compare(reference.get(name, {}), recorded[name], args.tolerance)
        if name not in reference:
            problems.append("case not in the recorded file")
        failed |= bool(problems)
        verdict = "same" if not problems else f"DIFFERENT ({len(problems)})"
        print(f"{name}: {verdict}; largest |difference| {largest:.3g} ({seconds:.0f} s)")
        for line in problems[:10]:
            print(f"  {line}")
    if args.record:
        path = Path(args.record)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
