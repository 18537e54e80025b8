"""The report package on synthetic results: statistics, the results files, baselines (stored and
parsed from old results), the Markdown text and the plots; no training involved."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from encouraging_loss.lab import io, report
from encouraging_loss.lab.report import stats

# The two-sided 95% table the report used before scipy (3 decimals).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042}


def _run(loss, seed, status="ok", **metrics):
    history = [
        {"epoch": e, "train_accuracy": 0.5, "val_accuracy": 0.4, "grad_share_well_classified": 0.1}
        for e in (1, 2)
    ]
    return {
        "loss": loss,
        "seed": seed,
        "status": status,
        "lr": 0.1,
        "metrics": metrics,
        "history": history,
    }


def _results(runs, **config):
    return {"task": "image", "dataset": "toy", "config": config, "runs": runs}


def _margins(pairs):
    """ce/el runs with the given (ce, el) margins per seed."""
    runs = []
    for seed, (ce, el) in enumerate(pairs):
        runs.append(_run("ce", seed, margin_mean=ce, test_accuracy=0.8))
        runs.append(_run("el", seed, margin_mean=el, test_accuracy=0.81))
    return runs


def _write(folder: Path, results: dict) -> Path:
    report.write_results(folder, results)
    return folder


# --- statistics --------------------------------------------------------------------------------
@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_table_to_three_decimals(df):
    assert round(report.t_quantile_975(df), 3) == T_TABLE[df]


def test_t_quantile_is_exact_between_rows_and_tends_to_normal():
    assert 2.021 < report.t_quantile_975(35) < 2.042  # the table gave 2.042 (row 30)
    assert report.t_quantile_975(10**6) == pytest.approx(1.95996, abs=1e-4)


@pytest.mark.parametrize("df", [0, -1, 1.5, True, "3"])
def test_t_quantile_rejects_bad_df(df):
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile_975(df)


def test_mean_std_and_paired_interval():
    assert report.mean_std([2.0]) == (2.0, 0.0)
    assert report.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, low, high = report.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(report.t_quantile_975(2) / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    single = report.paired_interval([0.5])
    assert single[0] == 0.5 and math.isnan(single[1]) and math.isnan(single[2])
    with pytest.raises(ValueError, match="values"):
        report.mean_std([])
    with pytest.raises(ValueError, match="differences"):
        report.paired_interval([])


def test_claim_verdict():
    assert report.claim_verdict([1.0, 1.1, 0.9], +1) == "holds"
    assert report.claim_verdict([-1.0, -1.1], -1) == "holds"
    assert report.claim_verdict([1.0, -0.5, 0.2], +1).startswith("does not hold (right direction")
    assert report.claim_verdict([1.0, 1.1], -1) == "does not hold (opposite direction)"
    assert report.claim_verdict([0.3], +1) == "holds (single seed, no interval)"
    assert report.claim_verdict([], +1).startswith("not measured")
    with pytest.raises(ValueError, match="direction"):
        report.claim_verdict([1.0], 0)


# --- results files -----------------------------------------------------------------------------
def test_write_results_json_and_csv(tmp_path):
    runs = [_run("ce", 0, a=1.0, b=None), _run("el", 0, "diverged", b=float("nan"), c=2.5)]
    report.write_results(tmp_path, _results(runs, x=float("inf")))
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["config"]["x"] is None and saved["runs"][1]["metrics"]["b"] is None
    rows = list(csv.reader((tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()))
    assert rows == [
        ["loss", "seed", "status", "a", "b", "c"],
        ["ce", "0", "ok", "1.0", "", ""],
        ["el", "0", "diverged", "", "nan", "2.5"],
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ([], "runs"),
        ({"task": "t", "dataset": "d", "runs": []}, "config"),
        (_results([{"loss": "ce", "seed": 0, "metrics": {}}]), "history"),
    ],
)
def test_write_results_rejects_broken_contract(tmp_path, results, match):
    with pytest.raises(ValueError, match=match):
        report.write_results(tmp_path, results)


def test_load_results_merges_folders(tmp_path):
    a = _write(tmp_path / "a", _results(_margins([(1.0, 2.0)]), seeds=[0]))
    b = _write(tmp_path / "b", _results([_run("el", 0, margin_mean=9.0), _run("el", 1)]))
    merged, source = report.load_results([a, b])
    assert [(r["loss"], r["seed"]) for r in merged["runs"]] == [("ce", 0), ("el", 0), ("el", 1)]
    assert merged["runs"][1]["metrics"]["margin_mean"] == 9.0  # the later folder wins
    assert source == {("ce", 0): a, ("el", 0): b, ("el", 1): b}
    assert merged["config"]["seeds"] == [0]
    assert merged["config"]["merged_from"] == [str(a), str(b)]
    single, _ = report.load_results([a])
    assert "merged_from" not in single["config"]


def test_load_results_errors(tmp_path):
    a = _write(tmp_path / "a", _results([]))
    other = _results([])
    other["dataset"] = "other"
    b = _write(tmp_path / "b", other)
    with pytest.raises(ValueError, match="dirs: .* holds image/other"):
        report.load_results([a, b])
    with pytest.raises(FileNotFoundError, match="dirs: no results.json"):
        report.load_results([tmp_path / "missing"])
    with pytest.raises(ValueError, match="dirs"):
        report.load_results([])
    with pytest.raises(ValueError, match="out_dir"):
        report.rebuild_report([a, a])


def test_report_spec_defaults_and_overrides():
    spec = report.report_spec(_results([]))
    assert spec["table"] is report.TABLE_METRICS and spec["claims"] is report.CLAIMS
    assert spec["comparisons"] is None and spec["curves"] == []
    assert spec["title"] == "image on toy: encouraging loss vs cross-entropy"
    custom = _results([], table_metrics=[["acc", "accuracy", 1]], table_note="note")
    custom["report"] = {"comparisons": [["el", "ce"]], "title": "T", "plots": []}
    spec = report.report_spec(custom)
    assert spec["table"] == (("acc", "accuracy", True),) and spec["notes"] == ["note"]
    assert spec["comparisons"] == [("el", "ce")] and spec["title"] == "T" and spec["plots"] == []


def test_summary_rows_and_paired_differences():
    runs = [*_margins([(1.0, 1.5), (2.0, 2.25)]), _run("el", 2, "diverged", diverged_step=7)]
    results = _results(runs)
    rows = {r["loss"]: r for r in report.summary_rows(results)}
    assert rows["el"]["n_ok"] == 2 and rows["el"]["n_diverged"] == 1
    assert rows["el"]["diverged_steps"] == [7] and rows["el"]["lr"] == [0.1]
    assert rows["ce"]["stats"]["margin_mean"] == (1.5, pytest.approx(math.sqrt(0.5)))
    assert math.isnan(rows["ce"]["stats"]["probe_accuracy"][0])
    assert report.paired_differences(results, "el", "ce", "margin_mean") == [0.5, 0.25]
    with pytest.raises(ValueError, match="results"):
        report.summary_rows({"runs": None})


# --- baselines ---------------------------------------------------------------------------------
def test_stored_baselines_are_used():
    runs = [*_margins([(1.0, 2.0), (1.0, 3.0)]), _run("ls-ce:0.1", 0), _run("ls-ce:0.1", 1)]
    # Not what parsing the names would give: proves the stored map is what counts.
    results = _results(runs, baselines={"ce": None, "el": "ls-ce:0.1", "ls-ce:0.1": None})
    assert report.comparisons(results) == ([("el", "ls-ce:0.1")],) * 2


def test_old_results_without_baselines_parse_the_names():
    runs = [
        _run(name, 0)
        for name in ("ce", "el", "ls-ce:0.1", "ls-el:0.1", "el-drw", "not a loss!", "focal:2")
    ]
    pairs, claim_pairs = report.comparisons(_results(runs))
    assert pairs == claim_pairs == [("el", "ce"), ("ls-el:0.1", "ls-ce:0.1"), ("focal:2", "ce")]


def test_a_baseline_without_runs_is_not_compared():
    results = _results(_margins([(1.0, 2.0)]), baselines={"el": "ce", "ce": None})
    results["runs"] = [r for r in results["runs"] if r["loss"] == "el"]
    assert report.comparisons(results) == ([], [])


def test_merged_new_folders_pair_across_folders(tmp_path):
    def folder(name, family):
        specs = {name: {"family": family, "params": {}}}
        runs = [_run(name, 0, margin_mean=1.0)]
        return _write(tmp_path / name, _results(runs, loss_specs=specs, baselines={name: None}))

    merged, _ = report.load_results([folder("ce", "ce"), folder("el", "el")])
    assert merged["config"]["baselines"] == {"ce": None, "el": "ce"}
    assert report.comparisons(merged)[0] == [("el", "ce")]


def test_merging_old_and_new_folders_falls_back_to_parsing(tmp_path):
    new = _results([_run("ce", 0)], loss_specs={"ce": {"family": "ce", "params": {}}})
    new["config"]["baselines"] = {"ce": None}
    merged, _ = report.load_results(
        [_write(tmp_path / "new", new), _write(tmp_path / "old", _results([_run("el", 0)]))]
    )
    assert "baselines" not in merged["config"]
    assert report.comparisons(merged)[0] == [("el", "ce")]


def test_task_comparisons_and_claim_pairs():
    results = _results(_margins([(1.0, 2.0)]))
    results["report"] = {
        "comparisons": [["el", "ce"], ["gone", "ce"]],
        "claim_pairs": [["ce", "el"]],
    }
    assert report.comparisons(results) == ([("el", "ce")], [("ce", "el")])


# --- Markdown ----------------------------------------------------------------------------------
def test_summary_table_text():
    runs = [*_margins([(1.0, 1.5), (2.0, 2.5)]), _run("x", 0, margin_mean=3.0)]
    results = _results(runs, table_metrics=[["margin_mean", "margin", True], ["ece", "ECE", 0]])
    assert report.summary_table(results).splitlines() == [
        "| loss | lr | runs ok | diverged | margin | ECE |",
        "|---|---|---|---|---|---|",
        "| `ce` | 0.1 | 2 | 0 | 1.5000 ± 0.7071 | — |",
        "| `el` | 0.1 | 2 | 0 | 2.0000 ± 0.7071 | — |",
        "| `x` | 0.1 | 1 | 0 | 3.0000 | — |",
    ]


def test_markdown_report_sections_and_numbers():
    runs = [*_margins([(1.0, 2.0), (1.5, 2.0), (1.0, 1.75)]), _run("el", 3, "diverged")]
    runs[-1]["metrics"] = {"diverged_step": 12}
    results = _results(runs, baselines={"ce": None, "el": "ce"}, note=float("nan"))
    text = report.markdown_report(results)
    mean, low, high = report.paired_interval([1.0, 0.5, 0.75])
    assert text.startswith("# image on toy: encouraging loss vs cross-entropy\n\n| loss |")
    assert report.DEFAULT_NOTE in text
    assert "- `el` (lr 0.1): 1 of 4 runs diverged (non-finite loss at step 12)" in text
    row = f"| `el` − `ce` | 3 | +0.0100 [0.0100, 0.0100] | {mean:+.4f} [{low:.4f}, {high:.4f}] |"
    assert row + " — |" * 6 in text.splitlines()
    claim = next(line for line in text.splitlines() if "**margin grows**" in line)
    assert claim == (
        "- **margin grows** — `el` vs `ce`: mean test margin z_y − max_{j≠y} z_j is larger: "
        f"**holds** (Δ {mean:+.4f}, 95% CI [{low:.4f}, {high:.4f}], n=3)"
    )
    assert "## The paper's three claims, checked on these runs" in text
    assert "**energy lower**" not in text  # not measured by these runs
    assert "![accuracy curves](accuracy_curves.png)" in text
    assert '"note": null' in text and text.endswith("```\n")


def test_markdown_report_a_loss_that_always_diverged():
    runs = [_run("ce", 0, margin_mean=1.0), _run("el", 0, "diverged", diverged_step=3)]
    text = report.markdown_report(_results(runs, baselines={"ce": None, "el": "ce"}))
    assert "| `el` − `ce` | 0 | — |" in text
    assert "**not measured: `el` diverged in every run**" in text


def test_markdown_report_without_comparisons_and_bad_input():
    text = report.markdown_report(_results([_run("ce", 0, margin_mean=1.0)]))
    assert "Paired difference" not in text and "## Plots" in text
    with pytest.raises(ValueError, match="results"):
        report.markdown_report([])


# --- plots and the whole report ----------------------------------------------------------------
def test_write_report_and_rebuild(tmp_path):
    runs = _margins([(1.0, 2.0), (1.5, 2.5)])
    for run in runs:
        run["reliability"] = {
            "count": [1, 0, 2],
            "accuracy": [1.0, None, 0.5],
            "confidence": [0.9, 0, 0.6],
        }
        run["metrics"]["rob"] = 0.5 + run["seed"]
        io.save_arrays(tmp_path / "out", run["loss"], run["seed"], margin=[0.1, 0.2], energy=[1, 2])
    results = _results(runs, baselines={"ce": None, "el": "ce"})
    curve = {
        "file": "robust.png",
        "title": "robust",
        "series": [{"label": "a", "points": [[0.1, "rob"]]}],
    }
    results["report"] = {"curves": [curve]}
    out = tmp_path / "out"
    path = report.write_report(out, results)
    assert path == out / "report.md" and "![robust](robust.png)" in path.read_text(encoding="utf-8")
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert names == {
        "results.json",
        "results.csv",
        "report.md",
        "accuracy_curves.png",
        "margin_hist.png",
        "energy_hist.png",
        "reliability.png",
        "grad_share.png",
        "robust.png",
    }
    assert all((out / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))
    rebuilt = report.rebuild_report([out], tmp_path / "rebuilt")
    assert rebuilt.read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    for name in ("margin_hist.png", "results.csv"):  # arrays are read from the source folder
        assert (tmp_path / "rebuilt" / name).read_bytes() == (out / name).read_bytes()


def test_make_plots_rejects_bad_source(tmp_path):
    with pytest.raises(ValueError, match="source"):
        report.make_plots(_results([]), None, tmp_path)


def test_report_writes_files_only_through_io():
    folder = Path(report.__file__).parent
    assert not [
        p.name for p in folder.glob("*.py") if "os.replace" in p.read_text(encoding="utf-8")
    ]
