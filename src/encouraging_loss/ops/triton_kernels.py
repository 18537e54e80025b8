"""The Triton kernels of :mod:`.triton_el` (imported on first launch: importing triton is slow).

See :mod:`.triton_el` for the maths; ``hard_target_kernel`` handles rows with one target class,
``smoothed_kernel`` label-smoothed rows. One program per row, ``BLOCK`` classes at a time.
Both apply the softcap to every logit they load (``HAS_SOFTCAP``; the gradient pass recomputes
it and multiplies by 1 - tanh**2), add the z-loss to the row loss and its gradient
(``HAS_Z_LOSS``), and write each row's logsumexp (of the capped logits) to ``lse_ptr``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= -1/2, accurate for small |x| (no log1p in tl's core)."""
    series = x * (1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)))
    return tl.where(tl.abs(x) < 1e-4, series, tl.log(1.0 + x))

@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))

@triton.jit
def _bonus(p, one_minus_p, log_p, log_one_minus_p, log_end, log1m_end, inv_1m_end, gamma,
           start, start_value, BONUS: tl.constexpr, HAS_START: tl.constexpr):
    """(b(p), g(p) = p (1 - p) b'(p)) of :class:`Bonus`, elementwise."""
    if BONUS == 1:
        linear = p > log_end
        value = tl.where(linear, log1m_end - (p - log_end) * inv_1m_end, log_one_minus_p)
        slope = tl.where(linear, -p * one_minus_p * inv_1m_end, -p)
    elif BONUS == 2:
        powered = tl.exp(gamma * log_p)
        value = -powered
        slope = -gamma * one_minus_p * powered
    elif BONUS == 3:
        half = tl.sin(0.5 * math.pi * p)
        value = -2.0 * half * half
        slope = -math.pi * p * one_minus_p * tl.sin(math.pi * p)
    else:
        value = p * 0.0
        slope = p * 0.0
    if HAS_START:
        active = p >= start
        value = tl.where(active, value - start_value, 0.0)
        slope = tl.where(active, slope, 0.0)
    return value, slope

@triton.jit
def _row_target(target_ptr, weight_ptr, row, ignore_index, HAS_WEIGHT: tl.constexpr):
    """(y, valid, w_y) of a row: its target (0 when ignored), whether it counts, and its class
    weight (0 when ignored)."""
    y = tl.load(target_ptr + row).to(tl.int64)
    valid = y != ignore_index
    y = tl.where(valid, y, 0)
    w_y = tl.where(valid, 1.0, 0.0)
    if HAS_WEIGHT:
        w_y = tl.where(valid, tl.load(weight_ptr + y).to(tl.float32), 0.0)
    return y, valid, w_y

@triton.jit
def _softcap(x, softcap):
    """(c tanh(x / c), 1 - tanh(x / c)**2), both without cancellation (tl's core has no tanh).

    With t = exp(-2 |u|): tanh u = sign(u) (1 - t) / (1 + t), where 1 - t >= 1/2 for |u| >= 0.35
    (below, the Taylor series to u**11, 1e-8 relative), and 1 - tanh**2 = 4 t / (1 + t)**2.
    """
    u = x / softcap
    t = tl.exp(-2.0 * tl.abs(u))
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (
        -17.0 / 315.0 + u2 * (62.0 / 2835.0 - u2 * (1382.0 / 155925.0))))))
    large = (1.0 - t) / (1.0 + t)
    tanh = tl.where(tl.abs(u) < 0.35, series, tl.where(u < 0.0, -large, large))
    return softcap * tanh, 4.0 * t / ((1.0 + t) * (1.0 + t))

@triton.jit
def _load_logits(ptr, cols, mask, other, softcap, HAS_SOFTCAP: tl.constexpr):
    """The logits at ``cols`` in float32, capped with ``HAS_SOFTCAP``, ``other`` off ``mask``
    (applied after the cap: a masked -inf stays -inf, a logit of -inf becomes -c)."""
    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x, _ = _softcap(x, softcap)
    return tl.where(mask, x, other)

