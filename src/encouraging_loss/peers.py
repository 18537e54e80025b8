"""Peers for comparison, with the conventions of ``F.cross_entropy``: focal loss and Poly-1.

Both take class-index targets, class ``weight``, ``ignore_index`` and ``reduction`` exactly as
``F.cross_entropy`` does ("mean" divides by the summed weight of the non-ignored targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import (
    check_class_vector,
    check_input_and_target,
    check_int,
    check_real,
    check_reduction,
    check_target_range,
    value_checks_enabled,
)

__all__ = ["focal_loss", "poly1_loss"]


def _index_rows(input, target, weight, ignore_index, reduction, validate_args, name):
    """Shared checks; returns (log-probabilities, log p_y, valid mask, target weight)."""
    if not check_input_and_target(input, target):
        raise ValueError(f"{name} takes class-index targets, got floating-point target")
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    weight = check_class_vector("weight", weight, num_classes, input)
    if value_checks_enabled(validate_args):
        check_target_range(target, num_classes, ignore_index)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).long()
    class_dim = 1 if input.dim() > 1 else 0
    log_p = F.log_softmax(
        input.float() if input.dtype in (torch.half, torch.bfloat16) else input, dim=class_dim
    )
    log_p_target = log_p.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
    target_weight = valid.to(log_p.dtype)
    if weight is not None:
        target_weight = target_weight * weight.to(log_p.dtype)[safe_target]
    return log_p, log_p_target, valid, target_weight


def _reduce(per_item, target_weight, reduction, dtype):
    if reduction == "none":
        return per_item.to(dtype)
    total = per_item.sum()
    if reduction == "mean":
        total = total / target_weight.sum()
    return total.to(dtype)


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    validate_args: bool = True,
) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017): ``-w_y (1 - p_y)^gamma log p_y``.

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices, shaped as for ``F.cross_entropy``.
        gamma: focusing parameter, >= 0 (0 gives cross-entropy).
        weight, ignore_index, reduction: as in ``F.cross_entropy``.
        validate_args: check class indices are in range (syncs a GPU).

    Example:
        >>> import torch
        >>> from encouraging_loss import focal_loss
        >>> logits, target = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])
        >>> round(focal_loss(logits, target, gamma=2.0).item(), 5)
        0.01109
    """
    gamma = check_real("gamma", gamma, low=0.0)
    _, log_p_target, valid, target_weight = _index_rows(
        input, target, weight, ignore_index, reduction, validate_args, "focal_loss"
    )
    # 1 - p_y = -expm1(log p_y): no cancellation for confident predictions.
    modulation = (-torch.expm1(log_p_target)).pow(gamma)
    per_item = torch.where(valid, -target_weight * modulation * log_p_target, 0.0)
    return _reduce(per_item, target_weight, reduction, input.dtype)


def poly1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    epsilon: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate_args: bool = True,
) -> torch.Tensor:
    """Poly-1 loss (Leng et al., 2022): cross-entropy plus ``epsilon * w_y (1 - p_t)``.

    ``p_t`` is the probability of the (smoothed) target distribution, as in the paper's code.

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices, shaped as for ``F.cross_entropy``.
        epsilon: weight of the first polynomial term (may be negative, > -1 keeps it convex).
        weight, ignore_index, reduction, label_smoothing: as in ``F.cross_entropy``.
        validate_args: check class indices are in range (syncs a GPU).

    Example:
        >>> import torch
        >>> from encouraging_loss import poly1_loss
        >>> logits, target = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])
        >>> round(poly1_loss(logits, target, epsilon=1.0).item(), 5)
        0.45571
    """
    epsilon = check_real("epsilon", epsilon)
    smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    log_p, log_p_target, valid, target_weight = _index_rows(
        input, target, weight, ignore_index, reduction, validate_args, "poly1_loss"
    )
    class_dim = 1 if input.dim() > 1 else 0
    num_classes = input.shape[class_dim]
    cross_entropy = F.cross_entropy(
        log_p,
        target,
        weight=None if weight is None else weight.to(log_p.dtype),
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=smoothing,
    )
    p_target = (1.0 - smoothing) * log_p_target.exp() + smoothing / num_classes
    per_item = torch.where(valid, cross_entropy + epsilon * target_weight * (1.0 - p_target), 0.0)
    return _reduce(per_item, target_weight, reduction, input.dtype)
