"""The image task's paper settings: test accuracy after every epoch (the paper's optimistic
protocol), never in tuning runs, kept across resume; every setting's quick run has its rows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from encouraging_loss.lab.experiment import Interrupted, Options, run_experiment
from encouraging_loss.lab.tasks import PaperSetting
from encouraging_loss.lab.tasks import image as task

from .helpers import SHARED_DATA, first_epoch_checkpoint, shared_dataset, torch_globals_restored

SETTINGS = {setting.name: setting for setting in task.TASK.paper}


def _run(out, **settings) -> dict:
    """``run image`` on the staged data (``settings``: :class:`Options` fields)."""
    settings.setdefault("jobs", 1)  # the runner's parallel workers are tested elsewhere
    options = Options(
        task="image", data_root=str(SHARED_DATA), out=str(out), progress=False, **settings
    )
    with torch_globals_restored():
        return run_experiment(options)


def test_best_test_accuracy_over_epochs():
    history = [{"test_accuracy": 0.5}, {"test_accuracy": 0.75}, {"test_accuracy": 0.625}]
    assert task.best_test_accuracy_over_epochs(history) == 0.75
    assert task.best_test_accuracy_over_epochs([{"test_accuracy": 0.5}, {}]) is None
    for bad in ([], None, [0.5]):
        with pytest.raises(ValueError, match="history"):
            task.best_test_accuracy_over_epochs(bad)


def test_only_the_paper_preset_scores_test_every_epoch():
    for preset, recipes in task.PRESETS.items():
        for dataset, recipe in recipes.items():
            assert recipe.best_test_over_epochs == (preset == "paper"), (preset, dataset)
    assert "paper" in task.TASK.presets
    assert task.TASK.describe_recipe(task.PRESETS["paper"]["mnist"]).endswith("every epoch")
    # The GPU CIFAR recipe of the paper preset is full's with the per-epoch test scores.
    paper_cifar = task.PRESETS["paper"]["cifar10"]
    assert replace(paper_cifar, best_test_over_epochs=False) == task.PRESETS["full"]["cifar10"]


def test_settings_name_their_losses_and_metrics():
    assert len(SETTINGS) == 3
    for setting in SETTINGS.values():
        assert isinstance(setting, PaperSetting) and setting.departures
        losses = setting.losses.split(",")
        assert {"quick", "gpu"} <= setting.runs.keys()
        for row in setting.rows:
            assert row.baseline in losses and row.treatment in losses, row
            assert row.metric in ("best_test_accuracy_over_epochs", "test_accuracy")
    mnist = next(s for s in SETTINGS.values() if s.name.startswith("MNIST"))
    assert mnist.losses == "ce,el:log_end=1,el"
    paper_row, *others = mnist.rows
    assert (paper_row.treatment, paper_row.paper) == ("el:log_end=1", (99.42, 99.56))
    assert all(row.paper is None and row.direction == +1 for row in others)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_quick_run_of_each_setting_has_every_row_metric(tmp_path, name):
    setting = SETTINGS[name]
    fields = setting.runs["quick"]
    shared_dataset(fields.get("dataset", "mnist"))
    results = _run(tmp_path / "out", losses=setting.losses, tune=None, **fields)
    specs = set(setting.losses.split(","))
    assert {r["loss"] for r in results["runs"]} == specs
    assert len(results["runs"]) == len(specs) * fields["seeds"]
    assert results["config"]["best_test_over_epochs"] is True
    for run in results["runs"]:
        assert run["status"] == "ok", run["loss"]  # one small epoch: no loss diverges
        for row in setting.rows:
            assert 0.0 <= run["metrics"][row.metric] <= 1.0, (run["loss"], row.metric)
        scores = [h["test_accuracy"] for h in run["history"]]
        assert len(scores) == fields["epochs"]
        assert run["metrics"]["best_test_accuracy_over_epochs"] == max(scores)


def test_best_over_epochs_is_at_least_the_selected_epochs_and_survives_resume(tmp_path):
    shared_dataset("mnist")
    common = {"preset": "paper", "dataset": "mnist", "losses": "ce", "epochs": 3}
    common |= {"train_size": 400, "test_size": 200}
    (straight,) = _run(tmp_path / "straight", **common)["runs"]
    scores = [h["test_accuracy"] for h in straight["history"]]
    metrics = straight["metrics"]
    assert metrics["best_test_accuracy_over_epochs"] == max(scores)
    # The validation-selected epoch's test accuracy is one of the per-epoch scores.
    assert metrics["test_accuracy"] == pytest.approx(scores[metrics["best_epoch"] - 1])
    with pytest.raises(Interrupted):
        _run(tmp_path / "resumed", stop_after_epochs=1, **common)
    (resumed,) = _run(tmp_path / "resumed", resume=True, **common)["runs"]
    assert resumed["metrics"] == metrics and resumed["history"] == straight["history"]


def test_tuning_runs_never_score_the_test_set(tmp_path):
    shared_dataset("mnist")
    out = tmp_path / "tuned"
    results = _run(
        out,
        preset="paper",
        dataset="mnist",
        losses="ce",
        epochs=2,
        train_size=300,
        test_size=100,
        tune="lr",
        tune_grid="0.05",
    )
    (record_path,) = (out / "tuning").glob("lr=*/runs/*.json")
    tuning = json.loads(record_path.read_text(encoding="utf-8"))
    assert all("test_accuracy" not in h for h in tuning["history"])
    assert "best_test_accuracy_over_epochs" not in tuning["metrics"]
    (run,) = results["runs"]
    assert all("test_accuracy" in h for h in run["history"])


def test_older_presets_do_not_score_test_per_epoch(tmp_path):
    shared_dataset("fashion-mnist")
    results = _run(tmp_path / "quick", preset="quick", losses="ce", epochs=1, train_size=200)
    (run,) = results["runs"]
    assert "best_test_accuracy_over_epochs" not in run["metrics"]
    assert all("test_accuracy" not in h for h in run["history"])
    assert "best_test_over_epochs" not in results["config"]


def test_cifar10_gpu_setting_takes_its_first_steps_on_cpu(tmp_path):
    """The GPU-size setting (ResNet-18, not run here) trains its first batch on a sliver."""
    shared_dataset("cifar10")
    setting = SETTINGS["CIFAR-10, ResNet-18"]
    fields = dict(setting.runs["gpu"], seeds=1, train_size=40, test_size=16, batch_size=32)
    recipe = task.PRESETS[fields["preset"]][fields["dataset"]]
    assert recipe.model == "resnet18" and recipe.train.epochs == 200
    out = tmp_path / "gpu"
    with pytest.raises(Interrupted):
        _run(out, losses="el", stop_after_epochs=1, device="cpu", threads=1, **fields)
    first_epoch_checkpoint(out)
