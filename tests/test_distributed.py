"""DistributedDataParallel (gloo, 2 CPU processes) gives the gradients of one process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from encouraging_loss import EncouragingLoss


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def _data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5, (8,), generator=generator)
    return inputs, targets


CRITERION_OPTIONS = dict(log_end=0.75, label_smoothing=0.1)


def _worker(rank, world_size, port, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        inputs, targets = _data()
        shard = slice(rank * 4, (rank + 1) * 4)
        loss = EncouragingLoss(**CRITERION_OPTIONS)(model(inputs[shard]), targets[shard])
        loss.backward()
        results[rank] = [p.grad.clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one():
    model = _model()
    inputs, targets = _data()
    EncouragingLoss(**CRITERION_OPTIONS)(model(inputs), targets).backward()
    expected = [p.grad for p in model.parameters()]

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        for got, want in zip(results[rank], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
