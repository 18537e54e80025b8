"""A final linear layer fused with the encouraging loss, chunked over tokens (pure torch).

For hidden states X (N, H), a projection W (C, H) and an optional bias, the loss of
``encouraging_loss(X @ W.T + bias, target)`` is computed without the (N, C) logits: rows are
processed in chunks of ``chunk_size``; for each chunk the logits (chunk, C) are formed, the row
losses and the logits' gradient come in closed form from :mod:`.rowwise` (the same maths and code
as :func:`encouraging_loss`), and the gradient is pushed through the projection at once:
``grad_X[chunk] = G @ W``, ``grad_W += G.T @ X[chunk]``, ``grad_bias += G.sum(0)``. Peak extra
memory is a few (chunk, C) buffers plus the gradients of X, W and bias themselves.

When the incoming gradient of every row is known before the backward pass, the gradients are
computed during the forward pass (as Liger-Kernel's fused linear cross-entropy does) and backward
only scales them by the scalar ``grad_output``: that is the case for ``"mean"`` (every row's
gradient is its target weight over the denominator, computed before the loop) and ``"sum"``.
For ``"none"`` the incoming gradients are per row and known only in backward; the forward pass
then computes the losses alone and backward recomputes each chunk's logits (one extra
(chunk, H) @ (H, C) product per chunk, no stored state beyond the inputs). The same recomputation
serves a second backward through a retained graph.

Precision: logits are formed in the inputs' dtype (as ``F.linear`` would); the loss terms run in
float32 for half-precision inputs (float64 for float64); the chunk gradient is rounded to the input
dtype for ``grad_X`` (as the materialised path does), and ``grad_W`` / ``grad_bias`` are
accumulated over chunks in float32 (a float32 product of the float32 chunk gradient and the
upcast hidden chunk) and rounded once at the end. ``accumulation_dtype=weight.dtype`` instead
accumulates them in the weight's own dtype (each chunk's product added with one rounding, as
Liger-Kernel's fused linear cross-entropy does by default): for half-precision weights it saves
the float32 accumulator and its final rounded copy (3x the weight's size at the end of the loop,
against 1x), at the price of one rounding per chunk instead of one in all.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .index_targets import IndexTargetRows
from .logit_terms import ChunkLogitTerms
from .rowwise import ROW_DTYPE

# The fewest logits a chunk should hold: below this, the per-chunk passes are too short to keep
# the threads busy and every chunk re-reads the whole projection (and its gradient) for little work.
MIN_CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(num_rows: int, hidden_size: int, num_classes: int) -> int:
    """Rows per chunk: chunk logits about as large as the hidden states, and not tiny.

    Liger-Kernel's rule ``next_power_of_2(ceil(N / ceil(C / H)))``, raised to the power of 2 that
    gives at least ``MIN_CHUNK_ELEMENTS`` logits per chunk (2**23: 32 MiB in float32), and never
    above N rounded up to a power of 2.
    """
    splits = max(1, -(-num_classes // max(hidden_size, 1)))
    rows = max(1, -(-num_rows // splits), -(-MIN_CHUNK_ELEMENTS // num_classes))
    rows = min(rows, max(num_rows, 1))
    return 1 << (rows - 1).bit_length()


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_accumulation_dtype(accumulation_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the weight and bias gradients are summed in over chunks.

    ``None`` means float32 (float64 for float64 weights); otherwise the weight's dtype or a wider
    float (float32, float64), never a narrower one. (That it is None or a dtype was checked when
    the :class:`~encouraging_loss.options.LinearLossOptions` were built.)
    """
    default = _accumulator_dtype(weight_dtype)
    if accumulation_dtype is None:
        return default
    candidates = dict.fromkeys((weight_dtype, torch.float32, torch.float64))
    allowed = [d for d in candidates if torch.finfo(d).eps <= torch.finfo(weight_dtype).eps]
    if accumulation_dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(
            f"accumulation_dtype must be None (meaning {default}) or one of {names} "
            f"(the weight's dtype or a wider float), got {accumulation_dtype!r}"
        )
    return accumulation_dtype


