"""``run graph`` end to end on a few dozen MUTAG graphs: files, metric ranges, determinism,
resume, stratified splits and option errors. Skipped without torch_geometric or the data."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest
import torch

from encouraging_loss.lab.cli import main

from .helpers import SHARED_DATA, load_results, shared_dataset, subprocess_env

pytest.importorskip("torch_geometric")

from encouraging_loss.lab.tasks import graph  # noqa: E402

TINY = [
    "--dataset",
    "MUTAG",
    "--train-size",
    "60",
    "--epochs",
    "3",
    "--batch-size",
    "16",
    "--no-progress",
]


def _run(out, *extra: str) -> int:
    shared_dataset("tu/MUTAG")
    return main(["run", "graph", "--data-root", str(SHARED_DATA), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def tiny_graph_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph") / "out"
    assert _run(out, "--seeds", "2") == 0
    return out


def test_files_and_contract(tiny_graph_run):
    for name in ("results.json", "results.csv", "report.md", "accuracy_curves.png"):
        assert (tiny_graph_run / name).is_file(), name
    results = load_results(tiny_graph_run)
    assert results["task"] == "graph" and results["dataset"] == "MUTAG"
    assert results["config"]["losses"] == ["ce", "el:log_end=0.5,start=0.5,ramp=0.2"]
    assert sorted((r["loss"], r["seed"]) for r in results["runs"]) == [
        ("ce", 0),
        ("ce", 1),
        ("el:log_end=0.5,start=0.5,ramp=0.2", 0),
        ("el:log_end=0.5,start=0.5,ramp=0.2", 1),
    ]
    data = results["config"]["data"]
    assert data["n_graphs"] == 60 and data["n_train"] + data["n_val"] + data["n_test"] == 60
    text = (tiny_graph_run / "report.md").read_text()
    assert "| test acc |" in text and "`el:log_end=0.5,start=0.5,ramp=0.2` − `ce`" in text
    assert (tiny_graph_run / "results.csv").read_text().count("\n") == 1 + 4


def test_metric_ranges_and_delayed_bonus(tiny_graph_run):
    for run in load_results(tiny_graph_run)["runs"]:
        m = run["metrics"]
        assert run["status"] == "ok" and len(run["history"]) == 3
        for name in ("test_accuracy", "val_accuracy", "probe_accuracy", "ece"):
            assert 0.0 <= m[name] <= 1.0, name
        for name in ("margin_mean", "energy_mean", "energy_true_mean", "test_nll"):
            assert math.isfinite(m[name]), name
        assert m["energy_mean"] <= m["energy_true_mean"]
        if run["loss"].startswith("el"):
            # start=0.5: no bonus in the first half of training, full bonus at the end.
            scales = [h["bonus_scale"] for h in run["history"]]
            assert scales[0] == 0.0 and scales[-1] == 1.0


def test_same_seed_same_numbers(tiny_graph_run, tmp_path):
    assert _run(tmp_path / "again", "--seeds", "1", "--losses", "ce") == 0
    again = load_results(tmp_path / "again")["runs"][0]
    first = next(
        r for r in load_results(tiny_graph_run)["runs"] if (r["loss"], r["seed"]) == ("ce", 0)
    )
    assert again["metrics"]["test_accuracy"] == first["metrics"]["test_accuracy"]
    for a, b in zip(again["history"], first["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_resume_gives_the_uninterrupted_result(tiny_graph_run, tmp_path):
    out = tmp_path / "resumed"
    args = ("--seeds", "1", "--losses", "ce")
    assert _run(out, *args, "--stop-after-epochs", "1") == 0
    assert not (out / "results.json").exists() and any((out / "checkpoints").iterdir())
    assert _run(out, *args, "--resume") == 0
    resumed = load_results(out)["runs"][0]
    first = next(
        r for r in load_results(tiny_graph_run)["runs"] if (r["loss"], r["seed"]) == ("ce", 0)
    )
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "CORA"], "dataset:"),
        (["--model", "mlp"], "model:"),
        (["--test-size", "20"], "test-size:"),
        (["--preset", "standard"], "preset:"),
    ],
)
def test_bad_options_name_the_argument(extra, message, tmp_path, capsys):
    args = ["run", "graph", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_data_is_one_line(tmp_path, capsys):
    assert main(["run", "graph", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tu/PROTEINS" in err and err.count("\n") == 1


def test_gcn_runs(tmp_path):
    out = tmp_path / "gcn"
    assert _run(out, "--model", "gcn", "--seeds", "1", "--losses", "el:log_end=0.5") == 0
    results = load_results(out)
    assert results["config"]["model"] == "gcn"
    assert 0.0 <= results["runs"][0]["metrics"]["test_accuracy"] <= 1.0


def test_torchrun_two_processes(tmp_path):
    """Two gloo processes finish and write the same files (BatchNorm statistics are per rank,
    so the numbers are close to, not equal to, one process's)."""
    pytest.importorskip("torch.distributed.run")
    shared_dataset("tu/MUTAG")
    out = tmp_path / "ddp"
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
            "-m",
            "encouraging_loss.lab",
            "run",
            "graph",
            "--data-root",
            str(SHARED_DATA),
            "--out",
            str(out),
            *TINY,
            "--seeds",
            "1",
            "--losses",
            "ce",
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
