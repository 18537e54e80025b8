"""Results files, plots and the Markdown report.

An output folder holds ``results.json`` (the contract other tasks reuse)::

    {"task", "dataset", "config", "runs": [{"loss", "seed", "metrics": {...}, "history": [...]}]}

plus ``results.csv`` (one row per run), ``arrays/*.npz`` (per-example test margins and energies
for histograms), PNG plots and ``report.md``. Every number in the report is computed from those
files; :func:`rebuild_report` regenerates everything from one or more saved folders.

Modules: :mod:`.stats` (means, t-intervals, verdicts), :mod:`.results` (the results files and
the report spec), :mod:`.markdown` (``report.md``), :mod:`.plots` (the PNGs). Every file is
written through :mod:`encouraging_loss.lab.io`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write_text
from .markdown import markdown_report, summary_table  # noqa: F401
from .plots import make_plots, plot_curves  # noqa: F401
from .results import (  # noqa: F401
    CLAIMS,
    COLUMNS,
    DEFAULT_NOTE,
    DEFAULT_PLOTS,
    TABLE_METRICS,
    against_ce,
    comparisons,
    load_results,
    paired_differences,
    report_spec,
    summary_rows,
    table_columns,
    write_results,
)
from .stats import claim_verdict, mean_std, paired_interval, t_quantile_975  # noqa: F401


def write_report(
    out_dir: str | os.PathLike, results: dict, source: dict[tuple[str, int], Path] | None = None
) -> Path:
    """Write results files, plots and ``report.md`` into ``out_dir``.

    Args:
        out_dir: output folder.
        results: results in the contract layout.
        source: where each run's arrays live (default: ``out_dir``).

    Returns:
        Path of ``report.md``.

    Raises:
        ValueError: if ``results`` breaks the contract (see :func:`write_results`).
    """
    out_dir = Path(out_dir)
    write_results(out_dir, results)
    make_plots(results, source or {}, out_dir)
    return atomic_write_text(out_dir / "report.md", markdown_report(results))


def rebuild_report(dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild the report from saved folders (``encouraging-loss report DIR...``).

    Args:
        dirs: result folders to merge.
        out_dir: where to write; default the single folder given, required for several.

    Returns:
        Path of the written ``report.md``.

    Raises:
        ValueError: if ``dirs`` is empty, or several folders are given without ``out_dir``.
    """
    if isinstance(dirs, (str, os.PathLike)) or not dirs:
        raise ValueError("dirs: give a non-empty list of results folders")
    if out_dir is None:
        if len(dirs) != 1:
            raise ValueError("out_dir: required when merging several folders (use --out)")
        out_dir = dirs[0]
    results, source = load_results(dirs)
    return write_report(out_dir, results, source)
