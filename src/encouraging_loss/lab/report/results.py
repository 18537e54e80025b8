"""The results-file contract: writing and merging ``results.json``, the report spec, aggregates.

``results.json`` holds ``{"task", "dataset", "config", "runs": [{"loss", "seed", "metrics",
"history", ...}], "report"?}``; ``config["baselines"]`` maps each loss to the CE loss it is
compared with (``null`` for none), computed by the runner from the typed loss specs.
"""

from __future__ import annotations

import csv
import json
import os
from io import StringIO
from pathlib import Path

from .. import io
from .stats import mean_std

#: The metrics the tasks' tables share: metric -> (column label, whether higher is better).
COLUMNS = {
    "test_accuracy": ("test acc", True),
    "val_accuracy": ("val acc", True),
    "margin_mean": ("margin", True),
    "energy_mean": ("energy −lse", False),
    "energy_true_mean": ("energy −z_y", False),
    "probe_accuracy": ("probe acc", True),
    "crt_accuracy": ("cRT acc", True),
    "ece": ("ECE", False),
    "grad_share_well_classified_last": ("grad share p_y>0.5", True),
}


def against_ce(losses: list[str]) -> dict:
    """A report spec's ``comparisons`` (every loss but ``ce`` against ``ce``) and ``claim_pairs``
    (the encouraging losses, ``el...`` and ``ls-el...``, against ``ce``).

    Args:
        losses: the loss names of the results, in order.
    """
    return {
        "comparisons": [[loss, "ce"] for loss in losses if loss != "ce"],
        "claim_pairs": [[loss, "ce"] for loss in losses if loss.startswith(("el", "ls-el"))],
    }


def table_columns(*columns, **labels) -> list[list]:
    """A report spec's ``table``: ``[metric, label, higher_is_better]`` rows.

    Args:
        *columns: metric names of :data:`COLUMNS`, or whole ``(metric, label, higher)`` rows.
        **labels: a different label for some of the named metrics (``margin_mean="token
            margin"``).

    Raises:
        ValueError: for a metric name :data:`COLUMNS` does not have.
    """
    rows = []
    for column in columns:
        if not isinstance(column, str):
            rows.append(list(column))
            continue
        if column not in COLUMNS:
            raise ValueError(f"columns: unknown metric {column!r}; known: {', '.join(COLUMNS)}")
        label, higher = COLUMNS[column]
        rows.append([column, labels.get(column, label), higher])
    return rows


TABLE_METRICS = tuple(tuple(row) for row in table_columns(
    "test_accuracy", "margin_mean", "energy_mean", "energy_true_mean", "probe_accuracy",
    "crt_accuracy", "ece", "grad_share_well_classified_last",
))  # fmt: skip
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


def check_results(results) -> None:
    """Raise ``ValueError`` unless ``results`` is a dict with a ``runs`` list."""
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise ValueError("results: expected a dict with a 'runs' list (see results.json)")


def is_ok(run: dict) -> bool:
    """Whether a run finished (neither diverged nor failed)."""
    return run.get("status", "ok") == "ok"


def losses_in_order(results: dict) -> list[str]:
    """The loss names of the runs, in order of first appearance."""
    return list(dict.fromkeys(run["loss"] for run in results["runs"]))


def _rows(spec: dict, key: str, default=None):
    return [tuple(row) for row in spec[key]] if key in spec else default


def report_spec(results: dict) -> dict:
    """What the report shows for a task: ``results["report"]`` over the image task's defaults.

    A task other than ``image`` may store a ``"report"`` entry in its results (so that
    ``encouraging-loss report`` rebuilds the same report from ``results.json``) with any of:
    ``title``; ``table`` (``[metric, label, higher_is_better]`` rows); ``claims`` (``[claim,
    metric, direction, wording]`` rows); ``comparisons`` (``[loss, baseline]`` pairs for the
    paired-difference table); ``claim_pairs`` (pairs the claims are checked on, default
    ``comparisons``); ``notes`` (paragraphs under the table); ``plots`` (``[alt, file]`` rows);
    ``curves`` (line plots of a metric against x, see :func:`~.plots.plot_curves`). The columns
    and the note may also come from ``config["table_metrics"]`` and ``config["table_note"]``.

    Args:
        results: loaded results.

    Returns:
        Dict with every key above filled in; ``comparisons`` is ``None`` when each loss is to
        be compared with its CE counterpart (the image task's rule).

    Raises:
        ValueError: if ``results`` is not a dict.
    """
    if not isinstance(results, dict):
        raise ValueError(f"results: expected a dict, got {type(results).__name__}")
    spec = results.get("report") or {}
    # Tasks may also name their columns and note in the config (graph, translation).
    config = results.get("config", {})
    custom = config.get("table_metrics")
    default_columns = (
        tuple((str(m), str(label), bool(higher)) for m, label, higher in custom)
        if custom
        else TABLE_METRICS
    )
    return {
        "title": spec.get(
            "title",
            f"{results['task']} on {results['dataset']}: encouraging loss vs cross-entropy",
        ),
        "table": _rows(spec, "table", default_columns),
        "claims": _rows(spec, "claims", CLAIMS),
        "comparisons": _rows(spec, "comparisons"),
        "claim_pairs": _rows(spec, "claim_pairs"),
        "notes": list(spec.get("notes", [config.get("table_note", DEFAULT_NOTE)])),
        "plots": _rows(spec, "plots", DEFAULT_PLOTS),
        "curves": list(spec.get("curves", [])),
    }


