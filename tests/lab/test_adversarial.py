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


def test_pgd_alpha_sets_the_step_size():
    model = _toy_model().eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    adv = task.make_attack("pgd", model, 0.3, steps=3, backend="builtin", alpha=1e-3)(x, y)
    torch.manual_seed(1)  # the same random start
    start = (x + torch.empty_like(x).uniform_(-0.3, 0.3)).clamp(0.0, 1.0)
    moved = (adv - start).abs().max().item()
    assert 0 < moved <= 3e-3 + 1e-6, "3 steps of 1e-3 from the random start"
    torch.manual_seed(1)
    default = task.make_attack("pgd", model, 0.3, steps=3, backend="builtin")(x, y)
    assert (default - start).abs().max().item() > 0.05, "2.5 ε / steps = 0.25 per step"
    with pytest.raises(ValueError, match="pgd_alpha"):
        task.make_attack("pgd", model, 0.3, 3, alpha=0.0)


def test_builtin_pgd_with_alpha_matches_torchattacks():
    pytest.importorskip("torchattacks")
    model = _toy_model().eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    images = []
    for backend in ("builtin", "torchattacks"):
        torch.manual_seed(3)
        images.append(task.make_attack("pgd", model, 0.1, 4, backend, alpha=2 / 255)(x, y))
    assert torch.allclose(*images)


@pytest.mark.parametrize("alpha", ["0", "0.1,0.2", "abc", "2"])
def test_bad_pgd_alpha_names_the_option(alpha):
    with pytest.raises(ValueError, match="pgd_alpha"):
        task.resolve_recipe(Options(task="adversarial", preset="paper", extra={"pgd_alpha": alpha}))


def test_paper_preset_is_the_torchattacks_demo():
    recipe = task.resolve_recipe(Options(task="adversarial", preset="paper"))
    assert (recipe.model, recipe.standardize, recipe.attacks) == (
        "demo-cnn",
        False,
        ("fgsm", "pgd"),
    )
    train = recipe.train
    assert (train.optimizer, train.lr, train.weight_decay, train.schedule) == (
        "adamw",
        1e-3,
        0.0,
        "constant",
    )
    assert (train.epochs, train.batch_size) == (5, 128)
    assert recipe.epsilons == (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    assert (recipe.pgd_steps, recipe.pgd_alpha) == (40, pytest.approx(2 / 255))
    override = task.resolve_recipe(
        Options(task="adversarial", preset="paper", extra={"pgd_alpha": "1/255"})
    )
    assert override.pgd_alpha == pytest.approx(1 / 255)
    # The other presets keep the standardising model and Madry's step rule.
    quick = task.resolve_recipe(Options(task="adversarial", preset="quick"))
    assert quick.standardize and quick.pgd_alpha is None


def test_every_paper_run_resolves_and_measures_each_rows_metric():
    for setting in task.TASK.paper:
        losses = setting.losses.split(",")
        for preset, fields in setting.runs.items():
            recipe = task.resolve_recipe(Options(task="adversarial", **fields))
            produced = {"clean_accuracy"} | {
                task.robust_key(a, e) for a in recipe.attacks for e in recipe.epsilons
            }
            for row in setting.rows:
                assert row.metric in produced, (preset, row.label)
                assert {row.baseline, row.treatment} <= set(losses), row.label


def test_paper_quick_run_has_every_rows_metric(tmp_path):
    (setting,) = task.TASK.paper
    fields = setting.runs["quick"]
    results = _run(tmp_path, losses=setting.losses, **fields)
    config = results["config"]
    assert config["standardized_inputs"] is False
    assert config["pgd"]["step_size"] == pytest.approx(2 / 255)
    assert config["data"]["n_test"] == fields["test_size"]
    runs = results["runs"]
    assert sorted({r["loss"] for r in runs}) == sorted(setting.losses.split(","))
    assert len(runs) == 2 * fields["seeds"]
    for run in runs:
        assert run["status"] == "ok"
        for row in setting.rows:
            assert 0.0 <= run["metrics"][row.metric] <= 1.0, row.metric
