"""The vocabulary-parallel loss: 2 CPU processes (gloo, one ``torchrun`` launch running every
case of tests/vocab_parallel_worker.py) against the single-process loss and gradients, its
errors on every rank, and single-process checks (world size 1) that need no launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from vocab_parallel_worker import CASES

import encouraging_loss
from encouraging_loss import encouraging_loss as full_loss
from encouraging_loss import linear_encouraging_loss
from encouraging_loss.vocab_parallel import (
    VocabParallelEncouragingLoss,
    vocab_parallel_encouraging_loss,
    vocab_parallel_linear_encouraging_loss,
)

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
#: Relative error to the single-process loss in float64 (and in float32).
TOLERANCE, FLOAT32_TOLERANCE = 1e-12, 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results, from one torchrun launch."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    source = os.path.dirname(os.path.dirname(encouraging_loss.__file__))
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", str(WORKER), str(out)]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"torchrun failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                    f"{run.stderr[-3000:]}")  # fmt: skip
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", [*CASES, "after_errors"])
def test_two_ranks_match_one_process(ranks, case):
    tolerance = FLOAT32_TOLERANCE if "float32" in case else TOLERANCE
    values = []
    for rank, results in enumerate(ranks):
        result = results["cases"][case]
        assert "exception" not in result, f"rank {rank}: {result.get('exception')}"
        cap_errors = {k: result.pop(k) for k in ("cap_float64", "cap_float64_single")
                      if k in result}  # fmt: skip
        errors = {k: v for k, v in result.items() if k not in ("value", "target_grad")}
        assert errors and all(v <= tolerance for v in errors.values()), (rank, errors)
        if cap_errors:
            # float32 under a softcap: the cap's float64 remainder summed over the ranks keeps
            # the loss about as exact as the single process's, against the float64 cap (without
            # it, several units).
            unit = torch.finfo(torch.float32).eps
            assert cap_errors["cap_float64"] <= 1.5 * unit, (rank, cap_errors)
        values.append(result["value"])
    # Every rank returns the same loss.
    assert values[0] == values[1]


def test_confident_target_gradient_is_minus_one(ranks):
    # rho = 1, plain log bonus, p_y = 1 - 1e-17: the target logit's gradient stays -1 (per row).
    for results in ranks:
        assert results["cases"]["confident_target"]["target_grad"] <= 1e-15


def test_a_wrong_shard_offset_changes_the_loss(ranks):
    # The test can fail: each rank passing the other's columns gives a different loss.
    for results in ranks:
        assert results["swapped"]["difference"] > 1e-3


#: error case -> (exception type, words its message must hold on every rank).
EXPECTED_ERRORS = {
    "vocab_size": ("ValueError", ["vocab_size=10", "[4, 5]", "does not match"]),
    "weight_length": ("ValueError", ["weight", "shape (9,)", "shape (8,)"]),
    "weight_length_one_rank": ("ValueError", ["weight", "shape (10,) on rank 1"]),
    "bonus_weight_shard_sized": ("ValueError", ["bonus_weight", "shape (9,)"]),
    "target_out_of_vocab": ("ValueError", ["target", "class index 9", "[0, 8]"]),
    "target_differs": ("ValueError", ["target differs"]),
    "probability_target": ("TypeError", ["probability targets"]),
    "backend_triton": ("ValueError", ["backend='triton'"]),
    "rows_differ": ("ValueError", ["[6, 5] rows"]),
    "shard_dtype_one_rank": ("ValueError", ["dtype of logits_shard", "torch.float32"]),
    "linear_class_weight": ("ValueError", ["class_weight", "weight_shard", "shape (9,)"]),
    "linear_chunk_size_differs": ("ValueError", ["chunk_size", "[2, 3]"]),
    "linear_vocab_size": ("ValueError", ["vocab_size=18", "weight_shard"]),
}


@pytest.mark.parametrize("name", EXPECTED_ERRORS)
def test_bad_arguments_raise_on_every_rank(ranks, name):
    kind, words = EXPECTED_ERRORS[name]
    for rank, results in enumerate(ranks):
        error = results["errors"][name]
        assert error["type"] == kind, (rank, error)
        for word in words:
            assert word in error["message"], (rank, word, error["message"])


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo, a file store)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_without_a_process_group_names_it():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_encouraging_loss(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("options", [
    {}, {"log_end": 1.0, "label_smoothing": 0.2}, {"reduction": "none", "z_loss": 1e-3},
    {"bonus": "power", "label_smoothing": 0.1, "softcap": 2.0},
])  # fmt: skip
def test_one_rank_is_the_full_loss(one_rank, options):
    logits = (3.0 * torch.randn(5, 7, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0, 6, -100, 3, 3])
    expected = full_loss(logits, target, **options)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    got = vocab_parallel_encouraging_loss(logits, target, vocab_size=7, **options)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=TOLERANCE, atol=1e-15)


def test_one_rank_linear_and_module(one_rank):
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (2, 3))
    expected = linear_encouraging_loss(hidden, weight, target, label_smoothing=0.1)
    got = vocab_parallel_linear_encouraging_loss(hidden, weight, target, label_smoothing=0.1,
                                                 chunk_size=4)  # fmt: skip
    for want, have in zip(torch.autograd.grad(expected, (hidden, weight)),
                          torch.autograd.grad(got, (hidden, weight)), strict=True):  # fmt: skip
        torch.testing.assert_close(have, want, rtol=TOLERANCE, atol=1e-15)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=0.0)
    criterion = VocabParallelEncouragingLoss(reduction="sum", log_end=0.5)
    logits = hidden @ weight.T
    torch.testing.assert_close(criterion(logits, target),
                               full_loss(logits.movedim(-1, 1), target, reduction="sum",
                                         log_end=0.5), rtol=TOLERANCE, atol=0.0)  # fmt: skip


def test_one_rank_bad_arguments(one_rank):
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        vocab_parallel_encouraging_loss(logits, target, group="world")
    with pytest.raises(TypeError, match="vocab_size must be None or a positive int"):
        vocab_parallel_encouraging_loss(logits, target, vocab_size=4.0)
    with pytest.raises(ValueError, match="vocab_size=5"):
        vocab_parallel_encouraging_loss(logits, target, vocab_size=5)
    with pytest.raises(ValueError, match="target must have logits_shard's shape"):
        vocab_parallel_encouraging_loss(logits, target[:2])
    with pytest.raises(ValueError, match="backend='triton'"):
        VocabParallelEncouragingLoss(backend="triton")
    with pytest.raises(ValueError, match="weight_shard has 3 input features"):
        vocab_parallel_linear_encouraging_loss(torch.randn(3, 2), torch.randn(4, 3), target)
