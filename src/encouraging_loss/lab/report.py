"""Results files, plots and the Markdown report.

An output folder holds ``results.json`` (the contract other tasks reuse)::

    {"task", "dataset", "config", "runs": [{"loss", "seed", "metrics": {...}, "history": [...]}]}

plus ``results.csv`` (one row per run), ``arrays/*.npz`` (per-example test margins and energies
for histograms), PNG plots and ``report.md``. Every number in the report is computed from those
files; :func:`rebuild_report` regenerates everything from one or more saved folders.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df}; standard table values.
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}
TABLE_METRICS = (
    ("test_accuracy", "test acc", True),
    ("margin_mean", "margin", True),
    ("energy_mean", "energy −lse", False),
    ("energy_true_mean", "energy −z_y", False),
    ("probe_accuracy", "probe acc", True),
    ("crt_accuracy", "cRT acc", True),
    ("ece", "ECE", False),
    ("grad_share_well_classified_last", "grad share p_y>0.5", True),
)
# claim -> (metric, +1 if the claim says EL is higher, -1 if lower, wording)
CLAIMS = (
    ("margin grows", "margin_mean", +1, "mean test margin z_y − max_{j≠y} z_j is larger"),
    ("energy lower", "energy_mean", -1, "mean test energy −logsumexp(z) is lower"),
    ("representation better", "probe_accuracy", +1, "linear-probe test accuracy is higher"),
)


DEFAULT_NOTE = (
    "Mean ± std over seeds of finished runs (test split, model selected on validation "
    "accuracy). margin = z_y − max_{j≠y} z_j; energy −lse = −logsumexp(z); probe = linear "
    "probe on frozen penultimate features; cRT = last layer re-trained with CE; grad share = "
    "share of the per-example logit-gradient norm from examples with p_y > 0.5 in the last "
    "training epoch."
)
DEFAULT_PLOTS = (
    ("accuracy curves", "accuracy_curves.png"),
    ("margin histogram", "margin_hist.png"),
    ("energy histogram", "energy_hist.png"),
    ("reliability diagram", "reliability.png"),
    ("gradient share", "grad_share.png"),
)


def report_spec(results: dict) -> dict:
    """What the report shows for a task: ``results["report"]`` over the image task's defaults.

    A task other than ``image`` may store a ``"report"`` entry in its results (so that
    ``encouraging-loss report`` rebuilds the same report from ``results.json``) with any of:
    ``title``; ``table`` (``[metric, label, higher_is_better]`` rows); ``claims`` (``[claim,
    metric, direction, wording]`` rows); ``comparisons`` (``[loss, baseline]`` pairs for the
    paired-difference table); ``claim_pairs`` (pairs the claims are checked on, default
    ``comparisons``); ``notes`` (paragraphs under the table); ``plots`` (``[alt, file]`` rows);
    ``curves`` (line plots of a metric against x, see :func:`plot_curves`). The columns and the
    note may also come from ``config["table_metrics"]`` and ``config["table_note"]``.

    Args:
        results: loaded results.

    Returns:
        Dict with every key above filled in; ``comparisons`` is ``None`` when each loss is to
        be compared with its CE counterpart (the image task's rule).
    """
    spec = results.get("report") or {}
    # Tasks may also name their columns and note in the config (graph, translation).
    config = results.get("config", {})
    custom = config.get("table_metrics")
    table_columns = (
        tuple((str(m), str(label), bool(higher)) for m, label, higher in custom)
        if custom
        else TABLE_METRICS
    )
    return {
        "title": spec.get(
            "title",
            f"{results['task']} on {results['dataset']}: encouraging loss vs cross-entropy",
        ),
        "table": [tuple(row) for row in spec["table"]] if "table" in spec else table_columns,
        "claims": [tuple(row) for row in spec["claims"]] if "claims" in spec else CLAIMS,
        "comparisons": [tuple(p) for p in spec["comparisons"]] if "comparisons" in spec else None,
        "claim_pairs": [tuple(p) for p in spec["claim_pairs"]] if "claim_pairs" in spec else None,
        "notes": list(spec.get("notes", [config.get("table_note", DEFAULT_NOTE)])),
        "plots": [tuple(row) for row in spec["plots"]] if "plots" in spec else DEFAULT_PLOTS,
        "curves": list(spec.get("curves", [])),
    }


def t_quantile_975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom.

    Args:
        df: degrees of freedom, at least 1.

    Returns:
        ``t_{0.975, df}`` (table values; conservative between table rows; 1.960 beyond 120).

    Raises:
        ValueError: if ``df < 1``.
    """
    if df < 1:
        raise ValueError(f"df: must be at least 1, got {df}")
    if df in _T975:
        return _T975[df]
    larger = [k for k in _T975 if k < df]
    return _T975[max(larger)] if df <= 120 else 1.960


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Args:
        values: non-empty list of numbers.

    Returns:
        ``(mean, std)``.

    Raises:
        ValueError: if ``values`` is empty.
    """
    if not values:
        raise ValueError("values: must not be empty")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences with a 95% t-interval.

    Args:
        differences: per-seed differences, non-empty.

    Returns:
        ``(mean, low, high)``; ``low``/``high`` are NaN for a single pair.

    Raises:
        ValueError: if ``differences`` is empty.
    """
    mean, std = mean_std(differences)
    n = len(differences)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def run_slug(loss: str, seed: int) -> str:
    """File-name-safe identifier of one run, e.g. ``el_log_end_1__seed0``.

    Args:
        loss: the loss name.
        seed: the seed.

    Returns:
        The slug.

    Raises:
        ValueError: if ``loss`` is empty or ``seed`` is not a non-negative int.
    """
    if not isinstance(loss, str) or not loss.strip():
        raise ValueError(f"loss: expected a non-empty loss name, got {loss!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return f"{re.sub(r'[^A-Za-z0-9.]+', '_', loss).strip('_')}__seed{seed}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file and ``os.replace`` it into place.

    Args:
        path: destination.
        text: content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically (non-finite floats become ``null``).

    Args:
        path: destination.
        obj: JSON-serialisable object.
    """
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")


def save_arrays(out_dir: str | os.PathLike, loss: str, seed: int, **arrays: np.ndarray) -> None:
    """Save one run's per-example arrays to ``out_dir/arrays/<slug>.npz`` atomically.

    Args:
        out_dir: output folder.
        loss: loss name.
        seed: seed.
        **arrays: named 1-D arrays (``margin``, ``energy``, ``energy_true``).
    """
    path = Path(out_dir) / "arrays" / f"{run_slug(loss, seed)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_arrays(out_dir: str | os.PathLike, loss: str, seed: int) -> dict[str, np.ndarray] | None:
    """Load one run's per-example arrays, or ``None`` if absent."""
    path = Path(out_dir) / "arrays" / f"{run_slug(loss, seed)}.npz"
    if not path.is_file():
        return None
    with np.load(path) as pack:
        return {k: pack[k] for k in pack.files}


def write_results(out_dir: str | os.PathLike, results: dict) -> None:
    """Write ``results.json`` and ``results.csv`` atomically.

    Args:
        out_dir: output folder.
        results: ``{"task", "dataset", "config", "runs": [...]}``.

    Raises:
        ValueError: if a contract key is missing.
    """
    for key in ("task", "dataset", "config", "runs"):
        if key not in results:
            raise ValueError(f"results: missing key {key!r}")
    for run in results["runs"]:
        for key in ("loss", "seed", "metrics", "history"):
            if key not in run:
                raise ValueError(f"results: a run lacks key {key!r}")
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", results)
    names: list[str] = []
    for run in results["runs"]:
        names += [k for k in run["metrics"] if k not in names]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["loss", "seed", "status", *names])
    for run in results["runs"]:
        row = [run["loss"], run["seed"], run.get("status", "ok")]
        row += ["" if run["metrics"].get(n) is None else run["metrics"][n] for n in names]
        writer.writerow(row)
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())


