"""The OOD task: scores, scikit-learn metrics on a fixed toy case, a tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from encouraging_loss.lab.experiment import Options, run_experiment
from encouraging_loss.lab.tasks import ood as task

from .helpers import SHARED_DATA, load_results, shared_dataset, torch_globals_restored


def _run(out, **settings) -> dict:
    """``run ood`` on staged MNIST (``settings``: :class:`Options` fields)."""
    shared_dataset("mnist")
    settings.setdefault("jobs", 1)  # the runner's parallel workers are tested in test_cli
    options = Options(
        task="ood", data_root=str(SHARED_DATA), out=str(out), progress=False, **settings
    )
    with torch_globals_restored():
        return run_experiment(options)


def test_metrics_on_a_fixed_toy_case():
    id_scores = np.array([0.9, 0.8, 0.7, 0.3])
    ood_scores = np.array([0.2, 0.6, 0.1])
    metrics = task.ood_metrics(id_scores, ood_scores)
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    scores = np.concatenate([id_scores, ood_scores])
    # 11 of the 12 (ID, OOD) pairs are ordered correctly.
    assert metrics["auroc"] == pytest.approx(11 / 12)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["aupr_in"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["aupr_out"] == pytest.approx(average_precision_score(1 - labels, -scores))
    # Keeping >= 95% of ID images needs the threshold 0.3, which lets 0.6 through: 1 of 3.
    assert metrics["fpr95"] == pytest.approx(1 / 3)


def test_metrics_validate_inputs():
    with pytest.raises(ValueError, match="id_scores"):
        task.ood_metrics(np.array([]), np.array([0.1]))
    with pytest.raises(ValueError, match="finite"):
        task.ood_metrics(np.array([np.nan]), np.array([0.1]))
    with pytest.raises(ValueError, match="logits"):
        task.scores_from_logits(torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        task.odin_scores(torch.nn.Linear(2, 2), torch.zeros(1, 2), 0.0, 0.1, 8, "cpu")


def test_scores_from_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    scores = task.scores_from_logits(logits)
    assert scores["max_logit"].tolist() == [2.0, 0.0]
    assert scores["energy"] == pytest.approx(torch.logsumexp(logits, 1).numpy())
    assert scores["msp"][1] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"extra": {"ood_scores": "msp,mahalanobis"}}, "ood_scores"),
        ({"extra": {"ood_sets": " , "}}, "ood_sets"),
        ({"dataset": "cifar10"}, "dataset"),
        ({"model": "vit"}, "model"),
    ],
)
def test_bad_options_name_the_option(settings, match):
    with pytest.raises(ValueError, match=match):
        task.resolve_recipe(Options(task="ood", preset="quick", **settings))


def test_presets_resolve_to_their_recipes():
    quick = task.resolve_recipe(Options(task="ood", preset="quick"))
    assert quick.scores == ("msp", "max_logit", "energy") and quick.max_test == 2000
    assert (quick.train.epochs, quick.train.batch_size, quick.threads) == (5, 64, 1)
    full = task.resolve_recipe(Options(task="ood", preset="full", test_size=50))
    assert full.scores == task.SCORES and full.model == "cnn" and full.threads is None
    assert full.max_test == 50 and full.train.device == "auto"


@pytest.fixture(scope="module")
def tiny_ood(tmp_path_factory):
    shared_dataset("fashion-mnist")
    notmnist = shared_dataset("notmnist")
    out = tmp_path_factory.mktemp("ood") / "out"
    extra = {"ood_sets": f"fashion-mnist,{notmnist}", "ood_scores": "msp,max_logit,energy,odin"}
    _run(out, losses="ce,el", seeds=2, train_size=500, test_size=200, epochs=2, extra=extra)
    return out


def test_tiny_run_files_and_metric_names(tiny_ood):
    for name in ("results.json", "results.csv", "report.md"):
        assert (tiny_ood / name).is_file(), name
    results = load_results(tiny_ood)
    assert results["config"]["data"]["ood_sets"] == {"fashion-mnist": 200, "notmnist": 200}
    for run in results["runs"]:
        m = run["metrics"]
        assert m["test_accuracy"] > 0.5
        for name in ("fashion-mnist", "notmnist"):
            for score in ("msp", "max_logit", "energy", "odin"):
                for metric in ("auroc", "aupr_in", "aupr_out", "fpr95"):
                    assert 0.0 <= m[f"ood/{name}/{score}/{metric}"] <= 1.0
    assert "energy AUROC against fashion-mnist is higher" in (tiny_ood / "report.md").read_text(
        encoding="utf-8"
    )


def test_unknown_ood_set_fails_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="ood_sets"):
        _run(tmp_path, train_size=100, epochs=1, extra={"ood_sets": "nowhere"})
    assert not (tmp_path / "runs").exists()


def test_paper_preset_is_the_papers_sgd_recipe_shortened():
    recipe = task.resolve_recipe(Options(task="ood", preset="paper"))
    assert (recipe.model, recipe.scores, recipe.max_test) == ("cnn", task.SCORES[:3], None)
    train = recipe.train
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay) == ("sgd", 0.1, 0.9, 0)
    assert (train.batch_size, train.schedule, train.milestones) == (256, "multistep", (0.5, 0.65))
    assert recipe.ood_sets == ("fashion-mnist", "notmnist")


def test_every_paper_run_resolves_and_measures_each_rows_metric():
    for setting in task.TASK.paper:
        for preset, fields in setting.runs.items():
            recipe = task.resolve_recipe(Options(task="ood", **fields))
            produced = {"test_accuracy"} | {
                f"ood/{name}/{score}/{metric}"
                for name in recipe.ood_sets
                for score in recipe.scores
                for metric in ("auroc", "aupr_in", "aupr_out", "fpr95")
            }
            for row in setting.rows:
                assert row.metric in produced, (preset, row.label)
                assert {row.baseline, row.treatment} <= set(setting.losses.split(",")), row.label


def test_paper_quick_run_has_every_rows_metric(tmp_path):
    shared_dataset("fashion-mnist")
    shared_dataset("notmnist")
    (setting,) = task.TASK.paper
    fields = setting.runs["quick"]
    results = _run(tmp_path, losses=setting.losses, **fields)
    assert results["config"]["data"]["ood_sets"] == {"fashion-mnist": 200, "notmnist": 200}
    runs = results["runs"]
    assert sorted({r["loss"] for r in runs}) == sorted(setting.losses.split(","))
    assert len(runs) == 2 * fields["seeds"]
    for run in runs:
        assert run["status"] == "ok"
        for row in setting.rows:
            assert 0.0 <= run["metrics"][row.metric] <= 1.0, row.metric
