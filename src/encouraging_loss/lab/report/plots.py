"""The report's PNG plots (matplotlib, Agg backend), each saved atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io
from .results import check_results, is_ok, losses_in_order, report_spec
from .stats import mean_std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, legend_axes=(), fontsize: int = 8) -> Path:
    """Add legends where there are labelled artists, save ``fig`` atomically and close it."""
    for ax in legend_axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=fontsize)
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def _history_lines(ax, results: dict, key: str, mark_failed: bool) -> None:
    """One line per run of ``history[key]`` against epoch; failed runs dotted if asked."""
    for index, loss in enumerate(losses_in_order(results)):
        runs = [r for r in results["runs"] if r["loss"] == loss and r["history"]]
        for i, run in enumerate(runs):
            style = {"linestyle": "-" if is_ok(run) else ":"} if mark_failed else {}
            ax.plot(
                [h["epoch"] for h in run["history"]],
                [h[key] for h in run["history"]],
                label=loss if i == 0 else None,
                color=f"C{index}",
                alpha=0.8,
                **style,
            )


def _pooled_arrays(results: dict, source: dict, out_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each loss's per-example arrays, concatenated over its finished seeds."""
    pooled = {}
    for loss in losses_in_order(results):
        parts: dict[str, list[np.ndarray]] = {}
        for run in results["runs"]:
            if run["loss"] != loss or not is_ok(run):
                continue
            folder = source.get((loss, int(run["seed"])), out_dir)
            for key, value in (io.load_arrays(folder, loss, run["seed"]) or {}).items():
                parts.setdefault(key, []).append(value)
        pooled[loss] = {k: np.concatenate(v) for k, v in parts.items()}
    return pooled


def _histogram(plt, pooled: dict, key: str, xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    values = [arrays[key] for arrays in pooled.values() if key in arrays]
    if values:
        low, high = np.percentile(np.concatenate(values), [0.5, 99.5])
        bins = np.linspace(low, high, 60)
        for index, (loss, arrays) in enumerate(pooled.items()):
            if key in arrays:
                ax.hist(
                    arrays[key],
                    bins=bins,
                    histtype="step",
                    density=True,
                    label=loss,
                    color=f"C{index}",
                )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (all seeds pooled)")
    return _save(fig, path, [ax])


def _weighted(runs: list[dict], key: str) -> np.ndarray:
    """Per-bin sum over runs of ``reliability[key]`` weighted by the bin counts."""
    return np.nansum(
        [
            np.nan_to_num(np.asarray(r["reliability"][key], dtype=float))
            * np.asarray(r["reliability"]["count"])
            for r in runs
        ],
        axis=0,
    )


def _reliability(plt, results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for index, loss in enumerate(losses_in_order(results)):
        runs = [
            r for r in results["runs"] if r["loss"] == loss and is_ok(r) and r.get("reliability")
        ]
        if not runs:
            continue
        counts = np.sum([r["reliability"]["count"] for r in runs], axis=0).astype(float)
        acc, conf = _weighted(runs, "accuracy"), _weighted(runs, "confidence")
        keep = counts > 0
        ax.plot(
            conf[keep] / counts[keep],
            acc[keep] / counts[keep],
            marker="o",
            markersize=3,
            label=loss,
            color=f"C{index}",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram (test, seeds pooled)")
    return _save(fig, path, [ax])


def make_plots(results: dict, source: dict[tuple[str, int], Path], out_dir: Path) -> list[Path]:
    """Draw accuracy curves, margin/energy histograms, reliability diagram, gradient share.

    Args:
        results: loaded results.
        source: ``(loss, seed) -> folder`` holding the run's ``arrays/``.
        out_dir: where the PNGs go.

    Returns:
        Paths of the written PNGs (then those of :func:`plot_curves`).

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list or ``source`` is not a dict.
    """
    check_results(results)
    if not isinstance(source, dict):
        raise ValueError(f"source: expected a dict (loss, seed) -> folder, got {source!r}")
    out_dir = Path(out_dir)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _history_lines(axes[0], results, "train_accuracy", mark_failed=True)
    _history_lines(axes[1], results, "val_accuracy", mark_failed=True)
    for ax, title in zip(axes, ("train accuracy", "validation accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    written = [_save(fig, out_dir / "accuracy_curves.png", [axes[1]])]

    pooled = _pooled_arrays(results, source, out_dir)
    written.append(
        _histogram(
            plt, pooled, "margin", "test margin z_y − max_{j≠y} z_j", out_dir / "margin_hist.png"
        )
    )
    written.append(
        _histogram(plt, pooled, "energy", "test energy −logsumexp(z)", out_dir / "energy_hist.png")
    )
    written.append(_reliability(plt, results, out_dir / "reliability.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _history_lines(ax, results, "grad_share_well_classified", mark_failed=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of logit-gradient norm")
    ax.set_title("gradient share of well-classified examples (p_y > 0.5)")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "grad_share.png", [ax]))
    return written + plot_curves(results, out_dir)


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

    Raises:
        ValueError: if ``results`` lacks a ``runs`` list.
    """
    check_results(results)
    curves = report_spec(results)["curves"]
    if not curves:
        return []
    plt = _pyplot()
    losses = losses_in_order(results)
    styles = ("-", "--", ":", "-.")
    written = []
    for curve in curves:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for series_index, series in enumerate(curve["series"]):
            for index, loss in enumerate(losses):
                ok = [r for r in results["runs"] if r["loss"] == loss and is_ok(r)]
                points = []
                for x, metric in series["points"]:
                    values = [
                        r["metrics"][metric] for r in ok if r["metrics"].get(metric) is not None
                    ]
                    if values:
                        points.append((float(x), *mean_std(values)))
                if points:
                    xs, means, stds = zip(*points, strict=True)
                    ax.errorbar(
                        list(xs),
                        list(means),
                        yerr=list(stds),
                        marker="o",
                        markersize=3,
                        capsize=2,
                        linestyle=styles[series_index % len(styles)],
                        color=f"C{index}",
                        label=f"{loss} ({series['label']})",
                    )
        ax.set_xlabel(curve.get("xlabel", "x"))
        ax.set_ylabel(curve.get("ylabel", "value"))
        ax.set_title(curve.get("title", ""))
        ax.grid(alpha=0.3)
        written.append(_save(fig, Path(out_dir) / curve["file"], [ax], fontsize=7))
    return written
