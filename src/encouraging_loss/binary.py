"""The encouraging loss in sigmoid form, for multi-label classification and detection."""

from __future__ import annotations

import torch

from ._validate import check_choice, check_real, check_reduction, check_tensor
from .bonus import Bonus
from .ops.rowwise import softplus

__all__ = ["binary_encouraging_loss_with_logits"]

BASES = ("bce", "focal")


def binary_encouraging_loss_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    base: str = "bce",
    alpha: float | None = None,
    gamma: float = 2.0,
    log_end: float = 0.75,
    bonus_scale: float = 1.0,
    bonus: str = "log",
    bonus_gamma: float = 1.0,
    bonus_start: float = 0.0,
) -> torch.Tensor:
    """Binary (sigmoid) encouraging loss: BCE or focal loss plus a bonus on each binary decision.

    Each element is a two-class problem with p = sigmoid(input) and target t in [0, 1]:

    ``loss = alpha_t [ base + bonus_scale (t b(p) + (1 - t) b(1 - p)) ]``

    where ``base`` is ``-t log p - (1 - t) log(1 - p)`` (``"bce"``) or that times
    ``(1 - p_t)^gamma`` with ``p_t = p t + (1 - p)(1 - t)`` (``"focal"``, as
    ``torchvision.ops.sigmoid_focal_loss``), and ``alpha_t = alpha t + (1 - alpha)(1 - t)`` when
    ``alpha`` is given. log p and log(1 - p) are taken as ``-softplus(-x)`` and ``-softplus(x)``: no
    clamp, exact for confident logits.

    Args:
        input: logits of any shape.
        target: same shape, binary labels or probabilities in [0, 1] (floating dtype).
        weight: optional elementwise weight, broadcastable to ``input``.
        reduction: ``"mean"`` (over all elements), ``"sum"`` or ``"none"``.
        base: ``"bce"`` or ``"focal"``.
        alpha: class-balance weight of positives in [0, 1], or ``None``/negative for none
            (torchvision uses 0.25 with the focal base).
        gamma: focusing parameter of the focal base, >= 0.
        log_end: where the conservative log bonus turns linear, in (0, 1] (0.75 for tasks with
            high accuracy, 0.5 otherwise, as the paper recommends).
        bonus_scale, bonus, bonus_gamma, bonus_start: as in :func:`encouraging_loss`.

    Example:
        >>> import torch
        >>> from encouraging_loss import binary_encouraging_loss_with_logits
        >>> logits = torch.tensor([[3.0, -1.0], [0.2, 2.0]])
        >>> labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(binary_encouraging_loss_with_logits(logits, labels).item(), 4)
        -1.1826
    """
    check_tensor("input", input, floating=True)
    check_tensor("target", target, floating=True)
    if target.shape != input.shape:
        raise ValueError(
            f"target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    check_reduction(reduction)
    check_choice("base", base, BASES)
    gamma = check_real("gamma", gamma, low=0.0)
    if alpha is not None and alpha >= 0:
        alpha = check_real("alpha", alpha, low=0.0, high=1.0)
    else:
        alpha = None
    rho = check_real("bonus_scale", bonus_scale)
    shape = Bonus(bonus, log_end, bonus_gamma, bonus_start)
    if weight is not None:
        check_tensor("weight", weight, floating=True)
        try:
            torch.broadcast_shapes(weight.shape, input.shape)
        except RuntimeError:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not broadcast to the input's shape "
                f"{tuple(input.shape)}"
            ) from None

    x = input.float() if input.dtype in (torch.half, torch.bfloat16) else input
    t = target.to(x.dtype)
    log_p, log_one_minus_p = -softplus(-x), -softplus(x)
    p, one_minus_p = torch.sigmoid(x), torch.sigmoid(-x)
    loss = -t * log_p - (1.0 - t) * log_one_minus_p
    if base == "focal":
        p_t = p * t + one_minus_p * (1.0 - t)
        loss = loss * (1.0 - p_t).pow(gamma)
    if not shape.is_zero and rho != 0.0:
        bonus_positive, _ = shape.value_and_slope(p, one_minus_p, log_one_minus_p)
        bonus_negative, _ = shape.value_and_slope(one_minus_p, p, log_p)
        loss = loss + rho * (t * bonus_positive + (1.0 - t) * bonus_negative)
    if alpha is not None:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum() if reduction == "sum" else loss.mean()
    return total.to(input.dtype)
