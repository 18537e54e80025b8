"""``--tune lr``: the same learning-rate grid for every loss, chosen on validation only."""

from __future__ import annotations

import json
import shutil

import pytest

from encouraging_loss.lab import experiment
from encouraging_loss.lab.cli import main
from encouraging_loss.lab.experiment import TUNE_FACTORS, Options
from encouraging_loss.lab.io import record_path

from .helpers import TINY_RUN, load_results

TUNE_RUN = ["run", "image", "--losses", "ce,el", "--seeds", "2", "--tune", "lr", "--jobs", "1"]


def run_tuned(out, data_root, *more) -> int:
    grid = ["--tune-grid", "0.01,0.2"]
    return main(
        [*TUNE_RUN, *grid, *more, "--data-root", str(data_root), "--out", str(out), *TINY_RUN]
    )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("tune") / "out"
    grid = ["--tune-grid", "0.01,0.2"]
    assert (
        main([*TUNE_RUN, *grid, "--data-root", str(data_root), "--out", str(out), *TINY_RUN]) == 0
    )
    return out


def test_each_loss_runs_its_seeds_at_the_rate_with_the_best_validation_accuracy(tuned):
    results = load_results(tuned)
    tuning = results["config"]["tuning"]
    assert tuning["grid"] == [0.01, 0.2] and tuning["seeds"] == [0]
    for loss, chosen in tuning["by_loss"].items():
        scores = chosen["val_accuracy"]
        assert set(scores) == {"0.01", "0.2"} and all(v is not None for v in scores.values())
        best = max(scores, key=scores.get)  # the first of equal scores: the smaller rate
        assert chosen["lr"] == float(best) == results["config"]["lr_by_loss"][loss]
        runs = [r for r in results["runs"] if r["loss"] == loss]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["lr"] == chosen["lr"] and "test_accuracy" in r["metrics"] for r in runs)
    report = (tuned / "report.md").read_text(encoding="utf-8")
    assert "## Tuning: lr on validation" in report and "| `el` |" in report


def test_tuning_runs_never_read_the_test_set(tuned):
    records = sorted((tuned / "tuning").glob("lr=*/runs/*.json"))
    assert len(records) == 4  # 2 losses x 2 rates x 1 tuning seed
    for path in records:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
        assert "val_accuracy" in metrics and "test_accuracy" not in metrics
    assert not list((tuned / "tuning").glob("*/arrays/*"))


def test_resume_reuses_the_tuning_runs(tuned, data_root):
    before = {p: p.stat().st_mtime_ns for p in (tuned / "tuning").glob("*/runs/*.json")}
    grid = ["--tune-grid", "0.01,0.2", "--resume"]
    assert (
        main([*TUNE_RUN, *grid, "--data-root", str(data_root), "--out", str(tuned), *TINY_RUN]) == 0
    )
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_resume_reruns_a_final_run_recorded_at_another_rate(tuned, data_root, tmp_path):
    # A record from an earlier tuning that chose another rate (e.g. a widened grid) is stale.
    out = tmp_path / "copy"
    shutil.copytree(tuned, out)
    chosen = load_results(out)["config"]["lr_by_loss"]["el"]
    stale, kept = record_path(out, "el", 1), record_path(out, "ce", 1)
    record = json.loads(stale.read_text(encoding="utf-8"))
    stale.write_text(json.dumps({**record, "lr": chosen * 7}), encoding="utf-8")
    kept_before = kept.stat().st_mtime_ns
    earlier = load_results(out)["config"]["wall_seconds_total"]
    assert run_tuned(out, data_root, "--resume") == 0
    assert json.loads(stale.read_text(encoding="utf-8"))["lr"] == chosen
    assert kept.stat().st_mtime_ns == kept_before
    config = load_results(out)["config"]  # the cost counts every invocation
    assert config["wall_seconds_total"] == pytest.approx(earlier + config["wall_seconds"])


def test_tuning_and_final_runs_share_one_worker_pool(tuned, data_root, tmp_path, monkeypatch):
    started = []

    class CountedPool(experiment.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(experiment, "ProcessPoolExecutor", CountedPool)
    more = ["--tune-grid", "0.01,0.2", "--jobs", "2", "--data-root", str(data_root)]
    assert main([*TUNE_RUN, *more, "--out", str(tmp_path), *TINY_RUN]) == 0
    assert started == [2]
    in_workers, in_process = load_results(tmp_path), load_results(tuned)
    assert in_workers["config"]["tuning"] == in_process["config"]["tuning"]
    assert [r["metrics"] for r in in_workers["runs"]] == [r["metrics"] for r in in_process["runs"]]


def test_default_grid_is_the_presets_rate_times_the_factors():
    assert Options(tune="lr").tune_values(0.05) == [0.005, 0.015, 0.05, 0.15, 0.5]
    assert len(TUNE_FACTORS) == 5
    assert Options(tune="lr", tune_grid="0.3, 0.1,0.1").tune_values(1.0) == [0.1, 0.3]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tune": "lr", "lr": 0.1}, "lr:"),
        ({"tune": "lr", "tune_grid": "0.1,x"}, "tune_grid:"),
        ({"tune": "lr", "tune_grid": "0.1,-1"}, "tune_grid:"),
        ({"tune_grid": "0.1"}, "tune:"),
        ({"tune": "momentum"}, "tune:"),
        ({"tune": "lr", "tune_seeds": 0}, "tune_seeds:"),
    ],
)
def test_bad_tuning_options_are_named(options, named):
    with pytest.raises(ValueError, match=named):
        Options(preset="quick", **options).validate(("quick",))
