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
and its gradient be computed without clamping even when p -> 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validate import check_choice, check_real

BONUS_SHAPES = ("log", "power", "cosine", "none")


@dataclass(frozen=True)
class Bonus:
    """A validated bonus shape.

    Args:
        kind: one of ``"log"``, ``"power"``, ``"cosine"``, ``"none"``.
        log_end: where the conservative log bonus turns linear, in (0, 1]; only shapes ``"log"``.
        gamma: exponent of the power bonus, > 0; only shapes ``"power"``.
        start: bonus_start in [0, 1): no bonus below this probability.
    """

    kind: str = "log"
    log_end: float = 0.75
    gamma: float = 1.0
    start: float = 0.0

    def __post_init__(self):
        check_choice("bonus", self.kind, BONUS_SHAPES)
        object.__setattr__(
            self, "log_end", check_real("log_end", self.log_end, low=0.0, high=1.0, low_open=True)
        )
        object.__setattr__(
            self, "gamma", check_real("bonus_gamma", self.gamma, low=0.0, low_open=True)
        )
        object.__setattr__(
            self, "start", check_real("bonus_start", self.start, low=0.0, high=1.0, high_open=True)
        )

    @property
    def is_zero(self) -> bool:
        return self.kind == "none"

    def _raw_value_float(self, p: float) -> float:
        """b(p) before truncation, in float64 Python arithmetic (for the bonus_start shift)."""
        if self.kind == "log":
            e = self.log_end
            if p > e:
                return math.log1p(-e) - (p - e) / (1.0 - e)
            return math.log1p(-p)
        if self.kind == "power":
            return -(p**self.gamma)
        if self.kind == "cosine":
            return -2.0 * math.sin(0.5 * math.pi * p) ** 2
        return 0.0

    def value_and_slope(self, p, one_minus_p, log_one_minus_p):
        """Return (b(p), g(p)) elementwise, with g = p (1 - p) b'(p).

        Args:
            p: probabilities.
            one_minus_p: 1 - p, computed accurately by the caller (not as ``1 - p``).
            log_one_minus_p: log(1 - p), computed accurately by the caller.
        """
        kind = self.kind
        if kind == "log":
            e = self.log_end
            value = log_one_minus_p
            slope = -p
            if e < 1.0:
                linear = p > e
                value = torch.where(linear, math.log1p(-e) - (p - e) / (1.0 - e), value)
                slope = torch.where(linear, slope * one_minus_p / (1.0 - e), slope)
        elif kind == "power":
            powered = p.pow(self.gamma)
            value = -powered
            slope = -self.gamma * one_minus_p * powered
        elif kind == "cosine":
            value = -2.0 * torch.sin((0.5 * math.pi) * p).square()
            slope = -math.pi * p * one_minus_p * torch.sin(math.pi * p)
        else:
            zero = torch.zeros_like(p)
            return zero, zero
        if self.start > 0.0:
            active = p >= self.start
            value = torch.where(active, value - self._raw_value_float(self.start), 0.0)
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
