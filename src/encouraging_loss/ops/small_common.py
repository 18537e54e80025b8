"""The small-problem path's commonest calls in the fewest operations.

Hard targets, or label smoothing, with the conservative log bonus, the "mean" or "sum" reduction
and no weights, on (N, C) CPU logits: :func:`hard_log_bonus_loss` computes them in about fifteen
torch operations and one autograd node (:mod:`.small`'s module docstring gives the exactness
argument: log p_y in float64, p_y - 1 from ``expm1``). At the sizes of :mod:`.small` each torch
operation costs microseconds whatever its size, so their count is the cost. Everything else, and
a call with an ignored or out-of-range target, takes :mod:`.small`'s general route.
"""

from __future__ import annotations

import functools

import torch

from ..options import LossOptions
from . import small

#: Whether :func:`hard_log_bonus_loss` takes the calls it supports (tests switch it off to
#: run the same calls through :class:`.small.SmallProblem`).
HARD_LOG_BONUS_FAST = True
#: The most logits the smoothed case takes (its float64 passes outgrow the general path's).
SMOOTHED_FAST_MAX_ELEMENTS = 1 << 15


def _hard_log_bonus_terms(input, target, rho: float, floor: float, scale: float):
    """(the loss as a float, its gradient for a unit incoming gradient, in the input's shape and
    dtype) of a :func:`hard_log_bonus_loss` call.

    The terms of :meth:`.small.SmallProblem._conservative_log` with nothing else around them (the
    module docstring gives the exactness argument): at the shapes this path serves each torch
    operation costs microseconds whatever its size, so the count of operations is the cost.
    """
    rows_count, num_classes = input.shape
    class_major = num_classes < small.CLASS_MAJOR_BELOW
    if class_major:
        rows, dim, index = input.t(), 0, target.view(1, rows_count)
    else:
        rows, dim, index = input, 1, target.view(rows_count, 1)
    # The float64 log-softmax where it is cheap (classes on the leading dimension, or a float64
    # input); else float32 and log p_y corrected in float64 (see small._Logits).
    exact = class_major or input.dtype == torch.float64
    log_probs = torch.log_softmax(rows, dim, dtype=torch.float64 if exact else None)
    # Rows of the value's terms: log p_y, p_y - 1, u = max(1 - p_y, floor), log u.
    terms = torch.empty((4, *index.shape), dtype=torch.float64)
    if class_major:
        log_p = torch.gather(log_probs, dim, index, out=terms[0])
        # The gradient in the input's own layout and dtype, written through its transpose: the
        # probabilities are rounded once here, and backward has nothing left to copy.
        gradient = torch.empty_like(input, memory_format=torch.contiguous_format)
        buffer = torch.exp(log_probs, out=gradient.t())
    elif exact:
        log_p = torch.gather(log_probs, dim, index, out=terms[0])
        buffer = log_probs.exp_()
    else:
        stats = torch.empty((3, *index.shape), dtype=input.dtype)
        torch.gather(rows, dim, index, out=stats[0])
        torch.amax(rows, dim, keepdim=True, out=stats[1])
        torch.amax(log_probs, dim, keepdim=True, out=stats[2])
        buffer = log_probs.exp_()
        log_norm = buffer.sum(dim, keepdim=True, dtype=torch.float64).log_()
        stats = stats.double()
        log_p = torch.sub(stats[0], stats[1], out=terms[0]).add_(stats[2]).sub_(log_norm)
    lost = torch.expm1(log_p, out=terms[1])
    # p - onehot_y, with p_y - 1 exact.
    buffer.scatter_(dim, index, lost if lost.dtype == buffer.dtype else lost.to(buffer.dtype))
    bound = torch.neg(lost, out=terms[2]).clamp_min_(floor)
    torch.log(bound, out=terms[3])
    sum_log_p, sum_lost, sum_bound, sum_log_bound = terms.view(4, -1).sum(1).tolist()
    # sum_rows -log p + rho (log u - (u - (1 - p)) / floor), and the gradient factor
    # (1 + rho p / u) times the mean's.
    total = -sum_log_p + rho * (sum_log_bound - (sum_bound + sum_lost) / floor)
    factor = torch.addcdiv(_scalar(scale), lost.add_(1.0), bound, value=rho * scale)
    buffer.mul_(factor if factor.dtype == buffer.dtype else factor.to(buffer.dtype))
    return total * scale, gradient if class_major else buffer


