"""A Hugging Face causal LM with the fused EL patch against the unpatched model, on CPU.

Usage::

    python benchmarks/bench_hf_patch.py           # tiny Llama, vocabulary 128000, 4 x 512 tokens
    python benchmarks/bench_hf_patch.py --quick   # smoke run: vocabulary 8192, 4 x 128, < 1 min

Options: ``--vocab V --hidden H --layers L --batch B --sequence S``, ``--repeats N``,
``--warmup N``, ``--no-memory``, ``--out PATH`` (default ``benchmarks/results/bench_hf_patch.json``,
written atomically).

The model is a randomly initialised ``LlamaForCausalLM`` (H hidden, L layers, 4 heads, no
download) in float32 training mode; the batch is B sequences of S random tokens, a quarter of
each sequence's first tokens labelled -100 (a prompt). Contenders, on the same model and batch,
in the same run, each one forward + backward from the input ids (the whole model):

* ``patched``: ``apply_encouraging_loss(model)``, then ``model(input_ids, labels=labels).loss``
  (the fused linear EL from the last hidden states and ``lm_head``; no logits);
* ``unpatched-el``: the model's logits fed to the same loss, materialised:
  ``CausalLMEncouragingLoss()(model(input_ids), labels)`` (what ``Trainer(compute_loss_func=
  causal_lm_encouraging_loss())`` does);
* ``unpatched-ce``: the model's own cross-entropy, ``model(input_ids, labels=labels).loss``.

Time: the contenders interleaved within each repetition after a warm-up, medians reported with
the ratio to ``unpatched-el``. Memory: each contender in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (as ``bench_fused_linear.py``): the child builds the model and
batch, warms up on a short batch, drops the parameter gradients, reads its resident set size,
runs one forward + backward and reports the peak resident set size (VmHWM) minus the size before:
the peak extra memory of a training step's forward + backward, activations and the parameter
gradients (every contender allocates them: 2 x V x H x 4 bytes for the embedding and the head)
included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from _measure import (
    MMAP_THRESHOLD,
    peak_rss_bytes,
    rss_bytes,
    time_interleaved,
    write_json_atomically,
)

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "bench_hf_patch.json"
)
MIB = 1024.0 * 1024.0
FULL_SHAPE = dict(vocab=128000, hidden=256, layers=2, batch=4, sequence=512)
QUICK_SHAPE = dict(vocab=8192, hidden=64, layers=2, batch=4, sequence=128)
CONTENDERS = ("patched", "unpatched-el", "unpatched-ce")
BASE = "unpatched-el"


def make_model(args, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max(args.sequence, 64),
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


def make_batch(args, batch: int, sequence: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, args.vocab, (batch, sequence), generator=generator)
    labels = input_ids.clone()
    labels[:, : sequence // 4] = -100
    return input_ids, labels


def make_step(contender: str, model):
    """A callable step(input_ids, labels) -> loss for one contender (patching the model once)."""
    from encouraging_loss.integrations.huggingface import (
        CausalLMEncouragingLoss,
        apply_encouraging_loss,
        remove_encouraging_loss,
    )

    if "_encouraging_loss_patch" in vars(model):
        remove_encouraging_loss(model)
    if contender == "patched":
        apply_encouraging_loss(model)
        return lambda ids, labels: model(input_ids=ids, labels=labels).loss
    if contender == "unpatched-el":
        loss_fn = CausalLMEncouragingLoss()
        return lambda ids, labels: loss_fn(model(input_ids=ids), labels)
    if contender == "unpatched-ce":
        return lambda ids, labels: model(input_ids=ids, labels=labels).loss
    raise ValueError(f"unknown contender {contender!r}")


def fwd_bwd(model, step, input_ids, labels) -> float:
    """Seconds for one forward + backward of the model, with fresh parameter gradients."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    step(input_ids, labels).backward()
    return time.perf_counter() - start


