"""The Triton kernels as a ``torch.library.triton_op`` (torch >= 2.6), for ``torch.compile``.

Importing this module (it imports triton, so the package does not import it: the Triton path
does, on its first call under ``torch.compile``) registers
``torch.ops.encouraging_loss.triton_loss_and_grad``: the operator returns the
loss, each row's logsumexp and the logits' gradient for a unit incoming gradient from one launch
of the kernels of :mod:`.triton_kernels`, launched through ``torch.library.wrap_triton``; its
registered backward scales that gradient by the incoming one (out of place: the operator
mutates nothing). :func:`.triton_el.triton_loss_with_options` (so ``backend="triton"`` and
:func:`.triton_el.triton_encouraging_loss`) calls it while ``torch.compile`` traces, and
:class:`.triton_el.TritonEL` (which scales its stored gradient in place) eagerly.

* **On CUDA** the operator is a ``triton_op``: ``torch.compile`` decomposes it and Inductor sees
  the two kernel launches (user-defined Triton kernels in the compiled graph, their sources in
  the compile cache's key).
* **Under** ``TRITON_INTERPRET=1`` (how the tests run the kernels on CPU tensors)
  ``wrap_triton`` hands back the interpreted kernel itself, which reads its tensors' data: a
  fake or functional tensor (``torch.compile``'s tracing, ``opcheck``'s fake-tensor and
  AOT-dispatch tests) would fail in it. There the operator is opaque instead, as a
  ``custom_op``: a shape-only fake implementation and no decomposition, so the compiled graph
  calls the operator, which runs the interpreted kernels on real tensors.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import wrap_triton

from ..options import LossOptions
from .triton_el import loss_and_unit_grad
from .triton_kernels import hard_target_kernel, smoothed_kernel

__all__ = ["OPERATOR", "TRITON_OP", "TRITON_OP_AVAILABLE", "triton_loss_and_grad"]

#: torch.library.triton_op exists (torch >= 2.6).
TRITON_OP_AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
#: The operator's qualified name.
OPERATOR = "encouraging_loss::triton_loss_and_grad"
# The kernels' options in the operator's schema (the tensors come first), in this order.
OPTION_NAMES = ("ignore_index", "reduction", "label_smoothing", "log_end", "bonus_scale", "bonus",
                "bonus_gamma", "bonus_start", "z_loss", "softcap")  # fmt: skip


def _loss_and_grad(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    bonus_weight: Tensor | None,
    token_weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    log_end: float,
    bonus_scale: float,
    bonus: str,
    bonus_gamma: float,
    bonus_start: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    options = LossOptions.of(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        log_end=log_end, bonus_scale=bonus_scale, bonus=bonus, bonus_gamma=bonus_gamma,
        bonus_start=bonus_start, validate_args=False, backend="triton", z_loss=z_loss,
        softcap=softcap,
    )  # fmt: skip
    # Both kernels are wrapped here, by name, where triton_op's source scan finds them (their
    # sources join the compile cache's key).
    launchers = {hard_target_kernel: wrap_triton(hard_target_kernel),
                 smoothed_kernel: wrap_triton(smoothed_kernel)}  # fmt: skip
    grad = torch.empty_like(logits)
    loss, lse = loss_and_unit_grad(logits, target, grad, options, weight, bonus_weight,
                                   token_weight, launchers.__getitem__)  # fmt: skip
    return loss, lse, grad


def _fake(logits, target, weight, bonus_weight, token_weight, ignore_index, reduction, *_):
    shape = logits.shape[:1] if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=torch.float64)
    lse = logits.new_empty(logits.shape[:1], dtype=torch.float32)
    return loss, lse, torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    _, lse, grad = output
    ctx.mark_non_differentiable(lse, grad)
    ctx.save_for_backward(grad)
    ctx.per_row = inputs[OPTION_NAMES.index("reduction") + 5] == "none"
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_loss, _grad_lse, _grad_grad):
    (grad,) = ctx.saved_tensors
    nothing = [None] * (ctx.num_inputs - 1)
    if grad_loss is None:
        return (None, *nothing)
    grad_loss = grad_loss.to(grad.dtype)
    if ctx.per_row:
        grad_loss = grad_loss.unsqueeze(1)
    return (grad * grad_loss, *nothing)


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    # What triton_op does under torch.export: keep the operator as one node.
    return mode.__torch_dispatch__(op, types, args, kwargs)


def _register():
    op = torch.library.triton_op(OPERATOR, _loss_and_grad, mutates_args=())
    op.register_autograd(_backward, setup_context=_setup_context)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # No public name for the mode whose dispatch triton_op overrides to decompose itself.
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        op.register_fake(_fake)
        op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)
    return op


#: The registered operator (a ``CustomOpDef``), None without ``triton_op``.
TRITON_OP = _register() if TRITON_OP_AVAILABLE else None


def triton_loss_and_grad(logits, target, weight, bonus_weight, token_weight,
                         options: LossOptions) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(loss, lse) of the kernels by the operator, differentiable in ``logits``.

    Args:
        logits: (N, C) logits with a contiguous class dimension (float32/bfloat16/float16).
        target: (N,) int64 class indices or ``options.ignore_index``.
        weight: optional (C,) float32 class weights.
        bonus_weight: optional (C,) float32 bonus weights.
        token_weight: optional (N,) float64 token weights.
        options: the loss options (:func:`.triton_el.triton_supports` accepted them).

    Returns:
        The loss in float64 (a scalar, or (N,) for ``"none"``) and lse, (N,) float32 without a
        gradient.

    Raises:
        RuntimeError: when this torch has no ``torch.library.triton_op``.
    """
    if TRITON_OP is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 has)"
        )
    values = [getattr(options, name) for name in OPTION_NAMES]
    loss, lse, _ = TRITON_OP(logits, target, weight, bonus_weight, token_weight, *values)
    return loss, lse
