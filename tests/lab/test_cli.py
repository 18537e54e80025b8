"""The command line: help text, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from encouraging_loss.lab.tasks import TASKS

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
    done = run_cli("run", "image", "--help")
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
        "--jobs",
    ):
        assert option in done.stdout
    assert "lr 0.05" in done.stdout  # the presets, from the task
    top = run_cli("--help")
    assert top.returncode == 0 and "reproduce" in top.stdout
    tasks = run_cli("run", "--help")
    for task in TASKS:
        assert task in tasks.stdout
    assert "--ood-sets" in run_cli("run", "ood", "--help").stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "image", "--losses", "ce,xent"), "unknown loss 'xent'"),
        (("run", "text"), "invalid choice: 'text'"),
        (("run", "image", "--seeds", "x"), "--seeds: expected a positive integer, got 'x'"),
        (("run", "image", "--lr", "-1"), "--lr: expected a positive number, got '-1'"),
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


def test_argparse_messages_show_no_private_names():
    done = run_cli("run", "image", "--epochs", "zero")
    assert done.returncode == 2 and "_" not in done.stderr.split("error:")[1].split("(see")[0]


def test_missing_data_root_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = run_cli("run", "image", "--data-root", str(missing))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"data_root: {missing} is not a folder" in done.stderr


def test_without_the_lab_extra_one_line_and_no_traceback():
    # A meta-path finder hides matplotlib, as on an install without the [lab] extra (numpy is
    # not hidden: without it torch itself warns at import, which is not ours to silence).
    hide_matplotlib = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from encouraging_loss.lab.cli import main\n"
        "raise SystemExit(main(['run', 'image']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide_matplotlib],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert 'pip install "encouraging-loss[lab]"' in done.stderr and "matplotlib" in done.stderr
