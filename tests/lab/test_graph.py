"""The graph task end to end on a few dozen MUTAG graphs: files, metric ranges, determinism,
resume, stratified splits, the trainer's graph batches and option errors. Skipped without
torch_geometric or the data."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from encouraging_loss.lab.data import DatasetNotFoundError
from encouraging_loss.lab.experiment import Interrupted, Options, run_experiment

from .helpers import (
    SHARED_DATA,
    load_results,
    shared_dataset,
    subprocess_env,
    torch_globals_restored,
)

pytest.importorskip("torch_geometric")

from encouraging_loss.lab.tasks import graph  # noqa: E402

TINY = {"dataset": "MUTAG", "train_size": 60, "epochs": 3, "batch_size": 16, "progress": False}
EL = "el:log_end=0.5,start=0.5,ramp=0.2"


def _run(out, **settings) -> dict:
    """``run graph`` on 60 staged MUTAG graphs (``settings``: :class:`Options` fields)."""
    shared_dataset("tu/MUTAG")
    settings.setdefault("jobs", 1)  # the runner's parallel workers are tested in test_cli
    settings = {**TINY, **settings}
    options = Options(task="graph", data_root=str(SHARED_DATA), out=str(out), **settings)
    with torch_globals_restored():
        return run_experiment(options)


def _run_of(results: dict, loss: str, seed: int) -> dict:
    return next(r for r in results["runs"] if (r["loss"], r["seed"]) == (loss, seed))


@pytest.fixture(scope="module")
def tiny_graph_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph") / "out"
    _run(out, seeds=2)
    return out


def test_files_and_contract(tiny_graph_run):
    for name in ("results.json", "results.csv", "report.md", "accuracy_curves.png"):
        assert (tiny_graph_run / name).is_file(), name
    results = load_results(tiny_graph_run)
    assert results["task"] == "graph" and results["dataset"] == "MUTAG"
    assert results["config"]["losses"] == ["ce", EL]
    assert sorted((r["loss"], r["seed"]) for r in results["runs"]) == [
        ("ce", 0),
        ("ce", 1),
        (EL, 0),
        (EL, 1),
    ]
    data = results["config"]["data"]
    assert data["n_graphs"] == 60 and data["n_train"] + data["n_val"] + data["n_test"] == 60
    text = (tiny_graph_run / "report.md").read_text()
    assert "| test acc |" in text and "| val acc |" in text and f"`{EL}` − `ce`" in text
    assert "one random stratified 80/10/10 split per seed" in text
    assert (tiny_graph_run / "results.csv").read_text().count("\n") == 1 + 4
    assert not any((tiny_graph_run / "checkpoints").glob("*.pt"))
    assert len(list((tiny_graph_run / "arrays").glob("*.npz"))) == 4


def test_metric_ranges_and_delayed_bonus(tiny_graph_run):
    for run in load_results(tiny_graph_run)["runs"]:
        m = run["metrics"]
        assert run["status"] == "ok" and len(run["history"]) == 3
        for name in ("test_accuracy", "val_accuracy", "probe_accuracy", "ece"):
            assert 0.0 <= m[name] <= 1.0, name
        for name in ("margin_mean", "energy_mean", "energy_true_mean", "test_nll"):
            assert math.isfinite(m[name]), name
        assert m["energy_mean"] <= m["energy_true_mean"]
        assert 0.0 <= m["grad_share_well_classified_last"] <= 1.0
        assert run["reliability"] is not None
        if run["loss"].startswith("el"):
            # start=0.5: no bonus in the first half of training, full bonus at the end.
            scales = [h["bonus_scale"] for h in run["history"]]
            assert scales[0] == 0.0 and scales[-1] == 1.0


def test_same_seed_same_numbers(tiny_graph_run, tmp_path):
    again = _run(tmp_path / "again", seeds=1, losses="ce")["runs"][0]
    first = _run_of(load_results(tiny_graph_run), "ce", 0)
    assert again["metrics"]["test_accuracy"] == first["metrics"]["test_accuracy"]
    for a, b in zip(again["history"], first["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_resume_gives_the_uninterrupted_result(tiny_graph_run, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _run(out, seeds=1, losses="ce", stop_after_epochs=1)
    assert not (out / "results.json").exists() and any((out / "checkpoints").iterdir())
    resumed = _run(out, seeds=1, losses="ce", resume=True)["runs"][0]
    first = _run_of(load_results(tiny_graph_run), "ce", 0)
    assert resumed["metrics"]["test_accuracy"] == first["metrics"]["test_accuracy"]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(
        first["history"][-1]["train_loss"], rel=1e-6
    )


def test_stratified_split_keeps_class_shares():
    labels = torch.tensor([0] * 70 + [1] * 30)
    train, val, test = graph.stratified_split(labels, seed=3)
    assert len(train) + len(val) + len(test) == 100
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 100
    assert (labels[test] == 1).sum().item() == 3 and (labels[val] == 1).sum().item() == 3
    again = graph.stratified_split(labels, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not torch.equal(graph.stratified_split(labels, seed=4)[2], test)
    with pytest.raises(ValueError, match="fractions"):
        graph.stratified_split(labels, seed=0, fractions=(0.5, 0.5, 0.5))


def test_graph_batches_collate_pyg_batches():
    from torch_geometric.data import Data

    graphs = [
        Data(x=torch.ones(n, 2), edge_index=torch.tensor([[0], [1]]), y=torch.tensor([n % 2]))
        for n in range(2, 22)
    ]
    splits = graph.make_graph_splits(graphs, num_classes=2, seed=0)
    batches = graph.GraphBatches(splits)
    assert batches.n_train == len(splits.train_y) == len(splits.train_x)
    index = batches.epoch_batches(4, seed=0)[0]
    batch = splits.train_x[index]
    assert batch.num_graphs == 4 and batch.x.shape[0] == sum(
        splits.train_x.graphs[i].num_nodes for i in index.tolist()
    )
    assert splits.val_x[0:2].num_graphs == 2
    model = graph.GraphClassifier("gin", 2, 2, hidden=8, layers=2)
    validation = batches.validate(model, 8, torch.device("cpu"))
    assert set(validation) == {"val_accuracy", "val_nll"}
    with pytest.raises(ValueError, match="splits"):
        graph.GraphBatches(splits.__dict__)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dataset": "CORA"}, "dataset:"),
        ({"model": "mlp"}, "model:"),
        ({"test_size": 20}, "test_size:"),
        ({"train_size": 15}, "train_size:"),
        ({"preset": "standard"}, "preset:"),
    ],
)
def test_bad_options_name_the_argument(settings, message, tmp_path):
    options = Options(task="graph", data_root=str(tmp_path), out=str(tmp_path / "o"), **settings)
    with pytest.raises(ValueError, match=message):
        run_experiment(options)


def test_missing_data_is_one_line(tmp_path):
    options = Options(task="graph", data_root=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(DatasetNotFoundError) as error:
        run_experiment(options)
    assert "tu/PROTEINS" in str(error.value) and "\n" not in str(error.value)


def test_gcn_runs(tmp_path):
    results = _run(tmp_path / "gcn", model="gcn", seeds=1, losses="el:log_end=0.5")
    assert results["config"]["model"] == "gcn"
    assert 0.0 <= results["runs"][0]["metrics"]["test_accuracy"] <= 1.0


def test_torchrun_two_processes(tmp_path):
    """Two gloo processes finish and write the same files (BatchNorm statistics are per rank,
    so the numbers are close to, not equal to, one process's)."""
    pytest.importorskip("torch.distributed.run")
    shared_dataset("tu/MUTAG")
    out = tmp_path / "ddp"
    settings = {**TINY, "seeds": 1, "losses": "ce", "data_root": str(SHARED_DATA), "out": str(out)}
    script = tmp_path / "run_graph.py"
    script.write_text(
        "import json, sys\n"
        "from encouraging_loss.lab.experiment import Options, run_experiment\n"
        "run_experiment(Options(task='graph', **json.loads(sys.argv[1])))\n",
        encoding="utf-8",
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
            json.dumps(settings),
        ],
        env=subprocess_env(),
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = load_results(out)
    assert results["config"]["world_size"] == 2
    assert 0.0 <= results["runs"][0]["metrics"]["test_accuracy"] <= 1.0


# --- the paper preset and setting ---------------------------------------------------------
def test_paper_setting_quick_run_has_every_row_metric(tmp_path):
    """The setting's quick run, as the paper page runs it (without tuning): every row's metric
    is in every run's record, for the losses the rows compare."""
    shared_dataset("tu/PROTEINS")
    (setting,) = graph.TASK.paper
    options = Options(
        task="graph",
        losses=setting.losses,
        data_root=str(SHARED_DATA),
        out=str(tmp_path / "paper"),
        progress=False,
        jobs=1,
        **setting.runs["quick"],
    )
    with torch_globals_restored():
        results = run_experiment(options)
    assert results["config"]["model"] == "sagpool" and results["config"]["pool_ratio"] == 0.5
    assert results["config"]["train"]["patience"] == 50
    for row in setting.rows:
        for loss in (row.baseline, row.treatment):
            runs = [r for r in results["runs"] if r["loss"] == loss]
            assert len(runs) == setting.runs["quick"]["seeds"], loss
            assert all(0.0 <= r["metrics"][row.metric] <= 1.0 for r in runs), loss


def test_paper_el_defers_the_bonus_for_25_epochs():
    """The bonus schedule's start is a fraction of the epoch cap, which early stopping does not
    change: the bonus is 0 through epoch 25 and on from the first step of epoch 26."""
    from encouraging_loss.lab.losses import build_criterion

    recipe = graph.PRESETS["paper"]
    steps_per_epoch, cap = 7, recipe.train.epochs
    criterion = build_criterion(graph.PAPER_EL)
    scales = []
    for step in range(steps_per_epoch * 30):
        criterion.step(step / (steps_per_epoch * cap))  # the trainer's progress
        scales.append(float(criterion.bonus_scale))
    last_off = graph.BONUS_DEFERRED_EPOCHS * steps_per_epoch - 1
    assert max(scales[: last_off + 1]) == 0.0 and min(scales[last_off + 1 :]) == 1.0
    assert graph.PAPER_LOSSES.split(",", 1) == ["ce", graph.PAPER_EL]


def test_sagpool_network_shapes_and_errors():
    from torch_geometric.data import Batch, Data

    recipe = graph.PRESETS["paper"]
    model = graph.build_graph_model(recipe, in_features=3, num_classes=2)
    assert isinstance(model, graph.SAGPoolClassifier) and len(model.pools) == 3
    widths = [(m.in_features, m.out_features) for m in model.head if isinstance(m, torch.nn.Linear)]
    assert widths == [(256, 128), (128, 64)] and model.classifier.in_features == 64
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.head)
    graphs = [
        Data(x=torch.randn(n, 3), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.tensor([0]))
        for n in (2, 5, 9)
    ]
    batch = Batch.from_data_list(graphs)
    assert model(batch).shape == (3, 2) and model.features(batch).shape == (3, 64)
    for kwargs, name in (
        ({"ratio": 0.0}, "ratio"),
        ({"hidden": 1}, "hidden"),
        ({"levels": 0}, "levels"),
    ):
        with pytest.raises(ValueError, match=name):
            graph.SAGPoolClassifier(3, 2, **kwargs)


