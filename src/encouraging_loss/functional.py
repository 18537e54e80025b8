"""The encouraging loss with the semantics of ``torch.nn.functional.cross_entropy``."""

from __future__ import annotations

import torch

from ._validate import (
    check_bool,
    check_class_vector,
    check_input_and_target,
    check_target_range,
    check_token_weight,
)
from .ops.index_targets import IndexTargetRows, row_token_weight, target_weights
from .ops.logit_terms import (
    CompensatedSoftcap,
    ZLoss,
    compensates,
    softcapped,
    z_row_weight,
)
from .ops.rowwise import ROW_DTYPE, DenseTargetEL
from .ops.small import small_encouraging_loss, small_path_supports
from .ops.small_common import hard_log_bonus_loss
from .ops.triton_el import triton_can_run, triton_loss_with_options, triton_supports
from .options import LossOptions, takes_options

__all__ = ["encouraging_loss", "encouraging_loss_with_options"]


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


def _weight_or_ones(weight, num_classes: int, like: torch.Tensor, dtype) -> torch.Tensor:
    if weight is not None:
        return weight
    return torch.ones(num_classes, dtype=dtype, device=like.device)


def may_use_triton(input, options: LossOptions) -> bool:
    """Whether the ``backend`` asks for the Triton kernels on this input where they apply."""
    return options.backend == "triton" or (options.backend == "auto" and input.is_cuda)


def use_triton_backend(input, target, options: LossOptions) -> bool:
    """Whether to run the Triton kernels (see ``backend`` in :class:`LossOptions`)."""
    if not may_use_triton(input, options):
        return False
    why_not = triton_supports(input, target, options)
    if options.backend == "auto":
        # Under torch.compile the torch path traces into the graph; a kernel launch would not.
        return why_not is None and not torch.compiler.is_compiling()
    if why_not is not None:
        raise ValueError(f"backend='triton': {why_not}")
    if not triton_can_run(input):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); input is on "
            f"{input.device}"
        )
    return True


