"""``report.md``: the per-loss table, paired differences, the paper's claims, plots, config."""

from __future__ import annotations

import json
import math

from ..io import json_safe
from .results import (
    CLAIMS,
    check_results,
    comparisons,
    paired_differences,
    report_spec,
    summary_rows,
)
from .stats import claim_verdict, paired_interval


def _fmt(value: float, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table_head(columns: tuple[str, ...], table_metrics) -> list[str]:
    labels = " | ".join(label for _, label, _ in table_metrics)
    return [
        f"| {' | '.join(columns)} | {labels} |",
        "|" + "---|" * (len(columns) + len(table_metrics)),
    ]


def summary_table(results: dict) -> str:
    """The per-loss mean ± std table as Markdown (also printed by the CLI).

    Args:
        results: loaded results.

    Returns:
        A Markdown table.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    check_results(results)
    table_metrics = report_spec(results)["table"]
    lines = _table_head(("loss", "lr", "runs ok", "diverged"), table_metrics)
    for row in summary_rows(results):
        cells = []
        for metric, _, _ in table_metrics:
            mean, std = row["stats"][metric]
            if not math.isfinite(mean):
                cells.append("—")
            elif row["n_ok"] < 2:
                cells.append(f"{mean:.4f}")  # one run: no spread to show
            else:
                cells.append(f"{mean:.4f} ± {std:.4f}")
        lr = ", ".join(f"{v:g}" for v in row["lr"]) or "—"
        lines.append(
            f"| `{row['loss']}` | {lr} | {row['n_ok']} | {row['n_diverged']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _diverged_section(rows: list[dict]) -> list[str]:
    diverged = [r for r in rows if r["n_diverged"]]
    if not diverged:
        return []
    lines = ["## Diverged runs", ""]
    for r in diverged:
        lines.append(
            f"- `{r['loss']}` (lr {', '.join(f'{v:g}' for v in r['lr'])}): "
            f"{r['n_diverged']} of {r['n_diverged'] + r['n_ok']} runs diverged "
            f"(non-finite loss at step {', '.join(str(s) for s in r['diverged_steps'])})"
        )
    return [*lines, ""]


def _tuning_section(config: dict) -> list[str]:
    """The ``--tune`` grid, each loss's validation scores and its chosen rate."""
    tuning = config.get("tuning")
    if not tuning:
        return []
    grid = [f"{lr:g}" for lr in tuning["grid"]]
    seeds = len(tuning["seeds"])
    lines = [
        f"## Tuning: {tuning['parameter']} on validation ({tuning['metric']}, mean of {seeds} "
        "seed(s)); the test set was read only by the chosen rate's runs",
        "",
        "| loss | " + " | ".join(f"lr {lr}" for lr in grid) + " | chosen |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    for loss, chosen in tuning["by_loss"].items():
        cells = [_fmt(v) if v is not None else "diverged" for v in chosen["val_accuracy"].values()]
        note = " (every rate diverged)" if chosen["all_diverged"] else ""
        lines.append(f"| `{loss}` | " + " | ".join(cells) + f" | {chosen['lr']:g}{note} |")
    return [*lines, ""]


def _differences_table(results: dict, pairs: list[tuple[str, str]], table_metrics) -> list[str]:
    lines = [
        "## Paired difference to the CE baseline (same seed), mean [95% t-interval]",
        "",
        *_table_head(("loss − baseline", "pairs"), table_metrics),
    ]
    for loss, base in pairs:
        cells = []
        count = 0
        for metric, _, _ in table_metrics:
            diffs = paired_differences(results, loss, base, metric)
            count = max(count, len(diffs))
            if not diffs:
                cells.append("—")
                continue
            mean, low, high = paired_interval(diffs)
            cells.append(f"{mean:+.4f} [{_fmt(low)}, {_fmt(high)}]")
        lines.append(f"| `{loss}` − `{base}` | {count} | " + " | ".join(cells) + " |")
    return lines


def _claims_section(results: dict, spec: dict, pairs: list[tuple[str, str]], rows) -> list[str]:
    heading = "three claims" if spec["claims"] is CLAIMS else "direction"
    lines = ["", f"## The paper's {heading}, checked on these runs", ""]
    return [*lines, *claim_lines(results, spec["claims"], pairs, rows), ""]


def claim_lines(results: dict, claims, pairs: list[tuple[str, str]], rows) -> list[str]:
    """One Markdown bullet per (claim, pair): the verdict from the paired differences.

    Args:
        results: loaded results.
        claims: ``(claim, metric, direction, wording)`` rows (see ``report_spec``); claims
            whose metric no run measured are skipped.
        pairs: ``(loss, baseline)`` pairs to check.
        rows: :func:`~.results.summary_rows` of ``results`` (to tell "diverged in every run").
    """
    all_diverged = {r["loss"]: r["n_ok"] == 0 and r["n_diverged"] > 0 for r in rows}
    lines = []
    for claim, metric, direction, wording in claims:
        if not any(metric in r["metrics"] for r in results["runs"]):
            continue  # the task does not measure it (e.g. no probe for translation)
        for loss, base in pairs:
            diffs = paired_differences(results, loss, base, metric)
            verdict = claim_verdict(diffs, direction)
            if not diffs and all_diverged.get(loss):
                verdict = f"not measured: `{loss}` diverged in every run"
            detail = ""
            if diffs:
                mean, low, high = paired_interval(diffs)
                detail = f" (Δ {mean:+.4f}, 95% CI [{_fmt(low)}, {_fmt(high)}], n={len(diffs)})"
            lines.append(f"- **{claim}** — `{loss}` vs `{base}`: {wording}: **{verdict}**{detail}")
    return lines


def markdown_report(results: dict) -> str:
    """Render ``report.md`` from results (no number typed by hand).

    Args:
        results: loaded results.

    Returns:
        Markdown text.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    check_results(results)
    rows = summary_rows(results)
    spec = report_spec(results)
    lines = [f"# {spec['title']}", "", summary_table(results), ""]
    for note in spec["notes"]:
        lines += [note, ""]
    lines += _tuning_section(results["config"])
    lines += _diverged_section(rows)
    pairs, claim_pairs = comparisons(results)
    if pairs:
        lines += _differences_table(results, pairs, spec["table"])
        lines += _claims_section(results, spec, claim_pairs, rows)
    lines += ["## Plots", ""]
    lines += [f"![{alt}]({file})" for alt, file in spec["plots"]]
    lines += [f"![{curve['title']}]({curve['file']})" for curve in spec["curves"]]
    config = json.dumps(json_safe(results["config"]), indent=1)
    lines += ["", "## Configuration", "", "```json", config, "```", ""]
    return "\n".join(lines)
