"""Files of an output folder: one atomic writer, run paths, records, checkpoints and arrays.

An output folder holds::

    results.json  results.csv  report.md  *.png
    runs/<slug>.json          one finished (loss, seed) run's record (reused by --resume)
    checkpoints/<slug>.pt     a run's last epoch while it trains (dropped when it finishes)
    arrays/<slug>.npz         per-example test margins and energies (for histograms)

Every file is written through :func:`atomic_write`: a reader (or a resumed run after a kill)
never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place.

    Args:
        path: destination (returned as a :class:`~pathlib.Path`); its folder is created.
        write: writes the whole content to the path it is given.

    Raises:
        TypeError: if ``write`` is not callable.
    """
    if not callable(write):
        raise TypeError(f"write: expected a callable taking a path, got {type(write).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept so that writers choosing a format by extension (savefig) still can.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value):
    """``value`` with non-finite floats as ``None`` and numpy scalars as Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (non-finite floats become ``null``)."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --- run paths -------------------------------------------------------------------------------
def run_slug(loss: str, seed: int) -> str:
    """File-name-safe identifier of one run, e.g. ``el_log_end_1__seed0``.

    Raises:
        ValueError: if ``loss`` is empty or ``seed`` is not a non-negative int.
    """
    if not isinstance(loss, str) or not loss.strip():
        raise ValueError(f"loss: expected a non-empty loss name, got {loss!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return f"{re.sub(r'[^A-Za-z0-9.]+', '_', loss).strip('_')}__seed{seed}"


def record_path(out_dir: str | os.PathLike, loss: str, seed: int) -> Path:
    """Where one finished run's record is saved."""
    return Path(out_dir) / "runs" / f"{run_slug(loss, seed)}.json"


def checkpoint_path(out_dir: str | os.PathLike, loss: str, seed: int) -> Path:
    """Where one run's per-epoch checkpoint is saved while it trains."""
    return Path(out_dir) / "checkpoints" / f"{run_slug(loss, seed)}.pt"


def load_record(out_dir: str | os.PathLike, loss: str, seed: int) -> dict | None:
    """A finished run's saved record, or ``None``."""
    path = record_path(out_dir, loss, seed)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def save_record(out_dir: str | os.PathLike, record: dict) -> None:
    """Save a finished run's record and drop its checkpoint (the record holds everything)."""
    atomic_write_json(record_path(out_dir, record["loss"], record["seed"]), record)
    checkpoint = checkpoint_path(out_dir, record["loss"], record["seed"])
    if checkpoint.is_file():
        checkpoint.unlink()


def save_arrays(out_dir: str | os.PathLike, loss: str, seed: int, **arrays) -> Path:
    """Save one run's named 1-D arrays (as float32) to ``out_dir/arrays/<slug>.npz``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    path = Path(out_dir) / "arrays" / f"{run_slug(loss, seed)}.npz"
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_arrays(out_dir: str | os.PathLike, loss: str, seed: int) -> dict[str, np.ndarray] | None:
    """Load one run's per-example arrays, or ``None`` if absent."""
    path = Path(out_dir) / "arrays" / f"{run_slug(loss, seed)}.npz"
    if not path.is_file():
        return None
    with np.load(path) as pack:
        return {k: pack[k] for k in pack.files}
