"""Class-index targets: the per-row arguments of the loss, and which row path computes it."""

from __future__ import annotations

import torch

from .rowwise import (
    ROW_DTYPE,
    DenseTargetEL,
    HardTargetEL,
    dense_target_grad_,
    dense_target_terms,
    hard_target_grad_,
    hard_target_terms,
)
from .smoothed import (
    SmoothedTargetEL,
    smoothed_path_supports,
    smoothed_target_grad_,
    smoothed_target_terms,
)


def target_weights(target: torch.Tensor, ignore_index: int, weight, dtype):
    """(valid, safe target, target weight) of class-index targets, in the target's shape.

    ``valid`` marks the items that count; the safe target is the target with ``ignore_index``
    replaced by class 0; the target weight is w_y (1 without class weights), 0 where ignored.
    Summed, the target weights are the "mean" reduction's denominator (as torch's).

    Args:
        target: int64 class indices or ``ignore_index``.
        ignore_index: the target value that contributes nothing.
        weight: optional (C,) class weights.
        dtype: the dtype of the target weights.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    if weight is None:
        return valid, safe_target, valid.to(dtype)
    return valid, safe_target, torch.where(valid, weight[safe_target].to(dtype), 0.0)


def row_token_weight(token_weight) -> torch.Tensor | None:
    """Checked per-element weights as (M,) float64 row weights (None stays None)."""
    return None if token_weight is None else token_weight.reshape(-1).to(ROW_DTYPE)


class IndexTargetRows:
    """The per-row arguments of the loss for class-index targets, sliceable into row chunks.

    Built once for the whole batch; :meth:`terms` computes row losses and the gradient buffer for
    any slice of rows, and :meth:`grad_` turns that buffer into the gradient.
    ``encouraging_loss`` uses it whole through the autograd Function of its kind, the fused
    linear path chunk by chunk. The kind: ``"hard"`` (no label smoothing,
    :class:`.rowwise.HardTargetEL`), ``"smoothed"`` (label smoothing with a bonus of bounded
    slope, :class:`.smoothed.SmoothedTargetEL`) or ``"dense"`` (label smoothing with any other
    bonus, :class:`.rowwise.DenseTargetEL`).

    Args:
        target: (M,) class indices or ``ignore_index``.
        num_classes: C.
        weight: optional (C,) class weights in the compute dtype.
        bonus_weight: optional (C,) bonus weights in the compute dtype.
        options: the loss options (ignore_index, label smoothing, the bonus).
        compute_dtype: float32 or float64, the dtype of the (M, C) passes.
        token_weight: optional per-row weights t (checked, the target's shape): they multiply
            every row's mass (a row of t = 0 counts as an ignored one: no loss, no gradient),
            and the denominator is sum_i t_i w_{y_i}.
    """

    def __init__(self, target, num_classes, weight, bonus_weight, options, compute_dtype,
                 token_weight=None):  # fmt: skip
        valid, safe_target, target_weight = target_weights(
            target.reshape(-1).long(), options.ignore_index, weight, ROW_DTYPE
        )
        row_weight = row_token_weight(token_weight)
        if row_weight is not None:
            target_weight = target_weight * row_weight
        #: The "mean" reduction's denominator: the summed target weights of non-ignored rows
        #: (times their token weights).
        self.denominator = target_weight.sum()
        self.num_rows = safe_target.numel()
        rho, bonus = options.bonus_scale, options.bonus_shape
        if options.label_smoothing == 0.0:
            self.kind = "hard"
        elif smoothed_path_supports(bonus, rho):
            self.kind = "smoothed"
        else:
            self.kind = "dense"
        self.target = safe_target.unsqueeze(1)
        self.tail = (rho, bonus, compute_dtype)
        if self.kind == "hard":
            row_bonus_weight = None if bonus_weight is None else bonus_weight[safe_target]
            self.row_vectors = (target_weight, row_bonus_weight)
        else:
            # Class mass a_k = w_k alpha + beta w_y [k = y], zero for ignored rows.
            if weight is None and self.kind == "dense":
                weight = torch.ones(num_classes, dtype=compute_dtype, device=target.device)
            alpha, beta = options.smoothing_masses(num_classes)
            row_alpha = valid.to(ROW_DTYPE) * alpha
            if row_weight is not None:
                row_alpha = row_alpha * row_weight
            self.class_vectors = (weight, bonus_weight)
            self.row_vectors = (row_alpha, beta * target_weight)

    def args(self, rows: slice = slice(None)) -> tuple:
        """The positional arguments after the logits of the terms function, for ``rows``."""
        target = self.target[rows]
        first, second = (None if v is None else v[rows] for v in self.row_vectors)
        if self.kind == "hard":
            return (target, first, second, *self.tail)
        weight, bonus_weight = self.class_vectors
        if self.kind == "smoothed":
            return (target, first, second, weight, bonus_weight, *self.tail)
        return (first, weight, None, None, target, second, bonus_weight, *self.tail)

    @property
    def function(self):
        """The autograd Function for whole-batch use."""
        return _ROW_FUNCTIONS[self.kind][0]

    def terms(self, logits: torch.Tensor, rows: slice, *, consume: bool = False):
        """(row losses, buffer, state) for the logits of ``rows`` (see the terms functions)."""
        return _ROW_FUNCTIONS[self.kind][1](logits, *self.args(rows), consume=consume)

    def grad_(self, buffer: torch.Tensor, state, grad_rows: torch.Tensor) -> torch.Tensor:
        """The buffer of :meth:`terms`, turned into the gradient in place (see ``*_grad_``)."""
        return _ROW_FUNCTIONS[self.kind][2](buffer, state, grad_rows)


#: kind -> (autograd Function, terms function, gradient function).
_ROW_FUNCTIONS = {
    "hard": (HardTargetEL, hard_target_terms, hard_target_grad_),
    "smoothed": (SmoothedTargetEL, smoothed_target_terms, smoothed_target_grad_),
    "dense": (DenseTargetEL, dense_target_terms, dense_target_grad_),
}
