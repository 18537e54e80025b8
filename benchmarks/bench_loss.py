"""Forward + backward time and peak extra memory of the encouraging loss against torch's CE.

Usage::

    python benchmarks/bench_loss.py            # full run: (4096, 1000) and (4096, 32000), fp32
    python benchmarks/bench_loss.py --quick    # CI smoke run: (256, 1000), 3 repetitions, < 30 s

Options: ``--dtype bfloat16``, ``--include-authors`` (adds a re-implementation of the authors'
published formulation, label "authors-formulation"), ``--cases NAME,NAME`` (``--list-cases``
shows them), ``--repeats N``, ``--warmup N``, ``--threads N``, ``--no-memory``, ``--out PATH``
(default ``benchmarks/results/bench_loss.json``).

Every case compares ``encouraging_loss.encouraging_loss`` (EL) with
``torch.nn.functional.cross_entropy`` (CE) on the same inputs, in the same run:

* time: one call ``loss(logits, target)`` then ``.backward()`` (with ``logits.grad = None``
  before each), contenders interleaved (CE, EL, CE, EL, ...) within each repetition after a
  warm-up; the median of the repetitions is reported, with the ratio EL / CE of the medians and
  the "paired" ratio, the median of the per-repetition ratios, which the verdicts use. Wall-clock
  timings on a shared machine are noisy: rerun before drawing conclusions from a few percent.
* memory: torch has no CPU peak-memory counter, so each contender runs in a fresh subprocess
  with ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are mmapped, freed memory goes back to the
  OS). The child builds the inputs, warms the kernels up on a small shape, reads its resident set
  size, runs one forward + backward and reports ``ru_maxrss - rss_before``: the peak extra memory
  of the call. The baseline holds logits and target; the extra includes the gradient tensor
  (N x C elements of the input dtype) that every contender must allocate.

Targets (verdicts are printed in full mode; the exit code is 0 regardless): with hard
(class-index) targets EL time <= 1.05x CE and memory <= 1.0x CE; with label smoothing EL time
<= 1.5x CE (against CE with the same smoothing). The authors' formulation has no target.
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
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from _measure import rss_bytes, time_interleaved

from encouraging_loss import encouraging_loss

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_loss.json")
MMAP_THRESHOLD = "65536"
MIB = 1024.0 * 1024.0
HARD_TIME_TARGET = 1.05
HARD_MEMORY_TARGET = 1.0
SMOOTH_TIME_TARGET = 1.5
AUTHORS = "authors-formulation"


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


def _cases(shapes) -> list[Case]:
    cases = []
    for n, c in shapes:
        shape = f"{n}x{c}"
        cases.append(Case(f"hard-{shape}", n, c, 0.0, 0.75))
        cases.append(Case(f"hard-{shape}-plainlog", n, c, 0.0, 1.0))
        cases.append(Case(f"smooth0.1-{shape}", n, c, 0.1, 0.75))
    return cases


FULL_SHAPES = [(4096, 1000), (4096, 32000)]
QUICK_SHAPES = [(256, 1000)]
ALL_CASES = {case.name: case for case in _cases(FULL_SHAPES + QUICK_SHAPES)}


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


def fwd_bwd(loss_fn, logits, target) -> float:
    """Seconds for one loss(logits, target) and .backward(), with a fresh gradient."""
    logits.grad = None
    start = time.perf_counter()
    loss_fn(logits, target).backward()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- time


def check_values(case: Case, dtype: torch.dtype, seed: int, include_authors: bool) -> dict:
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
    if include_authors:
        el_v, el_g = value_and_grad(make_loss("el", case))
        au_v, au_g = value_and_grad(make_loss(AUTHORS, case))
        out["el_vs_authors_abs_value_diff"] = float((el_v - au_v).abs())
        out["el_vs_authors_max_abs_grad_diff"] = float((el_g - au_g).abs().max())
    return out


def time_case(case: Case, contenders, dtype, seed: int, warmup: int, repeats: int) -> dict:
    logits, target = make_inputs(case, dtype, seed)
    fns = {name: make_loss(name, case) for name in contenders}
    # Interleaved: CE, EL, (authors), CE, EL, ...
    runs = {name: (lambda fn=fn: fwd_bwd(fn, logits, target)) for name, fn in fns.items()}
    times = time_interleaved(runs, warmup, repeats)
    logits.grad = None
    return times


# -------------------------------------------------------------------------------------- memory


def _measure_once(args, contender: str) -> dict:
    case = Case("child", args.n, args.c, args.label_smoothing, args.log_end)
    dtype = getattr(torch, args.dtype)
    loss_fn = make_loss(contender, case)
    maxrss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    small = Case("warmup", 64, 100, args.label_smoothing, args.log_end)
    x, t = make_inputs(small, dtype, args.seed)
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


def targets_for(case: Case, contender: str):
    """(time target, memory target or None, description); None for no target."""
    if contender == AUTHORS:
        return None
    if case.kind == "hard":
        text = f"t<={HARD_TIME_TARGET} m<={HARD_MEMORY_TARGET}"
        return HARD_TIME_TARGET, HARD_MEMORY_TARGET, text
    return SMOOTH_TIME_TARGET, None, f"t<={SMOOTH_TIME_TARGET}"


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over repetitions of time / baseline time in the same repetition.

    Each repetition runs the contenders back to back, so a load that drifts over the run hits
    both sides of each ratio alike: steadier than the ratio of the two medians.
    """
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def verdict(row: dict, quick: bool) -> str:
    """PASS/FAIL against the case's targets; time from the paired ratio (see paired_ratio)."""
    target = row["target"]
    if target is None:
        return "info"
    if quick:
        return "n/a (quick)"
    time_target, memory_target = target
    ok = row["paired_time_ratio"] <= time_target
    if memory_target is not None and row["memory_ratio"] is not None:
        ok = ok and row["memory_ratio"] <= memory_target
    return "PASS" if ok else "FAIL"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        "case", "contender", "CE ms", "X ms", "time ratio", "paired", "CE MiB", "X MiB",
        "mem ratio", "target", "verdict",
    )  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append((
            r["case"], r["contender"], _fmt(r["ce_ms"], ".2f"), _fmt(r["x_ms"], ".2f"),
            _fmt(r["time_ratio"], ".3f"), _fmt(r["paired_time_ratio"], ".3f"),
            _fmt(r["ce_mib"], ".1f"), _fmt(r["x_mib"], ".1f"),
            _fmt(r["memory_ratio"], ".3f"), r["target_text"], r["verdict"],
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
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def write_json_atomic(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench_loss.", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="(256, 1000), 3 repetitions, no verdicts")
    p.add_argument("--cases", default=None, help="comma-separated case names (see --list-cases)")
    p.add_argument("--list-cases", action="store_true", help="print the case names and exit")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--include-authors", action="store_true",
                   help=f"also time the authors' formulation ({AUTHORS!r})")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 11; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
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
    return _cases(QUICK_SHAPES if args.quick else FULL_SHAPES)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
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
        print(f"note: {repeats} repetitions (< 7): medians are less reliable", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    contenders = ["ce", "el"] + ([AUTHORS] if args.include_authors else [])
    cases = select_cases(args)

    info = machine_info()
    print(
        f"torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_count']} CPUs, "
        f"{info['platform']}; dtype {args.dtype}; {repeats} repetitions (median), "
        f"{warmup} warm-up; interleaved {', '.join(contenders)}"
    )
    rows, results = [], []
    for case in cases:
        t0 = time.perf_counter()
        checks = check_values(case, dtype, args.seed, args.include_authors)
        timing = time_case(case, contenders, dtype, args.seed, warmup, repeats)
        memory = {}
        if not args.no_memory:
            memory = measure_memory(case, contenders, args.dtype, args.seed, threads)
        ce_s = timing["ce"]["median_s"]
        ce_mem = memory["ce"]["peak_extra_bytes"] if memory else None
        case_rows = []
        for name in contenders[1:]:
            x_mem = memory[name]["peak_extra_bytes"] if memory else None
            target = targets_for(case, name)
            row = {
                "case": case.name,
                "contender": name,
                "ce_ms": 1e3 * ce_s,
                "x_ms": 1e3 * timing[name]["median_s"],
                "time_ratio": timing[name]["median_s"] / ce_s,
                "paired_time_ratio": paired_ratio(timing[name]["all_s"], timing["ce"]["all_s"]),
                "ce_mib": None if ce_mem is None else ce_mem / MIB,
                "x_mib": None if x_mem is None else x_mem / MIB,
                "memory_ratio": None if x_mem is None else x_mem / ce_mem,
                "target": None if target is None else target[:2],
                "target_text": "-" if target is None else target[2],
            }
            row["verdict"] = verdict(row, args.quick)
            case_rows.append(row)
        rows.extend(case_rows)
        results.append({
            "case": asdict(case) | {"kind": case.kind},
            "timing": timing,
            "memory": memory,
            "gradient_tensor_mib": case.n * case.c * torch.empty((), dtype=dtype).element_size()
            / MIB,
            "checks": checks,
            "rows": case_rows,
            "case_wall_s": time.perf_counter() - t0,
        })  # fmt: skip
        diff = checks["el_bonus0_vs_ce_abs_value_diff"]
        gdiff = checks["el_bonus0_vs_ce_max_abs_grad_diff"]
        print(
            f"  done {case.name} in {time.perf_counter() - t0:.1f} s "
            f"(EL bonus_scale=0 vs CE: |dvalue| {diff:.2e}, max |dgrad| {gdiff:.2e})",
            flush=True,
        )

    print()
    print_table(rows)
    if not args.quick:
        failed = [f"{r['case']}/{r['contender']}" for r in rows if r["verdict"] == "FAIL"]
        print(f"\nverdict: {'all targets met' if not failed else 'FAIL: ' + ', '.join(failed)}")
    load_start, load_end = info["load_average_1_5_15"][0], os.getloadavg()[0]
    print(
        f"(wall-clock medians; 'paired' is the median of per-repetition ratios, which the "
        f"verdicts use; 1-min load average {load_start:.2f} at start, {load_end:.2f} at end "
        f"on {info['cpu_count']} CPUs: on a shared machine expect noise"
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
            "seed": args.seed,
            "contenders": contenders,
            "memory_method": (
                "fresh subprocess per contender, MALLOC_MMAP_THRESHOLD_=65536; "
                "ru_maxrss*1024 - RSS(/proc/self/statm) before one forward+backward; "
                "baseline holds logits+target, extra includes the gradient tensor"
            ),
            "targets": {
                "hard": {"time_ratio": HARD_TIME_TARGET, "memory_ratio": HARD_MEMORY_TARGET},
                "smoothing": {"time_ratio": SMOOTH_TIME_TARGET},
            },
        },
        "results": results,
        "table": rows,
    }
    write_json_atomic(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
