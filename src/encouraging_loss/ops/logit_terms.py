"""The z-loss, the logits' logsumexp and logit softcapping, around any form of the loss.

* Softcap (Gemma 2): the logits z become ``c * tanh(z / c)`` before the loss; the gradient with
  respect to z is the capped logits' gradient times ``1 - tanh(z / c)**2``.
* z-loss (PaLM; Liger-Kernel's ``lse_square_scale``): ``z_loss * lse**2`` is added per element,
  lse the logsumexp of its (capped) logits, times its token weight and zero where the target is
  ``ignore_index``; its gradient is ``2 z_loss lse softmax(z)`` per element.

:func:`encouraging_loss`'s torch paths apply them around the loss of the capped logits: the
softcap as torch operations (autograd takes the gradient through the tanh), the z-loss by
:class:`ZLoss`; the fused linear loss, chunk by chunk with :class:`ChunkLogitTerms`, which adds
the closed-form gradients to each chunk's logits gradient. The Triton kernels compute both
inside (see :mod:`.triton_el`).

Exactness of the softcap for float32 logits: the capped logits ``s`` are rounded to float32, a
half unit of each (up to ~1e-6 at ``|s|`` near 30), and EL, whose target gradient stays near -1
where CE's vanishes, passes that rounding on to its value at several float32 units where CE of
the same capped logits errs about two. So for float32 logits the cap is taken in float64,
``s = s32 + low`` with ``s32`` its rounding, the loss computed from ``s32`` and its value
corrected to first order, ``loss(s) = loss(s32) + sum_j g_j low_j`` with ``g`` the gradient of
each element's loss with respect to its capped logits, which the closed-form paths build
anyway (:class:`CompensatedSoftcap`, :meth:`ChunkLogitTerms.correction`). The second-order
remainder is ~|g'| low**2, far below a unit; the gradient is that of ``s32``, as accurate as
CE's.
"""

from __future__ import annotations

import torch

from .rowwise import ROW_DTYPE