def check_values(args) -> dict:
    """Patched against unpatched EL on a short batch: loss and largest gradient difference."""
    model = make_model(args)
    input_ids, labels = make_batch(args, 2, min(args.sequence, 64), seed=2)
    results = {}
    for name in ("unpatched-el", "patched"):
        model.zero_grad(set_to_none=True)
        step = make_step(name, model)
        loss = step(input_ids, labels)
        loss.backward()
        results[name] = (loss.detach().double(), [p.grad.double() for p in model.parameters()])
    (pv, pg), (mv, mg) = results["patched"], results["unpatched-el"]
    return {
        "abs_loss_diff": float((pv - mv).abs()),
        "max_abs_grad_diff": max(float((a - b).abs().max()) for a, b in zip(pg, mg, strict=True)),
    }


def time_contenders(args) -> dict:
    input_ids, labels = make_batch(args, args.batch, args.sequence)
    models = {name: make_model(args) for name in CONTENDERS}  # the same weights, one per contender
    runs = {}
    for name, model in models.items():
        step = make_step(name, model)
        runs[name] = lambda model=model, step=step: fwd_bwd(model, step, input_ids, labels)
    return time_interleaved(runs, args.warmup, args.repeats)


def _measure_child(args) -> dict:
    """In the child: peak extra memory of one forward + backward of ``args.child``."""
    model = make_model(args)
    step = make_step(args.child, model)
    fwd_bwd(model, step, *make_batch(args, 1, 32, seed=3))  # warm the kernels up
    input_ids, labels = make_batch(args, args.batch, args.sequence)
    model.zero_grad(set_to_none=True)
    before = rss_bytes()
    step(input_ids, labels).backward()
    return {"rss_before_bytes": before, "peak_extra_bytes": peak_rss_bytes() - before}


def measure_memory(args, contender: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    command = [
        sys.executable, os.path.abspath(__file__), "--child", contender,
        "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--batch", str(args.batch), "--sequence", str(args.sequence),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    for name in FULL_SHAPE:
        parser.add_argument(f"--{name}", type=int)
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
        args.repeats = 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_measure_child(args)))
        return {}
    import transformers

    tokens = args.batch * args.sequence
    print(
        f"tiny Llama (H={args.hidden}, {args.layers} layers), vocabulary {args.vocab}, "
        f"{args.batch} x {args.sequence} = {tokens} tokens, float32, forward + backward; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    checks = check_values(args)
    print("patched vs unpatched EL (2 x 64 tokens):", {k: f"{v:.2e}" for k, v in checks.items()})
    # Memory first, while this process is small (see _measure.peak_rss_bytes).
    memory = {} if args.no_memory else {name: measure_memory(args, name) for name in CONTENDERS}
    timings = time_contenders(args)
    rows = []
    for name in CONTENDERS:
        row = {
            "contender": name,
            "median_s": timings[name]["median_s"],
            "time_ratio_vs_unpatched_el": timings[name]["median_s"] / timings[BASE]["median_s"],
        }
        line = f"  {name:13s} time {row['median_s']:7.2f} s ({row['time_ratio_vs_unpatched_el']:.2f}x)"  # noqa: E501
        if memory:
            extra = memory[name]["peak_extra_bytes"]
            row["peak_extra_mib"] = extra / MIB
            row["memory_ratio_vs_unpatched_el"] = extra / memory[BASE]["peak_extra_bytes"]
            line += f"  peak extra {row['peak_extra_mib']:7.0f} MiB ({row['memory_ratio_vs_unpatched_el']:.2f}x)"  # noqa: E501
        rows.append(row)
        print(line)
    if memory:
        patched = memory["patched"]["peak_extra_bytes"]
        print(
            "patched / unpatched: time "
            f"{timings['patched']['median_s'] / timings[BASE]['median_s']:.2f}x (EL), "
            f"{timings['patched']['median_s'] / timings['unpatched-ce']['median_s']:.2f}x (CE); "
            f"peak extra memory {patched / memory[BASE]['peak_extra_bytes']:.2f}x (EL), "
            f"{patched / memory['unpatched-ce']['peak_extra_bytes']:.2f}x (CE)"
        )
    payload = {
        "benchmark": "bench_hf_patch",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "shape": {name: getattr(args, name) for name in FULL_SHAPE},
        "checks": checks,
        "timings": timings,
        "memory": memory,
        "results": rows,
    }
    write_json_atomically(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
