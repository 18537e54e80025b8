"""``encouraging-loss paper``: settings run under the fair protocol, one page beside the paper."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from encouraging_loss.lab import paper
from encouraging_loss.lab.cli import main
from encouraging_loss.lab.tasks import TASKS, PaperRow, PaperSetting, load_task

from .helpers import load_results, torch_globals_restored

TINY = dict(preset="quick", seeds=2, epochs=2, train_size=400, test_size=200, batch_size=32)
SETTINGS = (
    PaperSetting(
        "Fashion-MNIST, tiny MLP",
        "ce,el",
        {"quick": dict(TINY, dataset="fashion-mnist")},
        (
            PaperRow("test accuracy (%)", "test_accuracy", paper=(90.0, 91.0)),
            PaperRow("mean margin", "margin_mean", scale=1.0, direction=1),
        ),
        departures="a tiny run for the test",
    ),
    PaperSetting(
        "CIFAR-10, ResNet",
        "ce,el",
        {"gpu": dict(preset="full", dataset="cifar10")},
        (PaperRow("best test accuracy (%)", "test_accuracy", paper=(95.0, 95.5)),),
        cost_case="image-cifar10",
    ),
)


def test_every_setting_the_cpu_page_skips_names_a_timed_benchmark_case():
    # The page quotes "cost here" from benchmarks/bench_presets.py by the setting's cost_case.
    # (Before the tests of the page fixture, which swaps image's settings for tiny ones.)
    source = (Path(__file__).parents[2] / "benchmarks" / "bench_presets.py").read_text("utf-8")
    cases = next(
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CASES"
    )
    names = {key.value for key in cases.keys}
    paper_settings = [s for t in TASKS for s in load_task(t).paper]
    skipped = [s for s in paper_settings if "gpu" in s.runs and "cpu" not in s.runs]
    assert skipped, "the page has GPU-only settings"
    for setting in skipped:
        assert setting.cost_case in names, setting.name


@pytest.fixture(scope="module")
def page(tmp_path_factory, data_root):
    task = load_task("image")
    saved = task.paper
    type(task).paper = SETTINGS
    out = tmp_path_factory.mktemp("paper") / "page"
    costs = out.parent / "bench_presets.json"  # as benchmarks/bench_presets.py writes it
    runs = [{"case": "image-cifar10", "projected_run_seconds": 7200.0}, {"case": "x", "error": "1"}]
    costs.write_text(json.dumps({"benchmark": "bench_presets", "results": runs}))
    args = ["paper", "--preset", "quick", "--tasks", "image", "--data-root", str(data_root)]
    args += ["--costs", str(costs)]
    try:
        with torch_globals_restored():
            assert main([*args, "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
        yield out, args
    finally:
        type(task).paper = saved


def test_the_page_has_a_row_per_paper_number_with_ours_and_a_verdict(page):
    out, _ = page
    text = (out / "report.md").read_text(encoding="utf-8")
    results = load_results(out / "image" / "fashion-mnist-tiny-mlp")
    assert set(results["config"]["tuning"]["by_loss"]) == {"ce", "el"}  # every loss was tuned
    accuracy = next(line for line in text.splitlines() if "test accuracy (%)" in line)
    assert "90 → 91" in accuracy and "(n=2)" in accuracy
    diffs = paper.paired_differences(results, "el", "ce", "test_accuracy")
    assert f"{100 * sum(diffs) / 2:+.2f}" in accuracy
    assert f"**{paper.verdict(diffs, +1)}**" in accuracy
    gpu_row = next(line for line in text.splitlines() if "best test accuracy" in line)
    assert "not run here: needs a GPU**; cost here: 2.0 h per (loss, seed) run" in gpu_row
    assert not (out / "image" / "cifar-10-resnet").exists()
    assert "a tiny run for the test" in text and "margin grows" in text
    assert "fashion-mnist-tiny-mlp/report.md" in text


def test_resume_reuses_every_finished_run(page):
    out, args = page
    before = load_results(out / "image" / "fashion-mnist-tiny-mlp")["runs"]
    with torch_globals_restored():
        assert main([*args, "--out", str(out), "--no-progress", "--resume", "--jobs", "1"]) == 0
    after = load_results(out / "image" / "fashion-mnist-tiny-mlp")["runs"]
    assert [r["metrics"] for r in after] == [r["metrics"] for r in before]


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([0.02, 0.03, 0.025], "reproduced"),
        ([0.05, -0.01, 0.02], "same direction, not significant"),
        ([-0.05, 0.01, -0.02], "not reproduced"),
        ([-0.02, -0.03, -0.025], "not reproduced (opposite direction, significant)"),
        ([0.01], "single seed: no interval"),
        ([], "not measured (no finished pair of runs)"),
    ],
)
def test_verdict_follows_the_interval(differences, expected):
    assert paper.verdict(differences, +1) == expected
    flipped = [-d for d in differences]
    assert paper.verdict(flipped, -1) == expected


def test_row_direction_comes_from_the_paper_numbers_or_is_required():
    assert paper.row_direction(PaperRow("fpr", "fpr95", paper=(20.9, 8.7))) == -1
    assert paper.row_direction(PaperRow("acc", "acc", direction=1)) == 1
    with pytest.raises(ValueError, match="direction"):
        paper.row_direction(PaperRow("acc", "acc"))


def test_bad_page_options_are_named(tmp_path, capsys):
    assert main(["paper", "--tasks", "nosuch", "--out", str(tmp_path)]) == 2
    assert "task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["paper", "--preset", "standard"])
    with pytest.raises(ValueError, match="preset"):
        paper.run_page("standard", tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "bench_loss", "results": []}))
    for path in (tmp_path / "missing.json", tmp_path / "other.json"):
        with pytest.raises(ValueError, match="costs"):
            paper.run_page("quick", tmp_path, costs=path)
