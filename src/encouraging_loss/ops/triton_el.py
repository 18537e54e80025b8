"""Triton kernels for the encouraging loss of (N, C) logits with class-index targets.

One program per row; the row is read in blocks of ``BLOCK`` classes with an online softmax, and
the loss and the gradient come out of the same launch (the gradient is computed in the forward
pass, as Liger-Kernel's cross-entropy does, and backward scales it by ``grad_output`` in place:
one backward pass per forward, ``retain_graph`` second passes raise).
The maths and its exactness are those of :mod:`.rowwise`:

* **hard targets** (two passes over the row): pass 1 keeps the running max and sum of
  exp(z_j - m) over the *non-target* classes, so d = z_y - logsumexp_{j != y} z_j gives
  -log p_y = softplus(-d) and log(1 - p_y) = -softplus(d) without cancellation; pass 2 writes
  dL/dz_j = G w_y T q_j (j != y) and -G w_y T at y, T = (1 - p_y) - rho v_y g(p_y). Every bonus
  shape (log with ``log_end``, power, cosine, ``bonus_start``) costs the same: it is a function
  of p_y only.
* **label smoothing** (three passes): the special class s is the row's arg-max; pass 1 keeps the
  running max, its index and the exact sum over the other classes (when the max moves, the old
  max joins the rest), pass 2 sums the per-class terms (cross-entropy, bonus and h_k of
  :class:`.rowwise.DenseTargetEL`) over k != s, pass 3 writes the gradient. The log bonus
  (any ``log_end``) and ``"none"`` are supported, without ``bonus_start``.

Both kernels fuse the logit terms of :mod:`.logit_terms`: with a ``softcap`` c every logit is
loaded as c tanh(z / c) (the gradient pass recomputes it and multiplies the row's gradient by
1 - tanh**2, no capped copy of the logits is made), and with ``z_loss`` z each counted row adds
z lse**2 to its loss and 2 z lse softmax_j (times the row's gradient scale: its token weight,
over the mean's denominator) to its gradient, lse the logsumexp of the capped logits, which the
kernels write for every row (ignored ones too) for ``return_lse``.

The elementwise work is float32 for every input dtype (float32, bfloat16, float16), each row's
scalars (the sums across blocks, logs, p, the bonus, the row loss, the lse) float64; under a
softcap the row loss is corrected to first order for the rounding of the float32 capped logits
(from a float64 tanh in the gradient pass; see :mod:`.triton_kernels`), so that the float32 loss
and gradient err no more than torch's float32 cross-entropy does. The gradient is written in
the logits' dtype, into a new tensor or, with ``in_place=True``, over the logits
themselves (the caller must not use the logits afterwards; saves one (N, C) tensor).

The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests
run them).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from .._validate import check_bool, check_class_vector, check_input_and_target, check_token_weight
from ..options import LossOptions, takes_options
from .index_targets import target_weights

__all__ = [
    "TRITON_AVAILABLE",
    "launch_rows",
    "triton_can_run",
    "triton_encouraging_loss",
    "triton_loss_with_options",
    "triton_supports",
]

# triton is an optional dependency (the "gpu" extra); the kernels import it on first launch.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
#: The bonus shapes the kernels compute, by their code in ``triton_kernels._bonus``.
BONUS_CODES = {"none": 0, "log": 1, "power": 2, "cosine": 3}
MAX_BLOCK = 4096


def triton_supports(input: torch.Tensor, target: torch.Tensor, options: LossOptions) -> str | None:
    """Why the Triton kernels cannot compute this loss, or None when they can.

    Supported: (N, C) or (C) logits of float32/bfloat16/float16, class-index targets, the bonus
    shapes of :data:`BONUS_CODES` without label smoothing, the log bonus (or none) without
    ``bonus_start`` with it; ``z_loss`` and ``softcap`` with any of them. A shape added to
    :data:`encouraging_loss.bonus.SHAPES` without kernel code is refused here by name, and the
    torch paths compute it.
    """
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if target.is_floating_point():
        return "probability targets are not supported by the Triton kernels"
    if input.dim() > 2:
        return "inputs with more than 2 dimensions are not supported by the Triton kernels"
    if input.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {input.dtype} is not supported by the Triton kernels"
    bonus = options.bonus_shape
    if bonus.kind not in BONUS_CODES:
        return f"the bonus shape {bonus.kind!r} has no Triton kernel"
    if options.label_smoothing > 0.0 and (bonus.kind not in ("log", "none") or bonus.start > 0.0):
        return "label smoothing with a bonus other than plain 'log' is not supported by Triton"
    return None


def triton_can_run(input: torch.Tensor) -> bool:
    """Triton can launch on this tensor: CUDA, or any device under ``TRITON_INTERPRET=1``."""
    return TRITON_AVAILABLE and (input.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def launch_rows(logits, target, grad, row_scale, options: LossOptions, weight=None,
                bonus_weight=None, launch=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Run the kernel over (N, C) rows: (row losses, row logsumexps), both float32; the
    gradient into ``grad``.

    The row losses include the z-loss (not the token weights); the softcap is applied to the
    logits as they are read.

    Args:
        logits: (N, C) logits with a contiguous class dimension.
        target: (N,) int64 class indices or ``options.ignore_index``.
        grad: (N, C) tensor the gradient is written into (may be ``logits`` itself).
        row_scale: (N,) float32 incoming gradient of each row loss.
        options: the loss options (:func:`triton_supports` accepted them).
        weight: optional (C,) float32 class weights.
        bonus_weight: optional (C,) float32 bonus weights.
        launch: how a kernel is launched (see :func:`loss_and_unit_grad`); None: directly.
    """
    from . import triton_kernels

    if launch is None:
        launch = _direct

    num_rows, num_classes = logits.shape
    row_loss = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(row_loss)
    if num_rows == 0:
        return row_loss, lse
    bonus = options.bonus_shape
    e = bonus.log_end
    common = dict(
        logits_ptr=logits, logits_stride=logits.stride(0), grad_ptr=grad,
        grad_stride=grad.stride(0), target_ptr=target,
        weight_ptr=logits if weight is None else weight,
        bonus_weight_ptr=logits if bonus_weight is None else bonus_weight,
        loss_ptr=row_loss, lse_ptr=lse, scale_ptr=row_scale, n_cols=num_classes,
        ignore_index=options.ignore_index, rho=float(options.bonus_scale), log_end=e,
        log1m_end=math.log1p(-e) if e < 1.0 else 0.0,
        inv_1m_end=1.0 / (1.0 - e) if e < 1.0 else 0.0, z_loss=float(options.z_loss),
        softcap=1.0 if options.softcap is None else float(options.softcap),
        HAS_Z_LOSS=options.z_loss != 0.0, HAS_SOFTCAP=options.softcap is not None,
        HAS_WEIGHT=weight is not None, HAS_BONUS_WEIGHT=bonus_weight is not None,
        BONUS=BONUS_CODES[bonus.kind] if options.with_bonus else 0,
        BLOCK=min(MAX_BLOCK, 1 << (num_classes - 1).bit_length()),
    )  # fmt: skip
    if options.label_smoothing == 0.0:
        launch(triton_kernels.hard_target_kernel)[(num_rows,)](
            **common, gamma=float(bonus.gamma), start=float(bonus.start),
            start_value=bonus.start_value, HAS_START=bonus.start > 0.0,
        )  # fmt: skip
    else:
        launch(triton_kernels.smoothed_kernel)[(num_rows,)](
            **common, smoothing=float(options.label_smoothing)
        )
    return row_loss, lse


