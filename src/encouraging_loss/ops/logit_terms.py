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
"""

from __future__ import annotations

import torch

from .rowwise import ROW_DTYPE


def softcapped(logits: torch.Tensor, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """``c * tanh(logits / c)`` in ``dtype`` (the logits unchanged for ``softcap=None``)."""
    if softcap is None:
        return logits
    return torch.tanh(logits.to(dtype) / softcap) * softcap


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
        softmax = torch.exp(logits - lse.unsqueeze(-1))
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
    """

    def __init__(self, options, target, token_weight, dtype, return_lse: bool):
        self.softcap, self.z_loss, self.dtype = options.softcap, options.z_loss, dtype
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
                softmax = torch.exp(capped.to(self.dtype) - lse.unsqueeze(1))
        return capped, (tanh, lse, softmax), z_rows

    def grad_(self, grad_logits: torch.Tensor, state, chunk: slice, grad_rows) -> torch.Tensor:
        """Add the z-loss's gradient to the capped logits' gradient, then take it through the
        softcap (in place where the dtypes allow)."""
        tanh, lse, softmax = state
        if softmax is not None:
            softmax = _z_loss_softmax_(softmax, lse, self.z_loss, self.row_weight[chunk],
                                       grad_rows)  # fmt: skip
            grad_logits = grad_logits.add_(softmax)
        if tanh is not None:
            grad_logits = grad_logits.mul_(tanh.square_().neg_().add_(1.0))
        return grad_logits
