"""The worker of tests/test_vocab_parallel.py, run on each rank by ``torchrun`` (gloo, CPU).

Every rank builds the same full float64 tensors, computes the single-process loss and gradients
(``encouraging_loss`` / ``linear_encouraging_loss``) and the vocabulary-parallel ones of its own
columns, and writes, per case, the relative errors (and for the error cases the exception) to
``<out_dir>/rank<r>.json``. Run: ``torchrun --nproc_per_node 2 --standalone
tests/vocab_parallel_worker.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from encouraging_loss import encouraging_loss, linear_encouraging_loss
from encouraging_loss.vocab_parallel import (
    VocabParallelEncouragingLoss,
    vocab_parallel_encouraging_loss,
    vocab_parallel_linear_encouraging_loss,
)

#: Widths of the two ranks' shards: uneven by default.
UNEVEN, EVEN = (4, 5), (5, 5)

#: name -> (form, widths, rows, options). ``rows`` may be a shape (N, d) for index shapes.
CASES = {
    "hard_conservative": ("logits", UNEVEN, 6, {}),
    "hard_plain_log": ("logits", UNEVEN, 6, {"log_end": 1.0}),
    "even_shards": ("logits", EVEN, 6, {"log_end": 0.5}),
    "ignore_index_weight_mean": ("logits", UNEVEN, 8, {"ignore": True, "weight": True}),
    "smoothing_conservative": ("logits", UNEVEN, 6, {"label_smoothing": 0.1}),
    "smoothing_plain_log_bonus_weight": (
        "logits", UNEVEN, 6,
        {"label_smoothing": 0.2, "log_end": 1.0, "bonus_weight": True, "ignore": True},
    ),
    "smoothing_power_weight": (
        "logits", UNEVEN, 6,
        {"label_smoothing": 0.1, "bonus": "power", "bonus_gamma": 2.0, "weight": True},
    ),
    "cosine_bonus_start": ("logits", UNEVEN, 6,
                           {"bonus": "cosine", "bonus_start": 0.2, "label_smoothing": 0.05}),
    "token_weight_sum": ("logits", UNEVEN, 8,
                         {"token_weight": True, "weight": True, "reduction": "sum",
                          "ignore": True}),
    "z_loss_softcap_lse": ("logits", UNEVEN, 6,
                           {"z_loss": 1e-2, "softcap": 4.0, "return_lse": True,
                            "label_smoothing": 0.1, "ignore": True}),
    "none_3d": ("logits", UNEVEN, (2, 3), {"reduction": "none", "label_smoothing": 0.1}),
    "bonus_scale_zero_is_ce": ("logits", UNEVEN, 6, {"bonus_scale": 0.0, "label_smoothing": 0.1}),
    "confident_target": ("logits", UNEVEN, 6, {"log_end": 1.0, "confident": "target"}),
    "confident_wrong_smoothing": ("logits", UNEVEN, 6,
                                  {"log_end": 1.0, "label_smoothing": 0.1,
                                   "confident": "wrong"}),
    "module_bonus_scale_half": ("module", UNEVEN, 6, {"bonus_scale": 0.5, "weight": True}),
    "float32": ("logits", UNEVEN, 6, {"dtype": torch.float32, "label_smoothing": 0.1}),
    "linear_bias_chunks": ("linear", UNEVEN, 10, {"bias": True, "chunk_size": 4}),
    "linear_none_smoothing_z_softcap": (
        "linear", UNEVEN, 10,
        {"reduction": "none", "label_smoothing": 0.1, "weight": True, "z_loss": 1e-2,
         "softcap": 3.0, "return_lse": True, "chunk_size": 3, "ignore": True},
    ),
    "linear_token_weight_sum": ("linear", EVEN, 7,
                                {"token_weight": True, "reduction": "sum", "log_end": 1.0}),
    # float32 under a softcap: also against the float64 loss of the float64 capped logits.
    "float32_softcap": ("logits", UNEVEN, 32,
                        {"dtype": torch.float32, "scale": 10.0, "softcap": 30.0,
                         "reduction": "none", "label_smoothing": 0.1}),
    "linear_float32_softcap": ("linear", UNEVEN, 32,
                               {"dtype": torch.float32, "softcap": 30.0, "reduction": "none",
                                "chunk_size": 8}),
}

#: The keys of a case's options that say how to build the inputs, not loss options.
BUILD_KEYS = ("ignore", "weight", "bonus_weight", "token_weight", "confident", "dtype", "bias",
              "scale")
HIDDEN = 3


def _inputs(name, widths, rows, spec):
    """The full tensors of a case, the same on every rank (seeded by the case's name)."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    vocab = sum(widths)
    shape = (rows,) if isinstance(rows, int) else tuple(rows)
    dtype = spec.get("dtype", torch.float64)
    logits = spec.get("scale", 3.0) * torch.randn(*shape, vocab, generator=generator,
                                                  dtype=torch.float64)  # fmt: skip
    target = torch.randint(0, vocab, shape, generator=generator)
    if spec.get("confident") == "target":
        # p_y = 1 - 1e-17 or so: the target far above the rest (on both ranks' columns).
        logits = logits.clamp(-1.0, 1.0)
        logits.scatter_(-1, target.unsqueeze(-1), 40.0)
    elif spec.get("confident") == "wrong":
        wrong = (target + 1) % vocab
        logits = logits.clamp(-1.0, 1.0)
        logits.scatter_(-1, wrong.unsqueeze(-1), 38.0)
    if spec.get("ignore"):
        target.view(-1)[::3] = -100
    extra = {}
    if spec.get("weight"):
        extra["weight"] = 0.5 + torch.rand(vocab, generator=generator, dtype=torch.float64)
    if spec.get("bonus_weight"):
        extra["bonus_weight"] = torch.rand(vocab, generator=generator, dtype=torch.float64)
    if spec.get("token_weight"):
        extra["token_weight"] = torch.rand(shape, generator=generator, dtype=torch.float64)
    extra = {key: value.to(dtype) for key, value in extra.items()}
    return logits.to(dtype), target, extra


def _relative_error(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-300)


def _columns(rank, widths):
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def _loss_value(result):
    return result if isinstance(result, torch.Tensor) else result[0]


def run_logits_case(name, form, widths, rows, spec, rank):
    options = {k: v for k, v in spec.items() if k not in BUILD_KEYS}
    full, target, extra = _inputs(name, widths, rows, spec)
    columns = _columns(rank, widths)
    reference_input = full.detach().clone().requires_grad_()
    # encouraging_loss takes the classes in dimension 1: move the vocabulary there.
    moved = reference_input if full.dim() == 2 else reference_input.movedim(-1, 1)
    expected = encouraging_loss(moved, target, **extra, **options)
    (expected_grad,) = torch.autograd.grad(_loss_value(expected).sum(), reference_input)
    shard = full[..., columns].clone().requires_grad_()
    if form == "module":
        weight = extra.pop("weight", None)
        got = VocabParallelEncouragingLoss(weight, **options)(shard, target, **extra)
    else:
        got = vocab_parallel_encouraging_loss(shard, target, **extra, **options)
    (grad,) = torch.autograd.grad(_loss_value(got).sum(), shard)
    result = {
        "loss": _relative_error(_loss_value(got), _loss_value(expected)),
        "grad": _relative_error(grad, expected_grad[..., columns]),
        "value": _loss_value(got).double().sum().item(),
    }
    if options.get("return_lse"):
        result["lse"] = _relative_error(got[1], expected[1])
    if full.dtype == torch.float32 and "softcap" in options:
        result.update(_float64_cap_errors(got, expected, encouraging_loss(
            moved.detach().double(), target, **options)))  # fmt: skip
    if spec.get("confident") == "target":
        # rho = 1 and the plain log bonus: the target logit's gradient is -1 / (number of rows)
        # exactly, however close p_y is to 1.
        owned = (target >= columns.start) & (target < columns.stop)
        rows_n = target.numel()
        local = (target - columns.start).clamp(0, widths[rank] - 1)
        at_target = grad.gather(-1, local.unsqueeze(-1)).squeeze(-1)[owned]
        result["target_grad"] = float((at_target * rows_n + 1.0).abs().max()) if owned.any() \
            else 0.0  # fmt: skip
    return result


def _float64_cap_errors(got, single, exact) -> dict:
    """The float32 vocabulary-parallel and single-process losses' errors against the float64
    loss of the float64 capped logits, relative to 1 + |value| (test_vocab_parallel.py reads
    them apart from the other errors)."""
    def error(value):
        value, exact_value = _loss_value(value).detach().double(), exact.double()
        return float(((value - exact_value).abs() / (exact_value.abs() + 1)).max())
    return {"cap_float64": error(got), "cap_float64_single": error(single)}


def run_linear_case(name, widths, rows, spec, rank):
    options = {k: v for k, v in spec.items() if k not in BUILD_KEYS}
    _, target, extra = _inputs(name, widths, rows, spec)
    if "weight" in extra:
        extra["class_weight"] = extra.pop("weight")
    generator = torch.Generator().manual_seed(7)
    vocab = sum(widths)
    hidden = torch.randn(*target.shape, HIDDEN, generator=generator, dtype=torch.float64)
    projection = 2.0 * torch.randn(vocab, HIDDEN, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64) if spec.get("bias") \
        else None  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (hidden, projection) + ((bias,) if spec.get(
        "bias") else ())]  # fmt: skip
    expected = linear_encouraging_loss(leaves[0], leaves[1], target,
                                       leaves[2] if bias is not None else None, **extra,
                                       **options)  # fmt: skip
    expected_grads = torch.autograd.grad(_loss_value(expected).sum(), leaves)
    columns = _columns(rank, widths)
    mine = [hidden.clone(), projection[columns].clone()]
    if bias is not None:
        mine.append(bias[columns].clone())
    mine = [t.requires_grad_() for t in mine]
    got = vocab_parallel_linear_encouraging_loss(
        mine[0], mine[1], target, mine[2] if bias is not None else None, **extra, **options
    )
    if spec.get("dtype") == torch.float32:
        # Logits of float32 values whose products are exact (3 bits each): float32 inputs,
        # the same logits on every path.
        scale = 8.0
        hidden32 = ((hidden * scale).round() / scale).float().requires_grad_()
        projection32 = ((projection * scale).round() / scale).float()
        expected = linear_encouraging_loss(hidden32, projection32, target, **options)
        got = vocab_parallel_linear_encouraging_loss(hidden32, projection32[columns].clone(),
                                                     target, **options)  # fmt: skip
        logit_options = {k: v for k, v in options.items() if k != "chunk_size"}
        exact = encouraging_loss((hidden32 @ projection32.t()).double(), target, **logit_options)
        return {"loss": _relative_error(got, expected), "value": got.double().sum().item(),
                **_float64_cap_errors(got, expected, exact)}  # fmt: skip
    grads = torch.autograd.grad(_loss_value(got).sum(), mine)
    result = {
        "loss": _relative_error(_loss_value(got), _loss_value(expected)),
        "grad_hidden": _relative_error(grads[0], expected_grads[0]),
        "grad_weight": _relative_error(grads[1], expected_grads[1][columns]),
        "value": _loss_value(got).double().sum().item(),
    }
    if bias is not None:
        result["grad_bias"] = _relative_error(grads[2], expected_grads[2][columns])
    if options.get("return_lse"):
        result["lse"] = _relative_error(got[1], expected[1])
    return result