def load_results(dirs: list[str | os.PathLike]) -> tuple[dict, dict[tuple[str, int], Path]]:
    """Load and merge ``results.json`` from several folders.

    Runs are concatenated (a later folder's run replaces an earlier one with the same loss and
    seed); task, dataset and config come from the first folder, and the others are listed
    under ``config["merged_from"]``.

    Args:
        dirs: folders written by ``encouraging-loss run`` / ``reproduce``.

    Returns:
        ``(results, source)`` where ``source`` maps ``(loss, seed)`` to the folder holding that
        run's arrays.

    Raises:
        FileNotFoundError: if a folder has no ``results.json``.
        ValueError: if ``dirs`` is empty or folders mix tasks or datasets.
    """
    if not dirs:
        raise ValueError("dirs: give at least one results folder")
    merged: dict | None = None
    runs: dict[tuple[str, int], dict] = {}
    source: dict[tuple[str, int], Path] = {}
    for folder in map(Path, dirs):
        path = folder / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"dirs: no results.json in {folder}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if merged is None:
            merged = {k: data[k] for k in ("task", "dataset", "config")}
            merged["config"] = dict(merged["config"])
            if "report" in data:  # a task's report layout (see report_spec)
                merged["report"] = data["report"]
        elif (data["task"], data["dataset"]) != (merged["task"], merged["dataset"]):
            raise ValueError(
                f"dirs: {folder} holds {data['task']}/{data['dataset']}, "
                f"not {merged['task']}/{merged['dataset']}"
            )
        for run in data["runs"]:
            runs[(run["loss"], int(run["seed"]))] = run
            source[(run["loss"], int(run["seed"]))] = folder
    assert merged is not None
    if len(dirs) > 1:
        merged["config"]["merged_from"] = [str(d) for d in dirs]
    merged["runs"] = list(runs.values())
    return merged, source


