"""The imbalanced task: long-tail profiles, class groups, re-weighting losses, a tiny run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encouraging_loss.lab.cli import main
from encouraging_loss.lab.losses import parse_loss
from encouraging_loss.lab.tasks import imbalanced as task

from .helpers import SHARED_DATA, load_results, shared_dataset


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


def test_class_groups_thresholds():
    groups = task.class_groups(task.long_tail_counts(10, 1000, 100.0, "exp"))
    # many: n > 200; few: n < 40; medium: the rest.
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}


def test_class_balanced_weights_favour_the_tail():
    weights = task.class_balanced_weights([1000, 100, 10], beta=0.9999)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2]
    with pytest.raises(ValueError, match="beta"):
        task.class_balanced_weights([10, 1], beta=1.0)


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


def test_loss_names_and_drw_switch():
    specs = task.parse_loss_list(
        "ce,cb-ce,ce-drw,ldam-drw:max_margin=0.3,la:tau=2,el:bonus_weight=balanced,"
        "bonus_start=0.5,el-drw",
        task.EXTRA_FAMILIES,
    )
    assert [s.family for s in specs] == ["ce", "cb-ce", "ce-drw", "ldam-drw", "la", "el", "el-drw"]
    counts = [100, 10, 1]
    built = {s.name: task.build_imbalanced_criterion(s, counts) for s in specs}
    assert built["ce-drw"][1] and built["el-drw"][1] and not built["ce"][1]
    el, _ = built["el:bonus_weight=balanced,bonus_start=0.5"]
    assert el.bonus_weight is not None and el.bonus_weight[2] > el.bonus_weight[0]
    criterion = built["ce-drw"][0]
    hook = task.drw_hook(criterion, counts, start=0.8, device=torch.device("cpu"))
    hook(0.5)
    assert criterion.weight is None
    hook(0.8)
    assert torch.equal(criterion.weight, task.class_balanced_weights(counts))
    with pytest.raises(ValueError, match="bonus_weight"):
        task.build_imbalanced_criterion(
            parse_loss("el:bonus_weight=tail", task.EXTRA_FAMILIES), counts
        )


@pytest.fixture(scope="module")
def tiny_imbalanced(tmp_path_factory):
    shared_dataset("fashion-mnist")
    out = tmp_path_factory.mktemp("imbalanced") / "out"
    argv = [
        "run",
        "imbalanced",
        "--losses",
        "ce,ce-drw,el:bonus_weight=balanced",
        "--seeds",
        "2",
        "--n-max",
        "200",
        "--epochs",
        "2",
        "--test-size",
        "300",
        "--no-progress",
        "--data-root",
        str(SHARED_DATA),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out, argv


def test_tiny_run_files_and_metrics(tiny_imbalanced):
    out, _ = tiny_imbalanced
    for name in ("results.json", "results.csv", "report.md", "accuracy_curves.png"):
        assert (out / name).is_file(), name
    results = load_results(out)
    assert results["task"] == "imbalanced" and results["dataset"] == "fashion-mnist-lt"
    data = results["config"]["data"]
    assert data["train_counts"] == task.long_tail_counts(10, 200, 100.0, "exp")
    assert data["n_train"] == sum(data["train_counts"]) and data["n_test"] == 300
    assert len(results["runs"]) == 6
    for run in results["runs"]:
        m = run["metrics"]
        for name in (
            "test_accuracy",
            "many_accuracy",
            "medium_accuracy",
            "few_accuracy",
            "crt_accuracy",
        ):
            assert 0.0 <= m[name] <= 1.0, name
        assert m["test_accuracy"] > 0.2  # chance is 0.1
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "`el:bonus_weight=balanced` − `ce`" in text
    assert "balanced test accuracy is higher" in text


def test_resume_reuses_finished_runs(tiny_imbalanced):
    out, argv = tiny_imbalanced
    before = {(r["loss"], r["seed"]): r["metrics"] for r in load_results(out)["runs"]}
    assert main([*argv, "--resume"]) == 0
    after = {(r["loss"], r["seed"]): r["metrics"] for r in load_results(out)["runs"]}
    assert before == after


def test_unknown_loss_is_a_usage_error(capsys):
    assert main(["run", "imbalanced", "--losses", "ce,nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_report_rebuilds_with_the_task_layout(tiny_imbalanced, tmp_path):
    out, _ = tiny_imbalanced
    rebuilt = tmp_path / "rebuilt"
    assert main(["report", str(out), "--out", str(rebuilt)]) == 0
    text = (rebuilt / "report.md").read_text(encoding="utf-8")
    assert "| few |" in text and "balanced test accuracy is higher" in text


def test_interrupted_drw_run_resumes_to_identical_metrics(tmp_path):
    shared_dataset("fashion-mnist")
    common = [
        "run",
        "imbalanced",
        "--losses",
        "ce-drw",
        "--n-max",
        "100",
        "--epochs",
        "3",
        "--drw-start",
        "0.5",
        "--test-size",
        "100",
        "--no-progress",
        "--data-root",
        str(SHARED_DATA),
    ]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    interrupted = [*common, "--out", str(tmp_path / "resumed")]
    assert main([*interrupted, "--stop-after-epochs", "1"]) == 0
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert main([*interrupted, "--resume"]) == 0
    straight = load_results(tmp_path / "straight")["runs"][0]
    resumed = load_results(tmp_path / "resumed")["runs"][0]
    assert resumed["metrics"] == straight["metrics"]
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]