def run_swapped_shards(rank):
    """Each rank passes the other rank's columns (a wrong offset): the loss must differ."""
    widths = EVEN
    full, target, _ = _inputs("swapped", widths, 6, {})
    expected = encouraging_loss(full, target)
    wrong = full[..., _columns(1 - rank, widths)]
    got = vocab_parallel_encouraging_loss(wrong, target)
    return {"difference": abs(float(got - expected))}


def _error_of(call):
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def error_cases(rank):
    """name -> the exception each bad call raised on this rank."""
    widths = UNEVEN
    full, target, _ = _inputs("errors", widths, 6, {})
    shard = full[..., _columns(rank, widths)]
    vocab = sum(widths)
    hidden = torch.randn(6, HIDDEN, dtype=torch.float64)
    weight_shard = torch.randn(widths[rank], HIDDEN, dtype=torch.float64)
    loss = vocab_parallel_encouraging_loss
    other_target = target.clone()
    if rank == 1:
        other_target[0] = (other_target[0] + 1) % vocab
    return {
        "vocab_size": _error_of(lambda: loss(shard, target, vocab_size=vocab + 1)),
        "weight_length": _error_of(
            lambda: loss(shard, target, torch.ones(vocab - 1, dtype=torch.float64))
        ),
        # A wrong weight on rank 1 only: rank 0 must raise too (not wait in a collective).
        "weight_length_one_rank": _error_of(
            lambda: loss(shard, target, torch.ones(vocab + rank, dtype=torch.float64))
        ),
        "bonus_weight_shard_sized": _error_of(
            lambda: loss(shard, target, bonus_weight=torch.ones(widths[rank],
                                                                dtype=torch.float64))
        ),
        "target_out_of_vocab": _error_of(lambda: loss(shard, torch.full_like(target, vocab))),
        "target_differs": _error_of(lambda: loss(shard, other_target)),
        "probability_target": _error_of(lambda: loss(shard, torch.softmax(shard, -1))),
        "backend_triton": _error_of(lambda: loss(shard, target, backend="triton")),
        "rows_differ": _error_of(lambda: loss(shard[: 6 - rank], target[: 6 - rank])),
        "shard_dtype_one_rank": _error_of(
            lambda: loss(shard.float() if rank == 1 else shard, target)
        ),
        "linear_class_weight": _error_of(
            lambda: vocab_parallel_linear_encouraging_loss(
                hidden, weight_shard, target, class_weight=torch.ones(widths[rank],
                                                                      dtype=torch.float64)
            )
        ),
        "linear_chunk_size_differs": _error_of(
            lambda: vocab_parallel_linear_encouraging_loss(hidden, weight_shard, target,
                                                           chunk_size=2 + rank)
        ),
        "linear_vocab_size": _error_of(
            lambda: vocab_parallel_linear_encouraging_loss(hidden, weight_shard, target,
                                                           vocab_size=2 * vocab)
        ),
    }


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"cases": {}, "errors": {}}
    status = 1
    try:
        for name, (form, widths, rows, spec) in CASES.items():
            try:
                if form == "linear":
                    results["cases"][name] = run_linear_case(name, widths, rows, spec, rank)
                else:
                    results["cases"][name] = run_logits_case(name, form, widths, rows, spec,
                                                             rank)  # fmt: skip
            except Exception as error:  # a case that breaks is reported, not fatal
                results["cases"][name] = {"exception": f"{type(error).__name__}: {error}"}
        results["swapped"] = run_swapped_shards(rank)
        results["errors"] = error_cases(rank)
        # The group still works after the errors (no rank left behind in a collective).
        name = "after_errors"
        results["cases"][name] = run_logits_case(name, "logits", UNEVEN, 6,
                                                 {"label_smoothing": 0.1}, rank)  # fmt: skip
        status = 0
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(results, file, indent=1)
        # Both ranks done, then out without tearing gloo down: its teardown at exit sometimes
        # aborts ("terminate called without an active exception") after the results are
        # written, which would fail the launch for nothing.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
