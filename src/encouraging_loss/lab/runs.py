"""Pieces every non-image task repeats: options from the command line, preset overrides, and
per-(loss, seed) records that make ``--resume`` skip finished runs.

The image task keeps its own copies (it predates this module); tasks never import each other.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from . import report
from .trainer import TrainConfig, world_size


@dataclass
class TaskOptions:
    """Options shared by the ``imbalanced``, ``ood`` and ``adversarial`` tasks.

    ``None`` fields fall back to the preset's recipe; ``extra`` holds the task's own options
    (``--imbalance-ratio``, ``--ood-sets``, ``--epsilons`` ...), keyed by argparse ``dest``.
    """

    losses: str = "ce,el"
    seeds: int = 1
    preset: str = "quick"
    dataset: str | None = None
    model: str | None = None
    data_root: str | None = None
    out: str | None = None
    resume: bool = False
    lr: float | None = None
    clip_grad_norm: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    train_size: int | None = None
    test_size: int | None = None
    device: str | None = None
    amp: bool = True
    threads: int | None = None
    progress: bool = True
    stop_after_epochs: int | None = None
    extra: dict | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TaskOptions:
        """Collect the options from parsed ``run`` arguments (missing ones keep defaults).

        Args:
            args: the namespace of ``encouraging-loss run``.

        Returns:
            The options; every argparse value not a field of this class goes to ``extra``.
        """
        values = vars(args)
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        options = cls(**known, extra=extra)
        if options.losses is None:
            options.losses = "ce,el"
        if options.seeds is None:
            options.seeds = 1
        return options

    def get(self, name: str, default=None):
        """A task-specific option, or ``default`` when it was not given."""
        value = (self.extra or {}).get(name)
        return default if value is None else value


def check_common(options: TaskOptions, presets: dict) -> None:
    """Validate the options every task shares.

    Args:
        options: parsed options.
        presets: the task's presets by name.

    Raises:
        ValueError: naming the bad option.
    """
    if options.preset not in presets:
        raise ValueError(f"preset: unknown preset {options.preset!r}; known: {', '.join(presets)}")
    if options.seeds < 1:
        raise ValueError(f"seeds: must be at least 1, got {options.seeds}")
    if options.threads is not None and options.threads < 0:
        raise ValueError(f"threads: must be >= 0 (0 = torch default), got {options.threads}")
    for name in ("train_size", "test_size"):
        value = getattr(options, name)
        if value is not None and value < 10:
            raise ValueError(f"{name}: must be at least 10, got {value}")


def override_train(config: TrainConfig, options: TaskOptions) -> TrainConfig:
    """Apply command-line overrides to a preset's training configuration.

    Args:
        config: the preset's configuration.
        options: parsed options.

    Returns:
        A validated copy.

    Raises:
        ValueError: naming an invalid field.
    """
    overrides = {
        key: getattr(options, key)
        for key in (
            "lr",
            "clip_grad_norm",
            "epochs",
            "batch_size",
            "optimizer",
            "schedule",
            "weight_decay",
            "device",
        )
        if getattr(options, key) is not None
    }
    config = replace(config, **overrides, amp=config.amp and options.amp)
    config.validate()
    return config


def apply_threads(preset_threads: int | None, options: TaskOptions) -> None:
    """Set torch's CPU threads: ``--threads`` (0 = torch default) over the preset's value."""
    threads = preset_threads if options.threads is None else (options.threads or None)
    if threads is not None:
        torch.set_num_threads(threads)


def base_config(options: TaskOptions, model: str, train: TrainConfig, data: dict) -> dict:
    """The ``config`` block of ``results.json`` shared by the tasks."""
    return {
        "preset": options.preset,
        "model": model,
        "seeds": list(range(options.seeds)),
        "train": asdict(train),
        "data": data,
        "world_size": world_size(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def record_path(out_dir: Path, loss: str, seed: int) -> Path:
    """Where one finished run's record is saved."""
    return out_dir / "runs" / f"{report.run_slug(loss, seed)}.json"


def checkpoint_path(out_dir: Path, loss: str, seed: int) -> Path:
    """Where one run's per-epoch checkpoint is saved while it trains."""
    return out_dir / "checkpoints" / f"{report.run_slug(loss, seed)}.pt"


def load_record(out_dir: Path, loss: str, seed: int, resume: bool) -> dict | None:
    """A finished run's saved record when resuming, else ``None``."""
    path = record_path(out_dir, loss, seed)
    if resume and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def save_record(out_dir: Path, record: dict) -> None:
    """Save a finished run's record and drop its checkpoint (the record holds everything)."""
    report.atomic_write_json(record_path(out_dir, record["loss"], record["seed"]), record)
    checkpoint = checkpoint_path(out_dir, record["loss"], record["seed"])
    if checkpoint.is_file():
        checkpoint.unlink()


def parse_float_list(name: str, text: str | list | tuple) -> list[float]:
    """Parse ``"0,0.05,0.1"`` (or a list) into floats.

    Args:
        name: the option's name, used in errors.
        text: comma-separated numbers or a sequence; ``a/b`` fractions such as ``8/255`` allowed.

    Returns:
        The numbers in order.

    Raises:
        ValueError: naming ``name`` when an item is not a number or the list is empty.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        raw = str(item).strip()
        if not raw:
            continue
        try:
            numerator, _, denominator = raw.partition("/")
            value = float(numerator) / (float(denominator) if denominator else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name}: {raw!r} is not a number") from None
        values.append(value)
    if not values:
        raise ValueError(f"{name}: expected a comma-separated list of numbers, got {text!r}")
    return values
