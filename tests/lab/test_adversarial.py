"""The adversarial task: attacks stay in the ε-ball and lower accuracy; a tiny run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encouraging_loss.lab.cli import main
from encouraging_loss.lab.runs import parse_float_list
from encouraging_loss.lab.tasks import adversarial as task

from .helpers import SHARED_DATA, load_results, shared_dataset


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def test_attacks_stay_in_the_ball_and_in_range():
    model = _toy_model()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for name in task.ATTACKS:
        for backend in ("builtin", task.attack_backend()):
            adv = task.make_attack(name, model, 0.1, steps=5, backend=backend)(x, y)
            assert (adv - x).abs().max() <= 0.1 + 1e-6
            assert adv.min() >= 0 and adv.max() <= 1


def test_builtin_fgsm_matches_torchattacks():
    pytest.importorskip("torchattacks")
    model = _toy_model()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    ours = task.make_attack("fgsm", model, 0.05, 1, backend="builtin")(x, y)
    theirs = task.make_attack("fgsm", model, 0.05, 1, backend="torchattacks")(x, y)
    assert torch.allclose(ours, theirs)


def test_attack_validation_names_the_argument():
    with pytest.raises(ValueError, match="attacks"):
        task.make_attack("cw", _toy_model(), 0.1, 1)
    with pytest.raises(ValueError, match="eps"):
        task.make_attack("pgd", _toy_model(), -0.1, 1)
    with pytest.raises(ValueError, match="epsilons"):
        parse_float_list("epsilons", "0,abc")
    assert parse_float_list("epsilons", "0,8/255") == pytest.approx([0.0, 8 / 255])


@pytest.fixture(scope="module")
def tiny_adversarial(tmp_path_factory):
    shared_dataset("mnist")
    out = tmp_path_factory.mktemp("adversarial") / "out"
    argv = [
        "run",
        "adversarial",
        "--losses",
        "ce,el",
        "--seeds",
        "2",
        "--train-size",
        "600",
        "--test-size",
        "200",
        "--epochs",
        "3",
        "--pgd-steps",
        "3",
        "--epsilons",
        "0,0.1,0.3",
        "--no-progress",
        "--data-root",
        str(SHARED_DATA),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def test_tiny_run_attacks_lower_accuracy(tiny_adversarial):
    for name in ("results.json", "results.csv", "report.md", "robust_accuracy.png"):
        assert (tiny_adversarial / name).is_file(), name
    results = load_results(tiny_adversarial)
    for run in results["runs"]:
        m = run["metrics"]
        assert m["clean_accuracy"] > 0.5
        assert m["robust_accuracy/fgsm/0"] == pytest.approx(m["clean_accuracy"])
        for attack in ("fgsm", "pgd"):
            for eps in ("0.1", "0.3"):
                assert 0.0 <= m[f"robust_accuracy/{attack}/{eps}"] <= 1.0
            assert m[f"robust_accuracy/{attack}/0.3"] < m["clean_accuracy"]
    text = (tiny_adversarial / "report.md").read_text(encoding="utf-8")
    assert "robust_accuracy.png" in text and "robust accuracy at ε=0.1 is higher" in text


def test_adversarial_training_runs(tmp_path):
    shared_dataset("mnist")
    out = tmp_path / "adv"
    argv = [
        "run",
        "adversarial",
        "--losses",
        "ce",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--epochs",
        "1",
        "--adv-train",
        "--adv-epsilon",
        "0.1",
        "--epsilons",
        "0,0.1",
        "--attacks",
        "pgd",
        "--pgd-steps",
        "2",
        "--no-progress",
        "--data-root",
        str(SHARED_DATA),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    config = load_results(out)["config"]
    assert config["adversarial_training"]["enabled"] is True
    assert config["adversarial_training"]["epsilon"] == pytest.approx(0.1)


def test_interrupted_adversarial_training_resumes_to_identical_metrics(tmp_path):
    shared_dataset("mnist")
    common = [
        "run",
        "adversarial",
        "--losses",
        "el",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--epochs",
        "2",
        "--adv-train",
        "--epsilons",
        "0,0.1",
        "--attacks",
        "pgd",
        "--pgd-steps",
        "2",
        "--no-progress",
        "--data-root",
        str(SHARED_DATA),
    ]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    interrupted = [*common, "--out", str(tmp_path / "resumed")]
    assert main([*interrupted, "--stop-after-epochs", "1"]) == 0
    assert main([*interrupted, "--resume"]) == 0
    straight = load_results(tmp_path / "straight")["runs"][0]["metrics"]
    assert load_results(tmp_path / "resumed")["runs"][0]["metrics"] == straight