def softcapped(logits: torch.Tensor, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """``c * tanh(logits / c)`` in ``dtype`` (the logits unchanged for ``softcap=None``)."""
    if softcap is None:
        return logits
    return torch.tanh(logits.to(dtype) / softcap) * softcap


def _exact_softcapped_block(logits: torch.Tensor, softcap: float):
    """:func:`exact_softcapped` of one block. ``c tanh(|z| / c)`` in float64 as
    ``c (2 / (1 + t) - 1)``, t = exp(-2|z| / c), in place on one float64 copy (a float64 exp costs
    a fifth of torch's float64 tanh on CPU); the sign is applied in float32. Near z = 0 the
    difference loses relative digits, never absolute ones (an error of ~c 1e-16, far below a
    float32 unit of the capped logit or of the loss)."""
    magnitude = logits.double().abs_().mul_(-2.0 / softcap).exp_()
    magnitude = magnitude.add_(1.0).reciprocal_().mul_(2.0 * softcap).sub_(softcap)
    capped = magnitude.float()
    low = magnitude.sub_(capped.double()).float()
    sign = torch.sign(logits)
    return capped.mul_(sign), torch.nan_to_num_(low.mul_(sign), nan=0.0)


#: Logits capped in float64 at a time by :func:`exact_softcapped` (8 MiB of float64).
EXACT_CAP_BLOCK = 1 << 20


def exact_softcapped(logits: torch.Tensor, softcap: float):
    """(``c * tanh(logits / c)`` rounded to float32, the rounding's remainder as float32) of
    float32 logits: the cap taken in float64, a block of :data:`EXACT_CAP_BLOCK` logits at a
    time (the float64 values are never all held). The remainder is 0 where the logits are not
    finite (an ignored element's NaN contributes nothing)."""
    flat = logits.reshape(-1)
    if flat.numel() <= EXACT_CAP_BLOCK:
        capped, low = _exact_softcapped_block(flat, softcap)
        return capped.view(logits.shape), low.view(logits.shape)
    capped, low = torch.empty_like(flat), torch.empty_like(flat)
    for start in range(0, flat.numel(), EXACT_CAP_BLOCK):
        block = slice(start, start + EXACT_CAP_BLOCK)
        capped[block], low[block] = _exact_softcapped_block(flat[block], softcap)
    return capped.view(logits.shape), low.view(logits.shape)


def compensates(logits: torch.Tensor, softcap: float | None) -> bool:
    """Whether :class:`CompensatedSoftcap` takes the softcap of these logits (float32 logits,
    outside ``torch.compile``, which cannot take its gradient inside forward: the compiled
    function computes the loss of the float64 cap in float64 instead). The fused linear
    loss's chunks compensate compiled too (their gradient is closed-form)."""
    return (softcap is not None and logits.dtype == torch.float32
            and not torch.compiler.is_compiling())  # fmt: skip


class CompensatedSoftcap(torch.autograd.Function):
    """The loss of softcapped float32 logits, exact to the float64 cap (see the module docstring).

    ``loss_of_capped(capped) -> (loss, extra)`` is any loss of the (..., C, ...) capped logits,
    each element's loss depending on its own logits only (reduced or not: ``"none"`` gives one
    value per element of the index shape); ``extra`` (None or a tensor without gradient, e.g.
    the logsumexp) is passed through. The gradient of ``loss`` is computed in forward with the
    library's closed-form paths (which build it there anyway) and kept, times the cap's
    derivative; backward scales it by the incoming gradient.

    Inputs: input (float32 logits, class dimension ``class_dim``), softcap, loss_of_capped,
    class_dim, and ``sum_over_shards`` (None, or for logits sharded over the classes across
    ranks a function that sums the corrections of every rank's columns, e.g. an all-reduce).
    Outputs: (loss, extra).
    """

    @staticmethod
    def forward(ctx, input, softcap, loss_of_capped, class_dim, sum_over_shards=None):
        capped, low = exact_softcapped(input, softcap)
        with torch.enable_grad():
            leaf = capped.requires_grad_()
            loss, extra = loss_of_capped(leaf)
            (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
        correction = (grad * low).sum(class_dim, dtype=torch.float64)
        if loss.dim() == 0:
            correction = correction.sum()
        if sum_over_shards is not None:
            correction = sum_over_shards(correction)
        value = (loss.detach().double() + correction).to(loss.dtype)
        ctx.class_dim = class_dim
        # d s / d z = 1 - tanh(z / c)**2, from the rounded cap: a relative unit, as autograd's.
        tanh = capped.detach().div_(softcap)
        ctx.save_for_backward(grad.mul_(tanh.square_().neg_().add_(1.0)))
        if extra is not None:
            extra = extra.detach()
            ctx.mark_non_differentiable(extra)
        return value, extra

    @staticmethod
    def backward(ctx, grad_loss, _grad_extra):
        (grad,) = ctx.saved_tensors
        if grad_loss.dim() == 0:
            return grad * grad_loss.to(grad.dtype), None, None, None, None
        return grad * grad_loss.to(grad.dtype).unsqueeze(ctx.class_dim), None, None, None, None


def z_loss_rows(lse: torch.Tensor, z_loss: float, row_weight) -> torch.Tensor:
    """The z-loss of each element, ``z_loss * lse**2 * row_weight`` (row_weight None: 1), 0
    where the weight is 0 (an ignored element's logits may be anything, NaN included)."""
    rows = lse.square() * z_loss
    if row_weight is None:
        return rows
    return torch.where(row_weight != 0, rows * row_weight, 0.0)


def _z_loss_softmax_(softmax, lse, z_loss: float, row_weight, grad_rows) -> torch.Tensor:
    """``softmax`` becomes the z-loss's gradient ``2 z lse softmax`` times each row's weight
    and incoming gradient, in place; 0 on rows of weight 0 (whatever their logits)."""
    scale = (2.0 * z_loss) * lse.to(ROW_DTYPE) * grad_rows
    if row_weight is not None:
        scale = scale * row_weight
    softmax = softmax.mul_(scale.to(softmax.dtype).unsqueeze(-1))
    if row_weight is not None:
        softmax = softmax.masked_fill_((row_weight == 0).unsqueeze(-1), 0.0)
    return softmax


class ZLoss(torch.autograd.Function):
    """(z-loss rows, lse) of (..., C) logits (classes last); the gradient ``2 z lse softmax``
    per row, made in backward (from the saved logits: no (..., C) tensor kept) and 0 on rows of
    weight 0.

    Inputs: logits (..., C) in the compute dtype, row_weight (float64 or None, as many values
    as rows), z_loss.
    """

    @staticmethod
    def forward(ctx, logits, row_weight, z_loss):
        lse = torch.logsumexp(logits, dim=-1)
        row_weight = None if row_weight is None else row_weight.reshape(lse.shape)
        ctx.save_for_backward(logits, lse)
        ctx.row_weight, ctx.z_loss = row_weight, z_loss
        ctx.mark_non_differentiable(lse)
        weight = None if row_weight is None else row_weight.to(lse.dtype)
        return z_loss_rows(lse, z_loss, weight), lse

    @staticmethod
    def backward(ctx, grad_rows, _grad_lse):
        logits, lse = ctx.saved_tensors
        # From the logits less their maximum: exp(z - lse) would carry lse's rounding (a unit
        # of ~|lse|) into every entry.
        softmax = torch.softmax(logits, dim=-1)
        grad = _z_loss_softmax_(softmax, lse, ctx.z_loss, ctx.row_weight, grad_rows.to(ROW_DTYPE))
        return grad, None, None


def z_row_weight(target: torch.Tensor, ignore_index: int, token_weight) -> torch.Tensor:
    """(M,) float64 weight of each element's z-loss: its token weight, 0 where ignored."""
    valid = (target.reshape(-1) != ignore_index).to(ROW_DTYPE)
    if token_weight is None:
        return valid
    return valid * token_weight.reshape(-1).to(ROW_DTYPE)


class ChunkLogitTerms:
    """Softcap, z-loss and logsumexp for the fused linear loss, one chunk of rows at a time.

    Args:
        options: the loss options (``softcap``, ``z_loss``, ``ignore_index``).
        target: (N,) class indices (flattened).
        token_weight: optional checked per-token weights, or None.
        dtype: the compute dtype of the terms (float32, float64 for float64 inputs).
        return_lse: keep each row's logsumexp in :attr:`lse`.
        sum_over_shards: for logits sharded over the classes across ranks (the
            vocabulary-parallel loss), a function summing each row's cap correction (see the
            module docstring) over every rank's columns; None for whole rows.
    """

    def __init__(self, options, target, token_weight, dtype, return_lse: bool,
                 sum_over_shards=None):  # fmt: skip
        self.softcap, self.z_loss, self.dtype = options.softcap, options.z_loss, dtype
        self.sum_over_shards = sum_over_shards
        self.row_weight = None
        if self.z_loss != 0.0:
            self.row_weight = z_row_weight(target, options.ignore_index, token_weight)
        #: (N,) logsumexp of every row's (capped) logits, ignored rows too; None unless asked.
        self.lse = None
        if return_lse:
            self.lse = torch.empty(target.numel(), dtype=dtype, device=target.device)

    def before(self, logits: torch.Tensor, chunk: slice, want_grads: bool):
        """(the logits the loss takes, the state :meth:`grad_` needs, the chunk's z-loss rows
        (float64) or None)."""
        low = None
        if self.softcap is not None and logits.dtype == torch.float32:  # compiled too
            capped, low = exact_softcapped(logits, self.softcap)
        else:
            capped = softcapped(logits, self.softcap, self.dtype)
        tanh = capped / self.softcap if self.softcap is not None and want_grads else None
        lse = softmax = z_rows = None
        if self.z_loss != 0.0 or self.lse is not None:
            lse = torch.logsumexp(capped.to(self.dtype), dim=-1)
            if self.lse is not None:
                self.lse[chunk] = lse
        if self.z_loss != 0.0:
            z_rows = z_loss_rows(lse.to(ROW_DTYPE), self.z_loss, self.row_weight[chunk])
            if want_grads:
                softmax = torch.softmax(capped.to(self.dtype), dim=-1)
        return capped, (tanh, lse, softmax, low), z_rows

    def correction(self, state, unit_grad: torch.Tensor) -> torch.Tensor:
        """The chunk's row-loss corrections (float64) for the float32 rounding of the capped
        logits, ``sum_j g_j low_j`` (see the module docstring), from each row's gradient for a
        unit incoming gradient (where :meth:`compensated`)."""
        correction = (unit_grad * state[3]).sum(-1, dtype=ROW_DTYPE)
        if self.sum_over_shards is not None:
            correction = self.sum_over_shards(correction)
        return correction

    @staticmethod
    def compensated(state) -> bool:
        """Whether :meth:`correction` applies to this chunk (see :func:`compensates`)."""
        return state[3] is not None

    def grad_(self, grad_logits: torch.Tensor, state, chunk: slice, grad_rows) -> torch.Tensor:
        """Add the z-loss's gradient to the capped logits' gradient, then take it through the
        softcap (in place where the dtypes allow)."""
        tanh, lse, softmax, _ = state
        if softmax is not None:
            softmax = _z_loss_softmax_(softmax, lse, self.z_loss, self.row_weight[chunk],
                                       grad_rows)  # fmt: skip
            grad_logits = grad_logits.add_(softmax)
        if tanh is not None:
            grad_logits = grad_logits.mul_(tanh.square_().neg_().add_(1.0))
        return grad_logits
