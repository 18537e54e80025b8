"""``nn.Module`` wrappers: they store arguments and call the functions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import _reduction

from ._validate import check_choice, check_int, check_real, check_reduction
from .binary import binary_encouraging_loss_with_logits
from .bonus import Bonus
from .functional import encouraging_loss
from .peers import focal_loss, poly1_loss
from .schedules import BonusSchedule

__all__ = ["EncouragingLoss", "BinaryEncouragingLoss", "FocalLoss", "Poly1Loss"]


def _scheduled(name: str, value):
    """Split a float-or-schedule argument into (current value, schedule or None)."""
    if isinstance(value, BonusSchedule):
        return value(0.0), value
    if callable(value):
        raise TypeError(f"{name} must be a number or a BonusSchedule, got {type(value).__name__}")
    return value, None


class EncouragingLoss(nn.Module):
    """The encouraging loss as a drop-in for ``nn.CrossEntropyLoss``.

    Takes ``nn.CrossEntropyLoss``'s arguments, in its order, plus the bonus options of
    :func:`encouraging_loss` as keywords. ``bonus_scale`` and ``log_end`` may be a
    :class:`BonusSchedule`; then :meth:`step` sets them from training progress. The paper
    recommends ``log_end=0.75`` for tasks that reach high accuracy and ``0.5`` otherwise.

    Example:
        >>> import torch
        >>> from encouraging_loss import EncouragingLoss, BonusSchedule
        >>> criterion = EncouragingLoss(log_end=0.75, label_smoothing=0.1)
        >>> logits, target = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
        >>> criterion(logits, target).backward()
        >>> delayed = EncouragingLoss(bonus_scale=BonusSchedule(final=1.0, start=0.5))
        >>> delayed.bonus_scale, delayed.step(0.6), delayed.bonus_scale
        (0.0, None, 1.0)
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        log_end: float | BonusSchedule = 0.75,
        bonus_scale: float | BonusSchedule = 1.0,
        bonus: str = "log",
        bonus_gamma: float = 1.0,
        bonus_start: float = 0.0,
        bonus_weight: torch.Tensor | None = None,
        validate_args: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("bonus_weight", bonus_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.log_end, self.log_end_schedule = _scheduled("log_end", log_end)
        self.bonus_scale, self.bonus_schedule = _scheduled("bonus_scale", bonus_scale)
        self.bonus = bonus
        self.bonus_gamma = bonus_gamma
        self.bonus_start = bonus_start
        self.validate_args = validate_args
        self.backend = check_choice("backend", backend, ("auto", "torch", "triton"))
        # Fail early on bad options (the function checks them again on every call).
        Bonus(bonus, self.log_end, bonus_gamma, bonus_start)
        check_int("ignore_index", ignore_index)
        check_reduction(reduction)
        check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        check_real("bonus_scale", self.bonus_scale)

    def step(self, progress: float) -> None:
        """Set ``bonus_scale`` and ``log_end`` from their schedules at training progress [0, 1]."""
        if self.bonus_schedule is not None:
            self.bonus_scale = self.bonus_schedule(progress)
        if self.log_end_schedule is not None:
            self.log_end = self.log_end_schedule(progress)

    def keyword_options(self) -> dict:
        """The keyword-only options of :func:`encouraging_loss` as set now (after ``step``).

        For callers that pass this criterion's settings to another form of the loss, such as
        :func:`encouraging_loss.linear_encouraging_loss`.
        """
        return {
            "log_end": self.log_end,
            "bonus_scale": self.bonus_scale,
            "bonus": self.bonus,
            "bonus_gamma": self.bonus_gamma,
            "bonus_start": self.bonus_start,
            "bonus_weight": self.bonus_weight,
            "validate_args": self.validate_args,
            "backend": self.backend,
        }

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return encouraging_loss(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            **self.keyword_options(),
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"bonus={self.bonus!r}, log_end={self.log_end}, bonus_scale={self.bonus_scale}"
        )


class BinaryEncouragingLoss(nn.Module):
    """Module form of :func:`binary_encouraging_loss_with_logits` (same keywords)."""

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean", **options):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.options = options

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_encouraging_loss_with_logits(
            input, target, self.weight, self.reduction, **self.options
        )


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`."""

    def __init__(
        self,
        gamma: float = 2.0,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        validate_args: bool = True,
    ):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.validate_args = validate_args

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(
            input,
            target,
            self.gamma,
            self.weight,
            self.ignore_index,
            self.reduction,
            validate_args=self.validate_args,
        )


class Poly1Loss(nn.Module):
    """Module form of :func:`poly1_loss`."""

    def __init__(
        self,
        epsilon: float = 1.0,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        validate_args: bool = True,
    ):
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.validate_args = validate_args

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return poly1_loss(
            input,
            target,
            self.epsilon,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            validate_args=self.validate_args,
        )