# Whether CUDA's mixed-precision addmm (half inputs, float32 output) has worked here; None: not
# tried yet. It is not available on CPU, and its absence is not an error.
_MIXED_ADDMM_WORKS: bool | None = None


def _accumulate_product_(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """``accumulator += left @ right`` with ``accumulator`` in float32/float64.

    Half-precision operands on CUDA use ``torch.addmm(..., out_dtype=torch.float32)`` (a half
    matrix product with float32 accumulation and output, tensor cores) when torch provides it;
    otherwise both operands are upcast to the accumulator's dtype (a float32 product: correct
    everywhere, slower on GPUs). Upcasting costs one temporary of each operand's size.
    """
    global _MIXED_ADDMM_WORKS
    half = left.dtype in (torch.float16, torch.bfloat16) and left.dtype == right.dtype
    if half and left.is_cuda and _MIXED_ADDMM_WORKS is not False:
        try:
            torch.addmm(accumulator, left, right, out_dtype=accumulator.dtype, out=accumulator)
            _MIXED_ADDMM_WORKS = True
            return accumulator
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM_WORKS = False
    return accumulator.addmm_(left.to(accumulator.dtype), right.to(accumulator.dtype))


class TritonRows:
    """The arguments of the Triton EL kernel for the whole batch (see :mod:`.triton_el`).

    With it, each chunk's loss and gradient come from one kernel launch that writes the gradient
    over the chunk's logits (Liger-Kernel's fused linear cross-entropy design), instead of the
    torch row-wise passes; the kernel applies the options' softcap and z-loss, and writes each
    row's lse into :attr:`lse` with ``return_lse``.
    """

    def __init__(self, target, weight, bonus_weight, options, token_weight=None,
                 return_lse: bool = False):  # fmt: skip
        self.target = target.reshape(-1).long().contiguous()
        self.weight = None if weight is None else weight.float().contiguous()
        self.bonus_weight = None if bonus_weight is None else bonus_weight.float().contiguous()
        self.options = options
        #: (N,) float64 token weights, or None: they scale each row's gradient (through the
        #: kernel's per-row scale) and loss.
        self.token_weight = None if token_weight is None else token_weight.reshape(-1).double()
        #: (N,) float32 logsumexp of every row's (capped) logits, from the kernel; None unless
        #: asked.
        self.lse = None
        if return_lse:
            self.lse = torch.empty(self.target.numel(), dtype=torch.float32,
                                   device=self.target.device)  # fmt: skip

    def loss_and_grad_(self, logits, chunk, grad_rows):
        """Row losses (float64) of the chunk; ``logits`` becomes the gradient, in place."""
        from .triton_el import launch_rows, token_row_scale, weighted_row_loss

        token_weight = None if self.token_weight is None else self.token_weight[chunk]
        if grad_rows is None:
            row_scale = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        elif token_weight is not None:
            row_scale = token_row_scale(token_weight, grad_rows[chunk]).contiguous()
        else:
            row_scale = grad_rows[chunk].to(torch.float32).contiguous()
        row_loss, lse = launch_rows(
            logits, self.target[chunk], logits, row_scale, self.options, self.weight,
            self.bonus_weight,
        )  # fmt: skip
        if self.lse is not None:
            self.lse[chunk] = lse
        if token_weight is not None:
            return weighted_row_loss(row_loss, token_weight), logits
        return row_loss.to(ROW_DTYPE), logits


def chunked_linear_el(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: IndexTargetRows,
    chunk_size: int,
    grad_rows: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    triton_rows: TritonRows | None = None,
    accumulation_dtype: torch.dtype | None = None,
    logit_terms: ChunkLogitTerms | None = None,
):
    """One pass over row chunks: row losses and, if ``grad_rows`` is given, the gradients.

    Args:
        hidden: (N, H) hidden states.
        weight: (C, H) projection.
        bias: (C,) or None.
        rows: the per-row arguments of the loss.
        chunk_size: rows per chunk.
        grad_rows: (N,) incoming gradient of each row loss (float64), or None for losses only.
        needs: whether the gradients of (hidden, weight, bias) are wanted.
        triton_rows: compute each chunk's loss and gradient with the Triton kernel instead.
        accumulation_dtype: the dtype ``grad_weight`` and ``grad_bias`` are summed in (see
            :func:`check_accumulation_dtype`; None: float32, float64 for float64 inputs).
        logit_terms: the softcap, z-loss and logsumexp of each chunk, or None.

    Returns:
        (row_losses (N,) float64, grad_hidden or None, grad_weight or None, grad_bias or None);
        the gradients in the inputs' dtype.
    """
    num_rows = hidden.shape[0]
    row_losses = torch.empty(num_rows, dtype=ROW_DTYPE, device=hidden.device)
    want_grads = grad_rows is not None
    need_hidden, need_weight, need_bias = (want_grads and n for n in needs)
    accumulate = accumulation_dtype or _accumulator_dtype(weight.dtype)
    # In the weight's own (half) dtype the chunk product must be a half product too: its operand
    # is the chunk gradient rounded to that dtype, the one grad_hidden's product uses.
    narrow = accumulate == weight.dtype and accumulate in (torch.float16, torch.bfloat16)
    # The bias's chunk sums in float32 even when their total is kept in the half dtype.
    sum_dtype = _accumulator_dtype(weight.dtype) if narrow else accumulate
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) \
        if need_weight else None  # fmt: skip
    grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) \
        if need_bias else None  # fmt: skip
    for start in range(0, num_rows, chunk_size):
        chunk = slice(start, min(start + chunk_size, num_rows))
        hidden_chunk = hidden[chunk]
        logits = torch.nn.functional.linear(hidden_chunk, weight, bias)
        z_rows = None
        if logit_terms is not None:
            logits, extra, z_rows = logit_terms.before(logits, chunk, want_grads)
        if triton_rows is not None:
            loss, grad_logits = triton_rows.loss_and_grad_(logits, chunk, grad_rows)
            row_losses[chunk] = loss if z_rows is None else loss + z_rows
            del logits, loss
            if not want_grads:
                continue
            buffer = grad_logits
        else:
            loss, buffer, state = rows.terms(logits, chunk, consume=True)
            compensated = logit_terms is not None and logit_terms.compensated(extra)
            if compensated:
                # The float32 cap's remainder corrects the value through the unit row gradient.
                ones = torch.ones(buffer.shape[0], dtype=ROW_DTYPE, device=buffer.device)
                grad_logits = rows.grad_(buffer, state, ones)
                loss = loss + logit_terms.correction(extra, grad_logits)
            row_losses[chunk] = loss if z_rows is None else loss + z_rows
            del logits, loss
            if not want_grads:
                continue
            if compensated:
                # Rows without a gradient stay 0 whatever theirs is (a mean over zero items: inf).
                scale = grad_rows[chunk].to(grad_logits.dtype).unsqueeze(1)
                grad_logits = torch.where(grad_logits == 0, 0.0, grad_logits * scale)
            else:
                grad_logits = rows.grad_(buffer, state, grad_rows[chunk])
            del state
        if logit_terms is not None:
            grad_logits = logit_terms.grad_(grad_logits, extra, chunk, grad_rows[chunk])
            del extra
        rounded = grad_logits.to(hidden.dtype) if grad_hidden is not None or narrow else None
        if grad_hidden is not None:
            torch.mm(rounded, weight, out=grad_hidden[chunk])
        if grad_weight is not None:
            if narrow:
                grad_weight.addmm_(rounded.t(), hidden_chunk)
            else:
                _accumulate_product_(grad_weight, grad_logits.t(), hidden_chunk)
        if grad_bias is not None:
            grad_bias.add_(grad_logits.sum(0, dtype=sum_dtype))
        del grad_logits, buffer, rounded
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return row_losses, grad_hidden, grad_weight, grad_bias