@triton.jit
def hard_target_kernel(
    logits_ptr, logits_stride, grad_ptr, grad_stride, target_ptr, weight_ptr,
    bonus_weight_ptr, loss_ptr, lse_ptr, scale_ptr, n_cols, ignore_index, rho, log_end,
    log1m_end, inv_1m_end, z_loss, softcap, gamma, start, start_value,
    HAS_WEIGHT: tl.constexpr, HAS_BONUS_WEIGHT: tl.constexpr, BONUS: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    y, valid, w = _row_target(target_ptr, weight_ptr, row, ignore_index, HAS_WEIGHT)
    v = 1.0
    if HAS_BONUS_WEIGHT:
        v = tl.load(bonus_weight_ptr + y).to(tl.float32)
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y, _ = _softcap(z_y, softcap)

    # Pass 1: online max and sum of exp over the non-target classes.
    row_max = -float("inf")
    sum_exp = 0.0
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        x = _load_logits(logits_ptr, cols, (cols < n_cols) & (cols != y), -float("inf"), softcap,
                         HAS_SOFTCAP)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        sum_exp = sum_exp * tl.exp(row_max - safe_max) + tl.sum(tl.exp(x - safe_max), 0)
        row_max = new_max
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    has_rest = sum_exp > 0.0
    lse_rest = safe_max + tl.log(tl.where(has_rest, sum_exp, 1.0))
    d = tl.where(has_rest, z_y - lse_rest, float("inf"))

    small = tl.exp(-tl.abs(d))
    p = tl.where(d >= 0, 1.0 / (1.0 + small), small / (1.0 + small))
    one_minus_p = tl.where(d >= 0, small / (1.0 + small), 1.0 / (1.0 + small))
    neg_log_p = _softplus(-d)
    log_one_minus_p = -_softplus(d)
    row_loss = neg_log_p
    push = one_minus_p
    if BONUS != 0:
        b, g = _bonus(p, one_minus_p, -neg_log_p, log_one_minus_p, log_end, log1m_end,
                      inv_1m_end, gamma, start, start_value, BONUS, HAS_START)
        bonus_scale = rho * v
        row_loss += tl.where(bonus_scale != 0.0, bonus_scale * b, 0.0)
        push -= bonus_scale * g
    push = tl.where(has_rest, push, 0.0)
    # lse = lse_rest + softplus(d) = z_y + softplus(-d): the form that cannot overflow.
    lse = tl.where(d >= 0, z_y + neg_log_p, lse_rest + _softplus(d))
    row_loss = w * row_loss
    if HAS_Z_LOSS:
        row_loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))
    tl.store(lse_ptr + row, lse)

    # Pass 2: the gradient, G w_y T q_j off the target and -G w_y T on it (plus the z-loss's
    # 2 z G lse softmax_j; times 1 - tanh**2 under a softcap).
    scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
    target_grad = scale * w * push
    rest_coef = tl.where(has_rest, target_grad / tl.where(has_rest, sum_exp, 1.0), 0.0)
    for block_start in range(0, n_cols, BLOCK):
        cols, in_row, x, slope = _grad_block(logits_ptr, block_start, n_cols, softcap,
                                             HAS_SOFTCAP, BLOCK)
        grad = tl.where(cols == y, -target_grad, rest_coef * tl.exp(x - safe_max))
        _store_grad(grad_ptr, cols, in_row, grad, x, lse, 2.0 * z_loss * scale * lse, scale,
                    slope, HAS_Z_LOSS, HAS_SOFTCAP)

