"""The terms of :mod:`.small_common`'s few-operation calls: the loss and its gradient.

At the sizes these calls serve (at most :data:`.small.SMALL_MAX_ELEMENTS` logits) a torch
operation costs one to two microseconds whatever its size, so the cost is the count of
operations. The work splits in two:

* passes over the logits, (N, C), in torch: a maximum, an exponential, a float64 row sum, the
  gradient's scaling and its target entries (:func:`hard_terms`, :func:`smoothed_terms`);
* arithmetic on the N per-row values (log p_y and the bonus terms), in float64, in NumPy where it
  imports: a NumPy operation on a few hundred values costs a fraction of a microsecond, about a
  fifth of a torch one, and these are most of the operations. :class:`RowArrays` hides which
  library runs it (``ROW_ARRAYS``; without NumPy, torch), so the arithmetic is written once.

Exactness (as :mod:`.small`'s module docstring argues): the value must err no more than torch's
CE in the input's dtype, and the bonus's slope multiplies the error of log p_y by up to
1 + rho log_end / (1 - log_end). So log p_y is float64: (z_y - max z) - log S with the float32
logits' difference taken in float64 and S = sum_k exp(z_k - max z) summed in float64 (over a
last dimension of fewer than :data:`.small.CLASS_MAJOR_BELOW` classes, the float64
log-softmax of the class-major transpose, which costs about the float32 one there). p_y - 1 is
``expm1(log p_y)``, exact as p_y -> 1.
"""

from __future__ import annotations

import torch

from .small import CLASS_MAJOR_BELOW

try:
    import numpy
except ImportError:  # NumPy is optional: the row arithmetic then runs in torch
    numpy = None

#: From this many logits :func:`smoothed_terms` reads the classes over their last dimension.
SMOOTHED_LAST_FROM = 1 << 13


class RowArrays:
    """The per-row arithmetic's array library: NumPy (``numpy``) or torch (None).

    The arithmetic itself (:func:`target_terms`) uses what both libraries spell alike:
    ``expm1``, ``log``, operators and ``.sum()``, and :meth:`minimum`. This class converts at
    the edges: torch tensors to row arrays and back.

    Args:
        module: ``numpy``, or None for torch.
    """

    def __init__(self, module):
        self.module = module if module is not None else torch

    def float64(self, tensor: torch.Tensor):
        """A tensor's values as a float64 row array of its shape (a view where they already
        are)."""
        if self.module is torch:
            return tensor.double()
        return tensor.numpy().astype(numpy.float64, copy=False)

    def difference(self, first: torch.Tensor, second: torch.Tensor):
        """``first - second`` as a float64 row array, taken in float64 (exact for float32)."""
        if self.module is torch:
            return first.double() - second.double()
        return numpy.subtract(first.numpy(), second.numpy(), dtype=numpy.float64)

    def minimum(self, array, bound: float):
        """The elementwise minimum of a row array and a number."""
        if self.module is torch:
            return array.clamp_max(bound)
        return numpy.minimum(array, bound)

    def tensor(self, array, like: torch.Tensor) -> torch.Tensor:
        """A row array as a tensor of ``like``'s dtype (and the array's shape)."""
        if self.module is torch:
            return array.to(like.dtype)
        if like.dtype == torch.float32:
            array = array.astype(numpy.float32)
        return torch.from_numpy(array)


#: The library the per-row arithmetic runs in (tests switch it to torch's).
ROW_ARRAYS = RowArrays(numpy)


def target_terms(rows: RowArrays, log_p, rho: float, floor: float, scale: float):
    """The target's terms of the conservative log bonus, from float64 log p_y (a row array).

    b(p) = log u - (u - (1 - p)) / floor with u = max(1 - p, floor): log(1 - p) up to
    log_end = 1 - floor, its tangent beyond. With nu = -u = min(p - 1, -floor),
    u - (1 - p) = (p - 1) - nu.

    Returns:
        (sum over rows of -log p_y + rho b(p_y), times ``scale``; p_y - 1; the gradient factor
        ``scale * (1 + rho p_y / u)`` of p - onehot_y), the last two row arrays.
    """
    xp = rows.module
    lost = xp.expm1(log_p)  # p_y - 1
    negative_bound = rows.minimum(lost, -floor)  # -u
    factor = scale - (rho * scale) * (lost + 1.0) / negative_bound
    bonus = float(xp.log(-negative_bound).sum()) + float((negative_bound - lost).sum()) / floor
    return (rho * bonus - float(log_p.sum())) * scale, lost, factor


