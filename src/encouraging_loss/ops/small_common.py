"""The small-problem path's commonest calls in the fewest operations.

Hard targets, or label smoothing, with the conservative log bonus, the "mean" or "sum" reduction
and no weights, on (N, C) CPU logits: :func:`hard_log_bonus_loss` computes them in a handful of
passes over the logits and one autograd node (:mod:`.small_terms` computes the terms and gives
the exactness argument: log p_y in float64, p_y - 1 from ``expm1``). At the sizes of
:mod:`.small` each torch operation costs microseconds whatever its size, so their count is the
cost: the options' conditions are checked once per options object (:func:`loss_plan`), a call
checks only its tensors. Everything else, and a call with an ignored or out-of-range target,
takes :mod:`.small`'s general route.
"""

from __future__ import annotations

import torch

from ..options import LossOptions
from . import small, small_terms

#: Whether :func:`hard_log_bonus_loss` takes the calls it supports (tests switch it off to
#: run the same calls through :class:`.small.SmallProblem`).
HARD_LOG_BONUS_FAST = True
#: The most logits the smoothed case takes (its float64 passes outgrow the general path's).
SMOOTHED_FAST_MAX_ELEMENTS = 1 << 15
#: The key of this module's plan in :attr:`LossOptions.derived`.
PLAN_KEY = "small_common"


def loss_plan(options: LossOptions) -> tuple | None:
    """What :func:`hard_log_bonus_loss` does with these options: (terms function, its
    parameters, "mean", the most logits), or None where the options rule it out. Built once per
    options object (cached in ``options.derived``): a call then checks only its tensors."""
    derived = options.derived
    if PLAN_KEY not in derived:
        derived[PLAN_KEY] = _build_plan(options)
    return derived[PLAN_KEY]


def _build_plan(options: LossOptions) -> tuple | None:
    if not (
        options.reduction != "none"
        and options.bonus == "log"
        and options.log_end < 1.0
        and options.bonus_start == 0.0
        and options.bonus_scale != 0.0
        and options.backend != "triton"
        and not options.with_logit_terms
    ):
        return None
    parameters = (options.bonus_scale, 1.0 - options.log_end)
    if options.label_smoothing == 0.0:
        return small_terms.hard_terms, parameters, options.reduction == "mean", \
            small.SMALL_MAX_ELEMENTS  # fmt: skip
    return small_terms.smoothed_terms, (*parameters, options.label_smoothing), \
        options.reduction == "mean", SMOOTHED_FAST_MAX_ELEMENTS  # fmt: skip


class _PrecomputedGradientEL(torch.autograd.Function):
    """The loss of :func:`hard_log_bonus_loss`, its gradient built in forward.

    Inputs: logits (N, C), targets (N,) int64, the terms function
    (:func:`.small_terms.hard_terms` or :func:`.small_terms.smoothed_terms`) and its parameters
    (a tuple).
    """

    @staticmethod
    def forward(ctx, input, target, terms, parameters):
        value, ctx.gradient = terms(input, target, *parameters)
        # The arguments, not saved tensors: a second backward through a retained graph (the
        # first one scales the gradient in place) recomputes from them.
        ctx.arguments = (terms, input.detach(), target, parameters)
        return torch.full((), value, dtype=input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        gradient, ctx.gradient = ctx.gradient, None
        if gradient is None:
            terms, input, target, parameters = ctx.arguments
            _, gradient = terms(input, target, *parameters)
        # A unit incoming gradient (loss.backward()) is the common case: one pass saved.
        if grad_output.item() != 1.0:
            gradient.mul_(grad_output)
        return gradient, None, None, None


def hard_log_bonus_loss(input, target, options: LossOptions) -> torch.Tensor | None:
    """The loss of the most common call in the fewest operations, or None where it does not apply.

    It applies to eager CPU calls with (N, C) float32/float64 logits of at most
    :data:`.small.SMALL_MAX_ELEMENTS` and at least two classes, (N,) int64 class indices none of
    which is ignored (an ``ignore_index`` in [0, C) is left to the general route, which masks
    its rows), the conservative log bonus (log_end < 1) from p = 0, any label smoothing
    (up to :data:`SMOOTHED_FAST_MAX_ELEMENTS` logits), no class or bonus weights, no z-loss or
    softcap, the "mean" or "sum" reduction, and a backend other than ``"triton"`` (which always
    runs the kernels). The options' conditions are checked once per options object
    (:func:`loss_plan`), the tensors' here, the index range by the gather, which fails outside
    [0, C): a target equal to ``ignore_index`` or out of range returns None, and the general
    route handles it.

    Args:
        input: the logits.
        target: the targets.
        options: the loss options.
    """
    if not HARD_LOG_BONUS_FAST or torch.compiler.is_compiling():
        return None
    plan = loss_plan(options)
    if plan is None or not (
        isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and input.dim() == 2
        and target.dim() == 1
        and target.dtype == torch.int64
        and (input.dtype == torch.float32 or input.dtype == torch.float64)
        and input.is_cpu
        and target.is_cpu
    ):
        return None
    terms, parameters, mean, max_elements = plan
    count, num_classes = input.shape
    if not (
        num_classes >= 2
        and count == target.shape[0] > 0
        and count * num_classes <= min(max_elements, small.SMALL_MAX_ELEMENTS)
        and not 0 <= options.ignore_index < num_classes
    ):
        return None
    parameters = (*parameters, 1.0 / count if mean else 1.0)
    try:
        if input.requires_grad and torch.is_grad_enabled():
            return _PrecomputedGradientEL.apply(input, target, terms, parameters)
        return torch.full((), terms(input, target, *parameters)[0], dtype=input.dtype)
    except (RuntimeError, IndexError):
        return None  # an ignored or out-of-range target: the general route
