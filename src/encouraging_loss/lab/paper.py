"""The paper page: every task's paper settings under the fair protocol, beside the paper's numbers.

``encouraging-loss paper [--preset quick|cpu|gpu] [--tasks a,b] --out DIR`` runs, for each
:class:`~.tasks.PaperSetting` a task declares (``Task.paper``), one experiment of the runner
into ``DIR/<task>/<setting>`` — every loss tuned over the same learning-rate grid on validation
(``--tune lr``, unless ``--no-tune``), then its seeds at the chosen rate — and writes
``DIR/report.md``: one row per number of the paper, ours beside it with the paired difference,
its 95% t-interval and a verdict computed from the interval; then each setting's three claims
(margin, energy, representation), the departures from the paper, and the chosen rates. Each
setting keeps its own full report (``DIR/<task>/<setting>/report.md``). Resumable (``--resume``)
and parallel (``--jobs``) as every run is; a setting without a run at the page preset is listed
as needing a GPU.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .experiment import Options, run_experiment
from .io import atomic_write_text
from .report import (
    load_results,
    mean_std,
    paired_differences,
    paired_interval,
    report_spec,
    summary_rows,
)
from .report.markdown import claim_lines
from .report.results import is_ok
from .tasks import TASKS, PaperRow, PaperSetting, Task, load_task

PAGE_PRESETS = ("quick", "cpu", "gpu")
VERDICTS = (
    ("reproduced", "the 95% interval of our paired difference lies on the paper's side of 0"),
    ("same direction, not significant", "our mean difference has the paper's sign; the interval "
     "includes 0"),
    ("not reproduced", "our mean difference is 0 or has the opposite sign"),
    ("not run here: needs a GPU", "the setting has no run at this page preset"),
)  # fmt: skip


@dataclass(frozen=True)
class PageEntry:
    """One setting of the page: its task, the setting and where its results live."""

    task: Task
    setting: PaperSetting
    folder: Path

    @property
    def title(self) -> str:
        return f"{self.task.name}: {self.setting.name}"


def slug(name: str) -> str:
    """A folder name for a setting: lower-case words joined by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "setting"


def page_entries(out: str | Path, tasks: list[str] | None = None) -> list[PageEntry]:
    """The settings of ``tasks`` (default every registered task), in registry order.

    Raises:
        ValueError: naming ``tasks`` for an unknown task or a task with no paper setting.
    """
    names = list(TASKS) if tasks is None else list(tasks)
    entries = []
    for name in names:
        task = load_task(name)  # raises for an unknown name
        if tasks is not None and not task.paper:
            raise ValueError(f"tasks: {name} declares no paper setting")
        for setting in task.paper:
            entries.append(PageEntry(task, setting, Path(out) / name / slug(setting.name)))
    if not entries:
        raise ValueError("tasks: no paper setting to run")
    return entries


def run_page(
    preset: str = "quick",
    out: str | Path = "runs/paper",
    tasks: list[str] | None = None,
    tune: bool = True,
    command: str | None = None,
    costs: str | Path | None = None,
    **common,
) -> tuple[Path, list[dict]]:
    """Run every setting of the page at ``preset`` and write ``out/report.md``.

    Args:
        preset: the page preset, one of :data:`PAGE_PRESETS`.
        out: the page's folder.
        tasks: the tasks to run (default all).
        tune: give every loss the same learning-rate tuning (``--tune lr``).
        command: the command line to print on the page.
        costs: a ``benchmarks/bench_presets.py`` results file: the page quotes the measured
            cost here of each setting it does not run (``PaperSetting.cost_case``).
        **common: :class:`~.experiment.Options` fields every run shares (``data_root``,
            ``resume``, ``jobs``, ``progress``, ``device``, ``tune_seeds``).

    Returns:
        ``(path, failed)``: the page, and the failed runs of every setting (each with its
        ``setting``).

    Raises:
        ValueError: naming a bad argument (before any run starts).
    """
    if preset not in PAGE_PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PAGE_PRESETS)}, got {preset!r}")
    entries = page_entries(out, tasks)
    measured = load_costs(costs)
    started, failed = time.perf_counter(), []
    for entry in entries:
        fields = entry.setting.runs.get(preset)
        if fields is None:
            continue
        if common.get("progress", True):
            print(f"== {entry.title} ({preset}) ==", flush=True)
        options = Options(
            task=entry.task.name,
            losses=entry.setting.losses,
            out=str(entry.folder),
            tune="lr" if tune else None,
            **{**fields, **common},
        )
        results = run_experiment(options)
        failures = (results or {}).get("config", {}).get("failed_runs", [])
        failed += [{**failure, "setting": entry.title} for failure in failures]
    wall = time.perf_counter() - started
    text = page_markdown(entries, preset, wall, tune, command, measured)
    return atomic_write_text(Path(out) / "report.md", text), failed