@triton.jit
def smoothed_kernel(
    logits_ptr, logits_stride, grad_ptr, grad_stride, target_ptr, weight_ptr,
    bonus_weight_ptr, loss_ptr, lse_ptr, scale_ptr, n_cols, ignore_index, rho, smoothing,
    log_end, log1m_end, inv_1m_end, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_BONUS_WEIGHT: tl.constexpr, BONUS: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    y, valid, w_y = _row_target(target_ptr, weight_ptr, row, ignore_index, HAS_WEIGHT)
    # Class mass a_k = alpha w_k + beta [k = y]; zero for an ignored row.
    alpha = tl.where(valid, smoothing / n_cols, 0.0)
    beta = (1.0 - smoothing) * w_y

    # Pass 1: online arg-max m (index s) and the exact sum of exp(z - m) over k != s.
    row_max = -float("inf")
    special = 0
    rest = 0.0
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        x = _load_logits(logits_ptr, cols, cols < n_cols, -float("inf"), softcap, HAS_SOFTCAP)
        block_max = tl.max(x, 0)
        block_arg = tl.min(tl.where(x == block_max, cols, n_cols + BLOCK), 0)
        block_rest = tl.sum(tl.where(cols == block_arg, 0.0, tl.exp(x - block_max)), 0)
        take = block_max > row_max
        moved = tl.exp(row_max - block_max)  # 0 while row_max is -inf
        kept = tl.where(block_max == -float("inf"), 0.0,
                        tl.exp(block_max - tl.where(take, block_max, row_max)))
        rest = tl.where(
            take, rest * moved + moved + block_rest, rest + kept * (1.0 + block_rest)
        )
        special = tl.where(take, block_arg, special)
        row_max = tl.maximum(row_max, block_max)
    log_total = _log1p_any(rest)  # log S, S = 1 + rest
    total = 1.0 + rest

    # Pass 2: sums over k != s of a_k (m - z_k), a_k, a_k v_k b(p_k) and h_k.
    ce_rest = 0.0
    mass_rest = 0.0
    bonus_rest = 0.0
    hessian_rest = 0.0
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        in_rest = (cols < n_cols) & (cols != special)
        x = _load_logits(logits_ptr, cols, in_rest, 0.0, softcap, HAS_SOFTCAP)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_rest, other=0.0).to(tl.float32)
        mass = tl.where(in_rest, alpha * w + tl.where(cols == y, beta, 0.0), 0.0)
        ce_rest += tl.sum(mass * (row_max - x), 0)
        mass_rest += tl.sum(mass, 0)
        if BONUS != 0:
            p = tl.where(in_rest, tl.exp(x - row_max) / total, 0.0)
            b, ratio = _rest_bonus(p, log_end, log1m_end, inv_1m_end)
            v = 1.0
            if HAS_BONUS_WEIGHT:
                v = tl.load(bonus_weight_ptr + cols, mask=in_rest, other=0.0).to(tl.float32)
            bonus_rest += tl.sum(mass * v * b, 0)
            hessian_rest += tl.sum(rho * mass * v * ratio, 0)

    w_s = 1.0
    if HAS_WEIGHT:
        w_s = tl.load(weight_ptr + special).to(tl.float32)
    mass_special = alpha * w_s + tl.where(special == y, beta, 0.0)
    mass_total = mass_rest + mass_special
    one_minus_p_s = rest / total
    row_loss = ce_rest + mass_total * log_total
    bonus_special = 0.0
    g_s = 0.0
    if BONUS != 0:
        p_s = 1.0 / total
        log_one_minus_p_s = tl.log(tl.where(rest > 0.0, rest, 1.0)) - log_total
        log_one_minus_p_s = tl.where(rest > 0.0, log_one_minus_p_s, -float("inf"))
        b_s, g_s = _bonus(p_s, one_minus_p_s, -log_total, log_one_minus_p_s, log_end,
                          log1m_end, inv_1m_end, 1.0, 0.0, 0.0, 1, False)
        v_s = 1.0
        if HAS_BONUS_WEIGHT:
            v_s = tl.load(bonus_weight_ptr + special).to(tl.float32)
        bonus_special = rho * mass_special * v_s
        row_loss += rho * bonus_rest + tl.where(bonus_special != 0.0, bonus_special * b_s, 0.0)
    lse = row_max + log_total
    if HAS_Z_LOSS:
        row_loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))
    tl.store(lse_ptr + row, lse)

    # Pass 3: the gradient (see DenseTargetEL): q_k C1 + a_k (rho v_k r_k - 1) off s.
    scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
    push = one_minus_p_s * (mass_total - hessian_rest) - bonus_special * g_s
    grad_special = mass_rest - hessian_rest - push
    grad_special = tl.where(rest > 0.0, grad_special, 0.0)
    rest_coef = tl.where(rest > 0.0, push / tl.where(rest > 0.0, rest, 1.0), 0.0)
    for block_start in range(0, n_cols, BLOCK):
        cols, in_row, x, slope = _grad_block(logits_ptr, block_start, n_cols, softcap,
                                             HAS_SOFTCAP, BLOCK)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        mass = alpha * w + tl.where(cols == y, beta, 0.0)
        bonus_slope = -1.0
        if BONUS != 0:
            p = tl.where(cols == special, 0.0, tl.exp(x - row_max) / total)
            _, ratio = _rest_bonus(p, log_end, log1m_end, inv_1m_end)
            v = 1.0
            if HAS_BONUS_WEIGHT:
                v = tl.load(bonus_weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            bonus_slope = rho * v * ratio - 1.0
        grad = rest_coef * tl.exp(x - row_max) + mass * bonus_slope
        grad = scale * tl.where(cols == special, grad_special, grad)
        _store_grad(grad_ptr, cols, in_row, grad, x, lse, 2.0 * z_loss * scale * lse, scale,
                    slope, HAS_Z_LOSS, HAS_SOFTCAP)

@triton.jit
def _grad_block(logits_ptr, block_start, n_cols, softcap, HAS_SOFTCAP: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """A gradient pass's block: (cols, in_row, the (capped) logits, the softcap's slope
    1 - tanh**2, 1 without a softcap)."""
    cols = block_start + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    slope = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_SOFTCAP:
        x, slope = _softcap(x, softcap)
    return cols, in_row, x, slope

@triton.jit
def _store_grad(grad_ptr, cols, in_row, grad, x, lse, z_coef, scale, slope,
                HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    """Store the gradient of the capped logits ``x`` plus the z-loss's ``z_coef * softmax``,
    times the softcap's ``slope``; 0 on a row of scale 0 (ignored, or of token weight 0),
    whatever its logits (NaN included)."""
    if HAS_Z_LOSS:
        grad += z_coef * tl.exp(x - lse)
    if HAS_SOFTCAP:
        grad *= slope
    grad = tl.where(scale != 0.0, grad, 0.0)
    tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

@triton.jit
def _log1p_any(x):
    """log(1 + x) for x >= 0."""
    return tl.where(x < 1e-4, x * (1.0 - x * (0.5 - x * (1.0 / 3.0))), tl.log(1.0 + x))

@triton.jit
def _rest_bonus(p, log_end, log1m_end, inv_1m_end):
    """Log bonus b(p) and r(p) = p b'(p) for p <= 1/2 (a class that is not the arg-max)."""
    one_minus_p = 1.0 - p
    linear = p > log_end
    value = tl.where(linear, log1m_end - (p - log_end) * inv_1m_end, _log1p(-p))
    ratio = tl.where(linear, -p * inv_1m_end, -p / one_minus_p)
    return value, ratio
