"""Label-smoothed class-index targets at cross-entropy's cost: a few cheap passes, no arg-max.

The class mass of row i is a_ik = alpha_i w_k + beta_i [k = y_i] (alpha = eps / C for the
non-ignored rows, beta = (1 - eps) w_y). Off the target a class carries only the smoothing mass
alpha w_k, and the conservative log bonus (log_end = e < 1) has a bounded slope, so the bonus of
those classes,

    b(p_k) = log(1 - min(p_k, e)) - relu(p_k - e) / (1 - e),

may come from the rounded p_k: it errs by about a unit of 1 per class, alpha-weighted, as torch's
own smoothing term does. The target's terms are exact row quantities (the statistics of
:func:`.rowwise.softmax_with_target_stats`). So, unlike the general dense path of
:mod:`.rowwise`, no row needs its arg-max, and every (M, C) pass after the softmax is one
elementwise op or reduction. On CPU those passes run block by block over a few hundred rows that
stay in cache, with one small scratch block instead of a second (M, C) buffer: the extra memory is
the single buffer that becomes the gradient, as for hard targets. There, too, the cap at e is
skipped in the rows that cannot reach it (no class past e off y), and the few rows that can are
redone exactly afterwards (:func:`_fix_rows`); on a GPU and under ``torch.compile`` every row takes
the capped form, which needs no data-dependent shapes.

Gradient, with V_k = p_k / (1 - min(p_k, e)) (= -r_k, r = p b'(p)), A' = alpha sum_{k != y} w_k
and H' = -rho alpha sum_{k != y} w_k v_k V_k:

    dL/dz_k = p_k (A - H) - alpha w_k - rho alpha w_k v_k V_k   (k != y),
    A - H = A' - H' + a_y (1 - rho v_y r_y),
    dL/dz_y = p_y (A' - H') - a_y [(1 - p_y) - rho v_y g_y],   g = p (1 - p) b'(p).
"""

from __future__ import annotations

import torch

from ..bonus import Bonus
from .rowwise import (
    ROW_DTYPE,
    block_rows,
    cpu_eager,
    rows_as,
    rows_function,
    softmax_with_target_stats,
    sum_into,
)


def smoothed_path_supports(bonus: Bonus, rho: float) -> bool:
    """Whether this path computes the bonus: bounded slope and no truncation (or no bonus)."""
    if bonus.is_zero or rho == 0.0:
        return True
    return bonus.kind == "log" and bonus.log_end < 1.0 and bonus.start == 0.0


class _Bound:
    """log_end e as 0-d tensors of the buffer's dtype, for 1 - p and its cap at 1 - e.

    Tensors rather than floats: backward's state holds tensors only, and a compiled backward then
    needs no host value.
    """

    def __init__(self, end: torch.Tensor):
        self.end, self.one = end, end.new_ones(())
        self.floor = self.one - end

    def bounded_into(self, block: torch.Tensor, out: torch.Tensor, exact: bool) -> torch.Tensor:
        """1 - min(p, e) = max(1 - p, 1 - e) into ``out``; just 1 - p unless ``exact``.

        ``exact=False`` is for rows with no class past e off y, where the two agree.
        """
        bounded = torch.sub(self.one, block, out=out)
        return bounded.clamp_min_(self.floor) if exact else bounded


