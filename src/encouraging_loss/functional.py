"""The encouraging loss with the semantics of ``torch.nn.functional.cross_entropy``."""

from __future__ import annotations

import torch

from ._validate import (
    check_choice,
    check_class_vector,
    check_input_and_target,
    check_int,
    check_real,
    check_reduction,
    check_target_range,
    value_checks_enabled,
)
from .bonus import Bonus
from .ops.index_targets import IndexTargetRows
from .ops.rowwise import ROW_DTYPE, DenseTargetEL
from .ops.triton_el import triton_can_run, triton_encouraging_loss, triton_supports

__all__ = ["encouraging_loss"]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_last(tensor: torch.Tensor) -> torch.Tensor:
    """View (C), (N, C) or (N, C, d1..dK) with the class dimension last.

    The view may be strided; the private copy the loss makes anyway gathers it into rows.
    """
    if tensor.dim() == 1:
        return tensor.unsqueeze(0)
    return tensor.movedim(1, -1)


BACKENDS = ("auto", "torch", "triton")


def use_triton_backend(backend: str, input, target, epsilon: float, shape: Bonus) -> bool:
    """Whether to run the Triton kernels (see ``backend`` in :func:`encouraging_loss`)."""
    if backend == "torch":
        return False
    why_not = triton_supports(input, target, epsilon, shape)
    if backend == "auto":
        # Under torch.compile the torch path traces into the graph; a kernel launch would not.
        return why_not is None and input.is_cuda and not torch.compiler.is_compiling()
    if why_not is not None:
        raise ValueError(f"backend='triton': {why_not}")
    if not triton_can_run(input):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); input is on "
            f"{input.device}"
        )
    return True


def _weight_or_ones(weight, num_classes: int, like: torch.Tensor, dtype) -> torch.Tensor:
    if weight is not None:
        return weight
    return torch.ones(num_classes, dtype=dtype, device=like.device)


def encouraging_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    log_end: float = 0.75,
    bonus_scale: float = 1.0,
    bonus: str = "log",
    bonus_gamma: float = 1.0,
    bonus_start: float = 0.0,
    bonus_weight: torch.Tensor | None = None,
    validate_args: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""The encouraging loss: cross-entropy plus a bonus for confident correct predictions.

    .. math::
        \mathrm{EL} = \sum_j w_j q_j \big(-\log p_j + \rho\, v_j\, b(p_j)\big),
        \qquad b(p) = \log(1 - p)

    where ``p = softmax(input)``, ``q`` is the target distribution torch's cross-entropy uses
    (one-hot; ``(1 - eps) one-hot + eps / C`` with label smoothing; the given probabilities for
    probability targets), ``w`` the class ``weight``, ``rho`` the ``bonus_scale`` and ``v`` the
    per-class ``bonus_weight``. The result is reduced exactly as ``F.cross_entropy`` reduces it, and
    with ``bonus_scale=0`` (or ``bonus="none"``) the loss *is* ``F.cross_entropy`` in value and
    gradient. With ``rho = 1`` and the plain log bonus, the loss of a sample equals
    ``log sum_{j != y} exp(z_j - z_y)``: the gradient on the target logit stays -1 instead of
    vanishing as ``p_y -> 1``.

    Args:
        input: logits of shape (C), (N, C) or (N, C, d1, ..., dK); any floating dtype
            (float16/bfloat16 are computed in float32).
        target: class indices of shape (), (N) or (N, d1, ..., dK) (an integer dtype, values in
            [0, C) or ``ignore_index``), or class probabilities with the input's shape.
        weight: optional class weights of shape (C,), as in ``F.cross_entropy``.
        ignore_index: class-index target value that contributes nothing (index targets only).
        reduction: ``"mean"`` (weighted mean over non-ignored items, as torch), ``"sum"`` or
            ``"none"``.
        label_smoothing: in [0, 1]; applied to the cross-entropy and the bonus alike.
        log_end: where the conservative log bonus turns linear, in (0, 1]. The paper recommends
            0.75 for tasks that reach high accuracy, 0.5 otherwise; 1 gives the plain log bonus.
        bonus_scale: rho, the weight of the bonus (0 gives cross-entropy).
        bonus: the bonus shape, ``"log"``, ``"power"`` (-p**bonus_gamma), ``"cosine"``
            (cos(pi p) - 1) or ``"none"``.
        bonus_gamma: exponent of the power bonus, > 0.
        bonus_start: in [0, 1): no bonus for p < bonus_start (shifted to stay continuous).
        bonus_weight: optional per-class bonus weights of shape (C,), separate from ``weight``
            (e.g. the class-balanced bonus for imbalanced data).
        validate_args: check that class indices are in range. This reads the target's values and
            so synchronises a GPU; pass ``False`` on a hot path. Shape checks always run.
        backend: ``"auto"`` (the Triton kernels of :mod:`encouraging_loss.ops.triton_el` for
            CUDA tensors when ``triton`` imports and they support the options, else torch),
            ``"torch"`` (always the torch path) or ``"triton"`` (always the kernels; an error
            names what they do not support). Both give the same results within rounding.

    Returns:
        The loss: a scalar for ``"mean"``/``"sum"``, else the target's index shape.

    Example:
        >>> import torch
        >>> from encouraging_loss import encouraging_loss
        >>> logits = torch.tensor([[4.0, 1.0, 0.0], [0.5, 2.0, 0.1]], requires_grad=True)
        >>> target = torch.tensor([0, 1])
        >>> loss = encouraging_loss(logits, target, log_end=0.75)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        -1.5262
    """
    is_index = check_input_and_target(input, target)
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    epsilon = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    rho = check_real("bonus_scale", bonus_scale)
    shape = Bonus(bonus, log_end, bonus_gamma, bonus_start)
    weight = check_class_vector("weight", weight, num_classes, input)
    bonus_weight = check_class_vector("bonus_weight", bonus_weight, num_classes, input)
    if is_index and value_checks_enabled(validate_args):
        check_target_range(target, num_classes, ignore_index)
    check_choice("backend", backend, BACKENDS)
    if use_triton_backend(backend, input, target, epsilon, shape):
        return triton_encouraging_loss(
            input, target, weight, ignore_index, reduction, epsilon,
            bonus_scale=rho, bonus=shape, bonus_weight=bonus_weight,
        )  # fmt: skip

    dtype = compute_dtype_for(input.dtype)
    logits = class_last(input)
    if weight is not None:
        weight = weight.to(dtype)
    if bonus_weight is not None:
        bonus_weight = bonus_weight.to(dtype)

    if is_index:
        rows = IndexTargetRows(
            target, num_classes, weight, bonus_weight, ignore_index, epsilon, rho, shape, dtype
        )
        row_loss = rows.function.apply(logits, *rows.args())
        denominator = rows.denominator
    else:
        # Class mass a_k = w_k ((1 - eps) q_k + eps / C).
        num_rows = logits.numel() // num_classes
        row_alpha = torch.full(
            (num_rows,), epsilon / num_classes, dtype=ROW_DTYPE, device=input.device
        )
        row_loss = DenseTargetEL.apply(
            logits, row_alpha, _weight_or_ones(weight, num_classes, input, dtype),
            class_last(target), 1.0 - epsilon, None, None, bonus_weight, rho, shape, dtype,
        )  # fmt: skip
        denominator = num_rows

    if reduction == "none":
        index_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
        return row_loss.reshape(index_shape).to(input.dtype)
    total = row_loss.sum()
    if reduction == "mean":
        total = total / denominator
    return total.to(input.dtype)
