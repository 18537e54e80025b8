"""Data parallelism: 2 processes under torchrun (gloo, CPU) match 1 process, same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .helpers import load_results, subprocess_env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path, data_root):
    pytest.importorskip("torch.distributed.run")
    args = [
        "run",
        "image",
        "--losses",
        "ce,el",
        "--data-root",
        str(data_root),
        "--train-size",
        "400",
        "--test-size",
        "200",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--no-progress",
    ]
    env = subprocess_env()
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "encouraging_loss.lab", *args, "--out", str(single)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "encouraging_loss.lab",
    ]
    done = subprocess.run(
        [*launcher, *args, "--out", str(double)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = load_results(single), load_results(double)
    assert one["config"]["world_size"] == 1 and two["config"]["world_size"] == 2
    for run_one, run_two in zip(one["runs"], two["runs"], strict=True):
        assert run_one["loss"] == run_two["loss"]
        for epoch_one, epoch_two in zip(run_one["history"], run_two["history"], strict=True):
            # Same global batches and averaged gradients: only float summation order differs.
            assert epoch_two["train_loss"] == pytest.approx(epoch_one["train_loss"], rel=1e-3)
            assert epoch_two["val_accuracy"] == pytest.approx(epoch_one["val_accuracy"], abs=0.01)
        for name in ("test_accuracy", "probe_accuracy"):
            assert run_two["metrics"][name] == pytest.approx(run_one["metrics"][name], abs=0.01)
        assert run_two["metrics"]["margin_mean"] == pytest.approx(
            run_one["metrics"]["margin_mean"], rel=1e-2
        )
