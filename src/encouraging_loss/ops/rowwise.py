"""The encouraging loss over rows of logits, with closed-form gradients.

Both autograd Functions here take logits with the class dimension last, ``(..., C)`` (a possibly
strided view of the caller's tensor), treat them as rows ``(M, C)`` and return one float64 loss per
row; the caller reduces. They work on a single private buffer that is first a copy of the logits,
then the softmax over the non-special classes, then the gradient, so the extra memory is one
``(M, C)`` buffer (plus one more while a dense-target forward runs, and one kept for its backward)
and every pass after the copy is in place.

Exactness: log(1 - p_s) for the special class s of a row (the target for hard targets, the arg-max
for dense targets) is taken as ``logsumexp_{j != s} z_j - logsumexp_j z_j``, written through
the single difference ``d = z_s - logsumexp_{j != s} z_j``: ``-log p_s = softplus(-d)`` and
``log(1 - p_s) = -softplus(d)``. No clamp is involved, so a confident row (p_s = 1 - 1e-8) gets the
exact loss and gradient. Every other class has p <= 1/2, where 1 - p has no cancellation.

Notation: a_k >= 0 is the weight of class k in the row's loss (class weight times target mass),
b is the bonus and g(p) = p (1 - p) b'(p). The row loss is
``sum_k a_k (-log p_k + rho v_k b(p_k))`` and its gradient, with h_k = rho a_k v_k p_k b'(p_k) and
A = sum_k a_k, H = sum_k h_k, is ``dL/dz_k = p_k (A - H) - a_k + h_k``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..bonus import Bonus

NEG_INF = float("-inf")
# Per-row quantities (a few per row) are kept in float64: it costs nothing next to the (M, C)
# passes and keeps the loss as accurate as the logits' own rounding allows.
ROW_DTYPE = torch.float64


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) without the threshold approximation of ``F.softplus``."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def copy_rows(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A private contiguous ``dtype`` copy of ``logits`` (..., C), possibly strided, as rows."""
    buffer = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    buffer.copy_(logits)
    return buffer.view(-1, logits.shape[-1])


def working_rows(logits: torch.Tensor, dtype: torch.dtype, consume: bool) -> torch.Tensor:
    """The buffer the terms functions work in: ``logits`` itself when the caller hands it over.

    ``consume=True`` says the caller owns ``logits`` and will not read it again (the fused linear
    path's chunk of logits); it is then used in place if it already is contiguous ``dtype`` rows.
    """
    if consume and logits.dtype == dtype and logits.dim() == 2 and logits.is_contiguous():
        return logits
    return copy_rows(logits, dtype)


def cpu_eager(device: torch.device) -> bool:
    """Whether this runs eagerly on CPU, where in-place kernels, row blocks and data-dependent
    row subsets pay; on a GPU and while compiling, whole-tensor passes are used instead."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def grad_like(buffer: torch.Tensor, ctx) -> torch.Tensor:
    """The gradient rows in the logits' shape and dtype."""
    grad = buffer.view(ctx.logits_shape)
    return grad if grad.dtype == ctx.input_dtype else grad.to(ctx.input_dtype)


