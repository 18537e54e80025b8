"""The Triton kernels of :mod:`.triton_el` (imported on first launch: importing triton is slow).

See :mod:`.triton_el` for the maths; ``hard_target_kernel`` handles rows with one target class,
``smoothed_kernel`` label-smoothed rows. One program per row, ``BLOCK`` classes at a time.
Both apply the softcap to every logit they load (``HAS_SOFTCAP``; the gradient pass recomputes
it and multiplies by 1 - tanh**2), add the z-loss to the row loss and its gradient
(``HAS_Z_LOSS``), and write each row's logsumexp (of the capped logits) to ``lse_ptr``.

Precision: the elementwise work (exp, the block sums, the gradient) is float32; the per-row
scalars (the running sums across blocks and their rescaling, the logs, p, the bonus, the row
loss and the lse) are float64, a few scalar operations per row, so that the row loss errs about
the final rounding to float32. The z-loss's gradient 2 z lse softmax_j is folded into the
gradient's coefficients (no exp(z_j - lse) of a rounded lse). Every pass caps the logits with
:func:`_softcap` (float32, within 0.8 of a unit: the passes agree, and the gradient's softmax
is that of the sums); the gradient pass also computes each capped logit in float64
(:func:`_softcap64`), takes 1 - tanh**2 from it, and adds sum_j g_j lo_j to the row loss, g_j
the gradient with respect to capped logit j and lo_j = (float64 cap) - (float32 cap): the loss
of the exact capped logits to first order (the float32 rounding of c tanh(z / c) otherwise
reaches the loss at a unit of the logits' size, which EL, whose target gradient stays near -1,
carries to confident rows). Every launch runs the gradient pass (with a row scale of 0 when no
gradient is wanted), so the loss is the same with and without gradients.
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
    """(c tanh(x / c), 1 - tanh(x / c)**2) of float32 ``x`` in float32, the first within 0.8 of a
    unit (0.25 on average; torch's float32 c * tanh(x / c) errs up to 2, 0.3-0.4 on average; tl's
    core has no tanh).

    tanh(u) is formed as an unevaluated sum hi + lo of float32s, then c (hi + lo) rounded once
    (the product c hi exact by an fma); the rounding of u = x / c enters through the exact
    residual x - u c (an fma) times 1 - tanh**2. With a = |u|:

    * a < 0.55: the Taylor series to u**21 (3e-9 relative), u + u**3 P(u**2) with its rounding;
    * 0.55 <= a < 1.1: tanh u = 2 s / (1 + s**2), s = tanh(u / 2) by the series, the square and
      the division carried with their residuals;
    * a >= 1.1: with t = exp(-2 a), sign(u) (1 - t) / (1 + t), the roundings of 1 -+ t and the
      division carried (t's own rounding is left, damped by 2 t / (1 - t**2) <= 0.23).

    1 - tanh**2 = 4 t / (1 + t)**2, relatively exact.
    """
    u = x / softcap
    a = tl.abs(u)
    residual = tl.where(a < float("inf"), tl.fma(-u, softcap, x), 0.0)  # 0 at +-inf
    t = tl.exp(-2.0 * a)
    one_plus = 1.0 + t
    slope = 4.0 * t / (one_plus * one_plus)
    # a >= 1.1: q = (1 - t) / (1 + t) and q_lo, the rest of the exact quotient.
    one_minus = 1.0 - t
    one_minus_err = (1.0 - one_minus) - t
    one_plus_err = t - (one_plus - 1.0)
    q = one_minus / one_plus
    q_lo = (tl.fma(-q, one_plus, one_minus) + (one_minus_err - q * one_plus_err)) / one_plus
    q = tl.where(u < 0.0, -q, q)
    q_lo = tl.where(u < 0.0, -q_lo, q_lo)
    # The series at w = u (a < 0.55) or u / 2: w + w**3 P(w**2), P of tanh's Taylor coefficients.
    small = a < 0.55
    w = tl.where(small, u, 0.5 * u)
    w2 = w * w
    poly = -443861162.0 / 1856156927625.0 + w2 * (18888466084.0 / 194896477400625.0)
    poly = 6404582.0 / 10854718875.0 + w2 * poly
    poly = -929569.0 / 638512875.0 + w2 * poly
    poly = 21844.0 / 6081075.0 + w2 * poly
    poly = -1382.0 / 155925.0 + w2 * poly
    poly = -1.0 / 3.0 + w2 * (2.0 / 15.0 + w2 * (-17.0 / 315.0 + w2 * (62.0 / 2835.0 + w2 * poly)))
    tail = w * w2 * poly
    series = w + tail
    series_lo = tail - (series - w)
    # 0.55 <= a < 1.1: 2 s / (1 + s**2), s = series + series_lo.
    square = series * series
    square_lo = tl.fma(series, series, -square) + 2.0 * series * series_lo
    den = 1.0 + square
    den_lo = ((1.0 - den) + square) + square_lo
    doubled = 2.0 * series / den
    doubled_lo = (tl.fma(-doubled, den, 2.0 * series) + (2.0 * series_lo - doubled * den_lo)) / den
    middle = a < 1.1
    hi = tl.where(small, series, tl.where(middle, doubled, q))
    lo = tl.where(small, series_lo, tl.where(middle, doubled_lo, q_lo))
    capped = softcap * hi
    capped_err = tl.fma(softcap, hi, -capped)
    return capped + (capped_err + (softcap * lo + residual * slope)), slope

@triton.jit
def _softcap64(x, softcap):
    """(c tanh(x / c), 1 - tanh(x / c)**2) in float64 of float32 ``x``, as :func:`_softcap`
    (series below |u| = 1e-3, to u**5: 1e-19 relative; above, 1 - t loses at most 1e-13)."""
    u = x.to(tl.float64) / softcap
    t = tl.exp(-2.0 * tl.abs(u))
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0)))
    large = (1.0 - t) / (1.0 + t)
    tanh = tl.where(tl.abs(u) < 1e-3, series, tl.where(u < 0.0, -large, large))
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

    # Pass 1: online max and sum of exp over the non-target classes (float32 blocks, the
    # running sum and its rescaling in float64).
    row_max = tl.full((), -float("inf"), tl.float32)
    sum_exp = tl.full((), 0.0, tl.float64)
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        x = _load_logits(logits_ptr, cols, (cols < n_cols) & (cols != y), -float("inf"), softcap,
                         HAS_SOFTCAP)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        block_sum = tl.sum(tl.exp(x - safe_max), 0).to(tl.float64)
        sum_exp = sum_exp * tl.exp(row_max.to(tl.float64) - safe_max.to(tl.float64)) + block_sum
        row_max = new_max
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    max64 = safe_max.to(tl.float64)
    has_rest = sum_exp > 0.0
    lse_rest = max64 + tl.log(tl.where(has_rest, sum_exp, 1.0))
    z_y64 = z_y.to(tl.float64)
    d = tl.where(has_rest, z_y64 - lse_rest, float("inf"))

    # The row's scalars in float64.
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
    lse = tl.where(d >= 0, z_y64 + neg_log_p, lse_rest + _softplus(d))
    row_loss = w * row_loss
    if HAS_Z_LOSS:
        row_loss += z_loss * lse * lse
    tl.store(lse_ptr + row, lse.to(tl.float32))

    # Pass 2: the gradient for a unit row scale, w_y T q_j off the target and -w_y T on it,
    # plus the z-loss's 2 z lse softmax_j (softmax_y = p_y, softmax_j = (1 - p_y) q_j: folded
    # into the two coefficients), stored times the row's scale (and 1 - tanh**2 under a
    # softcap); the softcap's first-order correction of the row loss on the way.
    scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
    target_grad = w * push
    rest_grad = target_grad
    if HAS_Z_LOSS:
        z_coef = 2.0 * z_loss * lse
        target_grad -= z_coef * p
        rest_grad += z_coef * one_minus_p
    rest_coef = tl.where(has_rest, rest_grad / tl.where(has_rest, sum_exp, 1.0), 0.0)
    rest_coef = rest_coef.to(tl.float32)
    target_grad = target_grad.to(tl.float32)
    correction = tl.full((), 0.0, tl.float64)
    for block_start in range(0, n_cols, BLOCK):
        cols, in_row, x, slope, lo = _grad_block(logits_ptr, block_start, n_cols, softcap,
                                                 HAS_SOFTCAP, BLOCK)
        grad = tl.where(cols == y, -target_grad, rest_coef * tl.exp(x - safe_max))
        correction += _store_grad(grad_ptr, cols, in_row, grad, scale, slope, lo, HAS_SOFTCAP)
    row_loss += correction
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0).to(tl.float32))

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

    # Pass 1: online arg-max m (index s) and the exact sum of exp(z - m) over k != s (float32
    # blocks, the running sum and its rescaling in float64).
    row_max = tl.full((), -float("inf"), tl.float32)
    special = 0
    rest = tl.full((), 0.0, tl.float64)
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        x = _load_logits(logits_ptr, cols, cols < n_cols, -float("inf"), softcap, HAS_SOFTCAP)
        block_max = tl.max(x, 0)
        block_arg = tl.min(tl.where(x == block_max, cols, n_cols + BLOCK), 0)
        block_rest = tl.sum(tl.where(cols == block_arg, 0.0, tl.exp(x - block_max)), 0)
        block_rest = block_rest.to(tl.float64)
        take = block_max > row_max
        old_max = row_max.to(tl.float64)
        new_max = block_max.to(tl.float64)
        moved = tl.exp(old_max - new_max)  # 0 while row_max is -inf
        kept = tl.where(block_max == -float("inf"), 0.0,
                        tl.exp(new_max - tl.where(take, new_max, old_max)))
        rest = tl.where(
            take, rest * moved + moved + block_rest, rest + kept * (1.0 + block_rest)
        )
        special = tl.where(take, block_arg, special)
        row_max = tl.maximum(row_max, block_max)
    log_total = _log1p_any(rest)  # log S, S = 1 + rest (float64)
    total = 1.0 + rest
    total32 = total.to(tl.float32)

    # Pass 2: sums over k != s of a_k (m - z_k), a_k, a_k v_k b(p_k) and h_k (float32 blocks,
    # float64 across them).
    ce_rest = tl.full((), 0.0, tl.float64)
    mass_rest = tl.full((), 0.0, tl.float64)
    bonus_rest = tl.full((), 0.0, tl.float64)
    hessian_rest = tl.full((), 0.0, tl.float64)
    for block_start in range(0, n_cols, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        in_rest = (cols < n_cols) & (cols != special)
        x = _load_logits(logits_ptr, cols, in_rest, 0.0, softcap, HAS_SOFTCAP)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_rest, other=0.0).to(tl.float32)
        # The smoothing's mass alpha w_k here; the target's beta joins below in float64.
        smooth = tl.where(in_rest, alpha * w, 0.0)
        ce_rest += tl.sum(smooth * (row_max - x), 0).to(tl.float64)
        mass_rest += tl.sum(smooth, 0).to(tl.float64)
        if BONUS != 0:
            mass = smooth + tl.where(in_rest & (cols == y), beta, 0.0)
            p = tl.where(in_rest, tl.exp(x - row_max) / total32, 0.0)
            b, ratio = _rest_bonus(p, log_end, log1m_end, inv_1m_end)
            v = 1.0
            if HAS_BONUS_WEIGHT:
                v = tl.load(bonus_weight_ptr + cols, mask=in_rest, other=0.0).to(tl.float32)
            bonus_rest += tl.sum(mass * v * b, 0).to(tl.float64)
            hessian_rest += tl.sum(rho * mass * v * ratio, 0).to(tl.float64)

    # The row's scalars in float64; the target's term beta (m - z_y) when y is not s.
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = _softcap(z_y, softcap)[0]  # (no "_": pass 3 assigns it blocks)
    target_mass = tl.where(special == y, 0.0, beta).to(tl.float64)
    ce_rest += target_mass * (row_max.to(tl.float64) - z_y.to(tl.float64))
    mass_rest += target_mass
    w_s = 1.0
    if HAS_WEIGHT:
        w_s = tl.load(weight_ptr + special).to(tl.float32)
    mass_special = (alpha * w_s + tl.where(special == y, beta, 0.0)).to(tl.float64)
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
    max64 = row_max.to(tl.float64)
    lse = max64 + log_total
    if HAS_Z_LOSS:
        row_loss += z_loss * lse * lse
    tl.store(lse_ptr + row, lse.to(tl.float32))

    # Pass 3: the gradient for a unit row scale (see DenseTargetEL): q_k C1 + a_k (rho v_k r_k
    # - 1) off s, plus the z-loss's 2 z lse softmax_k = 2 z lse exp(z_k - m) / S (folded into
    # the coefficients: exp(z_s - m) = 1), stored times the row's scale; the softcap's
    # correction of the row loss.
    scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
    push = one_minus_p_s * (mass_total - hessian_rest) - bonus_special * g_s
    grad_special = mass_rest - hessian_rest - push
    grad_special = tl.where(rest > 0.0, grad_special, 0.0)
    rest_coef = tl.where(rest > 0.0, push / tl.where(rest > 0.0, rest, 1.0), 0.0)
    if HAS_Z_LOSS:
        z_softmax = 2.0 * z_loss * lse / total
        grad_special += z_softmax
        rest_coef += z_softmax
    grad_special = grad_special.to(tl.float32)
    rest_coef = rest_coef.to(tl.float32)
    correction = tl.full((), 0.0, tl.float64)
    for block_start in range(0, n_cols, BLOCK):
        cols, in_row, x, slope, lo = _grad_block(logits_ptr, block_start, n_cols, softcap,
                                                 HAS_SOFTCAP, BLOCK)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        mass = alpha * w + tl.where(cols == y, beta, 0.0)
        e = tl.exp(x - row_max)
        bonus_slope = -1.0
        if BONUS != 0:
            p = tl.where(cols == special, 0.0, e / total32)
            _, ratio = _rest_bonus(p, log_end, log1m_end, inv_1m_end)
            v = 1.0
            if HAS_BONUS_WEIGHT:
                v = tl.load(bonus_weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            bonus_slope = rho * v * ratio - 1.0
        grad = rest_coef * e + mass * bonus_slope
        grad = tl.where(cols == special, grad_special, grad)
        correction += _store_grad(grad_ptr, cols, in_row, grad, scale, slope, lo, HAS_SOFTCAP)
    row_loss += correction
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0).to(tl.float32))

@triton.jit
def _grad_block(logits_ptr, block_start, n_cols, softcap, HAS_SOFTCAP: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """A gradient pass's block: (cols, in_row, the (capped) logits, the softcap's slope
    1 - tanh**2, lo); without a softcap the slope is 1 and lo 0.

    Under a softcap the capped logits are the float32 :func:`_softcap` of the other passes (so
    that the gradient's softmax is that of their sums), the slope that of :func:`_softcap64`,
    and lo = (c tanh(z / c) in float64) - (the float32 capped logit)."""
    cols = block_start + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    slope = tl.full((BLOCK,), 1.0, tl.float32)
    lo = tl.full((BLOCK,), 0.0, tl.float32)
    if HAS_SOFTCAP:
        capped, slope64 = _softcap64(x, softcap)
        x, _ = _softcap(x, softcap)
        lo = (capped - x.to(tl.float64)).to(tl.float32)
        slope = slope64.to(tl.float32)
    return cols, in_row, x, slope, lo

@triton.jit
def _store_grad(grad_ptr, cols, in_row, grad, scale, slope, lo, HAS_SOFTCAP: tl.constexpr):
    """Store the unit gradient ``grad`` of the capped logits times the softcap's ``slope`` and
    the row's ``scale``; 0 on a row of scale 0 (ignored, or of token weight 0), whatever its
    logits (NaN included). Returns the block's sum of ``grad * lo`` (float64; 0 without a
    softcap)."""
    correction = tl.full((), 0.0, tl.float64)
    if HAS_SOFTCAP:
        correction = tl.sum(tl.where(in_row, grad * lo, 0.0), 0).to(tl.float64)
        grad *= slope
    grad = tl.where(scale != 0.0, grad * scale, 0.0)
    tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    return correction

@triton.jit
def _log1p_any(x):
    """log(1 + x) for x >= 0, to a few units of x's dtype (Kahan: log(u) x / (u - 1), u = 1 + x
    rounded)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))

@triton.jit
def _rest_bonus(p, log_end, log1m_end, inv_1m_end):
    """Log bonus b(p) and r(p) = p b'(p) for p <= 1/2 (a class that is not the arg-max)."""
    one_minus_p = 1.0 - p
    linear = p > log_end
    value = tl.where(linear, log1m_end - (p - log_end) * inv_1m_end, _log1p(-p))
    ratio = tl.where(linear, -p * inv_1m_end, -p / one_minus_p)
    return value, ratio