@takes_options(LossOptions)
def encouraging_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        bonus_weight: optional per-class bonus weights of shape (C,), separate from ``weight``
            (e.g. the class-balanced bonus for imbalanced data).
        token_weight: optional per-element weights t >= 0 of the target's index shape (the
            input's shape without the class dimension: (), (N) or (N, d1, ..., dK), for
            probability targets too), a floating tensor on the input's device that does not
            require grad. Each element's loss (after the class ``weight``) is multiplied by its
            t: ``"none"`` returns the weighted losses, ``"sum"`` their sum and ``"mean"`` their
            sum over ``sum_i t_i w_{y_i}`` for the non-ignored elements i (``sum_i t_i`` for
            probability targets): the class-weighted mean of torch with each element counted
            t_i times. All ones give the unweighted loss. The values (finite, >= 0) are checked
            with ``validate_args``.
        return_lse: also return the logsumexp of each element's (softcapped) logits.
        **options: the bonus and dispatch options of :class:`~encouraging_loss.options.LossOptions`
            (where each is described): ``log_end=0.75``, ``bonus_scale=1.0``, ``bonus="log"``,
            ``bonus_gamma``, ``bonus_start``, ``validate_args=True``, ``backend="auto"``,
            ``z_loss=0.0`` (adds ``z_loss * lse**2`` per element, times its token weight, not
            its class weight), ``softcap=None`` (logits ``c * tanh(z / c)``). Each distinct set
            is checked once; a module checks its own when it is built.

    Returns:
        The loss: a scalar for ``"mean"``/``"sum"``, else the target's index shape. With
        ``return_lse``, ``(loss, lse)``: lse of the index shape in float32 (float64 for float64
        inputs), computed for ignored elements too, without a gradient (train it through
        ``z_loss``).

    Raises:
        TypeError, ValueError: naming the argument that is wrong.

    Example:
        >>> import torch
        >>> from encouraging_loss import encouraging_loss
        >>> logits = torch.tensor([[4.0, 1.0, 0.0], [0.5, 2.0, 0.1]], requires_grad=True)
        >>> target = torch.tensor([0, 1])
        >>> loss = encouraging_loss(logits, target, log_end=0.75)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        -1.5262

        Per-token weights, e.g. half weight for the second element (a weighted mean):

        >>> token_weight = torch.tensor([1.0, 0.5])
        >>> weighted = encouraging_loss(logits, target, token_weight=token_weight)
        >>> rows = encouraging_loss(logits, target, reduction="none")
        >>> bool(torch.allclose(weighted, (rows * token_weight).sum() / token_weight.sum()))
        True

        The z-loss and logit softcapping (Gemma 2), with the logsumexp per element:

        >>> loss, lse = encouraging_loss(logits, target, z_loss=1e-4, softcap=30.0,
        ...                              return_lse=True)
        >>> lse.shape, lse.dtype
        (torch.Size([2]), torch.float32)
    """
    options = LossOptions.of(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, **options
    )
    check_bool("return_lse", return_lse)
    return encouraging_loss_with_options(input, target, options, weight, bonus_weight,
                                         token_weight, return_lse)  # fmt: skip


def encouraging_loss_with_options(
    input: torch.Tensor,
    target: torch.Tensor,
    options: LossOptions,
    weight: torch.Tensor | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`encouraging_loss` with its options already built (what the modules call).

    Only what depends on the tensors is checked here. Small problems on CPU take the few-pass
    path of :mod:`.ops.small`; the rest the row paths (or the Triton kernels, by ``backend``).

    Args:
        input: logits, as for :func:`encouraging_loss`.
        target: class indices or probabilities, as for :func:`encouraging_loss`.
        options: the loss options.
        weight: optional (C,) class weights.
        bonus_weight: optional (C,) bonus weights.
        token_weight: optional per-element weights (the target's index shape).
        return_lse: also return each element's logsumexp.

    Returns:
        The loss (and the logsumexp), as :func:`encouraging_loss` returns it.
    """
    logit_terms = return_lse or options.with_logit_terms
    if not logit_terms and weight is None and bonus_weight is None and token_weight is None:
        # First, before any other check: the common call's cost is its count of operations.
        fast = hard_log_bonus_loss(input, target, options)
        if fast is not None:
            return fast
    if logit_terms and not may_use_triton(input, options):
        return _with_logit_terms(input, target, options, weight, bonus_weight, token_weight,
                                 return_lse)  # fmt: skip
    is_index = check_input_and_target(input, target)
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    index_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    weight = check_class_vector("weight", weight, num_classes, input)
    bonus_weight = check_class_vector("bonus_weight", bonus_weight, num_classes, input)
    token_weight = check_token_weight(token_weight, index_shape, input, options.validate_args)
    if use_triton_backend(input, target, options):
        # The kernels fuse the softcap, the z-loss and the logsumexp.
        return triton_loss_with_options(input, target, options, weight, bonus_weight, False,
                                        token_weight, return_lse)  # fmt: skip
    if logit_terms:  # "auto" on CUDA for a loss the kernels do not compute
        return _with_logit_terms(input, target, options, weight, bonus_weight, token_weight,
                                 return_lse)  # fmt: skip
    if small_path_supports(input, options) is None:
        return small_encouraging_loss(input, target, weight, bonus_weight, options, token_weight)
    if is_index and options.validate_args and not torch.compiler.is_compiling():
        check_target_range(target, num_classes, options.ignore_index)

    dtype = compute_dtype_for(input.dtype)
    logits = class_last(input)
    if weight is not None:
        weight = weight.to(dtype)
    if bonus_weight is not None:
        bonus_weight = bonus_weight.to(dtype)

    if is_index:
        rows = IndexTargetRows(target, num_classes, weight, bonus_weight, options, dtype,
                               token_weight)  # fmt: skip
        row_loss = rows.function.apply(logits, *rows.args())
        denominator = rows.denominator
    else:
        # Class mass a_k = t w_k ((1 - eps) q_k + eps / C), t the token weight (1 without).
        alpha, beta = options.smoothing_masses(num_classes)
        num_rows = logits.numel() // num_classes
        row_alpha = torch.full((num_rows,), alpha, dtype=ROW_DTYPE, device=input.device)
        probabilities, denominator = class_last(target), num_rows
        row_weight = row_token_weight(token_weight)
        if row_weight is not None:
            row_alpha, denominator = row_alpha * row_weight, row_weight.sum()
            probabilities = probabilities * token_weight.unsqueeze(-1)
        row_loss = DenseTargetEL.apply(
            logits, row_alpha, _weight_or_ones(weight, num_classes, input, dtype),
            probabilities, beta, None, None, bonus_weight, options.bonus_scale,
            options.bonus_shape, dtype,
        )  # fmt: skip

    if options.reduction == "none":
        return row_loss.reshape(index_shape).to(input.dtype)
    total = row_loss.sum()
    if options.reduction == "mean":
        total = total / denominator
    return total.to(input.dtype)