def _softmax_rows_(buffer: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a private (M, C) buffer, in place where torch allows.

    On CPU the softmax kernel reads each row before writing it, so ``out`` may alias the input;
    elsewhere (and while compiling) it allocates.
    """
    if cpu_eager(buffer.device):
        return torch._softmax(buffer, 1, False, out=buffer)
    return torch.softmax(buffer, dim=1)


def _exclude_and_normalise(buffer: torch.Tensor, special: torch.Tensor):
    """Turn ``buffer`` (a copy of the logits) into the softmax over the classes j != special.

    Returns (q, has_rest, d): q the (M, C) softmax over j != special (0 at special), has_rest
    (M, 1) whether any other class has a finite logit, and the float64 column
    d = z_special - logsumexp_{j != special} z_j.
    """
    z_special = buffer.gather(1, special)
    # The lowest finite value rather than -inf: a row with no other finite class then stays a
    # valid softmax (q = 1 at special), and has_rest marks it.
    lowest = torch.finfo(buffer.dtype).min
    buffer.scatter_(1, special, lowest)
    rest_max = buffer.amax(1, keepdim=True)
    has_rest = rest_max > lowest
    q = _softmax_rows_(buffer)
    # logsumexp_{j != s} z = max z - log(max q): the largest q_j is 1 / sum_j e^(z_j - max z).
    lse_rest = rest_max.to(ROW_DTYPE) - q.amax(1, keepdim=True).to(ROW_DTYPE).log()
    d = torch.where(has_rest, z_special.to(ROW_DTYPE) - lse_rest, float("inf"))
    return q, has_rest, d


def _special_terms(d: torch.Tensor, bonus: Bonus):
    """-log p, 1 - p and the bonus pair (b, g) at the special class, all exact."""
    one_minus_p = torch.sigmoid(-d)
    b, g = bonus.value_and_slope(torch.sigmoid(d), one_minus_p, -softplus(d))
    return softplus(-d), one_minus_p, b, g


def rows_as(buffer: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
    """A per-row vector as a (M, 1) column in the buffer's dtype, for in-place (M, C) updates."""
    return row_values.to(buffer.dtype).unsqueeze(1)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator, 0.0)


def keep_for_backward(ctx, terms, logits, args, buffer, state):
    """Keep what backward needs; backward turns the buffer into the gradient in place.

    Eagerly, the buffer and the row terms are held on ``ctx`` rather than saved (they are plain
    tensors made under no-grad, so no reference cycle): the first backward consumes them (the
    buffer, and any scratch block among the terms, are updated in place), and a later backward
    through the same graph (``retain_graph``, gradcheck) recomputes them with ``terms`` from the
    saved logits. Under ``torch.compile`` they are saved as usual and the compiler makes the
    in-place updates safe.
    """
    ctx.input_dtype, ctx.logits_shape, ctx.num_args = logits.dtype, logits.shape, len(args)
    ctx.eager = not torch.compiler.is_compiling()
    if ctx.eager:
        ctx.terms, ctx.args, ctx.kept = terms, args, (buffer, state)
        ctx.save_for_backward(logits)
    else:
        ctx.save_for_backward(buffer, *state)


def take_for_backward(ctx):
    """(buffer, state) kept by :func:`keep_for_backward`; both are the caller's to consume."""
    if not ctx.eager:
        buffer, *state = ctx.saved_tensors
        return buffer, state
    (logits,) = ctx.saved_tensors
    kept, ctx.kept = ctx.kept, None
    if kept is None:
        _, buffer, state = ctx.terms(logits, *ctx.args)
        return buffer, state
    return kept