class LinearEL(torch.autograd.Function):
    """Autograd Function of the fused linear + encouraging loss (see the module docstring).

    Inputs: hidden (N, H), weight (C, H), bias (C,) or None, rows (:class:`IndexTargetRows`),
    reduction, chunk_size, triton_rows (:class:`TritonRows` or None), accumulation_dtype,
    logit_terms (:class:`.logit_terms.ChunkLogitTerms` or None; see :func:`chunked_linear_el`).
    Output: the reduced loss
    (float64 scalar), or (N,) float64 row losses for ``"none"``.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, rows, reduction, chunk_size, triton_rows, accumulation_dtype,
        logit_terms=None,
    ):  # fmt: skip
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.rows, ctx.reduction, ctx.chunk_size, ctx.needs = rows, reduction, chunk_size, needs
        ctx.triton_rows, ctx.accumulation_dtype = triton_rows, accumulation_dtype
        ctx.logit_terms = logit_terms
        ctx.save_for_backward(hidden, weight, bias)
        ctx.grads = None
        if reduction == "none" or not any(needs):
            row_losses, *_ = chunked_linear_el(
                hidden, weight, bias, rows, chunk_size, None, needs, triton_rows,
                logit_terms=logit_terms,
            )  # fmt: skip
            return row_losses
        unit = _unit_row_grad(rows, reduction, hidden.device)
        row_losses, *grads = chunked_linear_el(
            hidden, weight, bias, rows, chunk_size, unit, needs, triton_rows, accumulation_dtype,
            logit_terms,
        )  # fmt: skip
        ctx.grads = grads
        total = row_losses.sum()
        return total / rows.denominator if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            # "none", or a second backward through a retained graph: recompute chunk by chunk.
            if ctx.reduction == "none":
                grad_rows = grad_output.to(ROW_DTYPE)
            else:
                unit = _unit_row_grad(ctx.rows, ctx.reduction, hidden.device)
                grad_rows = unit * grad_output.to(ROW_DTYPE)
            _, *grads = chunked_linear_el(
                hidden, weight, bias, ctx.rows, ctx.chunk_size, grad_rows, ctx.needs,
                ctx.triton_rows, ctx.accumulation_dtype, ctx.logit_terms,
            )  # fmt: skip
        else:
            # The gradients were computed for a unit incoming gradient; they are ours to scale.
            grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None, None, None)


def fused_linear_loss(hidden, weight, bias, rows, reduction: str, chunk_size: int,
                      triton_rows=None, accumulation_dtype=None, logit_terms=None):
    """The reduced loss (float64; (N,) rows for ``"none"``) of the fused linear layer: through
    :class:`LinearEL` when a gradient is wanted, else one pass of :func:`chunked_linear_el`.

    ``rows`` is any object with the interface of :class:`IndexTargetRows` (``terms``, ``grad_``,
    ``denominator``, ``num_rows``); the other arguments are :func:`chunked_linear_el`'s.
    """
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return LinearEL.apply(
            hidden, weight, bias, rows, reduction, chunk_size, triton_rows, accumulation_dtype,
            logit_terms,
        )  # fmt: skip
    row_losses, *_ = chunked_linear_el(
        hidden, weight, bias, rows, chunk_size, None, (False, False, False), triton_rows,
        logit_terms=logit_terms,
    )  # fmt: skip
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    return total / rows.denominator if reduction == "mean" else total


def _unit_row_grad(rows: IndexTargetRows, reduction: str, device) -> torch.Tensor:
    """The incoming gradient of every row loss for a unit gradient of the reduced loss."""
    if reduction == "mean":
        return (1.0 / rows.denominator).to(ROW_DTYPE).expand(rows.num_rows)
    return torch.ones((), dtype=ROW_DTYPE, device=device).expand(rows.num_rows)
