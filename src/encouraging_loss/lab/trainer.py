"""One training loop for every lab task.

Seeds and determinism, SGD/AdamW, cosine and multi-step learning-rate schedules, bfloat16
autocast on CUDA, a held-out validation split for model selection, bonus-scale schedules,
atomic per-epoch checkpoints with exact resume, divergence detection, and data parallelism
under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on GPU).

Reproducibility rests on two choices: the shuffling order of epoch ``e`` is drawn from a
generator seeded by ``(seed, e)`` (so a resumed run needs no sampler state), and the learning
rate is a pure function of the global step (so there is no scheduler state to drift).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import random_crop_flip
from .diagnostics import eval_mode
from .distributed import init_distributed, rank, resolve_device, world_size
from .io import atomic_torch_save

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        epochs: passes over the training split.
        batch_size: global batch size (split evenly over processes under ``torchrun``).
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: decoupled for AdamW, L2 for SGD.
        schedule: ``"cosine"`` (to 0 over training), ``"multistep"`` or ``"constant"``.
        milestones: fractions of training where ``multistep`` multiplies the lr by ``gamma``.
        gamma: multi-step decay factor.
        warmup_epochs: linear warm-up length in epochs (0 = none).
        clip_grad_norm: clip the global gradient norm to this value; ``None`` = no clipping.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or ``"auto"``.
        seed: seed of initialisation and shuffling.
        deterministic: ask torch for deterministic kernels.
        eval_batch_size: batch size of evaluation passes.
        augment: random 4-pixel-padded crops and horizontal flips (the CIFAR recipe).
        patience: early stopping: end training once this many epochs have passed since the
            epoch with the best validation accuracy (the selected one); ``None`` = train all
            ``epochs``. Progress (lr schedule, bonus schedules) stays relative to ``epochs``.
    """

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    clip_grad_norm: float | None = None
    amp: bool = True
    device: str = "cpu"
    seed: int = 0
    deterministic: bool = True
    eval_batch_size: int = 1024
    augment: bool = False
    patience: int | None = None

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the first invalid field.
        """
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name, known in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name}: expected one of {known}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a positive number, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum, weight_decay: must be non-negative")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones: fractions in (0, 1) expected, got {self.milestones}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma: must be in (0, 1], got {self.gamma}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: must be non-negative, got {self.warmup_epochs}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm: must be positive or None, got {self.clip_grad_norm}")
        if self.patience is not None and not (
            isinstance(self.patience, int) and self.patience >= 1
        ):
            raise ValueError(f"patience: must be a positive int or None, got {self.patience!r}")

    def patience_spent(self, epochs_done: int, best_epoch: int) -> bool:
        """Whether early stopping ends training after ``epochs_done`` epochs whose best
        (selected) epoch is ``best_epoch``: a pure function of the history, so a resumed run
        stops at the same epoch."""
        return self.patience is not None and epochs_done - best_epoch >= self.patience


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained module, holding the weights of the best validation epoch.
        history: one dict per finished epoch (train loss/accuracy, val accuracy/NLL, lr, ...).
        best_epoch: 1-based epoch selected on validation accuracy (0 if none finished).
        best_val_accuracy: its validation accuracy.
        diverged: whether the loss became non-finite.
        diverged_step: global step (1-based) of the first non-finite loss.
        diverged_epoch: 1-based epoch of that step.
        interrupted: stopped early on purpose (``stop_after_epochs``); a checkpoint remains.
        stopped_early: training ended before ``epochs`` by early stopping (``patience``).
        train_seconds: wall time spent in this call.
        lr: the peak learning rate it trained with (``config.lr``).
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    diverged: bool = False
    diverged_step: int | None = None
    diverged_epoch: int | None = None
    interrupted: bool = False
    stopped_early: bool = False
    train_seconds: float = 0.0
    lr: float = float("nan")

    def outcome_metrics(self) -> dict:
        """The run's outcome as result metrics: divergence, selected epoch, its val accuracy."""
        return {
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "diverged_epoch": self.diverged_epoch,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.best_val_accuracy,
        }


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with ``deterministic``, ask for deterministic kernels.

    Raises:
        ValueError: if ``seed`` is negative or not an int.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    # cuBLAS needs this set before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    # The legacy global state is what third-party code (and users) draw from.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def learning_rate(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate at a 0-based global ``step`` of ``total_steps`` (warm-up, then schedule).

    Raises:
        ValueError: if ``step`` is negative or ``total_steps``/``steps_per_epoch`` not positive.
    """
    if step < 0:
        raise ValueError(f"step: must be non-negative, got {step}")
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"total_steps/steps_per_epoch: must be positive, got {total_steps}/{steps_per_epoch}"
        )
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "multistep":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    return config.lr


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``(N, C)`` float32 CPU logits of ``model`` on ``x`` in eval mode (mode restored after).

    Raises:
        ValueError: if ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    with eval_mode(model):
        out = [
            model(x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(out) if out else torch.empty(0)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ClassificationBatches:
    """The default training data of :func:`train`: tensors of examples and class labels.

    A task with other batches (padded sentence pairs, graphs) passes an object with the same
    four members instead: ``n_train``, ``epoch_batches``, ``loss`` and ``validate``.

    Args:
        splits: object with ``train_x, train_y, val_x, val_y`` (see ``data.Splits``).
        augment: random 4-pixel-padded crops and horizontal flips, seeded per step.
        perturb: ``perturb(model, x, y)`` returns the batch the model trains on (e.g. PGD
            adversarial examples for adversarial training); ``None`` trains on ``x``.
    """

    def __init__(self, splits, augment: bool = False, perturb: Callable | None = None):
        for name in ("train_x", "train_y", "val_x", "val_y"):
            if not hasattr(splits, name):
                raise ValueError(f"splits: expected train_x, train_y, val_x, val_y; no {name}")
        self.splits, self.augment, self.perturb = splits, augment, perturb
        self.n_train = len(splits.train_y)

    def epoch_batches(self, batch: int, seed: int) -> list[torch.Tensor]:
        """``n_train // batch`` index batches of one epoch, shuffled by a generator of ``seed``."""
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed))
        return list(order[: self.n_train // batch * batch].split(batch))

    def loss(self, step: BatchStep) -> tuple[torch.Tensor, Callable[[], dict]]:
        """The loss of one batch and a function giving its statistics after ``backward``."""
        xb = self.splits.train_x[step.index].to(step.device)
        yb = self.splits.train_y[step.index].to(step.device)
        if self.augment:
            # Seeded by (seed, step, rank) so a resumed run draws the same crops.
            generator = torch.Generator().manual_seed(step.seed * 64 + step.rank)
            xb = random_crop_flip(xb, generator)
        if self.perturb is not None:
            xb = self.perturb(step.model, xb, yb).detach()
        with torch.autocast(step.device.type, dtype=torch.bfloat16, enabled=step.amp):
            logits = step.forward(xb)
        logits = logits.float()
        logits.retain_grad()
        loss = step.criterion(logits, yb)

        def statistics() -> dict:
            with torch.no_grad():
                probs = logits.detach().softmax(dim=1)
                p_true = probs.gather(1, yb[:, None]).squeeze(1)
                grad_norms = logits.grad.norm(dim=1)  # per-example gradient w.r.t. logits
                return {
                    "loss": loss.item() * len(yb),
                    "correct": (probs.argmax(dim=1) == yb).sum().item(),
                    "count": len(yb),
                    "well_norm": grad_norms[p_true > 0.5].sum().item(),
                    "total_norm": grad_norms.sum().item(),
                }

        return loss, statistics

    def validate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict:
        """Validation accuracy and NLL (``val_accuracy`` selects the epoch)."""
        val_logits = predict_logits(model, self.splits.val_x, batch_size, device)
        val_y = self.splits.val_y
        return {
            "val_accuracy": (val_logits.argmax(1) == val_y).float().mean().item(),
            "val_nll": nn.functional.cross_entropy(val_logits, val_y).item(),
        }


@dataclass
class BatchStep:
    """What a batch-loss hook gets at one training step.

    Attributes:
        index: this rank's example indices of the batch.
        model: the bare model (for attacks or its output layer).
        forward: the module the forward pass runs through (the DDP wrapper under torchrun).
        criterion: the loss module.
        device: the training device.
        amp: whether bfloat16 autocast is on.
        seed: ``(run seed, global step)`` folded into one integer, for per-step randomness.
        rank: this process's rank.
    """

    index: torch.Tensor
    model: nn.Module
    forward: nn.Module
    criterion: nn.Module
    device: torch.device
    amp: bool
    seed: int
    rank: int


def _epoch_record(sums: dict, validation: dict, epoch: int, step: int, lr: float, criterion):
    """One epoch's history entry from the summed batch statistics and the validation."""
    count = sums["count"]
    record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": sums["loss"] / count}
    if "ce" in sums:
        record["train_ce"] = sums["ce"] / count
    record["train_accuracy"] = sums["correct"] / count
    record.update(validation)
    total = sums["total_norm"]
    record["grad_share_well_classified"] = sums["well_norm"] / total if total > 0 else 0.0
    scale = getattr(criterion, "bonus_scale", None)
    record["bonus_scale"] = None if scale is None else float(scale)
    return record


_RESUMED = ("history", "best_epoch", "best_val_accuracy")  # TrainResult fields in checkpoints


def train(
    model: nn.Module,
    criterion: nn.Module,
    data,
    config: TrainConfig,
    *,
    progress_hook: Callable[[float], None] | None = None,
    perturb: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    epoch_hook: Callable[[nn.Module, int], dict] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` with ``criterion`` and select the epoch with the best validation accuracy.

    Args:
        model: freshly initialised model (seed it with :func:`set_seed` before building it).
        criterion: ``criterion(logits, targets)`` returning a scalar loss. If it has a
            ``step(progress)`` method (``EncouragingLoss`` with a bonus or ``log_end``
            schedule), it is called before every step with training progress in ``[0, 1]``.
        data: the training data: an object with ``train_x, train_y, val_x, val_y`` tensors
            (see ``data.Splits``; trained through :class:`ClassificationBatches`), or a task's
            own batches with the members of :class:`ClassificationBatches`.
        progress_hook: called before every step with training progress in ``[0, 1]`` (e.g.
            deferred re-weighting swaps the criterion's class weights at a fixed progress);
            it must be a pure function of progress so that resumed runs stay identical.
        perturb: for tensor data, ``perturb(model, x, y)`` returns the batch the model trains
            on (see :class:`ClassificationBatches`).
        epoch_hook: called after each epoch's validation as ``epoch_hook(model, epoch)``
            (``epoch`` 1-based, the model holding that epoch's weights); the dict it returns is
            merged into the epoch's history entry, so it is checkpointed and survives resume
            (e.g. the image task's test accuracy per epoch). It must not change the model or
            draw from the global random generators, so that training is the same without it.
        checkpoint_path: where the per-epoch checkpoint is written (atomically); ``None`` = none.
        resume: continue from ``checkpoint_path`` if it exists.
        stop_after_epochs: return after this many epochs of *this call* as if killed (the
            checkpoint stays); used to test ``--resume``.
        progress: show a tqdm progress bar (rank 0 only).
        description: progress-bar label.

    Returns:
        A :class:`TrainResult`; the model holds the best validation weights.

    Raises:
        ValueError: for an invalid configuration, a checkpoint for another setup, or ``resume``
            without ``checkpoint_path``.
    """
    config.validate()
    if resume and checkpoint_path is None:
        raise ValueError("checkpoint_path: resume=True needs a checkpoint path")
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ValueError(f"stop_after_epochs: must be at least 1, got {stop_after_epochs}")
    if epoch_hook is not None and not callable(epoch_hook):
        raise ValueError(f"epoch_hook: must be callable or None, got {type(epoch_hook).__name__}")
    if not hasattr(data, "epoch_batches"):
        data = ClassificationBatches(data, augment=config.augment, perturb=perturb)
    elif perturb is not None:
        raise ValueError("perturb: only for tensor data; a task's batches perturb themselves")
    started = time.perf_counter()
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    world, my_rank = world_size(), rank()
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by {world} processes")
    model.to(device)
    n_train = data.n_train
    # Global batches must split evenly across ranks so that averaged gradients equal the
    # gradient of the global mean; a dataset smaller than the batch becomes one batch.
    batch = min(config.batch_size, n_train - n_train % world)
    if batch < world:
        raise ValueError(f"data: {n_train} training examples cannot feed {world} processes")
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * config.epochs
    ddp_model: nn.Module = model
    if distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(model, config)
    use_amp = config.amp and device.type == "cuda"
    # Called before every step with training progress in [0, 1].
    hooks = [hook for hook in (getattr(criterion, "step", None), progress_hook) if hook is not None]

    result = TrainResult(model=model, lr=config.lr)
    best_state: dict | None = None
    start_epoch, global_step = 0, 0
    setup = {"config": asdict(config), "n_train": n_train, "world_batch": batch}
    if resume and Path(checkpoint_path).is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state["setup"]["config"] != setup["config"] or state["setup"]["n_train"] != n_train:
            raise ValueError(f"checkpoint_path: {checkpoint_path} was written for another setup")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        best_state = state["best_state"]
        for key in _RESUMED:
            setattr(result, key, state[key])

    bar = _progress_bar(progress and my_rank == 0, config.epochs, start_epoch, description)
    for epoch in range(start_epoch, config.epochs):
        # At the top, so a run resumed from its stopping epoch's checkpoint stops there too.
        if config.patience_spent(epoch, result.best_epoch):
            result.stopped_early = True
            break
        ddp_model.train()
        batches = data.epoch_batches(batch, config.seed * 1_000_003 + epoch)
        sums: dict[str, float] = {}
        diverged = False
        for step_in_epoch in range(steps_per_epoch):
            lr = learning_rate(config, global_step, total_steps, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for hook in hooks:
                hook(global_step / max(1, total_steps))
            step = BatchStep(
                index=batches[step_in_epoch][my_rank::world],
                model=model,
                forward=ddp_model,
                criterion=criterion,
                device=device,
                amp=use_amp,
                seed=config.seed * 1_000_003 + global_step,
                rank=my_rank,
            )
            loss, statistics = data.loss(step)
            global_step += 1
            finite = torch.isfinite(loss.detach()).float()
            if distributed:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            # Before the step: a fused loss's statistics form logits from the output weight.
            for key, value in statistics().items():
                sums[key] = sums.get(key, 0.0) + value
            optimizer.step()
        if diverged:
            result.diverged, result.diverged_step = True, global_step
            result.diverged_epoch = epoch + 1
            break
        if distributed:
            totals = torch.tensor(list(sums.values()), dtype=torch.float64)
            dist.all_reduce(totals)
            sums = dict(zip(sums, totals.tolist(), strict=True))
        validation = data.validate(model, config.eval_batch_size, device)
        record = _epoch_record(sums, validation, epoch + 1, global_step, lr, criterion)
        if epoch_hook is not None:
            measured = epoch_hook(model, epoch + 1)
            if not isinstance(measured, dict) or measured.keys() & record.keys():
                raise ValueError("epoch_hook: must return a dict of new history keys")
            record.update(measured)
        result.history.append(record)
        val_accuracy = validation["val_accuracy"]
        if best_state is None or val_accuracy > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch + 1, val_accuracy
            best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        if checkpoint_path is not None and my_rank == 0:
            atomic_torch_save(
                {
                    "setup": setup,
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "best_state": best_state,
                    **{key: getattr(result, key) for key in _RESUMED},
                },
                checkpoint_path,
            )
        if distributed:
            dist.barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{val_accuracy:.3f}")
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
            done = epoch + 1 == config.epochs or config.patience_spent(epoch + 1, result.best_epoch)
            result.interrupted = not done
            if result.interrupted:
                break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.train_seconds = time.perf_counter() - started
    return result


def _progress_bar(show: bool, epochs: int, start_epoch: int, description: str):
    """A tqdm bar over epochs, or ``None`` when hidden or tqdm is missing."""
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the [lab] extra; train silently without it
        return None
    return tqdm(
        total=epochs, initial=start_epoch, desc=description, leave=False, dynamic_ncols=True
    )
