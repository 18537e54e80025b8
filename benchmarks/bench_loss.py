"""Forward + backward time and peak extra memory of the encouraging loss against torch's CE.

Usage::

    python benchmarks/bench_loss.py            # full run: every shape below, 1 and 2 threads
    python benchmarks/bench_loss.py --quick    # CI smoke run: (256, 1000), 3 repetitions, < 1 min
    python benchmarks/bench_loss.py --shapes small --threads 1

Shapes: the small ones where the paper's experiments and most vision training live, (128, 10),
(256, 10), (256, 100), (256, 1000); the large ones, (4096, 1000) and (4096, 32000). Each shape
runs with hard targets (log_end 0.75) and with label smoothing 0.1; the large ones also with the
plain log bonus (log_end 1). Options: ``--shapes small|large|all``, ``--threads 1,2``,
``--dtype bfloat16``, ``--cases NAME,NAME`` (``--list-cases`` shows them), ``--repeats N``,
``--warmup N``, ``--no-memory``, ``--out PATH`` (default ``benchmarks/results/bench_loss.json``).

Every case compares, in the same run and on the same inputs, ``encouraging_loss`` (EL) with
``torch.nn.functional.cross_entropy`` (CE, with the same smoothing) and with the authors'
formulation (a re-implementation of their published code, label "authors-formulation"):

* time: ``loss(logits, target)`` then ``.backward()`` (with ``logits.grad = None`` before each),
  repeated within one sample until it lasts about 20 ms (small shapes need hundreds of calls for
  a clock reading above its noise), contenders interleaved sample by sample after a warm-up,
  each round starting with the next one (CE EL authors, EL authors CE, ...): a predecessor's
  freed memory and evicted caches change the next call's time, so none always follows the
  same. Reported: each contender's median per call, and the "paired" ratios, the median over
  samples of EL's time over CE's (or the authors') in the same round, which the verdicts use.
  Wall-clock timings on a shared machine are noisy: rerun before drawing conclusions from a few
  percent.
* memory: torch has no CPU peak-memory counter, so each contender runs in a fresh subprocess
  with ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are mmapped, freed memory goes back to the
  OS). The child warms up on 60% of the case's rows (the same code path: first calls load
  modules, which the resident size would count), builds the inputs, reads its resident set size,
  runs one forward + backward and reports ``ru_maxrss - rss_before``: the peak extra memory of
  the call, the gradient tensor included. Below 512 KiB of logits that is under the resolution
  of the resident set size, and it is not reported.

Targets (verdicts in full mode; the exit code is 0 regardless), from issue 13: hard targets EL
<= 1.5x CE at 128x10, 256x10, 256x100 and <= 1.05x at 4096 rows; label smoothing <= 2x CE at
those small shapes and <= 1.3x at 4096 rows; EL never slower than the authors' formulation; peak
memory <= CE's wherever it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _measure import MMAP_THRESHOLD, rss_bytes, time_interleaved, write_json_atomically

from encouraging_loss import encouraging_loss

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_loss.json")
MIB = 1024.0 * 1024.0
#: EL/CE time targets by (targets, shape group); a shape outside a group has no time target.
TIME_TARGETS = {("hard", "small"): 1.5, ("hard", "large"): 1.05,
                ("smoothing", "small"): 2.0, ("smoothing", "large"): 1.3}  # fmt: skip
SMALL_TARGET_SHAPES = {(128, 10), (256, 10), (256, 100)}
MEMORY_TARGET = 1.0
AUTHORS_TARGET = 1.0
#: Logits below this many bytes: the RSS-based memory reading is noise (see the docstring).
MIN_MEMORY_BYTES = 1 << 19
#: Seconds one timing sample lasts at least (calls are repeated within it).
SAMPLE_SECONDS = 0.02
AUTHORS = "authors-formulation"
CONTENDERS = ("ce", "el", AUTHORS)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    name: str
    n: int
    c: int
    label_smoothing: float
    log_end: float

    @property
    def kind(self) -> str:
        return "smoothing" if self.label_smoothing > 0.0 else "hard"

    @property
    def group(self) -> str | None:
        """"small" (the issue's small shapes), "large" (4096 rows or more) or None."""
        if (self.n, self.c) in SMALL_TARGET_SHAPES:
            return "small"
        return "large" if self.n >= 4096 else None


def _cases(shapes, plain_log: bool) -> list[Case]:
    cases = []
    for n, c in shapes:
        shape = f"{n}x{c}"
        cases.append(Case(f"hard-{shape}", n, c, 0.0, 0.75))
        if plain_log:
            cases.append(Case(f"hard-{shape}-plainlog", n, c, 0.0, 1.0))
        cases.append(Case(f"smooth0.1-{shape}", n, c, 0.1, 0.75))
    return cases


SMALL_SHAPES = [(128, 10), (256, 10), (256, 100), (256, 1000)]
LARGE_SHAPES = [(4096, 1000), (4096, 32000)]
QUICK_SHAPES = [(256, 1000)]
SHAPE_SETS = {
    "small": _cases(SMALL_SHAPES, plain_log=False),
    "large": _cases(LARGE_SHAPES, plain_log=True),
}
SHAPE_SETS["all"] = SHAPE_SETS["small"] + SHAPE_SETS["large"]
ALL_CASES = {case.name: case for case in SHAPE_SETS["all"]}


# ----------------------------------------------------------------------------------- contenders


def authors_formulation(logits, target, label_smoothing=0.0, log_end=0.75):
    """The authors' published formulation, re-implemented here (autograd through all of it).

    log_softmax, p = exp, bonus = log(clamp(1 - p, min=1e-5)) over all classes, the conservative
    tangent for p > log_end via ``torch.where``, then the target's entry of ``-(log p - bonus)``,
    averaged. Label smoothing follows torch's convention (q = (1 - eps) one-hot + eps / C), as the
    library does.
    """
    lprobs = F.log_softmax(logits, dim=-1)
    probs = torch.exp(lprobs)
    bonus = torch.log(torch.clamp(torch.ones_like(probs) - probs, min=1e-5))
    if log_end != 1.0:
        y_log_end = torch.log(torch.ones_like(probs) - log_end)
        bonus_after = 1.0 / (log_end - torch.ones_like(probs)) * (probs - log_end) + y_log_end
        bonus = torch.where(probs > log_end, bonus_after, bonus)
    per_class = -(lprobs - bonus)
    nll = per_class.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0.0:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * per_class.mean(dim=-1)
    return nll.mean()


def make_loss(contender: str, case: Case):
    """A callable loss(logits, target) for one contender of a case."""
    eps = case.label_smoothing
    if contender == "ce":
        return lambda x, t: F.cross_entropy(x, t, label_smoothing=eps)
    if contender == "el":
        return lambda x, t: encouraging_loss(x, t, label_smoothing=eps, log_end=case.log_end)
    if contender == AUTHORS:
        return lambda x, t: authors_formulation(x, t, label_smoothing=eps, log_end=case.log_end)
    raise ValueError(f"unknown contender {contender!r}")


def make_inputs(case: Case, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    logits = torch.randn(case.n, case.c, dtype=dtype).requires_grad_()
    target = torch.randint(0, case.c, (case.n,))
    return logits, target


def fwd_bwd(loss_fn, logits, target, calls: int = 1) -> float:
    """Seconds per call of ``calls`` loss(logits, target) and .backward(), each with a fresh
    gradient."""
    start = time.perf_counter()
    for _ in range(calls):
        logits.grad = None
        loss_fn(logits, target).backward()
    return (time.perf_counter() - start) / calls


def calls_per_sample(fns, logits, target) -> int:
    """How many calls of the slowest contender make a sample of about SAMPLE_SECONDS."""
    slowest = max(fwd_bwd(fn, logits, target, 3) for fn in fns.values())
    return max(1, min(1000, round(SAMPLE_SECONDS / max(slowest, 1e-9))))


# ---------------------------------------------------------------------------------------- time


def check_values(case: Case, dtype: torch.dtype, seed: int) -> dict:
    """EL with bonus_scale=0 must be CE (value and gradient); EL against the authors' form."""
    logits, target = make_inputs(case, dtype, seed)
    eps = case.label_smoothing

    def value_and_grad(fn):
        logits.grad = None
        value = fn(logits, target)
        value.backward()
        return value.detach().double(), logits.grad.double()

    ce_v, ce_g = value_and_grad(lambda x, t: F.cross_entropy(x, t, label_smoothing=eps))
    el0_v, el0_g = value_and_grad(
        lambda x, t: encouraging_loss(x, t, label_smoothing=eps, bonus_scale=0.0)
    )
    out = {
        "el_bonus0_vs_ce_abs_value_diff": float((el0_v - ce_v).abs()),
        "el_bonus0_vs_ce_max_abs_grad_diff": float((el0_g - ce_g).abs().max()),
        "ce_value": float(ce_v),
    }
    el_v, el_g = value_and_grad(make_loss("el", case))
    au_v, au_g = value_and_grad(make_loss(AUTHORS, case))
    out["el_vs_authors_abs_value_diff"] = float((el_v - au_v).abs())
    out["el_vs_authors_max_abs_grad_diff"] = float((el_g - au_g).abs().max())
    return out


def time_case(case: Case, contenders, dtype, seed: int, warmup: int, repeats: int) -> dict:
    logits, target = make_inputs(case, dtype, seed)
    fns = {name: make_loss(name, case) for name in contenders}
    calls = calls_per_sample(fns, logits, target)
    runs = {name: (lambda fn=fn: fwd_bwd(fn, logits, target, calls)) for name, fn in fns.items()}
    times = time_interleaved(runs, warmup, repeats, rotate=True)
    logits.grad = None
    return times | {"calls_per_sample": calls}


# -------------------------------------------------------------------------------------- memory


def _measure_once(args, contender: str) -> dict:
    case = Case("child", args.n, args.c, args.label_smoothing, args.log_end)
    dtype = getattr(torch, args.dtype)
    loss_fn = make_loss(contender, case)
    maxrss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Warm up on the case's classes and 60% of its rows: the same code path (first calls load
    # modules and set up kernels, which the resident size would count), a smaller peak.
    warm = Case("warmup", max(1, (args.n * 3) // 5), args.c, args.label_smoothing, args.log_end)
    x, t = make_inputs(warm, dtype, args.seed)
    for _ in range(2):
        fwd_bwd(loss_fn, x, t)
    del x, t
    logits, target = make_inputs(case, dtype, args.seed)
    rss_before = rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fwd_bwd(loss_fn, logits, target)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "contender": contender,
        "maxrss_at_start_bytes": maxrss_at_start,
        "rss_before_bytes": rss_before,
        "maxrss_before_call_bytes": maxrss_before,
        "maxrss_bytes": maxrss_after,
        "peak_extra_bytes": maxrss_after - rss_before,
        # True when the process peak before the call (set-up) was not exceeded by the call:
        # then peak_extra_bytes is only an upper bound of the call's own peak extra.
        "peak_masked_by_setup": maxrss_after == maxrss_before,
    }


def _in_forked_process(fn, *fn_args) -> dict:
    """Run fn(*fn_args) in a forked process and return its JSON-able result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the measuring process
        os.close(read_fd)
        code = 1
        try:
            payload = json.dumps(fn(*fn_args)).encode()
            with os.fdopen(write_fd, "wb") as f:
                f.write(payload)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not payload:
        sys.exit(f"memory measurement failed (wait status {status})")
    return json.loads(payload)


def measure_memory_child(args) -> None:
    """Runs in a fresh subprocess: peak extra bytes of one forward + backward per contender.

    Linux carries ru_maxrss across fork + exec: a child started by ``subprocess`` inherits the
    parent's peak RSS (the parent's whole peak with vfork), which would hide the call's own peak.
    So this subprocess, before torch computes anything (no worker threads yet), forks one process
    per contender and measures there: each starts with its own rusage, from the resident size of
    a process that has only imported torch, and does its own warm-up. (One subprocess per case
    rather than per contender halves the torch imports, which dominate ``--quick``.)
    """
    contenders = args.contender.split(",")
    print(json.dumps({name: _in_forked_process(_measure_once, args, name) for name in contenders}))


def measure_memory(case: Case, contenders, dtype_name: str, seed: int, threads: int) -> dict:
    """{contender: measurement} for one case, from a fresh subprocess (see the child above)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--measure-memory",
        "--contender", ",".join(contenders), "--n", str(case.n), "--c", str(case.c),
        "--label-smoothing", repr(case.label_smoothing), "--log-end", repr(case.log_end),
        "--dtype", dtype_name, "--seed", str(seed), "--threads", str(threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed for {case.name}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over samples of time / baseline time in the same round.

    Each round runs the contenders back to back, so a load that drifts over the run hits both
    sides of each ratio alike: steadier than the ratio of the two medians.
    """
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def _check(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return "-"
    return f"{'PASS' if value <= target else 'FAIL'} (<= {target:g})"


def case_row(case: Case, threads: int, timing: dict, memory: dict, quick: bool) -> dict:
    """The table row of one case at one thread count: times, ratios and verdicts of EL."""
    all_s = {name: timing[name]["all_s"] for name in CONTENDERS}
    peak = {name: memory[name]["peak_extra_bytes"] for name in memory}
    time_target = TIME_TARGETS.get((case.kind, case.group))
    row = {
        "case": case.name,
        "threads": threads,
        **{f"{name}_ms": 1e3 * timing[name]["median_s"] for name in CONTENDERS},
        "el_vs_ce": paired_ratio(all_s["el"], all_s["ce"]),
        "el_vs_authors": paired_ratio(all_s["el"], all_s[AUTHORS]),
        "memory_el_vs_ce": peak["el"] / peak["ce"] if peak and peak["ce"] > 0 else None,
        "memory_authors_vs_ce": peak[AUTHORS] / peak["ce"] if peak and peak["ce"] > 0 else None,
        "time_target": time_target,
    }
    checks = {
        "vs CE": _check(row["el_vs_ce"], time_target),
        "vs authors": _check(row["el_vs_authors"], AUTHORS_TARGET),
        "memory": _check(row["memory_el_vs_ce"], MEMORY_TARGET),
    }
    row["verdicts"] = {k: ("n/a (quick)" if quick and v != "-" else v) for k, v in checks.items()}
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        "case", "thr", "CE ms", "EL ms", "authors ms", "EL/CE", "EL/authors", "mem EL/CE",
        "time vs CE", "vs authors", "memory",
    )  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append((
            r["case"], str(r["threads"]), _fmt(r["ce_ms"], ".3f"), _fmt(r["el_ms"], ".3f"),
            _fmt(r[f"{AUTHORS}_ms"], ".3f"), _fmt(r["el_vs_ce"], ".2f"),
            _fmt(r["el_vs_authors"], ".2f"), _fmt(r["memory_el_vs_ce"], ".2f"),
            r["verdicts"]["vs CE"], r["verdicts"]["vs authors"], r["verdicts"]["memory"],
        ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------- main


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2, got {text!r}")
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="(256, 1000), 3 repetitions, no verdicts")
    p.add_argument("--shapes", choices=tuple(SHAPE_SETS), default="all",
                   help="which shapes (default all; see the module docstring)")  # fmt: skip
    p.add_argument("--cases", default=None, help="comma-separated case names (see --list-cases)")
    p.add_argument("--list-cases", action="store_true", help="print the case names and exit")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="samples (default 11; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--threads", type=_thread_counts, default=None, metavar="N[,N...]",
                   help="torch thread counts (default 1,2; quick: torch's default)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    # Internal: the memory-measuring child.
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", default="el", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--c", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--label-smoothing", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--log-end", type=float, default=0.75, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_cases(args) -> list[Case]:
    if args.cases:
        names = [name.strip() for name in args.cases.split(",") if name.strip()]
        unknown = [name for name in names if name not in ALL_CASES]
        if unknown:
            sys.exit(f"unknown case(s) {unknown}; known: {sorted(ALL_CASES)}")
        return [ALL_CASES[name] for name in names]
    return _cases(QUICK_SHAPES, plain_log=False) if args.quick else SHAPE_SETS[args.shapes]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_memory:
        torch.set_num_threads(args.threads[0])
        measure_memory_child(args)
        return 0
    if args.list_cases:
        print("\n".join(ALL_CASES))
        return 0

    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 11)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 0:
        sys.exit("--repeats must be >= 1 and --warmup >= 0")
    if not args.quick and repeats < 7:
        print(f"note: {repeats} samples (< 7): medians are less reliable", file=sys.stderr)
    thread_counts = args.threads or ([torch.get_num_threads()] if args.quick else [1, 2])
    dtype = getattr(torch, args.dtype)
    cases = select_cases(args)

    info = machine_info()
    print(
        f"torch {info['torch']}, threads {thread_counts}, {info['cpu_count']} CPUs, "
        f"{info['platform']}; dtype {args.dtype}; {repeats} samples (median), {warmup} warm-up; "
        f"interleaved {', '.join(CONTENDERS)}"
    )
    rows, results = [], []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for case in cases:
            t0 = time.perf_counter()
            checks = check_values(case, dtype, args.seed)
            timing = time_case(case, CONTENDERS, dtype, args.seed, warmup, repeats)
            memory = {}
            measurable = case.n * case.c * dtype.itemsize >= MIN_MEMORY_BYTES
            if not args.no_memory and measurable:
                memory = measure_memory(case, CONTENDERS, args.dtype, args.seed, threads)
            row = case_row(case, threads, timing, memory, args.quick)
            rows.append(row)
            results.append({
                "case": asdict(case) | {"kind": case.kind, "group": case.group},
                "threads": threads,
                "timing": timing,
                "memory": memory,
                "checks": checks,
                "row": row,
                "case_wall_s": time.perf_counter() - t0,
            })  # fmt: skip
            print(
                f"  done {case.name} at {threads} thread(s) in {time.perf_counter() - t0:.1f} s "
                f"(EL bonus_scale=0 vs CE: |dvalue| "
                f"{checks['el_bonus0_vs_ce_abs_value_diff']:.2e}, max |dgrad| "
                f"{checks['el_bonus0_vs_ce_max_abs_grad_diff']:.2e})",
                flush=True,
            )

    print()
    print_table(rows)
    if not args.quick:
        failed = [
            f"{r['case']}@{r['threads']}:{name}"
            for r in rows
            for name, text in r["verdicts"].items()
            if text.startswith("FAIL")
        ]
        print(f"\nverdict: {'all targets met' if not failed else 'FAIL: ' + ', '.join(failed)}")
    load_start, load_end = info["load_average_1_5_15"][0], os.getloadavg()[0]
    print(
        f"(EL/CE and EL/authors are paired ratios, which the verdicts use; 1-min load average "
        f"{load_start:.2f} at start, {load_end:.2f} at end on {info['cpu_count']} CPUs: on a "
        f"shared machine expect noise"
        + (", here a lot: other work competed for the CPUs)" if max(load_start, load_end)
           > (info["cpu_count"] or 1) else ")")
    )  # fmt: skip

    info["load_average_at_end_1_5_15"] = list(os.getloadavg())
    data = {
        "benchmark": "bench_loss",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [os.path.basename(sys.executable), *sys.argv],
        "machine": info,
        "settings": {
            "dtype": args.dtype,
            "quick": args.quick,
            "repeats": repeats,
            "warmup": warmup,
            "threads": thread_counts,
            "seed": args.seed,
            "contenders": list(CONTENDERS),
            "memory_method": (
                "fresh subprocess per contender, MALLOC_MMAP_THRESHOLD_=65536; "
                "ru_maxrss*1024 - RSS(/proc/self/statm) before one forward+backward; "
                "baseline holds logits+target, extra includes the gradient tensor; "
                f"not measured below {MIN_MEMORY_BYTES} bytes of logits"
            ),
            "targets": {
                "time_vs_ce": {f"{k[0]}/{k[1]}": v for k, v in TIME_TARGETS.items()},
                "small_shapes": sorted(SMALL_TARGET_SHAPES),
                "time_vs_authors": AUTHORS_TARGET,
                "memory_vs_ce": MEMORY_TARGET,
            },
        },
        "results": results,
        "table": rows,
    }
    write_json_atomically(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
