"""The imbalanced task: long-tail profiles, class groups, re-weighting losses, a tiny run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from encouraging_loss.lab import report
from encouraging_loss.lab.experiment import Interrupted, Options, run_experiment
from encouraging_loss.lab.losses import (
    UnknownLossError,
    build_criterion,
    class_balanced_weights,
    parse_loss,
    parse_loss_list,
)
from encouraging_loss.lab.tasks import imbalanced as task

from .helpers import (
    SHARED_DATA,
    first_epoch_checkpoint,
    load_results,
    shared_dataset,
    torch_globals_restored,
)

FAMILIES = task.TASK.loss_families


def _run(out, **settings) -> dict:
    """``run imbalanced`` on staged Fashion-MNIST (``settings``: :class:`Options` fields)."""
    shared_dataset("fashion-mnist")
    settings.setdefault("jobs", 1)  # the runner's parallel workers are tested in test_cli
    options = Options(
        task="imbalanced", data_root=str(SHARED_DATA), out=str(out), progress=False, **settings
    )
    with torch_globals_restored():
        return run_experiment(options)


def test_exponential_profile_counts():
    counts = task.long_tail_counts(10, 1000, 100.0, "exp")
    assert counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert counts[0] / counts[-1] == pytest.approx(100.0)


def test_step_profile_counts():
    assert task.long_tail_counts(10, 500, 10.0, "step") == [500] * 5 + [50] * 5


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"n_max": 0}, "n_max"),
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"profile": "linear"}, "profile"),
    ],
)
def test_profile_validation_names_the_argument(kwargs, argument):
    args = {"num_classes": 10, "n_max": 100, "imbalance_ratio": 10.0, "profile": "exp", **kwargs}
    with pytest.raises(ValueError, match=argument):
        task.long_tail_counts(**args)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"extra": {"imbalance_ratio": 0.5}}, "imbalance_ratio"),
        ({"extra": {"n_max": 0}}, "n_max"),
        ({"extra": {"profile": "linear"}}, "profile"),
        ({"extra": {"drw_start": 1.5}}, "drw_start"),
        ({"model": "vit"}, "model"),
    ],
)
def test_bad_options_name_the_option(settings, match):
    with pytest.raises(ValueError, match=match):
        task.resolve_recipe(Options(task="imbalanced", preset="quick", **settings))


def test_options_resolve_into_the_recipe():
    options = Options(
        task="imbalanced",
        preset="quick",
        test_size=300,
        epochs=2,
        extra={"imbalance_ratio": 10, "profile": "step", "n_max": 200, "drw_start": 0.5},
    )
    recipe = task.resolve_recipe(options)
    assert (recipe.imbalance_ratio, recipe.profile, recipe.n_max) == (10.0, "step", 200)
    assert recipe.drw_start == 0.5 and recipe.test_per_class == 30 and recipe.train.epochs == 2


def test_class_groups_thresholds():
    groups = task.class_groups(task.long_tail_counts(10, 1000, 100.0, "exp"))
    # many: n > 200; few: n < 40; medium: the rest.
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}


def test_group_accuracies_per_group():
    labels = torch.tensor([0, 0, 1, 2])
    predictions = torch.tensor([0, 1, 1, 0])
    out = task.group_accuracies(predictions, labels, {"many": [0], "medium": [], "few": [1, 2]})
    assert out == {
        "test_accuracy": 0.5,
        "many_accuracy": 0.5,
        "medium_accuracy": None,
        "few_accuracy": 0.5,
    }
    with pytest.raises(ValueError, match="predictions"):
        task.group_accuracies(predictions[:3], labels, {})


def test_class_balanced_weights_favour_the_tail():
    weights = class_balanced_weights([1000, 100, 10], beta=0.9999)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2]
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([10, 1], beta=1.0)


def test_ldam_and_logit_adjustment_are_shifted_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    counts = [100, 10, 1]
    ldam = task.LDAMLoss(counts, max_margin=0.5)
    assert ldam.margins[2].item() == pytest.approx(0.5)
    shifted = logits - nn.functional.one_hot(target, 3) * ldam.margins[target, None]
    assert ldam(logits, target).item() == pytest.approx(
        nn.functional.cross_entropy(shifted, target).item()
    )
    la = task.LogitAdjustedLoss(counts, tau=1.0)
    prior = torch.tensor(counts, dtype=torch.float) / sum(counts)
    assert la(logits, target).item() == pytest.approx(
        nn.functional.cross_entropy(logits + prior.log(), target).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="counts"):
        task.LDAMLoss([10, 0])
    with pytest.raises(ValueError, match="max_margin"):
        task.LDAMLoss(counts, max_margin=0.0)
    with pytest.raises(ValueError, match="tau"):
        task.LogitAdjustedLoss(counts, tau=-1.0)


def test_loss_names_and_drw_switch():
    specs = parse_loss_list(
        "ce,cb-ce,ce-drw,ldam-drw:max_margin=0.3,la:tau=2,el:bonus_weight=balanced,"
        "bonus_start=0.5,el-drw",
        FAMILIES,
    )
    assert [s.family for s in specs] == ["ce", "cb-ce", "ce-drw", "ldam-drw", "la", "el", "el-drw"]
    counts = [100, 10, 1]
    built = {s.name: build_criterion(s, counts, FAMILIES) for s in specs}
    assert torch.equal(built["cb-ce"].weight, class_balanced_weights(counts))
    assert built["ldam-drw:max_margin=0.3"].margins[2].item() == pytest.approx(0.3)
    assert built["ce-drw"].weight is None and built["el-drw"].weight is None
    el = built["el:bonus_weight=balanced,bonus_start=0.5"]
    assert el.bonus_weight is not None and el.bonus_weight[2] > el.bonus_weight[0]
    criterion = built["ce-drw"]
    hook = task.drw_hook(criterion, counts, start=0.8, device=torch.device("cpu"))
    hook(0.5)
    assert criterion.weight is None
    hook(0.8)
    assert torch.equal(criterion.weight, class_balanced_weights(counts))
    with pytest.raises(ValueError, match="start"):
        task.drw_hook(criterion, counts, start=1.5, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="bonus_weight"):
        parse_loss("el:bonus_weight=tail", FAMILIES)
    with pytest.raises(UnknownLossError, match="beta"):
        parse_loss("cb-ce:1.0", FAMILIES)
    with pytest.raises(ValueError, match="counts"):
        build_criterion(parse_loss("ldam", FAMILIES), None, FAMILIES)


@pytest.fixture(scope="module")
def tiny_imbalanced(tmp_path_factory):
    out = tmp_path_factory.mktemp("imbalanced") / "out"
    settings = {
        "losses": "ce,ce-drw,el:bonus_weight=balanced",
        "seeds": 2,
        "epochs": 2,
        "test_size": 300,
        "extra": {"n_max": 200},
    }
    _run(out, **settings)
    return out, settings


def test_tiny_run_files_and_metrics(tiny_imbalanced):
    out, _ = tiny_imbalanced
    for name in ("results.json", "results.csv", "report.md", "accuracy_curves.png"):
        assert (out / name).is_file(), name
    results = load_results(out)
    assert results["task"] == "imbalanced" and results["dataset"] == "fashion-mnist-lt"
    data = results["config"]["data"]
    assert data["train_counts"] == task.long_tail_counts(10, 200, 100.0, "exp")
    assert data["n_train"] == sum(data["train_counts"]) and data["n_test"] == 300
    assert results["config"]["drw_start"] == 0.8
    assert len(results["runs"]) == 6
    for run in results["runs"]:
        m = run["metrics"]
        for name in (
            "test_accuracy",
            "many_accuracy",
            "medium_accuracy",
            "few_accuracy",
            "crt_accuracy",
            "class_accuracy/9",
        ):
            assert 0.0 <= m[name] <= 1.0, name
        assert m["test_accuracy"] > 0.2  # chance is 0.1
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "`el:bonus_weight=balanced` − `ce`" in text
    assert "balanced test accuracy is higher" in text


def test_resume_reuses_finished_runs(tiny_imbalanced):
    out, settings = tiny_imbalanced
    before = {(r["loss"], r["seed"]): r["metrics"] for r in load_results(out)["runs"]}
    _run(out, resume=True, **settings)
    after = {(r["loss"], r["seed"]): r["metrics"] for r in load_results(out)["runs"]}
    assert before == after


def test_unknown_loss_is_refused(tmp_path):
    with pytest.raises(UnknownLossError, match="nope"):
        run_experiment(Options(task="imbalanced", losses="ce,nope", out=str(tmp_path)))


def test_report_rebuilds_with_the_task_layout(tiny_imbalanced, tmp_path):
    out, _ = tiny_imbalanced
    rebuilt = report.rebuild_report([out], tmp_path / "rebuilt")
    text = rebuilt.read_text(encoding="utf-8")
    assert "| few |" in text and "balanced test accuracy is higher" in text


def test_interrupted_drw_run_resumes_to_identical_metrics(tmp_path):
    common = {
        "losses": "ce-drw",
        "epochs": 3,
        "test_size": 100,
        "extra": {"n_max": 100, "drw_start": 0.5},
    }
    straight = _run(tmp_path / "straight", **common)["runs"][0]
    with pytest.raises(Interrupted):
        _run(tmp_path / "resumed", stop_after_epochs=1, **common)
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed = _run(tmp_path / "resumed", resume=True, **common)["runs"][0]
    assert resumed["metrics"] == straight["metrics"]
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]


PAPER = {setting.name: setting for setting in task.TASK.paper}


def test_paper_settings_compare_losses_they_run():
    assert "paper" in task.TASK.presets
    # The paper preset is the standard view, trained twice as long.
    standard, paper = task.PRESETS["standard"], task.PRESETS["paper"]
    assert replace(paper, train=standard.train) == standard and paper.train.epochs == 30
    for setting in PAPER.values():
        losses = setting.losses.split(",")
        parse_loss_list(setting.losses, FAMILIES)
        assert "gpu" in setting.runs and setting.departures
        for fields in setting.runs.values():  # every run's options resolve
            task.resolve_recipe(Options(task="imbalanced", **fields))
        for row in setting.rows:
            assert row.baseline in losses and row.treatment in losses, row
            assert row.paper is None and row.direction == +1
    pairs = {(r.baseline, r.treatment, r.metric) for s in PAPER.values() for r in s.rows}
    assert ("ce-drw", "el-drw", "test_accuracy") in pairs
    assert ("ce", "el:bonus_weight=balanced", "test_accuracy") in pairs
    assert ("ce", "el", "crt_accuracy") in pairs


def test_the_long_tailed_fashion_mnist_setting_runs_quick():
    assert [s.name for s in PAPER.values() if "quick" in s.runs] == [next(iter(PAPER))]


@pytest.mark.parametrize("name", [name for name, s in PAPER.items() if "quick" in s.runs])
def test_quick_run_of_each_paper_setting_has_every_row_metric(tmp_path, name):
    setting = PAPER[name]
    fields = setting.runs["quick"]
    dataset = task.PRESETS[fields["preset"]].dataset
    shared_dataset(dataset)
    results = _run(tmp_path / "out", losses=setting.losses, **fields)
    assert results["dataset"] == f"{dataset}-lt"
    assert len(results["runs"]) == len(setting.losses.split(",")) * fields["seeds"]
    for run in results["runs"]:
        assert run["status"] == "ok", run["loss"]
        for row in setting.rows:
            assert 0.0 <= run["metrics"][row.metric] <= 1.0, (run["loss"], row.metric)


def test_cifar10_lt_gpu_setting_takes_its_first_steps_on_cpu(tmp_path):
    """The GPU-size setting (ResNet-18 on CIFAR-10-LT, not run here) trains a batch on a sliver."""
    shared_dataset("cifar10")
    setting = PAPER["CIFAR-10-LT (ratio 100), ResNet-18"]
    fields = dict(setting.runs["gpu"], seeds=1, train_size=40, test_size=20, batch_size=32)
    recipe = task.PRESETS[fields["preset"]]
    assert (recipe.dataset, recipe.model, recipe.train.epochs) == ("cifar10", "resnet18", 200)
    out = tmp_path / "gpu"
    with pytest.raises(Interrupted):
        _run(out, losses="el-drw", stop_after_epochs=1, device="cpu", threads=1, **fields)
    first_epoch_checkpoint(out)