def test_patience_option(tmp_path):
    def recipe(patience, preset="paper"):
        extra = {"patience": patience}
        return graph.resolve_recipe(Options(task="graph", preset=preset, extra=extra))

    assert graph.PRESETS["quick"].train.patience is None
    assert recipe(None).train.patience == 50 and recipe(0).train.patience is None
    assert recipe(7, preset="quick").train.patience == 7
    with pytest.raises(ValueError, match="patience"):
        recipe(-1)
    options = Options(task="graph", data_root=str(tmp_path), out=str(tmp_path / "o"))
    options.extra["patience"] = -3
    with pytest.raises(ValueError, match="patience"):
        run_experiment(options)


def test_early_stopping_resumes_to_the_same_epoch(tmp_path):
    """A tiny run that early stopping ends before its cap stops at the same epoch, with the same
    numbers, when interrupted and resumed."""
    settings = dict(seeds=1, losses="ce", epochs=20, extra={"patience": 2})
    whole = _run(tmp_path / "whole", **settings)["runs"][0]
    assert whole["metrics"]["epochs_trained"] == len(whole["history"]) < 20
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        _run(out, stop_after_epochs=1, **settings)
    resumed = _run(out, resume=True, **settings)["runs"][0]
    assert len(resumed["history"]) == len(whole["history"])
    assert resumed["metrics"]["test_accuracy"] == whole["metrics"]["test_accuracy"]
