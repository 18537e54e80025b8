"""Small problems at cross-entropy's cost: a few whole-tensor operations and one autograd node.

Below a hundred thousand logits every torch operation costs about the same few microseconds
whatever its size, so the row paths' dozens of small per-row operations (:mod:`.rowwise`) cost
more than the arithmetic. This path computes the loss in about twenty operations on CPU:

* one ``log_softmax``. torch's CPU kernel over a *last* dimension of fewer than 16 classes is
  several times slower than over a leading one, so such an (N, C) input is read class-major, as
  its (C, N) transpose; (N, C, d...) inputs already have their classes on a leading dimension;
* the gradient built in its exponential in place, ``p - onehot`` and one multiplication, so
  backward only scales it by the incoming gradient;
* the per-row terms from the probabilities as rounded: for the bonus shapes whose
  r(p) = p b'(p) is bounded (every shape but the plain log bonus,
  :attr:`Bonus.has_bounded_ratio`) that rounding costs no more than cross-entropy's own.

Exactness: the loss value must err no more than torch's CE in the input's dtype, whose value is
its float32 log-softmax. Where the classes are not the last dimension, the float64 log-softmax
costs little more than the float32 one, so float32 inputs are computed in float64 there (and the
gradient rounded once). Over a last dimension the float64 kernel is three times slower: the
log-softmax is float32 and the row terms are float64, with
``log p_y = (z_y - max z) + max log p`` (the kernel's own normaliser, -log sum e^(z - max z), is
its largest log-probability, without the rounding of z_y - max z), and the smoothing term from
the logits (``sum_k a_k (logsumexp z - z_k)``). Half-precision inputs are computed in float32.

Hard targets: row loss w_y (-log p_y + rho v_y b(p_y)), gradient w_y (1 - rho v_y r(p_y))
(p - onehot_y), p_y - 1 = expm1(log p_y). Label smoothing and probability targets: class mass a_k
(see :mod:`.rowwise`), row loss sum_k a_k (-log p_k + rho v_k b(p_k)), gradient
p_k (A - H) - a_k + h_k with h_k = rho a_k v_k r(p_k), A = sum_k a_k, H = sum_k h_k.

Token weights t (``token_weight``) scale each element's class mass: w_y becomes t w_y in the
hard-target terms and a_k becomes t a_k otherwise, and the mean divides by sum t w_y (sum t for
probability targets).

Ignored rows: where ``ignore_index`` cannot be a class, the targets are first used as they are;
a row of ``ignore_index`` (or an out-of-range target) makes the target gather fail, and the call
takes the masked route (ignored rows get weight 0 and zeroed log-probabilities, the range check
runs). :func:`small_path_supports` says which calls this path takes; the rest go to the row paths.
"""

from __future__ import annotations

import math

import torch

from .._validate import check_target_range
from ..options import LossOptions
from .index_targets import target_weights

#: The most logits this path takes: above it the row paths' fused passes pay for themselves.
SMALL_MAX_ELEMENTS = 1 << 17
#: Below this many classes an (N, C) input is read class-major (see the module docstring).
CLASS_MAJOR_BELOW = 16


def small_path_supports(input: torch.Tensor, options: LossOptions) -> str | None:
    """Why :func:`small_encouraging_loss` does not take this call, or None when it does.

    Args:
        input: the logits, (C), (N, C) or (N, C, d1, ..., dK).
        options: the loss options.
    """
    if not input.is_cpu or torch.compiler.is_compiling():
        return "not an eager CPU call (GPU tensors and torch.compile take the row paths)"
    if input.numel() > SMALL_MAX_ELEMENTS:
        return f"more than {SMALL_MAX_ELEMENTS} logits"
    if input.shape[1 if input.dim() > 1 else 0] < 2:
        return "a single class"
    if options.with_bonus and not options.bonus_shape.has_bounded_ratio:
        return (
            f"the {options.bonus!r} bonus with log_end={options.log_end} has an unbounded "
            "r(p) = p b'(p) (or no formula for it): its rows need the exact arg-max terms"
        )
    return None