def _losses_in_order(results: dict) -> list[str]:
    order: list[str] = []
    for run in results["runs"]:
        if run["loss"] not in order:
            order.append(run["loss"])
    return order


def _ok(run: dict) -> bool:
    return run.get("status", "ok") == "ok"


def _baseline_for(loss: str, losses: list[str]) -> str | None:
    from .losses import parse_loss  # local import: report stays usable without torch losses

    try:
        spec = parse_loss(loss)
    except ValueError:
        return None
    if spec.family in ("ce", "ls-ce"):
        return None
    wanted = spec.baseline_name
    for candidate in losses:
        try:
            other = parse_loss(candidate)
        except ValueError:
            continue
        if other.family in ("ce", "ls-ce") and other.baseline_name == wanted:
            return candidate
    return None


def _fmt(value: float, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _check_results(results) -> None:
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise ValueError("results: expected a dict with a 'runs' list (see results.json)")


def summary_rows(results: dict) -> list[dict]:
    """Per-loss aggregates: runs, diverged runs, and mean ± std of each table metric.

    Args:
        results: loaded results.

    Returns:
        One dict per loss with ``loss``, ``n_ok``, ``n_diverged``, ``diverged_steps`` and
        ``{metric: (mean, std)}`` under ``stats``.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    _check_results(results)
    rows = []
    for loss in _losses_in_order(results):
        runs = [r for r in results["runs"] if r["loss"] == loss]
        ok = [r for r in runs if _ok(r)]
        stats = {}
        for metric, _, _ in report_spec(results)["table"]:
            values = [r["metrics"][metric] for r in ok if r["metrics"].get(metric) is not None]
            stats[metric] = mean_std(values) if values else (float("nan"), float("nan"))
        rows.append(
            {
                "loss": loss,
                "n_ok": len(ok),
                "n_diverged": sum(r.get("status") == "diverged" for r in runs),
                "diverged_steps": [r["metrics"].get("diverged_step") for r in runs if not _ok(r)],
                "lr": sorted({r.get("lr") for r in runs if r.get("lr") is not None}),
                "stats": stats,
            }
        )
    return rows


def paired_differences(results: dict, loss: str, baseline: str, metric: str) -> list[float]:
    """Per-seed differences ``loss − baseline`` of ``metric`` over seeds where both finished.

    Args:
        results: loaded results.
        loss: compared loss name.
        baseline: baseline loss name.
        metric: metric name.

    Returns:
        The differences, ordered by seed.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    _check_results(results)
    by_seed = {
        name: {
            r["seed"]: r["metrics"].get(metric)
            for r in results["runs"]
            if r["loss"] == name and _ok(r)
        }
        for name in (loss, baseline)
    }
    seeds = sorted(set(by_seed[loss]) & set(by_seed[baseline]))
    return [
        by_seed[loss][s] - by_seed[baseline][s]
        for s in seeds
        if by_seed[loss][s] is not None and by_seed[baseline][s] is not None
    ]


def claim_verdict(differences: list[float], direction: int) -> str:
    """One-word-plus-reason verdict for a claim from paired differences.

    Args:
        differences: per-seed ``EL − CE`` differences.
        direction: +1 if the claim says the difference is positive, -1 if negative.

    Returns:
        ``"holds"`` when the 95% interval lies on the claimed side of 0, else ``"does not hold"``
        with the reason.

    Raises:
        ValueError: if ``direction`` is not +1 or -1.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction: expected +1 or -1, got {direction!r}")
    if not differences:
        return "not measured (no finished pair of runs)"
    mean, low, high = paired_interval(differences)
    if len(differences) < 2:
        side = "holds" if mean * direction > 0 else "does not hold"
        return f"{side} (single seed, no interval)"
    if direction * low > 0 and direction * high > 0:
        return "holds"
    if mean * direction > 0:
        return "does not hold (right direction, but the 95% interval includes 0)"
    return "does not hold (opposite direction)"


def markdown_report(results: dict) -> str:
    """Render ``report.md`` from results (no number typed by hand).

    Args:
        results: loaded results.

    Returns:
        Markdown text.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    _check_results(results)
    losses = _losses_in_order(results)
    rows = summary_rows(results)
    spec = report_spec(results)
    table_metrics = spec["table"]
    lines = [f"# {spec['title']}", "", summary_table(results), ""]
    for note in spec["notes"]:
        lines += [note, ""]
    diverged = [r for r in rows if r["n_diverged"]]
    if diverged:
        lines += ["## Diverged runs", ""]
        for r in diverged:
            lines.append(
                f"- `{r['loss']}` (lr {', '.join(f'{v:g}' for v in r['lr'])}): "
                f"{r['n_diverged']} of {r['n_diverged'] + r['n_ok']} runs diverged "
                f"(non-finite loss at step {', '.join(str(s) for s in r['diverged_steps'])})"
            )
        lines.append("")
    diverged_losses = {r["loss"]: r["n_ok"] == 0 and r["n_diverged"] > 0 for r in rows}
    if spec["comparisons"] is None:
        comparisons = [(loss, _baseline_for(loss, losses)) for loss in losses]
        comparisons = [(loss, base) for loss, base in comparisons if base is not None]
    else:
        comparisons = [(a, b) for a, b in spec["comparisons"] if a in losses and b in losses]
    claim_pairs = comparisons
    if spec["claim_pairs"] is not None:
        claim_pairs = [(a, b) for a, b in spec["claim_pairs"] if a in losses and b in losses]
    if comparisons:
        lines += [
            "## Paired difference to the CE baseline (same seed), mean [95% t-interval]",
            "",
            "| loss − baseline | pairs | "
            + " | ".join(label for _, label, _ in table_metrics)
            + " |",
            "|---|---|" + "---|" * len(table_metrics),
        ]
        for loss, base in comparisons:
            cells = []
            pairs = 0
            for metric, _, _ in table_metrics:
                diffs = paired_differences(results, loss, base, metric)
                pairs = max(pairs, len(diffs))
                if not diffs:
                    cells.append("—")
                    continue
                mean, low, high = paired_interval(diffs)
                cells.append(f"{mean:+.4f} [{_fmt(low)}, {_fmt(high)}]")
            lines.append(f"| `{loss}` − `{base}` | {pairs} | " + " | ".join(cells) + " |")
        heading = "three claims" if spec["claims"] is CLAIMS else "direction"
        lines += ["", f"## The paper's {heading}, checked on these runs", ""]
        for claim, metric, direction, wording in spec["claims"]:
            if not any(metric in r["metrics"] for r in results["runs"]):
                continue  # the task does not measure it (e.g. no probe for translation)
            for loss, base in claim_pairs:
                diffs = paired_differences(results, loss, base, metric)
                verdict = claim_verdict(diffs, direction)
                if not diffs and diverged_losses.get(loss):
                    verdict = f"not measured: `{loss}` diverged in every run"
                detail = ""
                if diffs:
                    mean, low, high = paired_interval(diffs)
                    detail = f" (Δ {mean:+.4f}, 95% CI [{_fmt(low)}, {_fmt(high)}], n={len(diffs)})"
                lines.append(
                    f"- **{claim}** — `{loss}` vs `{base}`: {wording}: **{verdict}**{detail}"
                )
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{alt}]({file})" for alt, file in spec["plots"]]
    lines += [f"![{curve['title']}]({curve['file']})" for curve in spec["curves"]]
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(_json_safe(results["config"]), indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """The per-loss mean ± std table as Markdown (also printed by the CLI).

    Args:
        results: loaded results.

    Returns:
        A Markdown table.
    """
    table_metrics = report_spec(results)["table"]
    header = (
        "| loss | lr | runs ok | diverged | "
        + " | ".join(label for _, label, _ in table_metrics)
        + " |"
    )
    lines = [header, "|---|---|---|---|" + "---|" * len(table_metrics)]
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


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def make_plots(results: dict, source: dict[tuple[str, int], Path], out_dir: Path) -> list[Path]:
    """Draw accuracy curves, margin/energy histograms, reliability diagram, gradient share.

    Args:
        results: loaded results.
        source: ``(loss, seed) -> folder`` holding the run's ``arrays/``.
        out_dir: where the PNGs go.

    Returns:
        Paths of the written PNGs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    losses = _losses_in_order(results)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss in losses:
        runs = [r for r in results["runs"] if r["loss"] == loss and r["history"]]
        for i, run in enumerate(runs):
            epochs = [h["epoch"] for h in run["history"]]
            kw = {
                "label": loss if i == 0 else None,
                "color": f"C{losses.index(loss)}",
                "alpha": 0.8,
                "linestyle": "-" if _ok(run) else ":",
            }
            axes[0].plot(epochs, [h["train_accuracy"] for h in run["history"]], **kw)
            axes[1].plot(epochs, [h["val_accuracy"] for h in run["history"]], **kw)
    for ax, title in zip(axes, ("train accuracy", "validation accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    _save_figure(fig, out_dir / "accuracy_curves.png")
    plt.close(fig)
    written.append(out_dir / "accuracy_curves.png")

    pooled: dict[str, dict[str, np.ndarray]] = {}
    for loss in losses:
        parts: dict[str, list[np.ndarray]] = {}
        for run in results["runs"]:
            if run["loss"] != loss or not _ok(run):
                continue
            arrays = load_arrays(source.get((loss, int(run["seed"])), out_dir), loss, run["seed"])
            for key, value in (arrays or {}).items():
                parts.setdefault(key, []).append(value)
        pooled[loss] = {k: np.concatenate(v) for k, v in parts.items()}
    for key, filename, xlabel in (
        ("margin", "margin_hist.png", "test margin z_y − max_{j≠y} z_j"),
        ("energy", "energy_hist.png", "test energy −logsumexp(z)"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        values = [pooled[loss][key] for loss in losses if key in pooled[loss]]
        if values:
            low, high = np.percentile(np.concatenate(values), [0.5, 99.5])
            bins = np.linspace(low, high, 60)
            for loss in losses:
                if key in pooled[loss]:
                    ax.hist(
                        pooled[loss][key],
                        bins=bins,
                        histtype="step",
                        density=True,
                        label=loss,
                        color=f"C{losses.index(loss)}",
                    )
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density (all seeds pooled)")
        _save_figure(fig, out_dir / filename)
        plt.close(fig)
        written.append(out_dir / filename)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for loss in losses:
        runs = [r for r in results["runs"] if r["loss"] == loss and _ok(r) and r.get("reliability")]
        if not runs:
            continue
        counts = np.sum([r["reliability"]["count"] for r in runs], axis=0).astype(float)
        acc = np.nansum(
            [
                np.nan_to_num(np.asarray(r["reliability"]["accuracy"], dtype=float))
                * np.asarray(r["reliability"]["count"])
                for r in runs
            ],
            axis=0,
        )
        conf = np.nansum(
            [
                np.nan_to_num(np.asarray(r["reliability"]["confidence"], dtype=float))
                * np.asarray(r["reliability"]["count"])
                for r in runs
            ],
            axis=0,
        )
        keep = counts > 0
        ax.plot(
            conf[keep] / counts[keep],
            acc[keep] / counts[keep],
            marker="o",
            markersize=3,
            label=loss,
            color=f"C{losses.index(loss)}",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram (test, seeds pooled)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save_figure(fig, out_dir / "reliability.png")
    plt.close(fig)
    written.append(out_dir / "reliability.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for loss in losses:
        runs = [r for r in results["runs"] if r["loss"] == loss and r["history"]]
        for i, run in enumerate(runs):
            ax.plot(
                [h["epoch"] for h in run["history"]],
                [h["grad_share_well_classified"] for h in run["history"]],
                label=loss if i == 0 else None,
                color=f"C{losses.index(loss)}",
                alpha=0.8,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of logit-gradient norm")
    ax.set_title("gradient share of well-classified examples (p_y > 0.5)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save_figure(fig, out_dir / "grad_share.png")
    plt.close(fig)
    written.append(out_dir / "grad_share.png")
    written += plot_curves(results, out_dir)
    return written


def plot_curves(results: dict, out_dir: Path) -> list[Path]:
    """Line plots of metrics against a numeric x, one colour per loss (``report`` ``curves``).

    Each curve entry is ``{"file", "title", "xlabel", "ylabel", "series": [{"label",
    "points": [[x, metric], ...]}]}``; every series is drawn per loss as the mean over finished
    seeds with ± std error bars, series told apart by line style (e.g. robust accuracy against
    ε for FGSM and PGD).

    Args:
        results: loaded results.
        out_dir: where the PNGs go.

    Returns:
        Paths of the written PNGs.
    """
    curves = report_spec(results)["curves"]
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = _losses_in_order(results)
    styles = ("-", "--", ":", "-.")
    written = []
    for curve in curves:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for series_index, series in enumerate(curve["series"]):
            for loss in losses:
                ok = [r for r in results["runs"] if r["loss"] == loss and _ok(r)]
                xs, means, stds = [], [], []
                for x, metric in series["points"]:
                    values = [
                        r["metrics"][metric] for r in ok if r["metrics"].get(metric) is not None
                    ]
                    if values:
                        mean, std = mean_std(values)
                        xs.append(float(x))
                        means.append(mean)
                        stds.append(std)
                if xs:
                    ax.errorbar(
                        xs,
                        means,
                        yerr=stds,
                        marker="o",
                        markersize=3,
                        capsize=2,
                        linestyle=styles[series_index % len(styles)],
                        color=f"C{losses.index(loss)}",
                        label=f"{loss} ({series['label']})",
                    )
        ax.set_xlabel(curve.get("xlabel", "x"))
        ax.set_ylabel(curve.get("ylabel", "value"))
        ax.set_title(curve.get("title", ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        path = out_dir / curve["file"]
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


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
    """
    out_dir = Path(out_dir)
    source = source or {}
    write_results(out_dir, results)
    make_plots(results, source, out_dir)
    path = out_dir / "report.md"
    atomic_write_text(path, markdown_report(results))
    return path


def rebuild_report(dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild the report from saved folders (``encouraging-loss report DIR...``).

    Args:
        dirs: result folders to merge.
        out_dir: where to write; default the single folder given, required for several.

    Returns:
        Path of the written ``report.md``.

    Raises:
        ValueError: if several folders are given without ``out_dir``.
    """
    if out_dir is None:
        if len(dirs) != 1:
            raise ValueError("out_dir: required when merging several folders (use --out)")
        out_dir = dirs[0]
    results, source = load_results(dirs)
    return write_report(out_dir, results, source)
