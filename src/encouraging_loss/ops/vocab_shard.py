"""The encouraging loss of logits sharded over the vocabulary: row statistics by all-reduce.

Each rank of a process group holds the columns [start, start + width) of the (M, V) logits (a
contiguous slice, in rank order). Every row quantity the loss needs is a max or a sum over the
columns, so each rank reduces its own columns and an all-reduce of (M,)-sized rows completes it;
no rank sees another's columns. The target column y of a row lives on one rank, which contributes
z_y (the others -inf to a max).

Exactness (as :mod:`.rowwise`): log(1 - p_y) comes from the non-target classes, through
``d = z_y - logsumexp_{j != y} z_j`` (``-log p_y = softplus(-d)``, ``log(1 - p_y) =
-softplus(d)``), so the non-target logsumexp is the global one: max_{j != y} z_j by all-reduce
MAX, then sum_{j != y} exp(z_j - max) by all-reduce SUM. With label smoothing every class k
carries mass alpha w_k and gets a bonus b(p_k); a class other than y can have p_k > 1/2 only at
the row's largest non-target logit, and there 1 - p_k is summed from the other classes (the ties
at the max and the classes below it, counted apart) rather than subtracted from 1.

Notation: a_k = alpha w_k + beta_i [k = y] the class mass (alpha = eps / V times the token weight,
0 for ignored rows), v the bonus weight, r(p) = p b'(p), g(p) = (1 - p) r(p), q_k =
exp(z_k - logsumexp_{j != y} z_j) the softmax over the classes j != y, A' = alpha sum_{k != y}
w_k and H' = rho alpha sum_{k != y} w_k v_k r_k. The gradient (see :mod:`.smoothed`) is

    dL/dz_k = q_k [(1 - p_y)(A' - H' + a_y) - rho a_y v_y g_y] - alpha w_k (1 - rho v_k r_k),
    dL/dz_y = p_y (A' - H') - a_y [(1 - p_y) - rho v_y g_y],

plus the z-loss's 2 z_loss lse p_k. Each rank forms it for its own columns only. At a column k
with p_k > 1/2 (only with label smoothing's bonus), r_k is unbounded for the plain log bonus and
the first term's share of H' (through h_k) nearly cancels the last term: there H' leaves out h_k
and the last term is alpha w_k (1 - rho v_k r_k) - p_k h_k = alpha w_k (1 - rho v_k g_k), exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .index_targets import row_token_weight, target_weights
from .logit_terms import z_loss_rows, z_row_weight
from .rowwise import NEG_INF, ROW_DTYPE, rows_as, rows_function, softplus, working_rows


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's columns lie in the vocabulary, and the group that holds the rest.

    Args:
        start: the first column of this rank's shard in the full vocabulary.
        width: the number of columns this rank holds.
        vocab_size: V, the sum of all ranks' widths.
        widths: every rank's width, in rank order.
        group: the process group (None: the default one).
    """

    start: int
    width: int
    vocab_size: int
    widths: tuple[int, ...]
    group: object = None

    @property
    def stop(self) -> int:
        return self.start + self.width

    def all_reduce_(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """``tensor`` reduced in place over the group's ranks (``op`` a ``dist.ReduceOp``)."""
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the group's ranks, in place (an all-reduce)."""
        return self.all_reduce_(tensor, dist.ReduceOp.SUM)


def row_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Float64 row sums of (M, width) ``values``, weighted by a (width,) vector when given."""
    return (values.sum(1) if weights is None else values @ weights).to(ROW_DTYPE)


class VocabShardRows:
    """The per-row arguments of the sharded loss, sliceable into row chunks.

    The interface of :class:`.index_targets.IndexTargetRows` (``terms``, ``grad_``,
    ``denominator``, ``num_rows``), so that the fused linear loss of :mod:`.fused_linear` runs
    on it chunk by chunk; :data:`VocabShardEL` runs it on a whole batch of logits.

    Args:
        target: (...) class indices in the full vocabulary, or ``ignore_index``; the same on
            every rank.
        shard: this rank's :class:`VocabShard`.
        weight: optional (V,) class weights of the full vocabulary, in the compute dtype.
        bonus_weight: optional (V,) bonus weights of the full vocabulary, in the compute dtype.
        options: the loss options (the softcap is applied by the caller, the z-loss here).
        compute_dtype: float32 or float64, the dtype of the (M, width) passes.
        token_weight: optional checked per-row weights (the target's shape).
        keep_lse: keep each row's logsumexp in :attr:`lse`.
    """

    def __init__(self, target, shard: VocabShard, weight, bonus_weight, options, compute_dtype,
                 token_weight=None, keep_lse: bool = False):  # fmt: skip
        flat_target = target.reshape(-1).long()
        valid, safe_target, target_weight = target_weights(
            flat_target, options.ignore_index, weight, ROW_DTYPE
        )
        row_weight = row_token_weight(token_weight)
        if row_weight is not None:
            target_weight = target_weight * row_weight
        self.shard, self.compute_dtype = shard, compute_dtype
        #: The "mean" reduction's denominator, as torch's (times the token weights).
        self.denominator = target_weight.sum()
        self.num_rows = flat_target.numel()
        local = safe_target - shard.start
        owned = valid & (local >= 0) & (local < shard.width)
        #: The target's column in this rank's shard, -1 where another rank holds it (or ignored).
        self.local_target = torch.where(owned, local, -1)
        alpha, beta = options.smoothing_masses(shard.vocab_size)
        self.alpha = valid.to(ROW_DTYPE) * alpha
        if row_weight is not None:
            self.alpha = self.alpha * row_weight
        self.target_mass = beta * target_weight  # beta_i w_y
        if weight is None:
            weight_sum, w_target, self.local_weight = float(shard.vocab_size), 1.0, None
        else:
            weight_sum = weight.sum(dtype=ROW_DTYPE)
            w_target = weight[safe_target].to(ROW_DTYPE)
            self.local_weight = weight[shard.start : shard.stop]
        self.weight_sum = weight_sum
        self.mass_y = self.alpha * w_target + self.target_mass  # a_y
        self.mass_rest = self.alpha * (weight_sum - w_target)  # A'
        self.bonus, self.with_bonus = options.bonus_shape, options.with_bonus
        self.rho = options.bonus_scale if self.with_bonus else 0.0
        self.v_y = None if bonus_weight is None else bonus_weight[safe_target].to(ROW_DTYPE)
        self.smoothing = options.label_smoothing != 0.0
        # The bonus of the classes other than y: only with label smoothing (their mass alpha w_k).
        self.rest_bonus = self.smoothing and self.with_bonus
        self.local_bonus_weight = None  # w_k v_k of this rank's columns (None: ones)
        if self.rest_bonus and (weight is not None or bonus_weight is not None):
            ones = torch.ones(shard.vocab_size, dtype=compute_dtype, device=target.device)
            both = (ones if weight is None else weight) * (1.0 if bonus_weight is None
                                                           else bonus_weight)  # fmt: skip
            self.local_bonus_weight = both[shard.start : shard.stop]
        self.z_loss = options.z_loss
        self.z_weight = None
        if self.z_loss != 0.0:
            self.z_weight = z_row_weight(flat_target, options.ignore_index, token_weight)
        #: (N,) logsumexp of every row's logits (ignored rows too), or None unless asked.
        self.lse = None
        if keep_lse:
            self.lse = torch.empty(self.num_rows, dtype=compute_dtype, device=target.device)

    def _rest_terms(self, q, one_minus_p, max_complement):
        """(b(p_k), the gradient's ratio term, high) of every local column from q (0 at y).

        ``high`` marks p_k > 1/2 (only at the rest's max), where 1 - p_k is summed from the
        other classes (``max_complement``, see :meth:`terms`) and the ratio term is
        g_k = (1 - p_k) r_k rather than r_k: there r_k is unbounded (the plain log bonus), and
        the gradient's h_k (1 - p_k) is taken in closed form, not as a difference.
        """
        p = q * rows_as(q, one_minus_p)
        high = p > 0.5
        complement = rows_as(q, max_complement)
        one_minus = torch.where(high, complement, 1.0 - p)
        log_one_minus = torch.where(high, complement.log(), torch.log1p(-p))
        value, slope = self.bonus.value_and_slope(p, one_minus, log_one_minus)
        return value, torch.where(high, slope, slope / one_minus), high

    def terms(self, logits: torch.Tensor, rows: slice = slice(None), *, consume: bool = False):
        """(row losses (m,) float64, buffer q (m, width), state) for the logits of ``rows``.

        Collective: every rank of the group calls it for the same rows.
        """
        shard = self.shard
        buffer = working_rows(logits, self.compute_dtype, consume)
        local_target = self.local_target[rows]
        owned = local_target >= 0
        column = local_target.clamp_min(0).unsqueeze(1)
        sums = []
        if self.smoothing:
            sums.append(row_sum(buffer, self.local_weight))  # sum_k w_k z_k
        at_column = buffer.gather(1, column)
        z_target = torch.where(owned, at_column.squeeze(1).to(ROW_DTYPE), NEG_INF)
        # The target's column drops out of the rest: -inf, which exp turns into 0.
        buffer.scatter_(1, column, at_column.masked_fill_(owned.unsqueeze(1), NEG_INF))
        maxima = torch.stack([buffer.amax(1).to(ROW_DTYPE), z_target])
        rest_max, z_target = shard.all_reduce_(maxima, dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(rest_max), rest_max, 0.0)
        exp = buffer.sub_(rows_as(buffer, shift)).exp_()  # 1 exactly at the rest's max
        if self.rest_bonus:
            at_max = exp == 1.0
            sums += [at_max.sum(1).to(ROW_DTYPE), row_sum(exp.masked_fill(at_max, 0.0), None)]
        else:
            sums.append(row_sum(exp, None))
        sums = shard.all_reduce_(torch.stack(sums), dist.ReduceOp.SUM)
        z_weighted = sums[0] if self.smoothing else None
        if self.rest_bonus:
            ties, below = sums[-2], sums[-1]
            rest_sum = ties + below
        else:
            rest_sum = sums[-1]
        has_rest = rest_sum > 0
        lse_rest = shift + rest_sum.log()
        d = torch.where(has_rest, z_target - lse_rest, float("inf"))
        neg_log_p, one_minus_p, p = softplus(-d), torch.sigmoid(-d), torch.sigmoid(d)
        lse = torch.where(has_rest, lse_rest + softplus(d), z_target)
        if self.lse is not None:
            self.lse[rows] = lse
        q = exp.div_(rows_as(exp, torch.where(has_rest, rest_sum, 1.0)))

        alpha, target_mass = self.alpha[rows], self.target_mass[rows]
        mass_y, mass_rest = self.mass_y[rows], self.mass_rest[rows]
        row_loss = torch.where(target_mass != 0, target_mass * neg_log_p, 0.0)
        if self.smoothing:
            # sum_k alpha w_k (lse - z_k).
            row_loss = row_loss + alpha * (self.weight_sum * lse - z_weighted)
        rest_push = mass_rest  # A' - H'
        target_slope = one_minus_p  # (1 - p_y) - rho v_y g_y
        max_complement = None
        if self.with_bonus:
            v_y = 1.0 if self.v_y is None else self.v_y[rows]
            b_y, g_y = self.bonus.value_and_slope(p, one_minus_p, -softplus(d))
            target_bonus = mass_y * v_y
            # 0 * b stays 0 where b = -inf (no other class, or no mass on y).
            row_loss = row_loss + self.rho * torch.where(target_bonus != 0,
                                                         target_bonus * b_y, 0.0)  # fmt: skip
            target_slope = one_minus_p - self.rho * v_y * g_y
        if self.rest_bonus:
            # 1 - p_k at the rest's max: p_y plus the other classes' share of 1 - p_y.
            max_complement = p + (ties - 1.0 + below) / rest_sum * one_minus_p
            b_rest, ratio, high = self._rest_terms(q, one_minus_p, max_complement)
            # r_k of the column past 1/2 (g_k / (1 - p_k)), summed apart from the others'.
            ratio_high = torch.where(high, ratio / rows_as(ratio, max_complement), 0.0)
            ratio_low = ratio.masked_fill_(high, 0.0)
            rest = torch.stack([row_sum(value, self.local_bonus_weight)
                                for value in (b_rest, ratio_low, ratio_high)])  # fmt: skip
            bonus_sum, ratio_low, ratio_high = shard.all_reduce_(rest, dist.ReduceOp.SUM)
            del b_rest, ratio, high
            row_loss = row_loss + self.rho * alpha * bonus_sum
            # A' - H' without the column past 1/2, for that column's own gradient.
            high_push = mass_rest - self.rho * alpha * ratio_low
            rest_push = high_push - self.rho * alpha * ratio_high
        active = (mass_y + mass_rest) != 0
        row_loss = torch.where(active, row_loss, 0.0)
        rest_coefficient = one_minus_p * rest_push + mass_y * target_slope
        high_coefficient = None if max_complement is None else \
            one_minus_p * high_push + mass_y * target_slope  # fmt: skip
        target_grad = p * rest_push - mass_y * target_slope
        if self.z_weight is not None:
            z_weight = self.z_weight[rows]
            row_loss = row_loss + z_loss_rows(lse, self.z_loss, z_weight)
            z_scale = torch.where(z_weight != 0, (2.0 * self.z_loss) * lse * z_weight, 0.0)
            rest_coefficient = rest_coefficient + z_scale * one_minus_p
            if high_coefficient is not None:
                high_coefficient = high_coefficient + z_scale * one_minus_p
            target_grad = target_grad + z_scale * p
            active = active | (z_weight != 0)
        state = (column, owned, active, rest_coefficient, high_coefficient, target_grad, alpha,
                 one_minus_p, max_complement)  # fmt: skip
        return row_loss, q, state

    def grad_(self, buffer: torch.Tensor, state, grad_rows: torch.Tensor) -> torch.Tensor:
        """The buffer q of :meth:`terms` turned into the gradient of this rank's columns, in
        place (scaled row-wise by ``grad_rows``, the incoming gradient of each row loss).

        No communication: the row terms are already global.
        """
        column, owned, active, rest_coefficient, high_coefficient, target_grad, alpha, \
            one_minus_p, max_complement = state  # fmt: skip
        # A row without mass or z-loss (ignored) has a constant loss: zero gradient, even where
        # the incoming one is not finite (the mean over zero items).
        grad_rows = torch.where(active, grad_rows, 0.0)
        smoothing_grad = alpha * grad_rows
        ratio_term = None
        coefficient = rows_as(buffer, torch.where(active, rest_coefficient * grad_rows, 0.0))
        if self.rest_bonus:
            _, ratio_term, high = self._rest_terms(buffer, one_minus_p, max_complement)
            if self.local_bonus_weight is not None:
                ratio_term = ratio_term.mul_(self.local_bonus_weight)
            high_value = torch.where(active, high_coefficient * grad_rows, 0.0)
            coefficient = torch.where(high, rows_as(buffer, high_value), coefficient)
        buffer.mul_(coefficient)
        if self.smoothing:
            # -alpha w_k (1 - rho v_k r_k), g_k in place of r_k past 1/2 (see the module).
            if self.local_weight is None:
                buffer.sub_(rows_as(buffer, smoothing_grad))
            else:
                buffer.addr_(rows_as(buffer, smoothing_grad).squeeze(1), self.local_weight,
                             alpha=-1.0)  # fmt: skip
            if ratio_term is not None:
                buffer.addcmul_(ratio_term, rows_as(buffer, self.rho * smoothing_grad))
        at_column = buffer.gather(1, column)
        target_value = rows_as(buffer, torch.where(active, target_grad * grad_rows, 0.0))
        buffer.scatter_(1, column, torch.where(owned.unsqueeze(1), target_value, at_column))
        return buffer


def _whole_batch_terms(logits, rows: VocabShardRows):
    row_loss, buffer, state = rows.terms(logits)
    return row_loss, buffer, (rows, state)


def _whole_batch_grad_(buffer, state, grad_rows):
    rows, state = state
    return rows.grad_(buffer, state, grad_rows)


VocabShardEL = rows_function(
    "VocabShardEL",
    _whole_batch_terms,
    _whole_batch_grad_,
    """The sharded loss of (M, width) logits (see the module docstring for the maths).

Inputs: this rank's logits (M, width), a :class:`VocabShardRows`.
Output: (M,) float64 row losses, the same on every rank; backward gives this rank's columns'
gradient without communication (a second backward, through a retained graph, recomputes the
terms and so all-reduces again, on every rank).
""",
)
