"""The adversarial task: attacks stay in the ε-ball and lower accuracy; tiny runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encouraging_loss.lab.experiment import Interrupted, Options, run_experiment
from encouraging_loss.lab.tasks import adversarial as task

from .helpers import SHARED_DATA, load_results, shared_dataset, torch_globals_restored


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def _run(out, **settings) -> dict:
    """``run adversarial`` on staged MNIST (``settings``: :class:`Options` fields)."""
    shared_dataset("mnist")
    settings.setdefault("jobs", 1)  # the runner's parallel workers are tested in test_cli
    options = Options(
        task="adversarial", data_root=str(SHARED_DATA), out=str(out), progress=False, **settings
    )
    with torch_globals_restored():
        return run_experiment(options)


def test_attacks_stay_in_the_ball_and_in_range():
    model = _toy_model()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for name in task.ATTACKS:
        for backend in ("builtin", task.attack_backend()):
            adv = task.make_attack(name, model, 0.1, steps=5, backend=backend)(x, y)
            assert (adv - x).abs().max() <= 0.1 + 1e-6
            assert adv.min() >= 0 and adv.max() <= 1
    assert model.training, "the attack restores the model's mode"


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
    with pytest.raises(ValueError, match="backend"):
        task.make_attack("pgd", _toy_model(), 0.1, 1, backend="foolbox")
    with pytest.raises(ValueError, match="epsilons"):
        task.parse_float_list("epsilons", "0,abc")
    assert task.parse_float_list("epsilons", "0,8/255") == pytest.approx([0.0, 8 / 255])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"epsilons": "0,2"}, "epsilons"),
        ({"attacks": "fgsm,cw"}, "attacks"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"adv_epsilon": "0.1,0.2"}, "adv_epsilon"),
    ],
)
def test_bad_options_name_the_option(extra, match):
    with pytest.raises(ValueError, match=match):
        task.resolve_recipe(Options(task="adversarial", preset="quick", extra=extra))


def test_dataset_override_takes_that_datasets_epsilons():
    recipe = task.resolve_recipe(Options(task="adversarial", preset="quick", dataset="cifar10"))
    assert recipe.epsilons == task.CIFAR_EPSILONS and recipe.key_epsilon == pytest.approx(8 / 255)


@pytest.fixture(scope="module")
def tiny_adversarial(tmp_path_factory):
    out = tmp_path_factory.mktemp("adversarial") / "out"
    extra = {"pgd_steps": 3, "epsilons": "0,0.1,0.3"}
    _run(out, losses="ce,el", seeds=2, train_size=600, test_size=200, epochs=3, extra=extra)
    return out


def test_tiny_run_attacks_lower_accuracy(tiny_adversarial):
    for name in ("results.json", "results.csv", "report.md", "robust_accuracy.png"):
        assert (tiny_adversarial / name).is_file(), name
    results = load_results(tiny_adversarial)
    assert results["config"]["epsilons"] == [0.0, 0.1, 0.3]
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
    extra = {
        "adv_train": True,
        "adv_epsilon": "0.1",
        "epsilons": "0,0.1",
        "attacks": "pgd",
        "pgd_steps": 2,
    }
    results = _run(tmp_path, losses="ce", train_size=200, test_size=100, epochs=1, extra=extra)
    config = results["config"]
    assert config["adversarial_training"]["enabled"] is True
    assert config["adversarial_training"]["epsilon"] == pytest.approx(0.1)
    assert "PGD adversarial training" in results["report"]["title"]
    assert set(results["runs"][0]["metrics"]) >= {"robust_accuracy/pgd/0.1", "clean_accuracy"}


def test_interrupted_adversarial_training_resumes_to_identical_metrics(tmp_path):
    extra = {"adv_train": True, "epsilons": "0,0.1", "attacks": "pgd", "pgd_steps": 2}
    common = {"losses": "el", "train_size": 200, "test_size": 100, "epochs": 2, "extra": extra}
    straight = _run(tmp_path / "straight", **common)["runs"][0]["metrics"]
    with pytest.raises(Interrupted):
        _run(tmp_path / "resumed", stop_after_epochs=1, **common)
    assert (tmp_path / "resumed" / "checkpoints" / "el__seed0.pt").is_file()
    resumed = _run(tmp_path / "resumed", resume=True, **common)
    assert resumed["runs"][0]["metrics"] == straight
