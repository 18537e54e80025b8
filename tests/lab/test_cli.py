"""The command line: help text, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .helpers import subprocess_env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encouraging_loss.lab", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )


def test_help_explains_each_option():
    done = run_cli("run", "--help")
    assert done.returncode == 0
    for option in (
        "--losses",
        "--seeds",
        "--preset",
        "--data-root",
        "--out",
        "--resume",
        "--lr",
        "--clip-grad-norm",
        "--epochs",
        "--device",
        "--download",
    ):
        assert option in done.stdout
    top = run_cli("--help")
    assert top.returncode == 0 and "reproduce" in top.stdout and "lr 0.05" in top.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "image", "--losses", "ce,xent"), "unknown loss 'xent'"),
        (("run", "text"), "unknown task 'text'"),
        (("run", "image", "--seeds", "0"), "--seeds"),
        (("run", "image", "--bogus"), "unrecognized arguments: --bogus"),
        (("run", "image", "--preset", "huge"), "--preset"),
        (("report", "/nonexistent-results-dir"), "no results.json"),
    ],
)
def test_errors_are_one_line(args, expected):
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr


def test_missing_dataset_lists_where_it_looked(tmp_path):
    done = run_cli("run", "image", "--dataset", "mnist", "--data-root", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "not found; looked in:" in done.stderr and str(tmp_path / "mnist") in done.stderr


def test_bad_thread_count_is_one_line():
    done = run_cli("run", "image", "--threads", "-1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "threads" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_one_line(data_root):
    done = run_cli(
        "run",
        "image",
        "--device",
        "cuda",
        "--data-root",
        str(data_root),
        "--train-size",
        "100",
        "--test-size",
        "20",
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "CUDA is not available" in done.stderr
