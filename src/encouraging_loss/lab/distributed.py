"""The processes of a run: its device, and the process group under ``torchrun``.

Data parallelism is DistributedDataParallel (gloo on CPU, nccl on GPU); without ``torchrun``
every helper here is a no-op or answers for one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"``/``"cpu"``/``"cuda[:i]"`` into a device, the local rank's GPU under DDP.

    Raises:
        ValueError: if CUDA is requested but not available, or the string is malformed.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: {device!r} is not a device ({error})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if resolved.index is None and world_size() > 1:
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


def world_size() -> int:
    """Number of processes (``WORLD_SIZE`` from ``torchrun``, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (``RANK`` from ``torchrun``, else 0)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> bool:
    """Join ``torchrun``'s process group (nccl on CUDA, gloo otherwise); whether distributed."""
    if world_size() <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            # Share the cores instead of oversubscribing them.
            fair_share = max(1, (os.cpu_count() or 1) // world_size())
            torch.set_num_threads(min(torch.get_num_threads(), fair_share))
    return True


def finish_distributed() -> None:
    """Wait for every rank, then leave the process group (no-op without ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