def load_costs(path: str | Path | None) -> dict[str, float]:
    """Seconds of one run by ``bench_presets.py`` case, from its results file (``{}``: none).

    Raises:
        ValueError: naming ``costs`` for a file that is missing or not that benchmark's.
    """
    if path is None:
        return {}
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = payload["results"] if payload.get("benchmark") == "bench_presets" else None
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"costs: cannot read {path}: {error}") from None
    if rows is None:
        raise ValueError(f"costs: {path} is not a bench_presets.py results file")
    return {r["case"]: r["projected_run_seconds"] for r in rows if "projected_run_seconds" in r}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# --- the page --------------------------------------------------------------------------------
def row_direction(row: PaperRow) -> int:
    """The sign of the difference the paper claims for ``row``.

    Raises:
        ValueError: if the row has neither a direction nor two different paper numbers.
    """
    if row.direction is not None:
        return row.direction
    if row.paper is None or row.paper[0] == row.paper[1]:
        raise ValueError(f"row {row.label!r}: give a direction or two different paper numbers")
    return 1 if row.paper[1] > row.paper[0] else -1


def verdict(differences: list[float], direction: int) -> str:
    """The page's verdict on paired ``treatment − baseline`` differences (see :data:`VERDICTS`)."""
    if not differences:
        return "not measured (no finished pair of runs)"
    mean, low, high = paired_interval(differences)
    if len(differences) < 2:
        return "single seed: no interval"
    near, far = sorted((direction * low, direction * high))  # the interval on the paper's axis
    if near > 0:
        return "reproduced"
    if direction * mean > 0:
        return "same direction, not significant"
    if far < 0:
        return "not reproduced (opposite direction, significant)"
    return "not reproduced"


def _values(results: dict, loss: str, metric: str) -> list[float]:
    runs = [r for r in results["runs"] if r["loss"] == loss and is_ok(r)]
    return [r["metrics"][metric] for r in runs if r["metrics"].get(metric) is not None]


def _number(values: list[float], scale: float) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean * scale:.2f} ± {std * scale:.2f} (n={len(values)})"


def _row_cells(row: PaperRow, results: dict | None, ran: bool, cost: float | None) -> list[str]:
    paper = "—" if row.paper is None else f"{row.paper[0]:g} → {row.paper[1]:g}"
    if not ran:
        measured = "" if cost is None else f"; cost here: {_duration(cost)} per (loss, seed) run"
        return [paper, "—", "—", f"**not run here: needs a GPU**{measured}"]
    if results is None:
        return [paper, "—", "—", "not measured (no results)"]
    baseline = _number(_values(results, row.baseline, row.metric), row.scale)
    treatment = _number(_values(results, row.treatment, row.metric), row.scale)
    diffs = paired_differences(results, row.treatment, row.baseline, row.metric)
    delta = "—"
    if diffs:
        mean, low, high = (v * row.scale for v in paired_interval(diffs))
        interval = "" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"
        delta = f"{mean:+.2f}{interval}"
    return [paper, f"{baseline} → {treatment}", delta, f"**{verdict(diffs, row_direction(row))}**"]


def _results(entry: PageEntry) -> dict | None:
    try:
        return load_results([entry.folder])[0]
    except FileNotFoundError:
        return None