def rows_function(name: str, terms, grad_, doc: str) -> type[torch.autograd.Function]:
    """An autograd Function over rows of logits, from its terms and gradient functions.

    ``terms(logits, *args)`` gives (row losses, buffer, state); backward keeps them as
    :func:`keep_for_backward` says and turns the buffer into the logits' gradient with
    ``grad_(buffer, state, grad_rows)``. The non-tensor arguments get no gradient.
    """

    def forward(ctx, logits, *args):
        row_loss, buffer, state = terms(logits, *args)
        keep_for_backward(ctx, terms, logits, args, buffer, state)
        return row_loss

    @once_differentiable
    def backward(ctx, grad_rows):
        buffer, state = take_for_backward(ctx)
        grad_(buffer, state, grad_rows)
        return grad_like(buffer, ctx), *([None] * ctx.num_args)

    body = {"__doc__": doc, "forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), body)


def hard_target_grad_(buffer: torch.Tensor, state, grad_rows: torch.Tensor) -> torch.Tensor:
    """Turn the buffer of :func:`hard_target_terms` into the gradient of the logits, in place.

    Args:
        buffer: (M, C) softmax over j != y (or over all j, with 0 at y), as left by the terms
            function.
        state: the row terms the terms function returned with it.
        grad_rows: (M,) incoming gradient of each row loss (any value for ignored rows).

    Returns:
        ``buffer``, now dL/dz scaled row-wise by ``grad_rows``.
    """
    target, row_weight, push, rest_sum = state
    # A row of weight 0 (ignored) has a constant loss: zero gradient even if the incoming one
    # is not finite (the mean over zero items is NaN, as in torch).
    target_grad = torch.where(row_weight != 0, grad_rows * row_weight * push, 0.0)
    # The buffer holds q_j = p_j / (1 - p_y), or p_j with rest_sum = 1 - p_y to divide by.
    rest_grad = target_grad if rest_sum is None else _safe_divide(target_grad, rest_sum)
    buffer.mul_(rows_as(buffer, rest_grad))
    buffer.scatter_(1, target, rows_as(buffer, -target_grad))
    return buffer


def hard_target_terms(
    logits, target, row_weight, row_bonus_weight, rho, bonus, compute_dtype, *, consume=False
):
    """Row losses, the buffer q (softmax over j != y) and the row terms backward needs.

    With ``consume=True`` the buffer may be ``logits`` itself (see :func:`working_rows`).
    """
    if bonus.kind == "log" and bonus.log_end == 1.0 and rho != 0.0:
        # The plain log bonus needs log(1 - p_y) even where 1 - p_y underflows the dtype:
        # take it from the logits with the target excluded.
        buffer, has_rest, d = _exclude_and_normalise(
            working_rows(logits, compute_dtype, consume), target
        )
        neg_log_p, one_minus_p, b, g = _special_terms(d.squeeze(1), bonus)
        has_rest = has_rest.squeeze(1)
        rest_sum = None  # the buffer is already the softmax over j != y
    else:
        buffer, rest_sum, neg_log_p, one_minus_p, b, g = _full_softmax_terms(
            logits, target, bonus, compute_dtype, consume
        )
        has_rest = rest_sum > 0
    scale = rho if row_bonus_weight is None else rho * row_bonus_weight
    per_row = neg_log_p
    if not bonus.is_zero and rho != 0.0:
        # 0 * b stays 0 even where b = -inf (a single class, or a zero bonus weight).
        per_row = per_row + torch.where(torch.as_tensor(scale) != 0, scale * b, 0.0)
    row_loss = torch.where(row_weight != 0, row_weight * per_row, 0.0)
    # With no other class left (C = 1, or all others at -inf) p_y is identically 1: the loss does
    # not depend on the logits and the gradient is zero, not the limit of the formula.
    push = torch.where(has_rest, one_minus_p - scale * g, 0.0)
    return row_loss, buffer, (target, row_weight, push, rest_sum)


#: Elements of one row block of the CPU passes: a block of logits, its probabilities and a
#: scratch block stay in cache (1 MiB of float32 each), and the per-block Python overhead is a
#: small share of the work.
BLOCK_ELEMENTS = 1 << 18


def block_rows(num_rows: int, num_classes: int, device: torch.device) -> int:
    """Rows per block of fused passes: cache-sized blocks on CPU, all rows at once elsewhere.

    On a GPU (and while compiling) one pass over everything is cheapest.
    """
    if not cpu_eager(device) or num_rows == 0:
        return max(num_rows, 1)
    return max(1, BLOCK_ELEMENTS // max(num_classes, 1))


def sum_into(values: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """Row sums of ``values``, weighted by a (C,) vector when given, written into ``out``."""
    if weights is None:
        torch.sum(values, 1, out=out)
    else:
        torch.mv(values, weights, out=out)


class TargetStats(NamedTuple):
    """What :func:`softmax_with_target_stats` returns: the probabilities and float64 rows."""

    #: (M, C) softmax with 0 at the target.
    probs: torch.Tensor
    #: -log p_y, p_y and 1 - p_y, each exact in relative terms.
    neg_log_p: torch.Tensor
    p: torch.Tensor
    one_minus_p: torch.Tensor
    #: sum_{j != y} p_j and max_j p_j of the rounded probabilities.
    rest_sum: torch.Tensor
    p_max: torch.Tensor
    #: logsumexp_j z_j.
    log_sum_exp: torch.Tensor
    #: sum_j w_j z_j, when asked for.
    z_weighted: torch.Tensor | None


def softmax_with_target_stats(
    logits, target, compute_dtype, consume: bool, *, logit_weights=False, per_block=None, step=None
) -> TargetStats:
    """One softmax over all classes, with the target's entry zeroed, and exact row statistics.

    Where p_y <= 1/2: ``-log p_y = logsumexp z - z_y`` with ``logsumexp z = max z - log(max p)``
    (exact at any loss: max p is 1 / sum_j e^(z_j - max z), rounded once) and
    ``1 - p_y = -expm1(log p_y)``. Where p_y > 1/2 everything comes from the ratio
    ``R = sum_{j != y} p_j / p_y = sum_{j != y} e^(z_j - z_y)``, in which the softmax's rounded
    normaliser cancels: ``-log p_y = log1p(R)``, ``1 - p_y = R / (1 + R)``; their errors then
    shrink with 1 - p_y, as the bonus's slope there needs.

    With ``per_block`` every pass runs block by block of ``step`` rows (see :func:`block_rows`):
    a block of logits is read from memory once, and its probabilities stay in cache for the
    statistics and for ``per_block``.

    Args:
        logits: (..., C) logits, class dimension last.
        target: (M, 1) int64 class indices in range.
        compute_dtype: dtype of the probabilities.
        consume: the probabilities may overwrite ``logits`` (see :func:`working_rows`).
        logit_weights: also return sum_k w_k z_k per row, for a (C,) ``w`` or None (ones);
            False: not needed.
        per_block: called as ``per_block(index, probs_block)`` after each block's statistics
            (probabilities with 0 at y), for more fused passes.
        step: rows per block with ``per_block``.
    """
    num_classes = logits.shape[-1]
    z_target = logits.gather(-1, target.view(*logits.shape[:-1], 1)).reshape(-1).to(ROW_DTYPE)
    if logits.dtype == compute_dtype and logits.is_contiguous():
        rows_in = logits.view(-1, num_classes)
    else:
        # A private copy (half inputs, strided views) is ours to overwrite.
        rows_in, consume = copy_rows(logits, compute_dtype), True
    num_rows = rows_in.shape[0]
    # Blocks pay when per_block adds passes over each block; without, whole passes are cheaper.
    step = max(num_rows, 1) if per_block is None else step
    want_weighted = logit_weights is not False
    # Rows: max z, max p, p_y, sum_{j != y} p, [sum_k w_k z_k].
    stats = rows_in.new_empty(5 if want_weighted else 4, num_rows)
    probs = None
    if cpu_eager(rows_in.device):
        probs = rows_in if consume else torch.empty_like(rows_in)

    def run_block(index, z, out, block_target, z_max, p_max, p_y, rest, *z_weighted):
        nonlocal probs
        # Statistics of the logits first: the softmax may overwrite them.
        torch.amax(z, 1, out=z_max)
        if want_weighted:
            sum_into(z, logit_weights, z_weighted[0])
        if out is not None:
            # The CPU kernel reads each row before writing it: out may alias the input.
            block = torch._softmax(z, 1, False, out=out)
        else:
            block = probs = torch.softmax(z, dim=1)
        torch.amax(block, 1, out=p_max)
        torch.gather(block, 1, block_target, out=p_y.unsqueeze(1))
        block.scatter_(1, block_target, 0.0)
        torch.sum(block, 1, out=rest)
        if per_block is not None:
            per_block(index, block)

    if step >= num_rows:
        # One block: no splitting (its cost shows at small sizes).
        run_block(0, rows_in, probs, target, *stats)
    else:
        blocks = zip(
            rows_in.split(step), probs.split(step), target.split(step),
            *(row.split(step) for row in stats), strict=True,
        )  # fmt: skip
        for index, views in enumerate(blocks):
            run_block(index, *views)
    stats = stats.to(ROW_DTYPE)
    z_max, p_max, p_rounded, rest_sum = stats[0], stats[1], stats[2], stats[3]
    log_sum_exp = z_max - p_max.log()
    neg_log_p = log_sum_exp - z_target
    ratio = rest_sum / p_rounded
    confident = rest_sum < p_rounded  # p_y > 1/2
    neg_log_p = torch.where(confident, torch.log1p(ratio), neg_log_p)
    p = torch.exp(-neg_log_p)
    # 1 - p has no cancellation where p <= 1/2.
    one_minus_p = torch.where(confident, ratio / (1.0 + ratio), 1.0 - p)
    return TargetStats(
        probs, neg_log_p, p, one_minus_p, rest_sum, p_max, log_sum_exp,
        stats[4] if want_weighted else None,
    )  # fmt: skip


def _full_softmax_terms(logits, target, bonus: Bonus, compute_dtype, consume: bool):
    """Hard-target terms from one softmax over all classes (every bonus but the plain log).

    The bonus needs log(1 - p_y) only up to log_end < 1, where 1 - p_y >= 1 - log_end: the
    statistics of :func:`softmax_with_target_stats` give it exactly.

    Returns:
        (p, rest_sum, -log p_y, 1 - p_y, b, g): p the (M, C) softmax with 0 at y, the others
        float64 rows; rest_sum = sum_{j != y} p_j, the sum the buffer is normalised by.
    """
    stats = softmax_with_target_stats(logits, target, compute_dtype, consume)
    p, one_minus_p = stats.p, stats.one_minus_p
    b, g = bonus.value_and_slope(p, one_minus_p, one_minus_p.log())
    return stats.probs, stats.rest_sum, stats.neg_log_p, one_minus_p, b, g


def dense_target_grad_(buffer: torch.Tensor, state, grad_rows: torch.Tensor) -> torch.Tensor:
    """Turn the buffer of :func:`dense_target_terms` into the gradient of the logits, in place.

    Args:
        buffer: (M, C) non-special softmax q, as the terms function left it.
        state: the row terms the terms function returned with it.
        grad_rows: (M,) incoming gradient of each row loss (any value for rows without mass).

    Returns:
        ``buffer``, now dL/dz scaled row-wise by ``grad_rows``.
    """
    (row_active, special, push, grad_special, alpha, class_weight, mass_slope, class_slope,
     target, target_correction) = state  # fmt: skip
    # A row with no class mass (ignored) has a constant loss: zero gradient (see HardTargetEL).
    grad_rows = torch.where(row_active, grad_rows, 0.0)
    buffer.mul_(rows_as(buffer, grad_rows * push))
    if mass_slope is not None:
        buffer.addcmul_(mass_slope, rows_as(buffer, grad_rows))
    elif class_slope is not None:
        buffer.addcmul_(class_slope, rows_as(buffer, grad_rows * alpha))
    else:
        buffer.addr_(rows_as(buffer, grad_rows * alpha).squeeze(1), class_weight, alpha=-1.0)
    if target is not None:
        buffer.scatter_add_(1, target, rows_as(buffer, grad_rows * target_correction))
    buffer.scatter_(1, special, rows_as(buffer, grad_rows * grad_special))
    return buffer


def dense_target_terms(
    logits,
    row_alpha,
    class_weight,
    dense_target,
    dense_scale,
    target,
    target_mass,
    bonus_weight,
    rho,
    bonus,
    compute_dtype,
    *,
    consume=False,
):
    """Row losses, the buffer q_k (the non-special softmax) and the terms backward needs.

    Args:
        logits: (..., C) logits, class dimension last.
        row_alpha: (M,) float64 alpha_i, the weight of the class-weight vector in each row's mass.
        class_weight: (C,) w (ones when the caller has no class weights).
        dense_target: (..., C) target probabilities D / dense_scale / w, or None.
        dense_scale: float factor of ``dense_target`` (1 - label smoothing).
        target: (M, 1) int64 class index y_i carrying beta_i, or None.
        target_mass: (M,) float64 beta_i, or None.
        bonus_weight: (C,) per-class bonus weight v, or None.
        rho: the bonus scale.
        bonus: the :class:`Bonus` shape.
        compute_dtype: dtype of the (M, C) passes.
        consume: the buffer may be ``logits`` itself (see :func:`working_rows`).
    """
    buffer = working_rows(logits, compute_dtype, consume)
    dense_mass = None
    if dense_target is not None:
        dense_mass = copy_rows(dense_target, compute_dtype).mul_(class_weight * dense_scale)
    z_max, special = buffer.max(1, keepdim=True)
    z_max = z_max.squeeze(1).to(ROW_DTYPE)
    alpha = row_alpha

    # Masses and mass-weighted logits, split into the special class and the rest.
    w_special = class_weight[special.squeeze(1)].to(ROW_DTYPE)
    mass_special = alpha * w_special
    mass_rest = alpha * (class_weight.sum() - w_special)
    logits_rest = alpha * ((buffer @ class_weight).to(ROW_DTYPE) - w_special * z_max)
    if dense_mass is not None:
        mass_special = mass_special + dense_mass.gather(1, special).squeeze(1)
        dense_mass.scatter_(1, special, 0.0)
        mass_rest = mass_rest + dense_mass.sum(1)
        logits_rest = logits_rest + _row_dot(dense_mass, buffer)
    if target is not None:
        target_is_special = (target == special).squeeze(1)
        target_rest = torch.where(target_is_special, 0.0, target_mass)
        mass_special = mass_special + torch.where(target_is_special, target_mass, 0.0)
        mass_rest = mass_rest + target_rest
        logits_rest = logits_rest + target_rest * buffer.gather(1, target).squeeze(1)
    else:
        target_rest = None
    mass_total = mass_rest + mass_special

    buffer, has_rest, d = _exclude_and_normalise(buffer, special)
    has_rest, d = has_rest.squeeze(1), d.squeeze(1)
    neg_log_p_s, one_minus_p_s, b_s, g_s = _special_terms(d, bonus)
    # Cross-entropy: sum_{k != s} a_k (z_s - z_k) + A (-log p_s), each term non-negative.
    row_loss = mass_rest * z_max - logits_rest + mass_total * neg_log_p_s

    v_special = 1.0 if bonus_weight is None else bonus_weight[special.squeeze(1)]
    bonus_special = rho * mass_special * v_special
    v_weight = class_weight if bonus_weight is None else class_weight * bonus_weight
    if bonus.is_zero or rho == 0.0:
        hessian_rest = torch.zeros_like(d)
        slope_rest = None  # a_k (rho v_k r_k - 1) = -a_k
        target_correction = None if target is None else -target_rest
    else:
        one_minus_p_column = rows_as(buffer, one_minus_p_s)
        b_rest, r_rest = bonus.rest_terms_(buffer * one_minus_p_column)
        dense_v = None
        if dense_mass is not None:
            dense_v = dense_mass if bonus_weight is None else dense_mass * bonus_weight
        bonus_rest = _weighted_row_sum(
            b_rest, alpha, v_weight, dense_v, target, target_rest, bonus_weight
        )
        # 0 * b_s stays 0 where b_s = -inf (no other class, no mass on the special class).
        special_bonus = torch.where(bonus_special != 0, mass_special * v_special * b_s, 0.0)
        row_loss = row_loss + rho * bonus_rest + rho * special_bonus
        if r_rest is None:
            r_rest = bonus.rest_ratio_(
                b_rest, lambda out: torch.mul(buffer, one_minus_p_column, out=out)
            )
        hessian_rest = rho * _weighted_row_sum(
            r_rest, alpha, v_weight, dense_v, target, target_rest, bonus_weight
        )
        del dense_v
        # slope_rest becomes rho v_k r_k - 1, the factor of a_k in the gradient.
        slope_rest = r_rest.mul_(rho if bonus_weight is None else rho * bonus_weight).sub_(1.0)
        target_correction = (
            None if target is None else target_rest * slope_rest.gather(1, target).squeeze(1)
        )
    push = one_minus_p_s * (mass_total - hessian_rest) - bonus_special * g_s
    grad_special = (
        mass_rest - hessian_rest - one_minus_p_s * (mass_total - hessian_rest) + bonus_special * g_s
    )
    # A row with no other finite class has p_s identically 1: no gradient (see the hard case).
    grad_special = torch.where(has_rest, grad_special, 0.0)
    # The gradient's a_k (rho v_k r_k - 1) term, kept in the cheapest form.
    if dense_mass is not None:
        dense_mass.addr_(rows_as(dense_mass, alpha).squeeze(1), class_weight)
        mass_slope = dense_mass if slope_rest is None else dense_mass.mul_(slope_rest)
        if slope_rest is None:
            mass_slope.neg_()
        del slope_rest
        class_slope = None
    else:
        mass_slope = None
        class_slope = None if slope_rest is None else slope_rest.mul_(class_weight)
    state = (mass_total != 0, special, push, grad_special, alpha, class_weight, mass_slope,
             class_slope, target, target_correction)  # fmt: skip
    return row_loss, buffer, state


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (M, C) tensors without an (M, C) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _weighted_row_sum(values, alpha, v_weight, dense_v, target, target_rest, bonus_weight):
    """sum_{k != s} a_k v_k values_k for class mass alpha w + D + beta [k = y] (values_s = 0)."""
    total = alpha * (values @ v_weight)
    if dense_v is not None:
        total = total + _row_dot(dense_v, values)
    if target is not None:
        at_target = values.gather(1, target).squeeze(1)
        if bonus_weight is not None:
            at_target = at_target * bonus_weight[target.squeeze(1)]
        total = total + target_rest * at_target
    return total


HardTargetEL = rows_function(
    "HardTargetEL",
    hard_target_terms,
    hard_target_grad_,
    """Rows with one target class each (no label smoothing).

Inputs: logits (..., C), target (M, 1) int64 in range, row_weight (M,) = class weight of the
target (0 for ignored rows), row_bonus_weight (M,) or None, rho, bonus, compute dtype.
Output: (M,) float64 row losses.

The row loss is w_y (-log p_y + rho v_y b(p_y)); its gradient is w_y k (p - onehot_y) with
k = 1 - rho v_y p_y b'(p_y). Written with the non-target softmax q_j = p_j / (1 - p_y) and
T = k (1 - p_y) = (1 - p_y) - rho v_y g(p_y): dL/dz_j = w_y T q_j for j != y, dL/dz_y = -w_y T.
""",
)

DenseTargetEL = rows_function(
    "DenseTargetEL",
    dense_target_terms,
    dense_target_grad_,
    """Rows with a weight on every class: label smoothing or probability targets.

The class mass of row i is a_ik = alpha_i w_k + D_ik + beta_i [k = y_i], each part optional:
label smoothing of index targets uses (alpha, w, beta, y) and never materialises a; probability
targets pass D as the target probabilities times a scale.

Inputs: logits (..., C), then the arguments of :func:`dense_target_terms`.
Output: (M,) float64 row losses.

The special class s of a row is its arg-max; every other class has p_k <= 1/2. With the
non-special softmax q_k = p_k / (1 - p_s), A' = sum_{k != s} a_k, H' = sum_{k != s} h_k and
r_k = p_k b'(p_k), h_k = rho a_k v_k r_k:
dL/dz_k = q_k [(1 - p_s)(A - H') - rho a_s v_s g_s] + a_k (rho v_k r_k - 1)  (k != s),
dL/dz_s = A' - H' - (1 - p_s)(A - H') + rho a_s v_s g_s.
""",
)
