"""The GPU benchmark's verdicts (judged from a run's rows) and its CPU dry run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench_gpu():
    # The script imports its sibling _measure, as when run as `python benchmarks/bench_gpu.py`.
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loss_row(name, time_ratio, memory_ratio):
    return {"contender": name, "time_vs_liger-ce": time_ratio, "memory_vs_liger-ce": memory_ratio}


def linear_row(name, gib, time_ratio):
    return {"contender": name, "peak_extra_gib": gib, "time_vs_liger-fused-ce": time_ratio}


def test_verdicts_judge_the_issue_targets(bench_gpu):
    payload = {
        "loss": [
            {"shape": [8192, 128256], "dtype": "torch.bfloat16",
             "results": [loss_row("el-triton", 1.05, 1.2), loss_row("el-triton-inplace", 1.2, 0.5),
                         loss_row("liger-ce", 1.0, 1.0)]},
            {"shape": [8192, 128256], "dtype": "torch.float32", "results": []},  # not judged
        ],
        "linear": [
            {"shape": [8192, 4096, 128256], "dtype": "torch.bfloat16",
             "results": [linear_row("fused-el", 3.1, 1.0),
                         linear_row("fused-el-sum-in-weight-dtype", 1.2, 1.15),
                         linear_row("liger-fused-ce", 1.1, 1.0)]},
        ],
    }  # fmt: skip
    lines = bench_gpu.verdicts(payload)
    assert len(lines) == 4
    triton, inplace, fused, narrow = lines
    assert "time 1.05x liger-ce (met" in triton and "memory 1.20x (NOT met" in triton
    assert "time 1.20x liger-ce (NOT met" in inplace and "memory 0.50x (met" in inplace
    assert "3.10 GiB (NOT met" in fused and "time 1.00x liger-fused-ce (met" in fused
    assert "1.20 GiB (met" in narrow and "time 1.15x liger-fused-ce (NOT met" in narrow


def test_verdicts_without_liger(bench_gpu):
    payload = {
        "loss": [{"shape": [8192, 128256], "dtype": "torch.bfloat16",
                  "results": [loss_row("el-triton", 1.0, 1.0)]}],
        "linear": [{"shape": [8192, 4096, 128256], "dtype": "torch.bfloat16",
                    "results": [linear_row("fused-el", 2.0, None),
                                linear_row("fused-el-sum-in-weight-dtype", 1.0, None)]}],
    }  # fmt: skip
    lines = bench_gpu.verdicts(payload)
    assert "not judged" in lines[0]
    assert "2.00 GiB (met" in lines[1] and "time not judged" in lines[1]


def test_smoke_run_writes_every_contender(bench_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # --smoke sets it; restored after the test
    out = tmp_path / "bench_gpu.json"
    payload = bench_gpu.main(["--smoke", "--only", "linear", "--dtypes", "bfloat16",
                              "--out", str(out)])  # fmt: skip
    assert out.is_file()
    names = {row["contender"] for row in payload["linear"][0]["results"]}
    assert {"fused-el", "fused-el-sum-in-weight-dtype", "linear+el", "linear+ce"} <= names
    assert payload["linear"][0]["fused_vs_materialised"]["grad1_max_rel_diff"] < 0.05
