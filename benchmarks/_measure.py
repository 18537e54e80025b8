"""Measurement pieces the CPU benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable

#: glibc's mmap threshold for the memory-measuring children: large buffers are mmapped, so memory
#: a call frees goes back to the OS and the resident set size follows the call's own peak.
MMAP_THRESHOLD = "65536"


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


def peak_rss_bytes() -> int:
    """The process's peak resident set size: VmHWM, the high-water mark of its own memory map.

    Not ``ru_maxrss``: Linux carries the parent's peak into a child across exec (exec_mmap records
    the old memory map's high-water mark), so a child spawned by a parent that has run the large
    timing loop would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def write_json_atomically(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
