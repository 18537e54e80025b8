"""Fixtures of the lab tests: the staged real data and one tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import SHARED_DATA, TINY_RUN, shared_dataset, torch_globals_restored


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The staged data root ``../shared/data``."""
    shared_dataset("fashion-mnist")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """One finished ``run image`` with ce and el, 2 seeds, on a few hundred examples."""
    from encouraging_loss.lab.cli import main

    out = tmp_path_factory.mktemp("tiny") / "out"
    with torch_globals_restored():
        status = main(
            [
                "run",
                "image",
                "--losses",
                "ce,el",
                "--seeds",
                "2",
                "--data-root",
                str(data_root),
                "--out",
                str(out),
                *TINY_RUN,
            ]
        )
    assert status == 0
    return out


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Keep other test modules unaffected by the one-thread, deterministic lab runs."""
    with torch_globals_restored():
        yield