class _Layout:
    """How the logits are read: ``rows`` has the classes on dimension ``dim``; per-row
    quantities have ``index_shape`` (``rows.shape`` with 1 at ``dim``)."""

    def __init__(self, input: torch.Tensor):
        dim = input.dim()
        num_classes = input.shape[1] if dim > 1 else input.shape[0]
        self.input_shape, self.num_classes = input.shape, num_classes
        self.transposed = dim == 2 and num_classes < CLASS_MAJOR_BELOW
        if dim == 1:
            self.rows, self.dim, self.index_shape = input.unsqueeze(1), 0, (1, 1)
        elif self.transposed:
            self.rows, self.dim, self.index_shape = input.t(), 0, (1, input.shape[0])
        elif dim == 2:
            self.rows, self.dim, self.index_shape = input, 1, (input.shape[0], 1)
        else:
            self.rows = input.reshape(input.shape[0], num_classes, -1)
            self.dim, self.index_shape = 1, (input.shape[0], 1, self.rows.shape[2])
        #: Whether the class dimension is the last (the float32 kernel's slow-in-float64 case).
        self.classes_last = self.dim == self.rows.dim() - 1
        #: The loss's shape for reduction="none": the input's without the class dimension.
        self.loss_shape = input.shape[:1] + input.shape[2:] if dim > 1 else ()

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the input's shape, read in this layout."""
        if tensor.dim() == 1:
            return tensor.unsqueeze(1)
        if self.transposed:
            return tensor.t()
        return tensor if tensor.dim() == 2 else tensor.reshape(self.rows.shape)

    def class_vector(self, vector: torch.Tensor) -> torch.Tensor:
        """A (C,) vector shaped to broadcast along the class dimension."""
        if self.dim == 0:
            return vector.view(-1, 1)
        return vector.view(1, -1, *([1] * (len(self.index_shape) - 2)))

    def gradient(self, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gradient buffer as a tensor of the input's shape and ``dtype``."""
        if self.transposed:
            # One copy that transposes and rounds: the result is the input's own layout.
            out = torch.empty(self.input_shape, dtype=dtype, device=buffer.device)
            return out.copy_(buffer.t())
        grad = buffer.view(self.input_shape)
        return grad if grad.dtype == dtype else grad.to(dtype)


def _token_rows(token_weight, layout: _Layout, dtype) -> torch.Tensor | None:
    """Per-element weights in the layout's index shape, a private ``dtype`` copy (or None)."""
    if token_weight is None:
        return None
    return token_weight.reshape(layout.index_shape).to(dtype=dtype, copy=True)


class _Targets:
    """Class-index targets in the layout: ``index`` (ignored rows set to class 0 when masked),
    ``valid`` (bool rows, or None when every row counts), ``row_weight`` (t w_y, 0 where
    ignored, t the token weight; None for all ones) and ``token_weight`` (t or None)."""

    def __init__(self, target, layout: _Layout, weight, options: LossOptions, masked: bool, dtype,
                 token_weight=None):  # fmt: skip
        index = target.reshape(layout.index_shape)
        if index.dtype != torch.int64:
            index = index.long()
        self.valid = self.row_weight = None
        if masked:
            if options.validate_args:
                check_target_range(target, layout.num_classes, options.ignore_index)
            self.valid, index, self.row_weight = target_weights(
                index, options.ignore_index, weight, dtype
            )
        elif weight is not None:
            self.row_weight = weight[index].to(dtype)
        self.token_weight = _token_rows(token_weight, layout, dtype)
        if self.token_weight is not None:
            # A copy either way: the row weight is scaled in place later.
            self.row_weight = self.token_weight.clone() if self.row_weight is None \
                else self.row_weight * self.token_weight  # fmt: skip
        self.index = index

    def denominator(self) -> float:
        """The "mean" reduction's denominator: the summed target weights of the counted rows."""
        if self.row_weight is None:
            return float(self.index.numel())
        return float(self.row_weight.sum())


def _mean_factor(denominator: float) -> float:
    """1 / denominator, 0 for the mean over nothing (its loss is NaN, its gradient 0)."""
    return 0.0 if denominator == 0.0 else 1.0 / denominator


class _Logits:
    """The log-softmax of the rows, and how exact its values are for the loss's value.

    With ``exact``, ``log_probs`` are exact enough as they are (float64, or float32 for a
    half-precision input). Otherwise (float32 over a last dimension, see the module) the value
    takes log p_y = (z_y - max z) + max log p - log_norm in float64: the float32 kernel's
    normaliser is its largest log-probability, without the rounding of z_y - max z, and
    ``log_norm = log sum_k exp(log p_k)`` (float64, after :meth:`probabilities`) removes the
    rounding of its sum.
    """

    __slots__ = ("layout", "exact", "dtype", "rows", "log_probs", "log_norm")

    def __init__(self, layout: _Layout, input_dtype: torch.dtype, index_targets: bool):
        rows = layout.rows
        self.exact = not (input_dtype == torch.float32 and layout.classes_last and index_targets)
        if input_dtype == torch.float64 or (input_dtype == torch.float32 and self.exact):
            compute = torch.float64
        else:
            compute = torch.float32
        self.layout, self.dtype, self.rows, self.log_norm = layout, compute, rows, None
        self.log_probs = torch.log_softmax(rows, layout.dim, dtype=None if rows.dtype == compute
                                           else compute)  # fmt: skip

    @property
    def row_dtype(self) -> torch.dtype:
        """The dtype of the per-row terms of the value."""
        return self.dtype if self.exact else torch.float64

    def mask_rows(self, invalid: torch.Tensor) -> None:
        """Zero the rows where ``invalid`` (ignored rows may hold anything, NaN)."""
        self.log_probs.masked_fill_(invalid, 0.0)
        if not self.exact:
            self.rows = self.rows.masked_fill(invalid, 0.0)

    def take(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`corrected` needs of the targets' log-probabilities (before
        :meth:`probabilities`): log p_y itself, or (z_y, max z, max log p)."""
        dim = self.layout.dim
        if self.exact:
            return torch.gather(self.log_probs, dim, index, out=out)
        taken = torch.empty((3, *index.shape), dtype=self.dtype, device=index.device)
        torch.gather(self.rows, dim, index, out=taken[0])
        torch.amax(self.rows, dim, keepdim=True, out=taken[1])
        torch.amax(self.log_probs, dim, keepdim=True, out=taken[2])
        return taken

    def probabilities(self) -> torch.Tensor:
        """The probabilities, in place of the log-probabilities (the gradient buffer)."""
        buffer = self.log_probs.exp_()
        if not self.exact:
            total = buffer.sum(self.layout.dim, keepdim=True, dtype=torch.float64)
            self.log_norm = total.log_()
        return buffer

    def corrected(self, taken: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """log p_y exact for the value, from :meth:`take` (after :meth:`probabilities`)."""
        if self.exact:
            return taken
        stats = taken.double()
        log_p = torch.sub(stats[0], stats[1], out=out)
        return log_p.add_(stats[2]).sub_(self.log_norm)

    def cross_entropy_raw(self, mass: torch.Tensor, per_row: bool) -> torch.Tensor:
        """sum_k a_k log p_k as the log-probabilities stand (before :meth:`probabilities`), per
        row (``per_row``) or in all, in the rows' dtype; :meth:`cross_entropy` finishes it.
        Inexactly: sum_k a_k z_k, the products summed in float64."""
        dim = self.layout.dim
        if self.exact:
            if not per_row and mass.shape == self.log_probs.shape and mass.is_contiguous():
                return torch.vdot(mass.view(-1), self.log_probs.view(-1))
            rows = torch.mul(mass, self.log_probs).sum(dim, keepdim=True)
        else:
            rows = torch.mul(mass, self.rows).sum(dim, keepdim=True, dtype=torch.float64)
        return rows if per_row else rows.sum()

    def cross_entropy(self, raw, taken, mass_rows: torch.Tensor, per_row: bool):
        """sum_k a_k log p_k, from :meth:`cross_entropy_raw` and :meth:`take`: inexactly,
        minus logsumexp z = max z - max log p + log_norm times the rows' mass sum_k a_k."""
        if self.exact:
            return raw
        stats = taken[1:].double()
        log_sum_exp = stats[0].sub_(stats[1]).add_(self.log_norm)
        correction = log_sum_exp.mul_(mass_rows)
        return raw.sub_(correction) if per_row else raw - correction.sum()


class SmallProblem:
    """One call of the loss on this path: its targets, weights and options, and its steps.

    Args:
        target: class indices (the input's shape without C) or probabilities (its shape).
        weight: optional (C,) class weights.
        bonus_weight: optional (C,) bonus weights.
        options: the loss options (:func:`small_path_supports` said yes to them).
        token_weight: optional per-element weights t (the target's index shape): they scale
            each element's class mass (its loss and gradient), and the mean's denominator is
            sum t w_y (sum t for probability targets).
    """

    __slots__ = ("target", "weight", "bonus_weight", "options", "layout", "token_weight")

    def __init__(self, target, weight, bonus_weight, options: LossOptions, token_weight=None):
        self.target, self.weight, self.bonus_weight = target, weight, bonus_weight
        self.options, self.token_weight = options, token_weight
        self.layout = None

    def loss_and_grad(self, input: torch.Tensor):
        """(loss in the input's dtype, gradient buffer for a unit incoming gradient)."""
        layout = self.layout = _Layout(input)
        index_targets = not self.target.is_floating_point()
        logits = _Logits(layout, input.dtype, index_targets)
        options, dtype = self.options, logits.dtype
        weight = None if self.weight is None else self.weight.to(dtype)
        bonus_weight = None if self.bonus_weight is None else self.bonus_weight.to(dtype)
        if not index_targets:
            loss, buffer = self._probabilities(logits, weight, bonus_weight)
        else:
            # The unmasked route first, where ignore_index cannot be a class (see the module).
            masked = 0 <= options.ignore_index < layout.num_classes
            row_dtype = logits.row_dtype
            try:
                targets = _Targets(self.target, layout, weight, options, masked, row_dtype,
                                   self.token_weight)  # fmt: skip
                taken, rows = self._take(logits, targets)
            except (RuntimeError, IndexError):
                if masked:
                    raise
                targets = _Targets(self.target, layout, weight, options, True, row_dtype,
                                   self.token_weight)  # fmt: skip
                taken, rows = self._take(logits, targets)
            if rows is not None:
                loss, buffer = self._conservative_log(logits, targets, taken, rows)
            else:
                loss, buffer = self._index(logits, targets, taken, weight, bonus_weight)
        return (loss if loss.dtype == input.dtype else loss.to(input.dtype)), buffer

    def _take(self, logits: _Logits, targets: _Targets):
        """(:meth:`_Logits.take` at the targets, the rows of :meth:`_conservative_log` or None
        for the general route). Fails on an ignored or out-of-range target where the targets
        are not masked."""
        if targets.valid is not None:
            logits.mask_rows(~targets.valid)
        options, rows = self.options, None
        if (
            options.label_smoothing == 0.0
            and options.reduction != "none"
            and self.bonus_weight is None
            and options.bonus == "log"
            and options.bonus_start == 0.0
            and options.bonus_scale != 0.0
        ):
            # Rows: log p_y, log u, -u, p_y - 1, with u = max(1 - p_y, 1 - log_end).
            rows = torch.empty((4, *self.layout.index_shape), dtype=logits.row_dtype)
        taken = logits.take(targets.index, out=rows[0] if rows is not None and logits.exact
                            else None)  # fmt: skip
        return taken, rows

    def _index(self, logits: _Logits, targets: _Targets, taken, weight, bonus_weight):
        options = self.options
        index, dim = targets.index, self.layout.dim
        smoothed = options.label_smoothing != 0.0
        per_row = options.reduction == "none"
        scale, empty = 1.0, False
        if options.reduction == "mean":
            denominator = targets.denominator()
            scale, empty = _mean_factor(denominator), denominator == 0.0
        alpha, beta = options.smoothing_masses(self.layout.num_classes)
        unit = rest = None
        if smoothed:
            # Smoothing: mass alpha w_k on every class of a counted row, alpha (and the mean's
            # factor) applied in the rows' dtype (the target's extra beta w_y is below, with its
            # exact terms).
            if targets.valid is None:
                unit = torch.ones_like(logits.log_probs)
            else:
                unit = targets.valid.to(logits.dtype).expand_as(logits.log_probs)
            if weight is not None:
                unit = unit * self.layout.class_vector(weight)
            if targets.token_weight is not None:
                unit = unit * targets.token_weight.to(logits.dtype)
            rest = logits.cross_entropy_raw(unit, per_row)
        buffer = logits.probabilities()
        log_p = logits.corrected(taken)
        lost, negative, factor = self._target_terms(log_p, index, bonus_weight)
        row_weight = targets.row_weight
        if smoothed:
            row_weight = beta if row_weight is None else row_weight.mul_(beta)
        # Minus the target's value: sum_rows w_y (-log p_y + rho v_y b(p_y)), negated.
        if per_row:
            if row_weight is not None:
                negative = negative.mul_(row_weight)
        elif row_weight is None or isinstance(row_weight, float):
            negative = negative.sum().mul_(1.0 if row_weight is None else row_weight)
        else:
            negative = torch.dot(negative.view(-1), row_weight.view(-1))
        # The target's gradient factor: w_y (1 - rho v_y r(p_y)) times the mean's factor.
        if factor is None:
            factor = torch.full_like(log_p, scale)
        else:
            factor.mul_(scale)
        if row_weight is not None:
            factor.mul_(row_weight)
        if not smoothed:
            buffer.scatter_(dim, index, lost.to(buffer.dtype))  # p - onehot_y
            buffer.mul_(factor)
            return self._value(negative, per_row, empty, scale), buffer
        rest, push, boost, mass = self._mass_terms(
            logits, buffer, unit, alpha * scale, rest, taken, bonus_weight, per_row
        )
        negative = rest + negative.to(rest.dtype).mul_(scale)
        # p (A - H) - a + h + c (p - onehot_y), with p_y - 1 exact: (p - onehot_y) (A - H + c)
        # + onehot_y (A - H) - a + h.
        buffer.scatter_(dim, index, lost.to(buffer.dtype))
        buffer.mul_(push + factor).scatter_add_(dim, index, push.to(buffer.dtype)).sub_(mass)
        if boost is not None:
            buffer.add_(boost)
        return self._value(negative, per_row, empty, 1.0), buffer

    def _conservative_log(self, logits: _Logits, targets: _Targets, taken, rows):
        """The common case in few operations: hard targets, the log bonus with log_end < 1,
        "mean" or "sum", without bonus weights (any class weights and ignored rows)."""
        options, layout = self.options, self.layout
        dim, index = layout.dim, targets.index
        buffer = logits.probabilities()
        log_p = logits.corrected(taken, out=None if logits.exact else rows[0])
        lost = torch.expm1(log_p, out=rows[3])
        buffer.scatter_(dim, index, lost if lost.dtype == buffer.dtype else lost.to(buffer.dtype))
        floor = 1.0 - options.log_end
        negative_bound = torch.clamp_max(lost, -floor, out=rows[2])
        torch.log(negative_bound.neg(), out=rows[1])
        row_weight = targets.row_weight
        flat = rows.view(4, -1)
        sums = flat.sum(1) if row_weight is None else torch.mv(flat, row_weight.view(-1))
        sum_log_p, sum_log_bound, sum_negative_bound, sum_lost = sums.tolist()
        scale = value_scale = 1.0
        if options.reduction == "mean":
            denominator = targets.denominator()
            scale = _mean_factor(denominator)
            value_scale = scale if denominator else math.nan
        rho = options.bonus_scale
        # sum_rows w (-log p + rho (log u - (u - (1 - p)) / (1 - log_end))).
        total = -sum_log_p + rho * (sum_log_bound - (sum_lost - sum_negative_bound) / floor)
        # The gradient factor w (1 + rho p / u) times the mean's factor.
        factor = torch.addcdiv(
            torch.full((), scale, dtype=rows.dtype), torch.exp(log_p), negative_bound,
            value=-rho * scale,
        )  # fmt: skip
        if row_weight is not None:
            factor.mul_(row_weight)
        buffer.mul_(factor)
        return torch.full((), total * value_scale, dtype=rows.dtype), buffer

    def _target_terms(self, log_p, index, bonus_weight):
        """(p_y - 1, minus the row loss -log p_y + rho v_y b(p_y), its gradient factor
        1 - rho v_y r(p_y) or None without a bonus), from exact log p_y."""
        options = self.options
        lost = torch.expm1(log_p)  # p_y - 1, accurate as p_y -> 1
        if not options.with_bonus:
            return lost, log_p, None
        bonus, ratio = options.bonus_shape.value_and_ratio(torch.exp(log_p), lost.neg())
        if bonus_weight is not None:
            target_bonus_weight = bonus_weight[index]
            bonus.mul_(target_bonus_weight)
            ratio.mul_(target_bonus_weight)
        rho = options.bonus_scale
        return lost, bonus.mul_(-rho).add_(log_p), ratio.mul_(-rho).add_(1.0)

    def _mass_terms(self, logits: _Logits, buffer, unit, factor: float, raw, taken,
                    bonus_weight, per_row: bool):  # fmt: skip
        """The terms of the class mass a_k = ``factor * unit`` (``unit`` broadcastable to the
        logits), after :meth:`_Logits.probabilities` turned the log-probabilities into
        ``buffer``. The sums of the value take ``factor`` in the rows' dtype.

        Args:
            raw: :meth:`_Logits.cross_entropy_raw` of ``unit``, taken before.
            taken: :meth:`_Logits.take` of the targets (None: the log-softmax is exact).

        Returns:
            (minus the value, per row or in all; A - H per row; h or None; a), for the gradient
            p (A - H) - a + h.
        """
        dim, rho = self.layout.dim, self.options.bonus_scale
        unit_rows = unit.sum(dim, keepdim=True, dtype=logits.row_dtype)
        if unit_rows.shape != torch.Size(self.layout.index_shape):
            unit_rows = unit_rows.expand(self.layout.index_shape)
        negative = logits.cross_entropy(raw, taken, unit_rows, per_row).mul_(factor)
        push = unit_rows * factor  # A, then A - H
        boost = None
        if self.options.with_bonus:
            bonus_unit = unit if bonus_weight is None else unit * self.layout.class_vector(
                bonus_weight)  # fmt: skip
            bonus, boost = self.options.bonus_shape.value_and_ratio(buffer, torch.rsub(buffer, 1.0))
            bonus.mul_(bonus_unit)
            if per_row:
                bonus_sum = bonus.sum(dim, keepdim=True, dtype=negative.dtype)
            else:
                bonus_sum = bonus.sum(dtype=negative.dtype)
            negative = negative.sub_(bonus_sum.mul_(rho * factor))
            boost.mul_(bonus_unit).mul_(rho * factor)  # h_k
            push.sub_(boost.sum(dim, keepdim=True))
        return negative, push, boost, unit * factor

    def _probabilities(self, logits: _Logits, weight, bonus_weight):
        """Probability targets: mass w_k ((1 - eps) q_k + eps / C)."""
        options, layout = self.options, self.layout
        alpha, beta = options.smoothing_masses(layout.num_classes)
        per_row = options.reduction == "none"
        scale, empty = 1.0, False
        token_weight = _token_rows(self.token_weight, layout, logits.dtype)
        if options.reduction == "mean":
            if token_weight is None:
                denominator = float(logits.log_probs.numel() // layout.num_classes)
            else:
                denominator = float(token_weight.sum(dtype=torch.float64))
            scale, empty = _mean_factor(denominator), denominator == 0.0
        mass = torch.empty_like(logits.log_probs)
        torch.mul(layout.rows_of(self.target), beta * scale, out=mass)
        if alpha != 0.0:
            mass.add_(alpha * scale)
        if weight is not None:
            mass.mul_(layout.class_vector(weight))
        if token_weight is not None:
            mass.mul_(token_weight)
        raw = logits.cross_entropy_raw(mass, per_row)
        buffer = logits.probabilities()
        negative, push, boost, mass = self._mass_terms(
            logits, buffer, mass, 1.0, raw, None, bonus_weight, per_row
        )
        buffer.mul_(push).sub_(mass)
        if boost is not None:
            buffer.add_(boost)
        return self._value(negative, per_row, empty, 1.0), buffer

    def _value(self, negative, per_row: bool, empty: bool, scale: float):
        """The loss from minus its sum (times ``scale``) or its rows: NaN for an empty mean."""
        if per_row:
            return negative.neg_().reshape(self.layout.loss_shape)
        return negative.mul_(math.nan if empty else -scale)

    def scaled_gradient(self, buffer: torch.Tensor, grad_output: torch.Tensor, dtype):
        """The buffer of :meth:`loss_and_grad` times the incoming gradient, as a tensor of the
        input's shape and ``dtype``."""
        if self.options.reduction == "none":
            buffer.mul_(grad_output.reshape(self.layout.index_shape))
        elif grad_output.item() != 1.0:
            buffer.mul_(grad_output)
        return self.layout.gradient(buffer, dtype)


class SmallEL(torch.autograd.Function):
    """The loss of a :class:`SmallProblem`, its gradient built in forward.

    Inputs: logits, problem. Output: the reduced loss (or the rows for ``"none"``).
    """

    @staticmethod
    def forward(ctx, input, problem):
        loss, buffer = problem.loss_and_grad(input)
        ctx.problem, ctx.buffer, ctx.input_dtype = problem, buffer, input.dtype
        ctx.save_for_backward(input)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None:
            # A second backward through a retained graph: the first one scaled the buffer.
            (input,) = ctx.saved_tensors
            _, buffer = ctx.problem.loss_and_grad(input)
        return ctx.problem.scaled_gradient(buffer, grad_output, ctx.input_dtype), None


def small_encouraging_loss(input, target, weight, bonus_weight, options: LossOptions,
                           token_weight=None):  # fmt: skip
    """The loss of a call :func:`small_path_supports` (checked inputs), with its gradient.

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices or probabilities, as ``F.cross_entropy`` takes them.
        weight: optional (C,) class weights.
        bonus_weight: optional (C,) bonus weights.
        options: the loss options.
        token_weight: optional per-element weights (the target's index shape).
    """
    problem = SmallProblem(target, weight, bonus_weight, options, token_weight)
    if input.requires_grad and torch.is_grad_enabled():
        return SmallEL.apply(input, problem)
    loss, _ = problem.loss_and_grad(input)
    return loss
