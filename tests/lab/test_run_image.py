"""End-to-end ``run image`` on a few hundred real examples: files, metric ranges, resume,
divergence, and rebuilding the report from saved folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from encouraging_loss.lab.cli import main
from encouraging_loss.lab.report import paired_interval, t_quantile_975

from .helpers import TINY_RUN, load_results

CONTRACT_METRICS = ("test_accuracy", "margin_mean", "energy_mean", "probe_accuracy", "ece")


def test_output_files_and_contract(tiny_run):
    for name in (
        "results.json",
        "results.csv",
        "report.md",
        "accuracy_curves.png",
        "margin_hist.png",
        "energy_hist.png",
        "reliability.png",
        "grad_share.png",
    ):
        assert (tiny_run / name).is_file(), name
    results = load_results(tiny_run)
    assert set(results) >= {"task", "dataset", "config", "runs"}
    assert results["task"] == "image" and results["dataset"] == "fashion-mnist"
    assert sorted((r["loss"], r["seed"]) for r in results["runs"]) == [
        ("ce", 0),
        ("ce", 1),
        ("el", 0),
        ("el", 1),
    ]
    assert results["config"]["data"]["n_train"] + results["config"]["data"]["n_val"] == 400
    for run in results["runs"]:
        assert set(run) >= {"loss", "seed", "metrics", "history"}
        assert len(run["history"]) == 3


def test_metric_ranges(tiny_run):
    for run in load_results(tiny_run)["runs"]:
        m = run["metrics"]
        for name in CONTRACT_METRICS:
            assert math.isfinite(m[name]), name
        # 10 classes: chance is 0.1; three epochs on 360 images reach well above it.
        assert 0.4 < m["test_accuracy"] <= 1.0
        assert 0.4 < m["probe_accuracy"] <= 1.0
        assert 0.0 <= m["crt_accuracy"] <= 1.0
        assert 0.0 <= m["ece"] <= 1.0
        assert m["margin_q05"] <= m["margin_q50"] <= m["margin_q95"]
        # -logsumexp(z) <= -z_y for every example, so also on average.
        assert m["energy_mean"] <= m["energy_true_mean"]
        assert m["diverged"] is False
        for epoch in run["history"]:
            assert 0.0 <= epoch["grad_share_well_classified"] <= 1.0


def test_csv_has_one_row_per_run(tiny_run):
    lines = (tiny_run / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("loss,seed,status,")
    assert len(lines) == 1 + 4


def test_report_has_table_intervals_and_verdicts(tiny_run):
    text = (tiny_run / "report.md").read_text()
    assert "| `el` − `ce` | 2 |" in text
    for claim in ("margin grows", "energy lower", "representation better"):
        line = next(line for line in text.splitlines() if f"**{claim}**" in line)
        assert "**holds" in line or "**does not hold" in line  # computed from the numbers


def test_report_numbers_come_from_results(tiny_run):
    results = load_results(tiny_run)
    by_seed = {
        loss: {r["seed"]: r["metrics"]["margin_mean"] for r in results["runs"] if r["loss"] == loss}
        for loss in ("ce", "el")
    }
    diffs = [by_seed["el"][s] - by_seed["ce"][s] for s in (0, 1)]
    mean, low, high = paired_interval(diffs)
    assert f"{mean:+.4f} [{low:.4f}, {high:.4f}]" in (tiny_run / "report.md").read_text()


def test_t_quantiles():
    # Exact Student-t quantiles (tables: 4.3027 at 2 degrees of freedom, 1.9623 at 1000).
    assert t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-4)
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)


def test_report_rebuild_and_merge(tiny_run, tmp_path, data_root, capsys):
    rebuilt = tmp_path / "rebuilt"
    assert main(["report", str(tiny_run), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "report.md").read_text() == (tiny_run / "report.md").read_text()
    assert (rebuilt / "margin_hist.png").stat().st_size > 1000
    other = tmp_path / "other"
    assert (
        main(
            [
                "run",
                "image",
                "--losses",
                "ls-ce:0.1,ls-el:0.1",
                "--data-root",
                str(data_root),
                "--out",
                str(other),
                *TINY_RUN,
            ]
        )
        == 0
    )
    merged = tmp_path / "merged"
    assert main(["report", str(tiny_run), str(other), "--out", str(merged)]) == 0
    results = load_results(merged)
    assert {r["loss"] for r in results["runs"]} == {"ce", "el", "ls-ce:0.1", "ls-el:0.1"}
    assert "`ls-el:0.1` − `ls-ce:0.1`" in (merged / "report.md").read_text()
    assert "| `ls-el:0.1` |" in capsys.readouterr().out


def test_resume_equals_uninterrupted(tmp_path, data_root):
    common = [
        "run",
        "image",
        "--losses",
        "ce,el",
        "--data-root",
        str(data_root),
        "--train-size",
        "300",
        "--test-size",
        "100",
        "--epochs",
        "3",
        "--no-progress",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--out", str(straight)]) == 0
    # Simulated kill after one epoch of the first run: a checkpoint, no results yet.
    assert main([*common, "--out", str(resumed), "--stop-after-epochs", "1"]) == 0
    assert (resumed / "checkpoints" / "ce__seed0.pt").is_file()
    assert not (resumed / "results.json").exists()
    assert main([*common, "--out", str(resumed), "--resume"]) == 0
    a, b = load_results(straight), load_results(resumed)
    for run_a, run_b in zip(a["runs"], b["runs"], strict=True):
        assert run_a["metrics"] == run_b["metrics"]
        assert run_a["history"] == run_b["history"]
    assert not (resumed / "checkpoints" / "ce__seed0.pt").exists()
    # Resuming a finished folder reuses every run.
    before = (resumed / "runs" / "el__seed0.json").read_text()
    assert main([*common, "--out", str(resumed), "--resume"]) == 0
    assert (resumed / "runs" / "el__seed0.json").read_text() == before


def test_divergence_is_recorded_not_raised(tmp_path, data_root):
    out = tmp_path / "diverged"
    assert (
        main(
            [
                "run",
                "image",
                "--losses",
                "el:log_end=1",
                "--lr",
                "50",
                "--data-root",
                str(data_root),
                "--out",
                str(out),
                *TINY_RUN,
            ]
        )
        == 0
    )
    (run,) = load_results(out)["runs"]
    assert run["status"] == "diverged"
    assert run["metrics"]["diverged"] is True
    assert isinstance(run["metrics"]["diverged_step"], int) and run["metrics"]["diverged_step"] >= 1
    assert run["metrics"].get("test_accuracy") is None
    text = (out / "report.md").read_text()
    assert "## Diverged runs" in text
    assert f"step {run['metrics']['diverged_step']}" in text
    json.loads((out / "results.json").read_text())  # valid JSON, no NaN


@pytest.mark.slow
def test_reproduce_quick(tmp_path, data_root, capsys):
    """The project's main job at its quick size: 5 losses × 3 seeds on Fashion-MNIST."""
    out = tmp_path / "reproduce"
    assert (
        main(
            [
                "reproduce",
                "--preset",
                "quick",
                "--data-root",
                str(data_root),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    results = load_results(out)
    assert results["dataset"] == "fashion-mnist"
    assert {r["loss"] for r in results["runs"]} == {
        "ce",
        "el",
        "el:log_end=1",
        "ls-ce:0.1",
        "ls-el:0.1",
    }
    assert len(results["runs"]) == 15
    printed = capsys.readouterr().out
    assert "| `ls-el:0.1` |" in printed and "report.md" in printed


def test_worker_processes_give_the_sequential_records(tiny_run, tmp_path, data_root):
    """--jobs 2 runs each (loss, seed) in a worker process; every record is the same."""
    out = tmp_path / "parallel"
    args = ["run", "image", "--losses", "ce,el", "--seeds", "2", "--jobs", "2"]
    assert main([*args, "--data-root", str(data_root), "--out", str(out), *TINY_RUN]) == 0
    sequential, parallel = load_results(tiny_run), load_results(out)
    assert parallel["config"]["jobs"] == 2
    for run_a, run_b in zip(sequential["runs"], parallel["runs"], strict=True):
        assert (run_a["loss"], run_a["seed"]) == (run_b["loss"], run_b["seed"])
        assert run_a["metrics"] == run_b["metrics"] and run_a["history"] == run_b["history"]


def test_a_failed_run_is_reported_and_the_others_kept(tmp_path, data_root, monkeypatch, capsys):
    from encouraging_loss.lab.tasks import image

    real_run_one = image.ImageTask.run_one

    def run_one(self, prepared, spec, seed, run):
        if spec.name == "el":
            raise RuntimeError("simulated crash")
        return real_run_one(self, prepared, spec, seed, run)

    monkeypatch.setattr(image.ImageTask, "run_one", run_one)
    out = tmp_path / "failed"
    args = ["run", "image", "--losses", "ce,el", "--jobs", "1", "--out", str(out)]
    assert main([*args, "--data-root", str(data_root), *TINY_RUN]) == 1
    results = load_results(out)
    assert [r["loss"] for r in results["runs"]] == ["ce"]
    assert results["config"]["failed_runs"][0]["loss"] == "el"
    assert "simulated crash" in capsys.readouterr().err


def test_workers_receive_the_prepared_data_where_it_pickles(tmp_path):
    """The runner ships a task's prepared data to its workers, unless the task or pickle refuses."""
    import pickle

    from encouraging_loss.lab.experiment import Prepared, _ship
    from encouraging_loss.lab.tasks import load_task

    task = load_task("image")
    prepared = Prepared("d", "out", {"preset": "quick"}, state=(torch.arange(5),), threads=1)
    shipped = _ship(task, prepared, tmp_path)
    received = pickle.loads(shipped.read_bytes())
    assert received.config == prepared.config and torch.equal(received.state[0], prepared.state[0])
    assert _ship(task, Prepared("d", "out", {}, state=lambda: None), tmp_path) is None
    assert _ship(load_task("graph"), prepared, tmp_path) is None  # graph prepares in each worker
