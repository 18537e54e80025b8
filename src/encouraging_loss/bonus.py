"""The bonus shapes b(p) of the encouraging loss.

Every shape is decreasing on [0, 1] with b(0) = 0, so adding ``bonus_scale * b(p_y)`` to
cross-entropy rewards confident correct predictions instead of ignoring them:

* ``"log"``: b(p) = log(1 - p). With ``log_end < 1`` it is *conservative*: for p > log_end it
  follows the tangent line of log(1 - p) at log_end, so it stays bounded below. The paper
  recommends ``log_end=0.75`` for tasks that reach high accuracy and ``0.5`` otherwise;
  ``log_end=1`` is the plain log bonus (unbounded, can diverge at CE's learning rate).
* ``"power"``: b(p) = -p**gamma.
* ``"cosine"``: b(p) = cos(pi p) - 1.
* ``"none"``: b = 0 (the loss is cross-entropy).

``bonus_start`` truncates any shape: no bonus for p < bonus_start, and b(p) - b(bonus_start)
above it, so the loss stays continuous.

Each shape gives, elementwise, the pair (b(p), g(p)) with g(p) = p (1 - p) b'(p): the derivative of
b(p_k) with respect to the logit z_k. Both are bounded for every shape, which is what lets the loss
and its gradient be computed without clamping even when p -> 1. The shapes whose r(p) = p b'(p)
is bounded too (all but the plain log bonus) also give (b(p), r(p)) from the rounded p alone,
which the small-problem path uses. The shapes live in :data:`SHAPES`, one entry each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._validate import check_choice, check_real


def _log_terms(bonus: Bonus, p, one_minus_p, log_one_minus_p):
    e = bonus.log_end
    value = log_one_minus_p
    slope = -p
    if e < 1.0:
        linear = p > e
        value = torch.where(linear, math.log1p(-e) - (p - e) / (1.0 - e), value)
        slope = torch.where(linear, slope * one_minus_p / (1.0 - e), slope)
    return value, slope


def _log_ratio(bonus: Bonus, p, one_minus_p):
    # With u = max(1 - p, 1 - e): b = log u - (u - (1 - p)) / (1 - e) and r = -p / u, on both
    # sides of log_end.
    floor = 1.0 - bonus.log_end
    bounded = one_minus_p.clamp_min(floor)
    value = torch.add(bounded.log(), bounded - one_minus_p, alpha=-1.0 / floor)
    return value, torch.div(p, bounded).neg_()


def _power_terms(bonus: Bonus, p, one_minus_p, log_one_minus_p):
    powered = p.pow(bonus.gamma)
    return -powered, -bonus.gamma * one_minus_p * powered


def _power_ratio(bonus: Bonus, p, one_minus_p):
    value = (p if bonus.gamma == 1.0 else p.pow(bonus.gamma)).neg()
    return value, value * bonus.gamma


def _cosine_terms(bonus: Bonus, p, one_minus_p, log_one_minus_p):
    value = -2.0 * torch.sin((0.5 * math.pi) * p).square()
    return value, -math.pi * p * one_minus_p * torch.sin(math.pi * p)


def _cosine_ratio(bonus: Bonus, p, one_minus_p):
    value = -2.0 * torch.sin((0.5 * math.pi) * p).square()
    return value, -math.pi * p * torch.sin(math.pi * p)


def _no_terms(bonus: Bonus, p, *rest):
    zero = torch.zeros_like(p)
    return zero, zero


class Shape(NamedTuple):
    """The formulas of one bonus shape, before ``bonus_start``'s truncation.

    ``terms(bonus, p, 1 - p, log(1 - p))`` gives (b(p), g(p)), g = p (1 - p) b'(p): every path
    can compute a shape that has it (the rows of :mod:`.ops.rowwise` treat each row's largest p
    exactly from these). ``ratio(bonus, p, 1 - p)`` gives (b(p), r(p)), r = p b'(p), from the
    rounded p alone: only for a shape whose r is bounded (``bounded(bonus)``), where that
    rounding costs no more than cross-entropy's own; without it the small-problem path
    (:mod:`.ops.small`) leaves the shape to the row paths.
    """

    terms: Callable
    ratio: Callable | None = None
    bounded: Callable[[Bonus], bool] = lambda bonus: True


#: The bonus shapes by name. A new shape added here runs on the torch paths; the Triton kernels
#: refuse it (by name, see ``ops.triton_el.triton_supports``) until they have its code.
SHAPES: dict[str, Shape] = {
    "log": Shape(_log_terms, _log_ratio, lambda bonus: bonus.log_end < 1.0),
    "power": Shape(_power_terms, _power_ratio),
    "cosine": Shape(_cosine_terms, _cosine_ratio),
    "none": Shape(_no_terms, _no_terms),
}


@dataclass(frozen=True)
class Bonus:
    """A validated bonus shape.

    Args:
        kind: a name in :data:`SHAPES`: ``"log"``, ``"power"``, ``"cosine"``, ``"none"``.
        log_end: where the conservative log bonus turns linear, in (0, 1]; only shapes ``"log"``.
        gamma: exponent of the power bonus, > 0; only shapes ``"power"``.
        start: bonus_start in [0, 1): no bonus below this probability.
    """

    kind: str = "log"
    log_end: float = 0.75
    gamma: float = 1.0
    start: float = 0.0
    #: b(start) before truncation: what ``bonus_start`` subtracts above it.
    start_value: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self):
        check_choice("bonus", self.kind, tuple(SHAPES))
        object.__setattr__(
            self, "log_end", check_real("log_end", self.log_end, low=0.0, high=1.0, low_open=True)
        )
        object.__setattr__(
            self, "gamma", check_real("bonus_gamma", self.gamma, low=0.0, low_open=True)
        )
        object.__setattr__(
            self, "start", check_real("bonus_start", self.start, low=0.0, high=1.0, high_open=True)
        )
        if self.start > 0.0:
            object.__setattr__(self, "start_value", self.raw_value(self.start))

    @property
    def is_zero(self) -> bool:
        return self.kind == "none"

    @property
    def has_bounded_ratio(self) -> bool:
        """Whether :meth:`value_and_ratio` computes this shape (its r = p b'(p) is bounded)."""
        shape = SHAPES[self.kind]
        return shape.ratio is not None and shape.bounded(self)

    def raw_value(self, p: float) -> float:
        """b(p) before truncation, in float64 (what ``bonus_start`` shifts by)."""
        probability = torch.tensor(p, dtype=torch.float64)
        value, _ = SHAPES[self.kind].terms(
            self, probability, 1.0 - probability, torch.log1p(-probability)
        )
        return float(value)

    def value_and_slope(self, p, one_minus_p, log_one_minus_p):
        """Return (b(p), g(p)) elementwise, with g = p (1 - p) b'(p).

        Args:
            p: probabilities.
            one_minus_p: 1 - p, computed accurately by the caller (not as ``1 - p``).
            log_one_minus_p: log(1 - p), computed accurately by the caller.
        """
        value, slope = SHAPES[self.kind].terms(self, p, one_minus_p, log_one_minus_p)
        return self._truncated(p, value, slope)

    def value_and_ratio(self, p, one_minus_p):
        """Return (b(p), r(p)) elementwise, r = p b'(p), for a shape :attr:`has_bounded_ratio`.

        Args:
            p: probabilities, as rounded as they come.
            one_minus_p: 1 - p (a bounded r needs no more accuracy than rounding gives).
        """
        value, ratio = SHAPES[self.kind].ratio(self, p, one_minus_p)
        return self._truncated(p, value, ratio)

    def _truncated(self, p, value, slope):
        if self.start > 0.0:
            active = p >= self.start
            value = torch.where(active, value - self.start_value, 0.0)
            slope = torch.where(active, slope, 0.0)
        return value, slope

    def rest_terms_(self, p: torch.Tensor):
        """Bonus terms for probabilities p <= 1/2 (every class but a row's arg-max), overwriting p.

        Returns ``(b, ratio)`` where ``b`` is b(p) and ``ratio`` is r(p) = p b'(p), or ``None``:
        then call :meth:`rest_ratio_` on ``b`` (after using it) to get r in place. The common
        shapes take this in-place route, which needs no further full-size buffer.
        """
        if self.start == 0.0 and self.kind == "log" and self.log_end >= 0.5:
            # p <= 1/2 <= log_end: the plain log region, b = log(1 - p).
            return p.neg_().log1p_(), None
        if self.start == 0.0 and self.kind == "power":
            return (p if self.gamma == 1.0 else p.pow_(self.gamma)).neg_(), None
        one_minus_p = 1.0 - p
        value, slope = self.value_and_slope(p, one_minus_p, torch.log1p(-p))
        ratio = slope / one_minus_p
        p.copy_(value)
        return p, ratio

    def rest_ratio_(self, b: torch.Tensor, fill_p) -> torch.Tensor:
        """r(p) = p b'(p) in place of ``b``, for the shapes :meth:`rest_terms_` left to it.

        Args:
            b: the values b(p) returned by :meth:`rest_terms_`, no longer needed.
            fill_p: writes p into the tensor it is given and returns it.
        """
        if self.kind == "log":
            # r = -p / (1 - p) = 1 - 1 / (1 - p): from p, cheaper than exp(-b).
            return fill_p(b).neg_().add_(1.0).reciprocal_().neg_().add_(1.0)
        # power: r = -gamma p**gamma = gamma b
        return b.mul_(self.gamma)
