"""Schedules for the bonus scale (or log_end) over training.

The paper enables the bonus late on some tasks (graphs, translation) and ramps it in. A schedule
maps training progress t in [0, 1] (or an epoch) to a value: ``initial`` until ``start``, then a
ramp of length ``ramp`` (both fractions of training) to ``final``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._validate import check_choice, check_int, check_real

RAMP_SHAPES = ("linear", "exp", "cosine", "step")


@dataclass(frozen=True)
class BonusSchedule:
    """A delayed ramp from ``initial`` to ``final``.

    Args:
        final: the value reached at the end of the ramp (e.g. the bonus scale rho).
        start: training progress in [0, 1] before which the value stays ``initial`` (the delay).
        ramp: length of the ramp as a fraction of training, in [0, 1]; 0 switches at ``start``.
        shape: ``"linear"``, ``"exp"`` (the sigmoid-shaped exp(-5 (1 - r)^2) ramp), ``"cosine"``
            (half a cosine) or ``"step"`` (jump to ``final`` at ``start``).
        initial: the value before ``start``.

    Example:
        >>> from encouraging_loss import BonusSchedule
        >>> schedule = BonusSchedule(final=1.0, start=0.5, ramp=0.25, shape="linear")
        >>> [schedule(t) for t in (0.0, 0.5, 0.625, 0.75, 1.0)]
        [0.0, 0.0, 0.5, 1.0, 1.0]
        >>> schedule.at_epoch(5, num_epochs=10)
        0.0
    """

    final: float = 1.0
    start: float = 0.0
    ramp: float = 0.0
    shape: str = "linear"
    initial: float = 0.0

    def __post_init__(self):
        check_real("final", self.final)
        check_real("initial", self.initial)
        check_real("start", self.start, low=0.0, high=1.0)
        check_real("ramp", self.ramp, low=0.0, high=1.0)
        check_choice("shape", self.shape, RAMP_SHAPES)

    def fraction(self, progress: float) -> float:
        """How far along the ramp training is at ``progress``, in [0, 1]."""
        progress = check_real("progress", progress, low=0.0, high=1.0)
        if progress < self.start:
            return 0.0
        if self.shape == "step" or progress >= self.start + self.ramp:
            return 1.0
        r = (progress - self.start) / self.ramp
        if self.shape == "linear":
            return r
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * r))
        return math.exp(-5.0 * (1.0 - r) ** 2)

    def __call__(self, progress: float) -> float:
        return self.initial + (self.final - self.initial) * self.fraction(progress)

    def at_epoch(self, epoch: int, num_epochs: int) -> float:
        """The value for 0-based ``epoch`` of ``num_epochs`` (progress = epoch / num_epochs)."""
        check_int("epoch", epoch)
        check_int("num_epochs", num_epochs)
        if num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {num_epochs}")
        if not 0 <= epoch <= num_epochs:
            raise ValueError(f"epoch must be in [0, num_epochs={num_epochs}], got {epoch}")
        return self(epoch / num_epochs)


def take_schedules(options: dict) -> tuple[BonusSchedule | None, BonusSchedule | None]:
    """Take the schedules out of a loss's keyword options: a :class:`BonusSchedule` given as
    ``log_end`` or ``bonus_scale`` is replaced, in ``options``, by its value at progress 0.

    Returns:
        (the ``log_end`` schedule, the ``bonus_scale`` schedule), None where a number was given.

    Raises:
        TypeError: for a callable that is not a :class:`BonusSchedule`.
    """
    schedules = []
    for name in ("log_end", "bonus_scale"):
        value = options.get(name)
        if isinstance(value, BonusSchedule):
            options[name] = value(0.0)
        elif callable(value):
            raise TypeError(
                f"{name} must be a number or a BonusSchedule, got {type(value).__name__}"
            )
        schedules.append(value if isinstance(value, BonusSchedule) else None)
    return schedules[0], schedules[1]


def scheduled_options(options, progress: float, bonus_schedule, log_end_schedule):
    """``options`` (a :class:`~encouraging_loss.options.LossOptions`) with ``bonus_scale`` and
    ``log_end`` set from their schedules (None: unscheduled) at training progress [0, 1]."""
    changes = {}
    if bonus_schedule is not None:
        changes["bonus_scale"] = bonus_schedule(progress)
    if log_end_schedule is not None:
        changes["log_end"] = log_end_schedule(progress)
    return options.replace(**changes) if changes else options