def _smoothed_log_bonus_terms(input, target, rho: float, floor: float, scale: float,
                              smoothing: float):  # fmt: skip
    """:func:`_hard_log_bonus_terms` with label smoothing: read class-major, everything in
    float64 (at any class count up to :data:`SMOOTHED_FAST_MAX_ELEMENTS` logits: torch's
    smoothed CE costs two to three times its hard-target CE, which leaves room for it).

    Class mass a_k = alpha + beta [k = y] (alpha = eps / C, beta = 1 - eps, sum 1). Row loss
    sum_k a_k (-log p_k + rho b(p_k)) with b(p) = log u - (u - (1 - p)) / floor, u = max(1 - p,
    floor); gradient p_k (1 - H) - a_k + h_k with h_k = -rho a_k q_k, q = p / u, H = sum_k h_k:
    p_k (1 + rho (alpha Q + beta q_y)) - alpha (1 + rho q_k) - beta (1 + rho q_y) [k = y], with
    Q = sum_k q_k. The target's terms come from p_y - 1 = expm1(log p_y), as without smoothing.
    """
    rows_count, num_classes = input.shape
    alpha, beta = smoothing / num_classes, 1.0 - smoothing
    rows, index = input.t(), target.view(1, rows_count)
    log_probs = torch.log_softmax(rows, 0, dtype=torch.float64)
    # Rows of the target's terms: log p_y, p_y - 1, u_y, log u_y; then sums over all classes.
    terms = torch.empty((4, 1, rows_count), dtype=torch.float64)
    log_p = torch.gather(log_probs, 0, index, out=terms[0])
    sum_log_probs = float(log_probs.sum())
    probs = log_probs.exp_()
    bound_all = torch.rsub(probs, 1.0).clamp_min_(floor)
    sum_bound_all = float(bound_all.sum())
    ratio = torch.div(probs, bound_all)  # q = p / u
    sum_log_bound_all = float(bound_all.log_().sum())
    lost = torch.expm1(log_p, out=terms[1])
    bound = torch.neg(lost, out=terms[2]).clamp_min_(floor)
    torch.log(bound, out=terms[3])
    sum_log_p, sum_lost, sum_bound, sum_log_bound = terms.view(4, -1).sum(1).tolist()
    # sum over rows and classes of b: sum log u - (sum u - N (C - 1)) / floor (each row's
    # 1 - p_k sum to C - 1); the target's b from its own terms.
    bonus_all = sum_log_bound_all - (sum_bound_all - rows_count * (num_classes - 1)) / floor
    bonus_target = sum_log_bound - (sum_bound + sum_lost) / floor
    total = -(alpha * sum_log_probs + beta * sum_log_p) + rho * (
        alpha * bonus_all + beta * bonus_target
    )
    ratio_target = lost.add_(1.0).div_(bound)  # q_y
    row_factor = torch.sum(ratio, 0, keepdim=True).mul_(rho * alpha * scale)
    row_factor.add_(ratio_target, alpha=rho * beta * scale).add_(scale)
    target_mass = ratio_target.mul_(-rho * beta * scale).sub_(beta * scale)
    gradient = probs.mul_(row_factor).sub_(ratio, alpha=rho * alpha * scale).sub_(alpha * scale)
    gradient.scatter_add_(0, index, target_mass)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    return total * scale, out.copy_(gradient.t())


class _PrecomputedGradientEL(torch.autograd.Function):
    """The loss of :func:`hard_log_bonus_loss`, its gradient built in forward.

    Inputs: logits (N, C), targets (N,) int64, the terms function (:func:`_hard_log_bonus_terms`
    or :func:`_smoothed_log_bonus_terms`) and its parameters.
    """

    @staticmethod
    def forward(ctx, input, target, terms, *parameters):
        value, ctx.gradient = terms(input, target, *parameters)
        # The arguments, not saved tensors: a second backward through a retained graph (the
        # first one scales the gradient in place) recomputes from them.
        ctx.arguments = (terms, input.detach(), target, *parameters)
        return torch.full((), value, dtype=input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        gradient, ctx.gradient = ctx.gradient, None
        if gradient is None:
            terms, *arguments = ctx.arguments
            _, gradient = terms(*arguments)
        return gradient.mul_(grad_output), *([None] * (len(ctx.arguments) - 1))


@functools.lru_cache(maxsize=64)
def _scalar(value: float) -> torch.Tensor:
    """A float64 0-dim tensor of ``value``, built once (the factor's addend)."""
    return torch.tensor(value, dtype=torch.float64)


def hard_log_bonus_loss(input, target, options: LossOptions) -> torch.Tensor | None:
    """The loss of the most common call in the fewest operations, or None where it does not apply.

    It applies to eager CPU calls with (N, C) float32/float64 logits of at most
    :data:`.small.SMALL_MAX_ELEMENTS` and at least two classes, (N,) int64 class indices none of
    which is ignored (an ``ignore_index`` in [0, C) is left to the general route, which masks
    its rows), the conservative log bonus (log_end < 1) from p = 0, any label smoothing
    (up to :data:`SMOOTHED_FAST_MAX_ELEMENTS` logits), no class or bonus weights, the "mean"
    or "sum" reduction, and a backend other than ``"triton"`` (which always runs the kernels).
    The shapes are checked here (they are the conditions), the index range by the gather, which
    fails outside [0, C): a target equal to ``ignore_index`` or out of range returns None, and
    the general route handles it.

    Args:
        input: the logits.
        target: the targets.
        options: the loss options.
    """
    if not (
        HARD_LOG_BONUS_FAST
        and isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and input.dim() == 2
        and target.dim() == 1
        and target.dtype == torch.int64
        and input.dtype in (torch.float32, torch.float64)
        and input.is_cpu
        and target.is_cpu
        and input.shape[1] >= 2
        and input.shape[0] == target.shape[0] > 0
        and input.numel() <= small.SMALL_MAX_ELEMENTS
        and not 0 <= options.ignore_index < input.shape[1]
        and (options.label_smoothing == 0.0 or input.numel() <= SMOOTHED_FAST_MAX_ELEMENTS)
        and options.reduction != "none"
        and options.bonus == "log"
        and options.log_end < 1.0
        and options.bonus_start == 0.0
        and options.bonus_scale != 0.0
        and options.backend != "triton"
        and not torch.compiler.is_compiling()
    ):
        return None
    scale = 1.0 / input.shape[0] if options.reduction == "mean" else 1.0
    parameters = (options.bonus_scale, 1.0 - options.log_end, scale)
    if options.label_smoothing == 0.0:
        terms = _hard_log_bonus_terms
    else:
        terms, parameters = _smoothed_log_bonus_terms, (*parameters, options.label_smoothing)
    try:
        return _PrecomputedGradientEL.apply(input, target, terms, *parameters)
    except (RuntimeError, IndexError):
        return None  # an ignored or out-of-range target: the general route