def _with_logit_terms(input, target, options, weight, bonus_weight, token_weight, return_lse):
    """The loss of the softcapped logits plus the z-loss, as torch operations (autograd carries
    the gradients through them); the logsumexp too with ``return_lse``. For float32 logits the
    cap is exact to float64 (:class:`.ops.logit_terms.CompensatedSoftcap`; under
    ``torch.compile``, which cannot take that gradient inside forward, the loss of the float64
    cap is computed in float64)."""
    is_index = check_input_and_target(input, target)
    dtype = compute_dtype_for(input.dtype)
    float64_cap = (options.softcap is not None and input.dtype == torch.float32
                   and torch.compiler.is_compiling())  # fmt: skip
    if float64_cap:
        dtype = torch.float64
    index_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()

    def loss_of_capped(capped):
        if options.z_loss != 0.0:
            # The loss and the z-loss summed in the compute dtype: one rounding to a half dtype.
            capped = capped.to(dtype)
        loss = encouraging_loss_with_options(capped, target, options.without_logit_terms(),
                                             weight, bonus_weight, token_weight)  # fmt: skip
        rows = class_last(capped).to(dtype)  # a view: no copy
        lse = None
        if options.z_loss != 0.0:
            if is_index:
                row_weight = z_row_weight(target, options.ignore_index, token_weight)
            else:
                row_weight = row_token_weight(token_weight)
            z_rows, lse = ZLoss.apply(rows, row_weight, options.z_loss)
            z_rows, lse = z_rows.reshape(index_shape), lse.reshape(index_shape)
            if options.reduction != "none":
                z_rows = z_rows.sum()
            if options.reduction == "mean":
                z_rows = z_rows / _mean_denominator(target, is_index, weight, token_weight,
                                                    options, dtype)  # fmt: skip
            loss = loss + z_rows
        elif return_lse:
            lse = torch.logsumexp(rows, dim=-1).reshape(index_shape)
        return loss, lse

    if compensates(input, options.softcap):
        loss, lse = CompensatedSoftcap.apply(input, options.softcap, loss_of_capped,
                                             1 if input.dim() > 1 else 0)  # fmt: skip
    else:
        loss, lse = loss_of_capped(softcapped(input, options.softcap, dtype))
    loss = loss.to(input.dtype)
    if not return_lse:
        return loss
    return loss, (lse.float() if float64_cap else lse).detach()


def _mean_denominator(target, is_index, weight, token_weight, options, dtype) -> torch.Tensor:
    """The "mean" reduction's denominator: sum_i t_i w_{y_i} over the non-ignored elements
    (sum_i t_i, or their number, for probability targets)."""
    if is_index:
        weight = None if weight is None else weight.to(dtype)
        _, _, target_weight = target_weights(target.long(), options.ignore_index, weight, dtype)
        if token_weight is not None:
            target_weight = target_weight * token_weight.to(dtype)
        return target_weight.sum()
    if token_weight is not None:
        return token_weight.to(dtype).sum()
    count = target.numel() // target.shape[1] if target.dim() > 1 else 1
    return torch.tensor(float(count), dtype=dtype, device=target.device)
