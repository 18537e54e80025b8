"""Measurement pieces the CPU benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable


def time_interleaved(
    runs: dict[str, Callable[[], float]], warmup: int, repeats: int, rotate: bool = False
) -> dict:
    """Time each contender, interleaved (A, B, A, B, ...) so that drift hits all alike.

    Args:
        runs: contender name -> a call that runs it once and returns its wall seconds.
        warmup: untimed rounds first.
        repeats: timed rounds.
        rotate: start each round with the next contender (A B C, B C A, C A B, ...), so that no
            contender always follows the same one (a predecessor's freed memory or evicted
            caches change the next call's time).

    Returns:
        name -> {"median_s", "min_s", "all_s"}.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    names = list(runs)
    for index in range(repeats):
        shift = index % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(runs[name]())
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts}
        for name, ts in times.items()
    }


def rss_bytes() -> int:
    """The process's current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_json_atomically(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