def _times(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """The product of two optional class vectors (None stands for ones)."""
    if first is None or second is None:
        return second if first is None else first
    return first * second


def smoothed_target_terms(
    logits,
    target,
    row_alpha,
    target_mass,
    class_weight,
    bonus_weight,
    rho,
    bonus,
    compute_dtype,
    *,
    consume=False,
):
    """Row losses, the buffer (the softmax with 0 at y) and the terms backward needs.

    Args:
        logits: (..., C) logits, class dimension last.
        target: (M, 1) int64 class indices in range.
        row_alpha: (M,) float64 alpha_i, the smoothing mass per unit class weight (0 if ignored).
        target_mass: (M,) float64 beta_i, the target's extra mass (0 if ignored).
        class_weight: (C,) w in the compute dtype, or None for ones.
        bonus_weight: (C,) v in the compute dtype, or None for ones.
        rho: the bonus scale.
        bonus: a :class:`Bonus` that :func:`smoothed_path_supports`.
        compute_dtype: dtype of the (M, C) passes.
        consume: the buffer may be ``logits`` itself (see :func:`.rowwise.working_rows`).
    """
    num_classes = logits.shape[-1]
    flat_target = target.squeeze(1)
    with_bonus = not (bonus.is_zero or rho == 0.0)
    bonus_sums = bound = class_bonus = None
    if with_bonus:
        e = bonus.log_end
        class_bonus = _times(class_weight, bonus_weight)
        bound = _Bound(torch.full((), e, dtype=compute_dtype, device=logits.device))
        num_rows = logits.numel() // max(num_classes, 1)
        step = block_rows(num_rows, num_classes, logits.device)
        bonus_sums = _BonusSums(bound, e, class_bonus, num_rows, step)
    stats = softmax_with_target_stats(
        logits, target, compute_dtype, consume, logit_weights=class_weight,
        per_block=bonus_sums, step=None if bonus_sums is None else bonus_sums.step,
    )  # fmt: skip
    probs, rest_sum, p_max, neg_log_p = stats.probs, stats.rest_sum, stats.p_max, stats.neg_log_p
    p, one_minus_p = stats.p, stats.one_minus_p
    if class_weight is None:
        weight_sum, w_target = float(num_classes), 1.0
    else:
        weight_sum = class_weight.sum(dtype=ROW_DTYPE)
        w_target = class_weight[flat_target].to(ROW_DTYPE)
    alpha = row_alpha
    mass_target = alpha * w_target + target_mass
    mass_rest = alpha * (weight_sum - w_target)
    # Cross-entropy: sum_k a_k (logsumexp z - z_k).
    row_loss = alpha * (weight_sum * stats.log_sum_exp - stats.z_weighted) + target_mass * neg_log_p

    bonus_alpha = None
    target_term = mass_target
    target_push = mass_target * one_minus_p
    fix_rows = None
    if with_bonus:
        log_sum, excess, fix_rows = bonus_sums.result(probs, p_max, rest_sum)
        bonus_alpha = rho * alpha
        row_loss = row_loss + bonus_alpha * (log_sum - excess / (1.0 - e))
        v_target = 1.0 if bonus_weight is None else bonus_weight[flat_target].to(ROW_DTYPE)
        b_target, g_target = bonus.value_and_slope(p, one_minus_p, one_minus_p.log())
        target_bonus = mass_target * v_target
        row_loss = row_loss + rho * torch.where(target_bonus != 0, target_bonus * b_target, 0.0)
        # r_y = p b'(p) = -p / (1 - min(p, e)).
        r_target = -p / one_minus_p.clamp_min(1.0 - e)
        target_term = mass_target * (1.0 - rho * v_target * r_target)
        target_push = mass_target * (one_minus_p - rho * v_target * g_target)
    row_active = (alpha * weight_sum + target_mass) != 0
    row_loss = torch.where(row_active, row_loss, 0.0)
    state = (
        row_active, target, alpha, bonus_alpha, None if bound is None else bound.end,
        fix_rows, class_weight, class_bonus, mass_rest, target_term, target_push, p,
    )  # fmt: skip
    return row_loss, probs, state


def _fix_rows(p_max: torch.Tensor, rest_sum: torch.Tensor, e: float, device) -> torch.Tensor:
    """Indices of the rows that may have a class past e off y, or None to treat all rows so.

    Off y every p_k <= min(max p, sum_{k != y} p) (0 at y), so other rows have none: their
    bonus is log(1 - p_k) throughout and the cap at 1 - e can be skipped. On CPU the few
    others are redone exactly; on a GPU (and while compiling) every row takes the exact form,
    which needs no data-dependent shapes.
    """
    if not cpu_eager(device):
        return None
    return (torch.minimum(p_max, rest_sum) > e).nonzero().squeeze(1)


class _BonusSums:
    """Row sums over k != y of the bonus, one row block of probabilities (0 at y) at a time.

    Called by :func:`.rowwise.softmax_with_target_stats` on each block while it is in cache;
    :meth:`result` gives (sum_k w_k v_k log(1 - min(p_k, e)), sum_k w_k v_k relu(p_k - e)).
    """

    def __init__(self, bound: _Bound, e: float, class_bonus, num_rows: int, step: int):
        self.bound, self.e, self.class_bonus, self.step = bound, e, class_bonus, step
        self.exact = not cpu_eager(bound.one.device)  # see _fix_rows
        self.sums = bound.one.new_zeros(2, num_rows)
        self.log_blocks, self.excess_blocks = self.sums[0].split(step), self.sums[1].split(step)
        self.scratch = None

    def __call__(self, index: int, block: torch.Tensor) -> None:
        if self.scratch is None:
            self.scratch = torch.empty_like(block)
        log_sum, excess = self.log_blocks[index], self.excess_blocks[index]
        self._sum_block(block, self.scratch[: block.shape[0]], log_sum, excess, self.exact)

    def _sum_block(self, block, scratch, log_sum, excess, exact: bool) -> None:
        bounded = self.bound.bounded_into(block, scratch, exact)
        sum_into(bounded.log_(), self.class_bonus, log_sum)
        if exact:
            past_end = torch.sub(block, self.bound.end, out=scratch).clamp_min_(0.0)
            sum_into(past_end, self.class_bonus, excess)

    def result(self, probs: torch.Tensor, p_max: torch.Tensor, rest_sum: torch.Tensor):
        """(log sum, excess) as float64 rows, and the rows redone exactly (see _fix_rows)."""
        fix_rows = _fix_rows(p_max, rest_sum, self.e, probs.device)
        if fix_rows is not None and fix_rows.numel() > 0:
            fixed = self.sums.new_empty(2, fix_rows.numel())
            rows = probs[fix_rows]
            self._sum_block(rows, torch.empty_like(rows), fixed[0], fixed[1], True)
            self.sums[:, fix_rows] = fixed
        sums = self.sums.to(ROW_DTYPE)
        return sums[0], sums[1], fix_rows


def smoothed_target_grad_(buffer: torch.Tensor, state, grad_rows: torch.Tensor) -> torch.Tensor:
    """Turn the buffer of :func:`smoothed_target_terms` into the gradient of the logits, in place.

    Args:
        buffer: (M, C) softmax with 0 at y, as the terms function left it.
        state: the row terms the terms function returned with it.
        grad_rows: (M,) incoming gradient of each row loss (any value for ignored rows).

    Returns:
        ``buffer``, now dL/dz scaled row-wise by ``grad_rows``.
    """
    (
        row_active, target, alpha, bonus_alpha, end, fix_rows, class_weight, class_bonus,
        mass_rest, target_term, target_push, p,
    ) = state  # fmt: skip
    # An ignored row has a constant loss: zero gradient (see HardTargetEL).
    grad_rows = torch.where(row_active, grad_rows, 0.0)
    # Off y: p_k (c_fixed + c_ratio h) - c_ratio w_k v_k V_k - alpha w_k, per row, where
    # h = sum_k w_k v_k V_k is known once V is.
    c_fixed = rows_as(buffer, grad_rows * (mass_rest + target_term))
    c_smooth = rows_as(buffer, grad_rows * alpha)
    rest_push = mass_rest  # A' - H'
    if bonus_alpha is None:
        buffer.mul_(c_fixed)
        _subtract_smoothing_(buffer, c_smooth, class_weight)
    else:
        c_ratio = rows_as(buffer, grad_rows * bonus_alpha)
        rows_grad = _RowsGrad(end, class_weight, class_bonus)
        ratio_sum = buffer.new_empty(buffer.shape[0], 1)
        fixed = None
        if fix_rows is not None and fix_rows.numel() > 0:
            # Their probabilities, before the fast pass below overwrites them.
            fixed = buffer[fix_rows]
        step = block_rows(buffer.shape[0], buffer.shape[1], buffer.device)
        scratch = buffer.new_empty(min(step, buffer.shape[0]), buffer.shape[1])
        columns = (buffer, c_fixed, c_ratio, c_smooth, ratio_sum)
        blocks = zip(*(t.split(step) for t in columns), strict=True)
        for block, *columns in blocks:
            rows_grad(block, scratch[: block.shape[0]], *columns, exact=fix_rows is None)
        if fixed is not None:
            columns = (t[fix_rows] for t in (c_fixed, c_ratio, c_smooth))
            fixed_sum = ratio_sum.new_empty(fix_rows.numel(), 1)
            rows_grad(fixed, torch.empty_like(fixed), *columns, fixed_sum, exact=True)
            buffer[fix_rows] = fixed
            ratio_sum[fix_rows] = fixed_sum
        rest_push = mass_rest + bonus_alpha * ratio_sum.squeeze(1).to(ROW_DTYPE)
    target_grad = grad_rows * (p * rest_push - target_push)
    buffer.scatter_(1, target, rows_as(buffer, target_grad))
    return buffer


class _RowsGrad:
    """The gradient off y for a block of rows with the bonus, in place (see the module)."""

    def __init__(self, end, class_weight, class_bonus):
        self.bound = _Bound(end)
        self.class_weight, self.class_bonus = class_weight, class_bonus

    def __call__(self, block, scratch, c_fixed, c_ratio, c_smooth, ratio_sum, *, exact: bool):
        """``block`` (probabilities, 0 at y) becomes the gradient off y; ``ratio_sum`` gets
        h = sum_k w_k v_k V_k per row, which the target's entry needs."""
        bounded = self.bound.bounded_into(block, scratch, exact)
        ratio = torch.div(block, bounded, out=bounded)
        if self.class_bonus is not None:
            ratio.mul_(self.class_bonus)
        h = torch.sum(ratio, 1, keepdim=True, out=ratio_sum)
        block.mul_(torch.addcmul(c_fixed, c_ratio, h))
        block.addcmul_(ratio, c_ratio, value=-1.0)
        _subtract_smoothing_(block, c_smooth, self.class_weight)


def _subtract_smoothing_(block: torch.Tensor, c_smooth: torch.Tensor, class_weight) -> None:
    """block -= c_smooth w (the -a_k of the gradient off y), in place."""
    if class_weight is None:
        block.sub_(c_smooth)
    else:
        block.addr_(c_smooth.squeeze(1), class_weight, alpha=-1.0)


SmoothedTargetEL = rows_function(
    "SmoothedTargetEL",
    smoothed_target_terms,
    smoothed_target_grad_,
    """Class-index targets with label smoothing (see the module docstring for the maths).

Inputs: logits (..., C), then the arguments of :func:`smoothed_target_terms`.
Output: (M,) float64 row losses.
""",
)
