"""Helpers shared by the lab tests: where the staged real data lives, child-process setup."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()
# Small enough for seconds on 2 CPU cores, large enough that accuracy is far above chance.
TINY_RUN = [
    "--train-size",
    "400",
    "--test-size",
    "200",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--no-progress",
]


def shared_dataset(name: str) -> Path:
    """Path of a staged dataset, skipping the test when it is absent."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data {folder} not staged on this machine")
    return folder


def load_results(folder: Path) -> dict:
    """Parse ``results.json`` of an output folder."""
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def first_epoch_checkpoint(out: Path) -> dict:
    """The one checkpoint of a run stopped after its first epoch, checked to hold that epoch
    with a finite training loss (a GPU-size preset's first steps, taken on CPU)."""
    (checkpoint,) = (out / "checkpoints").glob("*.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and math.isfinite(state["history"][0]["train_loss"])
    return state


def subprocess_env() -> dict[str, str]:
    """Environment for child processes that import the lab from this checkout's ``src``."""
    env = dict(os.environ)
    src = str(PROJECT_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def torch_globals_restored():
    """Undo the thread count and determinism flag that a lab run sets."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