def page_markdown(
    entries: list[PageEntry], preset: str, wall_seconds: float, tune: bool, command=None, costs=None
) -> str:
    """``report.md`` of the page from the settings' saved results (no number typed by hand)."""
    protocol = (
        "every loss tuned over the same learning-rate grid (the recipe's rate × 0.1, 0.3, 1, 3, "
        "10) on a validation split carved from the training data, the test set read once by "
        "the chosen rate"
        if tune
        else "no tuning (`--no-tune`): every loss at the recipe's learning rate"
    )
    loaded = {entry.folder: _results(entry) for entry in entries}
    lines = [
        "# The encouraging loss beside the paper",
        "",
        f"Page preset `{preset}`; {protocol}. Wall time of this invocation: {wall_seconds:.0f} s"
        f"{_total_wall(loaded.values())}. Ours: mean ± std over seeds (n), in the paper's unit; "
        "Δ: the mean paired difference (same seed: same split, initialisation and batches) with "
        "its 95% t-interval.",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        "| Family | Setting | Measure | Paper baseline → treatment | Ours baseline → treatment "
        "| Δ [95% CI] | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        ran = preset in entry.setting.runs
        for row in entry.setting.rows:
            cost = (costs or {}).get(entry.setting.cost_case)
            cells = _row_cells(row, loaded[entry.folder], ran, cost)
            label = f"{row.label} (`{row.treatment}` vs `{row.baseline}`)"
            lines.append(
                f"| {entry.task.name} | {entry.setting.name} | {label} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", "Verdicts: " + "; ".join(f"**{v}**: {why}" for v, why in VERDICTS) + ".", ""]
    lines += ["## The paper's three claims, per setting", ""]
    for entry in entries:
        results = loaded[entry.folder]
        if results is None:
            continue
        pairs = list(dict.fromkeys((r.treatment, r.baseline) for r in entry.setting.rows))
        claims = claim_lines(results, report_spec(results)["claims"], pairs, summary_rows(results))
        report = entry.folder.relative_to(entry.folder.parents[1]) / "report.md"
        lines += [f"### {entry.title} ([report]({report.as_posix()}))", ""]
        lines += claims or ["(this task measures none of the three claims)"]
        lines += _failures(results)
        lines.append("")
    lines += ["## Departures from the paper", ""]
    lines += [f"- **{e.title}**: {e.setting.departures}" for e in entries if e.setting.departures]
    lines += ["", "## Learning rates chosen, and the cost of each setting", ""]
    for entry in entries:
        results = loaded[entry.folder]
        if results is not None:
            config = results["config"]
            grid = config.get("tuning", {}).get("grid", [])
            rates = ", ".join(
                f"`{k}` {v:g}{_grid_edge(v, grid)}" for k, v in config.get("lr_by_loss", {}).items()
            )
            tried = f" (grid {', '.join(f'{lr:g}' for lr in grid)})" if grid else ""
            cost = f"{config['wall_seconds']:.0f} s" if "wall_seconds" in config else "—"
            if "wall_seconds_total" in config:
                cost = f"{config['wall_seconds_total']:.0f} s (its last invocation {cost})"
            lines.append(f"- {entry.title}: {rates}{tried}; wall time {cost}")
    lines += ["", "## Settings run", "", "```json"]
    lines.append(json.dumps({e.title: e.setting.runs.get(preset) for e in entries}, indent=1))
    lines += ["```", ""]
    return "\n".join(lines)


def _total_wall(loaded) -> str:
    """The settings' wall times over all their invocations, summed (``--resume`` adds up)."""
    totals = [r["config"].get("wall_seconds_total") for r in loaded if r is not None]
    if not totals or None in totals:
        return " (resumed runs are not re-timed)"
    return f"; of every invocation, the settings' wall times summed: {sum(totals):.0f} s"


def _grid_edge(lr: float, grid: list[float]) -> str:
    """A mark for a rate at the end of its grid: the best may lie beyond what was tried."""
    if len(grid) < 2 or lr not in (grid[0], grid[-1]):
        return ""
    return " (the grid's lowest)" if lr == grid[0] else " (the grid's highest)"


def _failures(results: dict) -> list[str]:
    bad = [r for r in results["runs"] if not is_ok(r)]
    if not bad:
        return []
    listed = ", ".join(f"`{r['loss']}` seed {r['seed']} ({r.get('status')})" for r in bad)
    return [f"- runs that did not finish: {listed}"]