def write_results(out_dir: str | os.PathLike, results: dict) -> None:
    """Write ``results.json`` and ``results.csv`` (one row per run) atomically.

    Args:
        out_dir: output folder.
        results: ``{"task", "dataset", "config", "runs": [...]}``.

    Raises:
        ValueError: if a contract key is missing.
    """
    check_results(results)
    for key in ("task", "dataset", "config", "runs"):
        if key not in results:
            raise ValueError(f"results: missing key {key!r}")
    for run in results["runs"]:
        for key in ("loss", "seed", "metrics", "history"):
            if key not in run:
                raise ValueError(f"results: a run lacks key {key!r}")
    out_dir = Path(out_dir)
    io.atomic_write_json(out_dir / "results.json", results)
    names = list(dict.fromkeys(name for run in results["runs"] for name in run["metrics"]))
    buffer = StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["loss", "seed", "status", *names])
    for run in results["runs"]:
        row = [run["loss"], run["seed"], run.get("status", "ok")]
        row += ["" if run["metrics"].get(n) is None else run["metrics"][n] for n in names]
        writer.writerow(row)
    io.atomic_write_text(out_dir / "results.csv", buffer.getvalue())


def load_results(dirs: list[str | os.PathLike]) -> tuple[dict, dict[tuple[str, int], Path]]:
    """Load and merge ``results.json`` from several folders.

    Runs are concatenated (a later folder's run replaces an earlier one with the same loss and
    seed); task, dataset and config come from the first folder, and the others are listed
    under ``config["merged_from"]``. The baselines of merged folders are recomputed from all
    their loss specs (a loss may meet its CE baseline only in another folder).

    Args:
        dirs: folders written by ``encouraging-loss run`` / ``reproduce``.

    Returns:
        ``(results, source)`` where ``source`` maps ``(loss, seed)`` to the folder holding that
        run's arrays.

    Raises:
        FileNotFoundError: if a folder has no ``results.json``.
        ValueError: if ``dirs`` is empty or folders mix tasks or datasets.
    """
    if isinstance(dirs, (str, os.PathLike)) or not dirs:
        raise ValueError("dirs: give a non-empty list of results folders")
    merged: dict | None = None
    configs: list[dict] = []
    runs: dict[tuple[str, int], dict] = {}
    source: dict[tuple[str, int], Path] = {}
    for folder in map(Path, dirs):
        path = folder / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"dirs: no results.json in {folder}")
        data = json.loads(path.read_text(encoding="utf-8"))
        configs.append(data["config"])
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
        _merge_baselines(merged["config"], configs)
    merged["runs"] = list(runs.values())
    return merged, source


def _merge_baselines(config: dict, configs: list[dict]) -> None:
    if not all("loss_specs" in c for c in configs):
        config.pop("baselines", None)  # a folder written before the redesign: names are parsed
        return
    from ..losses import LossSpec, baselines

    specs = {n: s for c in configs for n, s in c["loss_specs"].items()}
    config["loss_specs"] = specs
    config["baselines"] = baselines(
        [LossSpec(n, s["family"], s["params"]) for n, s in specs.items()]
    )


def _parsed_baselines(losses: list[str]) -> dict[str, str | None]:
    """Baselines of results written before the redesign (no ``config["baselines"]``)."""
    from ..losses import baselines, parse_loss

    specs = []
    for name in losses:
        try:
            specs.append(parse_loss(name))
        except ValueError:
            continue  # not a loss name this version knows: compared with nothing
    return baselines(specs)


def comparisons(results: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The ``(loss, baseline)`` pairs of the paired-difference table, and those of the claims.

    Args:
        results: loaded results.

    Returns:
        ``(comparisons, claim_pairs)``, both restricted to losses that have runs; without a
        task's ``comparisons`` each loss is paired with its CE baseline.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    check_results(results)
    losses = losses_in_order(results)
    spec = report_spec(results)
    if spec["comparisons"] is None:
        known = results.get("config", {}).get("baselines")
        known = _parsed_baselines(losses) if known is None else known
        pairs = [(loss, known.get(loss)) for loss in losses]
    else:
        pairs = spec["comparisons"]
    pairs = [(a, b) for a, b in pairs if a in losses and b in losses]
    if spec["claim_pairs"] is None:
        return pairs, pairs
    return pairs, [(a, b) for a, b in spec["claim_pairs"] if a in losses and b in losses]


def summary_rows(results: dict) -> list[dict]:
    """Per-loss aggregates: runs, diverged runs, and mean ± std of each table metric.

    Args:
        results: loaded results.

    Returns:
        One dict per loss with ``loss``, ``n_ok``, ``n_diverged``, ``diverged_steps``, ``lr``
        and ``{metric: (mean, std)}`` under ``stats``.

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    check_results(results)
    table = report_spec(results)["table"]
    rows = []
    for loss in losses_in_order(results):
        runs = [r for r in results["runs"] if r["loss"] == loss]
        ok = [r for r in runs if is_ok(r)]
        stats = {}
        for metric, _, _ in table:
            values = [r["metrics"][metric] for r in ok if r["metrics"].get(metric) is not None]
            stats[metric] = mean_std(values) if values else (float("nan"), float("nan"))
        rows.append(
            {
                "loss": loss,
                "n_ok": len(ok),
                "n_diverged": sum(r.get("status") == "diverged" for r in runs),
                "diverged_steps": [r["metrics"].get("diverged_step") for r in runs if not is_ok(r)],
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
    check_results(results)
    by_seed = {
        name: {
            r["seed"]: r["metrics"].get(metric)
            for r in results["runs"]
            if r["loss"] == name and is_ok(r)
        }
        for name in (loss, baseline)
    }
    seeds = sorted(set(by_seed[loss]) & set(by_seed[baseline]))
    return [
        by_seed[loss][s] - by_seed[baseline][s]
        for s in seeds
        if by_seed[loss][s] is not None and by_seed[baseline][s] is not None
    ]
