"""Helpers shared by the lab tests: where the staged real data lives, child-process setup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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


def subprocess_env() -> dict[str, str]:
    """Environment for child processes that import the lab from this checkout's ``src``."""
    env = dict(os.environ)
    src = str(PROJECT_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