def hard_terms(input, target, rho: float, floor: float, scale: float):
    """(the loss as a float, its gradient for a unit incoming gradient, in the input's shape and
    dtype) for hard targets: row loss -log p_y + rho b(p_y), gradient
    (1 + rho p_y / u) (p - onehot_y), both times ``scale``.

    Args:
        input: (N, C) float32 or float64 logits.
        target: (N,) int64 class indices (out of range: the gather fails).
        rho: the bonus scale.
        floor: 1 - log_end.
        scale: 1 / N for the mean, 1 for the sum.
    """
    rows = ROW_ARRAYS
    count, num_classes = input.shape
    if num_classes < CLASS_MAJOR_BELOW:
        index = target.view(1, count)
        probs = torch.log_softmax(input.t(), 0, dtype=torch.float64)
        log_p = rows.float64(torch.gather(probs, 0, index))
        value, lost, factor = target_terms(rows, log_p, rho, floor, scale)
        probs.exp_().mul_(rows.tensor(factor, probs))
        probs.scatter_(0, index, rows.tensor(factor * lost, probs))
        # One copy to the input's own layout and dtype: the gradient is rounded once.
        gradient = torch.empty_like(input, memory_format=torch.contiguous_format)
        return value, gradient.copy_(probs.t())
    index = target.view(count, 1)
    shift = torch.amax(input, 1, keepdim=True)
    gradient = torch.sub(input, shift).exp_()  # exp(z - max z), p times S
    total = rows.float64(gradient.sum(1, keepdim=True, dtype=torch.float64))  # S
    log_p = rows.difference(torch.gather(input, 1, index), shift)
    log_p -= rows.module.log(total)
    value, lost, factor = target_terms(rows, log_p, rho, floor, scale)
    gradient.mul_(rows.tensor(factor / total, input))
    gradient.scatter_(1, index, rows.tensor(factor * lost, input))
    return value, gradient


def smoothed_terms(input, target, rho: float, floor: float, smoothing: float, scale: float):
    """:func:`hard_terms` with label smoothing ``eps`` (``smoothing``).

    Class mass a_k = alpha + beta [k = y] (alpha = eps / C, beta = 1 - eps, sum 1). Row loss
    sum_k a_k (-log p_k + rho b(p_k)); gradient p_k (1 - H) - a_k + h_k with
    h_k = -rho a_k q_k, q = p / u, H = sum_k h_k:
    p_k (1 + rho (alpha Q + beta q_y)) - alpha (1 + rho q_k) - beta (1 + rho q_y) [k = y], with
    Q = sum_k q_k. The target's terms are exact as without smoothing (:func:`target_terms`).

    Small inputs (fewer than :data:`CLASS_MAJOR_BELOW` classes or :data:`SMOOTHED_LAST_FROM`
    logits) are read class-major and computed in float64 (:func:`smoothed_class_major_terms`):
    there the float64 passes cost about the float32 ones. Larger ones over their last dimension:
    the other classes' terms enter with the small weight alpha, so (as torch's CE rounds its own
    log-probabilities) they are computed in the input's dtype, except
    sum_k log p_k = sum_k z_k - C (max z + log S), from float64 sums.
    """
    count, num_classes = input.shape
    if num_classes < CLASS_MAJOR_BELOW or input.numel() < SMOOTHED_LAST_FROM:
        return smoothed_class_major_terms(input, target, rho, floor, smoothing, scale)
    rows = ROW_ARRAYS
    alpha, beta = smoothing / num_classes, 1.0 - smoothing
    index = target.view(count, 1)
    shift = torch.amax(input, 1, keepdim=True)
    probs = torch.sub(input, shift).exp_()
    total = rows.float64(probs.sum(1, keepdim=True, dtype=torch.float64))  # S
    log_total = rows.module.log(total)
    normaliser = log_total + rows.float64(shift)  # log sum_k exp z_k
    log_p = rows.difference(torch.gather(input, 1, index), shift)
    log_p -= log_total
    sum_log_probs = float(input.sum(dtype=torch.float64)) - num_classes * float(normaliser.sum())
    probs.mul_(rows.tensor(1.0 / total, input))
    bound = torch.rsub(probs, 1.0).clamp_min_(floor)  # u
    # u - (1 - p) = max(p - log_end, 0): the tangent's part, summed without cancellation.
    sum_excess = float(torch.sub(probs, 1.0 - floor).clamp_min_(0.0).sum())
    ratio = torch.div(probs, bound)  # q
    sum_ratio = rows.float64(ratio.sum(1, keepdim=True))  # Q
    sum_log_bound = float(bound.log_().sum())
    target_value, lost, _ = target_terms(rows, log_p, rho, floor, 1.0)
    # target_value = sum_rows -log p_y + rho b(p_y); the bonus over every class, alpha-weighted.
    value = beta * target_value + alpha * (rho * (sum_log_bound - sum_excess / floor)
                                           - sum_log_probs)  # fmt: skip
    ratio_target = (lost + 1.0) / -rows.minimum(lost, -floor)  # q_y
    row_factor = scale + (rho * scale) * (alpha * sum_ratio + beta * ratio_target)
    gradient = probs.mul_(rows.tensor(row_factor, input))
    gradient.sub_(ratio, alpha=rho * alpha * scale).sub_(alpha * scale)
    # The target's entry p_y R - (alpha + beta) scale (1 + rho q_y) in float64 from p_y - 1:
    # its two terms nearly cancel as p_y -> 1, each a few times the gradient's scale.
    target_entry = (lost + 1.0) * row_factor - ((alpha + beta) * scale) * (
        1.0 + rho * ratio_target)  # fmt: skip
    gradient.scatter_(1, index, rows.tensor(target_entry, input))
    return value * scale, gradient


def smoothed_class_major_terms(input, target, rho: float, floor: float, smoothing: float,
                               scale: float):  # fmt: skip
    """:func:`smoothed_terms` read class-major, everything in float64."""
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
