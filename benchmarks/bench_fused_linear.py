"""Fused linear + EL against the materialised linear + EL: time and peak extra memory, on CPU.

Usage::

    python benchmarks/bench_fused_linear.py            # full run: T=4096, H=1024, V=32000, fp32
    python benchmarks/bench_fused_linear.py --quick    # CI smoke run: T=256, H=128, V=2048, < 30 s

Options: ``--tokens T --hidden H --vocab V``, ``--dtype bfloat16``, ``--chunk-size N`` (default:
the library's rule), ``--label-smoothing EPS``, ``--include-ce`` (adds materialised linear + torch
CE for context), ``--repeats N``, ``--warmup N``, ``--no-memory``, ``--out PATH`` (default
``benchmarks/results/bench_fused_linear.json``, written atomically).

Contenders, on the same inputs (hidden (T, H) and weight (V, H), both requiring gradients, and
class-index targets), in the same run:

* ``fused``: ``linear_encouraging_loss(hidden, weight, target).backward()``;
* ``fused-sum-in-weight-dtype`` (bfloat16 only): the same with ``accumulation_dtype=weight.dtype``
  (the weight gradient summed over chunks in bfloat16, as Liger-Kernel does by default);
* ``materialised``: ``encouraging_loss(F.linear(hidden, weight), target).backward()``;
* ``materialised-ce`` (``--include-ce``): ``F.cross_entropy(F.linear(hidden, weight), target)``.

Time: forward + backward with fresh gradients, contenders interleaved within each repetition
after a warm-up; the median is reported with the ratio fused / materialised. Memory: each
contender runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers are
mmapped and go back to the OS when freed); the child builds the inputs, warms the kernels up on a
small shape, reads its resident set size, runs one forward + backward and reports the peak
resident set size (VmHWM; ``ru_maxrss`` is also recorded, measured before the parent grows) minus
the size before: the peak extra memory of the call, gradients of hidden and weight included
(every contender must allocate them).

Targets (printed in full mode; the exit code is 0 regardless): fused memory <= 0.35x and time
<= 1.3x the materialised path's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _measure import (
    MMAP_THRESHOLD,
    peak_rss_bytes,
    rss_bytes,
    time_interleaved,
    write_json_atomically,
)

from encouraging_loss import encouraging_loss, linear_encouraging_loss

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "bench_fused_linear.json"
)
MIB = 1024.0 * 1024.0
MEMORY_TARGET = 0.35
TIME_TARGET = 1.3
FULL_SHAPE = dict(tokens=4096, hidden=1024, vocab=32000)
QUICK_SHAPE = dict(tokens=256, hidden=128, vocab=2048)


def make_loss(contender: str, args):
    """A callable loss(hidden, weight, target) for one contender."""
    eps = args.label_smoothing
    if contender == "fused":
        return lambda h, w, t: linear_encouraging_loss(
            h, w, t, label_smoothing=eps, chunk_size=args.chunk_size
        )
    if contender == "fused-sum-in-weight-dtype":
        return lambda h, w, t: linear_encouraging_loss(
            h, w, t, label_smoothing=eps, chunk_size=args.chunk_size, accumulation_dtype=w.dtype
        )
    if contender == "materialised":
        return lambda h, w, t: encouraging_loss(F.linear(h, w), t, label_smoothing=eps)
    if contender == "materialised-ce":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w), t, label_smoothing=eps)
    raise ValueError(f"unknown contender {contender!r}")


def make_inputs(tokens: int, hidden_size: int, vocab: int, dtype, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,))
    return hidden, weight, target


def fwd_bwd(loss_fn, hidden, weight, target) -> float:
    """Seconds for one loss and .backward(), with fresh gradients."""
    hidden.grad = weight.grad = None
    start = time.perf_counter()
    loss_fn(hidden, weight, target).backward()
    return time.perf_counter() - start


def check_values(args, dtype) -> dict:
    """Fused against materialised on a small slice of the shape: loss and gradient differences."""
    hidden, weight, target = make_inputs(256, args.hidden, min(args.vocab, 4096), dtype, seed=1)
    results = {}
    for name in ("fused", "materialised"):
        hidden.grad = weight.grad = None
        value = make_loss(name, args)(hidden, weight, target)
        value.backward()
        results[name] = (value.detach().double(), hidden.grad.double(), weight.grad.double())
    (fv, fh, fw), (mv, mh, mw) = results["fused"], results["materialised"]
    return {
        "abs_value_diff": float((fv - mv).abs()),
        "max_abs_grad_hidden_diff": float((fh - mh).abs().max()),
        "max_abs_grad_weight_diff": float((fw - mw).abs().max()),
    }


def time_contenders(args, contenders, dtype) -> dict:
    hidden, weight, target = make_inputs(args.tokens, args.hidden, args.vocab, dtype)
    fns = {name: make_loss(name, args) for name in contenders}
    runs = {name: (lambda fn=fn: fwd_bwd(fn, hidden, weight, target)) for name, fn in fns.items()}
    return time_interleaved(runs, args.warmup, args.repeats)


def _measure_child(args) -> dict:
    """In the child: peak extra memory of one forward + backward of ``args.child``."""
    dtype = getattr(torch, args.dtype)
    loss_fn = make_loss(args.child, args)
    # Warm the kernels (and the allocator's bookkeeping) up on a small shape first.
    fwd_bwd(loss_fn, *make_inputs(64, args.hidden, 256, dtype))
    hidden, weight, target = make_inputs(args.tokens, args.hidden, args.vocab, dtype)
    before = rss_bytes()
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, target).backward()
    peak = peak_rss_bytes()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "rss_before_bytes": before,
        "peak_extra_bytes": peak - before,
        "ru_maxrss_minus_before_bytes": maxrss - before,
    }


def measure_memory(args, contender: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    command = [
        sys.executable, os.path.abspath(__file__), "--child", contender,
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--dtype", args.dtype, "--label-smoothing", str(args.label_smoothing),
    ]  # fmt: skip
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CI smoke run")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--include-ce", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    for key, value in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_measure_child(args)))
        return {}
    dtype = getattr(torch, args.dtype)
    contenders = ["fused", "materialised"] + (["materialised-ce"] if args.include_ce else [])
    if dtype == torch.bfloat16:
        contenders.insert(1, "fused-sum-in-weight-dtype")
    print(
        f"fused linear + EL, T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}"
    )
    checks = check_values(args, dtype)
    print("fused vs materialised (256 rows):", {k: f"{v:.2e}" for k, v in checks.items()})
    # Memory first, while this process is small (see _peak_rss_bytes), then time.
    memory = {} if args.no_memory else {name: measure_memory(args, name) for name in contenders}
    timings = time_contenders(args, contenders, dtype)
    base = "materialised"
    rows = []
    for name in contenders:
        row = {
            "contender": name,
            "median_s": timings[name]["median_s"],
            "time_ratio_vs_materialised": timings[name]["median_s"] / timings[base]["median_s"],
        }
        if memory:
            row["peak_extra_mib"] = memory[name]["peak_extra_bytes"] / MIB
            row["memory_ratio_vs_materialised"] = (
                memory[name]["peak_extra_bytes"] / memory[base]["peak_extra_bytes"]
            )
        rows.append(row)
        line = f"  {name:25s} time {row['median_s'] * 1e3:9.1f} ms  ({row['time_ratio_vs_materialised']:.2f}x)"  # noqa: E501
        if memory:
            line += f"  peak extra {row['peak_extra_mib']:8.1f} MiB  ({row['memory_ratio_vs_materialised']:.2f}x)"  # noqa: E501
        print(line)
    verdicts = {}
    if not args.quick:
        fused = rows[0]
        verdicts["time"] = fused["time_ratio_vs_materialised"] <= TIME_TARGET
        if memory:
            verdicts["memory"] = fused["memory_ratio_vs_materialised"] <= MEMORY_TARGET
        print(
            f"targets: time <= {TIME_TARGET}x: {'met' if verdicts['time'] else 'NOT met'}"
            + (
                f"; memory <= {MEMORY_TARGET}x: {'met' if verdicts['memory'] else 'NOT met'}"
                if memory
                else ""
            )
        )
    payload = {
        "benchmark": "bench_fused_linear",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "shape": {
            "tokens": args.tokens,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "label_smoothing": args.label_smoothing,
            "chunk_size": args.chunk_size,
        },
        "checks": checks,
        "timings": timings,
        "memory": memory,
        "results": rows,
        "targets": {"time_ratio": TIME_TARGET, "memory_ratio": MEMORY_TARGET},
        "verdicts": verdicts,
    }
    write_json_atomically(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