def _direct(kernel):
    return kernel


def token_row_scale(token_weight: torch.Tensor, scale) -> torch.Tensor:
    """The kernel's float32 per-row gradient scale ``token_weight * scale``, 0 where the weight
    is 0 (even for a scale that is not finite: the mean over zero weight is NaN, its gradient
    0, as for ignored rows)."""
    return torch.where(token_weight != 0, token_weight * scale, 0.0).float()


def weighted_row_loss(row_loss: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """The kernel's row losses times their token weights (float64), 0 where the weight is 0."""
    return torch.where(token_weight != 0, row_loss.double() * token_weight, 0.0)


def loss_and_unit_grad(logits, target, grad, options: LossOptions, weight=None,
                       bonus_weight=None, token_weight=None, launch=None):  # fmt: skip
    """The reduced loss and the row logsumexps of one kernel launch; into ``grad``, the logits'
    gradient for a unit incoming gradient of the loss (of each row loss for ``"none"``).

    Args:
        logits, target, weight, bonus_weight, options: as for :func:`launch_rows`.
        grad: (N, C) tensor the gradient is written into (may be ``logits`` itself).
        token_weight: optional (N,) float64 token weights: they scale each row's gradient
            through the kernel's per-row scale, and its loss here (float64).
        launch: how a kernel is launched, ``launch(kernel)[grid](**arguments)``: the kernel
            itself by default, ``torch.library.wrap_triton`` inside a ``triton_op``.

    Returns:
        (loss, lse): the loss in float64 (a scalar, or (N,) for ``"none"``), lse (N,) float32.
    """
    reduction = options.reduction
    denominator = None
    if reduction == "mean":
        *_, target_weight = target_weights(target, options.ignore_index, weight, torch.float32)
        if token_weight is None:
            denominator = target_weight.sum()
            row_scale = (1.0 / denominator).expand(logits.shape[0])
        else:
            denominator = torch.dot(target_weight.double(), token_weight)
            row_scale = token_row_scale(token_weight, 1.0 / denominator)
    else:
        row_scale = torch.ones((), dtype=torch.float32, device=logits.device)
        row_scale = row_scale.expand(logits.shape[0])
        if token_weight is not None:
            row_scale = token_row_scale(token_weight, 1.0)
    row_loss, lse = launch_rows(logits, target, grad, row_scale.contiguous(), options, weight,
                                bonus_weight, launch)  # fmt: skip
    if token_weight is not None:
        row_loss = weighted_row_loss(row_loss, token_weight)
    if reduction == "none":
        return row_loss.double(), lse
    result = row_loss.double().sum()
    return (result / denominator.double() if reduction == "mean" else result), lse


class TritonEL(torch.autograd.Function):
    """(loss, lse) from one kernel launch; backward scales the stored gradient.

    Inputs: logits (N, C), target (N,) int64, weight and bonus_weight (float32 or None), the
    :class:`LossOptions`, in_place, token_weight ((N,) float64 or None); see
    :func:`loss_and_unit_grad`. The lse (N,) float32 has no gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, bonus_weight, options, in_place, token_weight=None):
        # In place, the kernel writes through the raw pointer: autograd is not told (as in
        # Liger-Kernel), and the gradient is held on ctx rather than saved.
        grad = logits if in_place else torch.empty_like(logits)
        loss, lse = loss_and_unit_grad(logits, target, grad, options, weight, bonus_weight,
                                       token_weight)  # fmt: skip
        ctx.reduction = options.reduction
        ctx.grad = grad
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_output, _grad_lse):
        # The stored gradient is scaled in place (no second (N, C) tensor), so it serves once.
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "the Triton encouraging loss supports one backward pass per forward (it scales "
                "its stored gradient in place); use backend='torch' to backward twice"
            )
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(1).to(grad.dtype))
        else:
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None


@takes_options(LossOptions)
def triton_encouraging_loss(logits, target, weight=None, *, bonus_weight=None, token_weight=None,
                            in_place: bool = False, return_lse: bool = False,
                            **options):  # fmt: skip
    """The encouraging loss of (N, C) or (C) logits by the Triton kernels.

    :func:`encouraging_loss` calls these kernels with ``backend="triton"`` (or ``"auto"`` on
    CUDA); call this directly for ``in_place=True``: the gradient is then written over
    ``logits``, which must be a contiguous leaf-free tensor the caller does not read again (it
    holds the gradient after the forward call), saving one (N, C) buffer.

    Args:
        logits: (N, C) or (C) float32/bfloat16/float16 logits, CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        target: (N) or () class indices.
        weight: optional (C,) class weights.
        bonus_weight: optional (C,) bonus weights.
        token_weight: optional per-row weights of the target's shape (see
            :func:`~encouraging_loss.encouraging_loss`).
        in_place: write the gradient over ``logits`` (see above).
        return_lse: also return each row's logsumexp (of the capped logits), float32.
        **options: the options of :class:`~encouraging_loss.options.LossOptions`, by keyword
            (``ignore_index``, ``reduction``, ``label_smoothing``, the bonus's, ``z_loss`` and
            ``softcap``: both computed inside the kernels).

    Returns:
        The loss in the logits' dtype (with ``return_lse``, ``(loss, lse)``), as
        :func:`encouraging_loss` returns it.

    Example:
        >>> import torch
        >>> from encouraging_loss.ops.triton_el import triton_can_run, triton_encouraging_loss
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> if triton_can_run(logits):  # CUDA, or TRITON_INTERPRET=1
        ...     triton_encouraging_loss(logits, torch.tensor([1, 2, 3, -100])).backward()
    """
    options = LossOptions.of(**options)
    check_bool("return_lse", return_lse)
    check_input_and_target(logits, target)
    num_classes = logits.shape[-1]
    weight = check_class_vector("weight", weight, num_classes, logits)
    bonus_weight = check_class_vector("bonus_weight", bonus_weight, num_classes, logits)
    token_weight = check_token_weight(token_weight, logits.shape[:-1], logits,
                                      options.validate_args)  # fmt: skip
    return triton_loss_with_options(logits, target, options, weight, bonus_weight, in_place,
                                    token_weight, return_lse)  # fmt: skip


def triton_loss_with_options(
    logits, target, options: LossOptions, weight=None, bonus_weight=None, in_place: bool = False,
    token_weight=None, return_lse: bool = False,
):  # fmt: skip
    """:func:`triton_encouraging_loss` for checked tensors and built options (``token_weight``:
    checked per-element weights of the target's shape, or None).

    Raises:
        ValueError: when the kernels cannot compute this loss (the reason) or run here.
        TypeError: for a non-bool ``in_place``.
    """
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
    why_not = triton_supports(logits, target, options)
    if why_not is not None:
        raise ValueError(why_not)
    if not triton_can_run(logits):
        raise ValueError(
            f"logits are on {logits.device}: the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1)"
        )
    squeeze = logits.dim() == 1
    rows = logits.unsqueeze(0) if squeeze else logits
    if rows.stride(-1) != 1:
        if in_place:
            raise ValueError("in_place=True needs logits with a contiguous class dimension")
        rows = rows.contiguous()
    target = target.reshape(-1).long().contiguous()
    if weight is not None:
        weight = weight.float().contiguous()
    if bonus_weight is not None:
        bonus_weight = bonus_weight.float().contiguous()
    if token_weight is not None:
        token_weight = token_weight.reshape(-1).double()
    if torch.compiler.is_compiling():
        # Traced: the kernels as a torch.library.triton_op (out of place).
        if in_place:
            raise ValueError("in_place=True is not supported under torch.compile")
        from .triton_library import triton_loss_and_grad

        loss, lse = triton_loss_and_grad(rows, target, weight, bonus_weight, token_weight,
                                         options)  # fmt: skip
    else:
        loss, lse = TritonEL.apply(rows, target, weight, bonus_weight, options, in_place,
                                   token_weight)  # fmt: skip
    if squeeze:
        lse = lse.reshape(())
        if options.reduction == "none":
            loss = loss.reshape(())
    loss = loss.to(logits.dtype)
    return (loss, lse) if return_lse else loss
