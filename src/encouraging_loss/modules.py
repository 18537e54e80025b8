"""``nn.Module`` wrappers: they store arguments and call the functions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import _reduction

from ._validate import check_bool
from .binary import binary_encouraging_loss_with_logits
from .functional import encouraging_loss_with_options
from .options import CROSS_ENTROPY_OPTIONS, LossOptions, option_attributes, takes_options
from .peers import focal_loss, poly1_loss
from .schedules import scheduled_options, take_schedules

__all__ = ["EncouragingLoss", "BinaryEncouragingLoss", "FocalLoss", "Poly1Loss"]


@option_attributes(LossOptions)
class EncouragingLoss(nn.Module):
    """The encouraging loss as a drop-in for ``nn.CrossEntropyLoss``.

    Takes ``nn.CrossEntropyLoss``'s arguments, in its order, plus the options of
    :class:`~encouraging_loss.options.LossOptions` as keywords, checked here once: ``forward``
    checks only the tensors. Each option is an attribute (``criterion.bonus_scale``; setting one
    checks it). ``bonus_scale`` and ``log_end`` may be a :class:`BonusSchedule`; then
    :meth:`step` sets them from training progress. The paper recommends ``log_end=0.75`` for
    tasks that reach high accuracy and ``0.5`` otherwise.

    Args:
        weight: optional (C,) class weights (a buffer).
        size_average: deprecated, as in ``nn.CrossEntropyLoss``.
        ignore_index: class-index target value that contributes nothing.
        reduce: deprecated, as in ``nn.CrossEntropyLoss``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1].
        bonus_weight: optional (C,) per-class bonus weights (a buffer).
        return_lse: ``forward`` returns ``(loss, lse)``, lse the logsumexp of each element's
            logits (see :func:`encouraging_loss`).
        **options: the other options of :class:`~encouraging_loss.options.LossOptions`
            (``log_end`` and ``bonus_scale`` also as a :class:`BonusSchedule`; ``z_loss``,
            ``softcap``).

    Example:
        >>> import torch
        >>> from encouraging_loss import EncouragingLoss, BonusSchedule
        >>> criterion = EncouragingLoss(log_end=0.75, label_smoothing=0.1)
        >>> logits, target = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
        >>> criterion(logits, target).backward()
        >>> token_weight = torch.rand(8)  # per-element weights: a call argument, as the target
        >>> criterion(logits, target, token_weight=token_weight).shape
        torch.Size([])
        >>> delayed = EncouragingLoss(bonus_scale=BonusSchedule(final=1.0, start=0.5))
        >>> delayed.bonus_scale, delayed.step(0.6), delayed.bonus_scale
        (0.0, None, 1.0)
        >>> capped = EncouragingLoss(z_loss=1e-4, softcap=30.0, return_lse=True)
        >>> loss, lse = capped(logits, target)
        >>> lse.shape
        torch.Size([8])
    """

    @takes_options(LossOptions)
    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        bonus_weight: torch.Tensor | None = None,
        return_lse: bool = False,
        **options,
    ):
        super().__init__()
        self.return_lse = check_bool("return_lse", return_lse)
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("bonus_weight", bonus_weight)
        self.log_end_schedule, self.bonus_schedule = take_schedules(options)
        self.options = LossOptions(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            **options,
        )  # fmt: skip

    def step(self, progress: float) -> None:
        """Set ``bonus_scale`` and ``log_end`` from their schedules at training progress [0, 1]."""
        self.options = scheduled_options(
            self.options, progress, self.bonus_schedule, self.log_end_schedule
        )

    def keyword_options(self) -> dict:
        """The keyword-only options of :func:`encouraging_loss` as set now (after ``step``).

        For callers that pass this criterion's settings to another form of the loss, such as
        :func:`encouraging_loss.linear_encouraging_loss`.
        """
        names = LossOptions.option_names()[len(CROSS_ENTROPY_OPTIONS) :]
        return {
            **{name: getattr(self.options, name) for name in names},
            "bonus_weight": self.bonus_weight,
        }

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of ``input`` for ``target`` (see :func:`encouraging_loss`); ``token_weight``:
        optional per-element weights of the target's index shape (a call argument: it depends
        on the batch)."""
        return encouraging_loss_with_options(
            input, target, self.options, self.weight, self.bonus_weight, token_weight,
            self.return_lse,
        )  # fmt: skip

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
