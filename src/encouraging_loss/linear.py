"""The encouraging loss of a final linear layer, without materialising the logits."""

from __future__ import annotations

import torch
from torch import nn

from ._validate import (
    check_bool,
    check_class_vector,
    check_target_range,
    check_tensor,
    check_token_weight,
)
from .functional import compute_dtype_for, use_triton_backend
from .ops.fused_linear import (
    TritonRows,
    check_accumulation_dtype,
    default_chunk_size,
    fused_linear_loss,
)
from .ops.index_targets import IndexTargetRows
from .ops.logit_terms import ChunkLogitTerms
from .options import LinearLossOptions, option_attributes, takes_options

__all__ = ["LinearEncouragingLoss", "linear_encouraging_loss", "linear_loss_with_options"]


def check_linear_inputs(hidden, weight, target, bias, *, weight_name="weight",
                        bias_name="bias") -> None:
    """Check the tensors of :func:`linear_encouraging_loss`: shapes, dtypes and devices agree.

    Args:
        hidden, weight, target, bias: the loss's tensors.
        weight_name, bias_name: what the errors call the projection and the bias (the
            vocabulary-parallel loss passes ``weight_shard`` and ``bias_shard``).

    Raises:
        TypeError, ValueError: naming the argument that is wrong.
    """
    w, b = weight_name, bias_name
    check_tensor("hidden", hidden, floating=True)
    check_tensor(w, weight, floating=True)
    check_tensor("target", target)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{w} must have shape (C, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w} has {weight.shape[1]} input features but hidden has {hidden.shape[-1]} "
            f"({w} shape {tuple(weight.shape)}, hidden shape {tuple(hidden.shape)})"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w} must have at least one class (row), got shape (0, H)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w} has dtype {weight.dtype} but hidden has dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{w} is on {weight.device} but hidden is on {hidden.device}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have hidden's shape without the last dimension "
            f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor(b, bias, floating=True)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{b} must have shape ({weight.shape[0]},), got shape {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b} has dtype {bias.dtype} but hidden has dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{b} is on {bias.device} but hidden is on {hidden.device}")


@takes_options(LinearLossOptions)
def linear_encouraging_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``encouraging_loss(F.linear(hidden, weight, bias), target)`` without the full logits.

    For a final projection of many tokens onto a large vocabulary (LLM training, translation):
    the (tokens x classes) logits are formed and consumed ``chunk_size`` rows at a time, and the
    gradients of ``hidden``, ``weight`` and ``bias`` are accumulated chunk by chunk, so the extra
    memory is a few (chunk_size x C) buffers instead of several (N x C) ones. The result equals
    the materialised loss (same maths, see :mod:`encouraging_loss.ops.fused_linear`) within
    rounding; bfloat16/float16 inputs are computed in float32 and ``weight``/``bias`` gradients
    are accumulated in float32 unless ``accumulation_dtype`` says otherwise.

    Args:
        hidden: (..., H) hidden states (e.g. (batch, sequence, H) or (tokens, H)).
        weight: (C, H) projection, as ``nn.Linear(H, C).weight``; the same dtype as ``hidden``.
        target: (...) class indices (``hidden``'s shape without H), or ``ignore_index``.
        bias: optional (C,) bias.
        class_weight: optional (C,) class weights (``weight`` of ``F.cross_entropy``; named
            differently here because ``weight`` is the projection).
        bonus_weight: optional (C,) per-class bonus weights.
        token_weight: optional per-token weights t >= 0 of the target's shape (a floating
            tensor on ``hidden``'s device, not requiring grad): each token's loss is multiplied
            by its t, and ``"mean"`` divides by ``sum t * class_weight[target]`` over the
            non-ignored tokens, as :func:`~encouraging_loss.encouraging_loss` does.
        return_lse: also return each token's logsumexp (the target's shape, float32, float64
            for float64 inputs; ignored tokens' too; without a gradient), kept chunk by chunk.
        **options: the options of :class:`~encouraging_loss.options.LinearLossOptions`, all
            keywords: those of :func:`encouraging_loss` (``ignore_index``, ``reduction``,
            ``label_smoothing``, ``log_end``, ..., ``validate_args``, ``backend``) and
            ``chunk_size`` and ``accumulation_dtype``. ``reduction="none"`` gives the loss per
            token (its backward recomputes the logits chunk by chunk, one extra matrix
            product). ``chunk_size=None`` picks ``next_power_of_2(ceil(N / ceil(C / H)))``.
            ``accumulation_dtype`` is the dtype the ``weight`` and ``bias`` gradients are
            summed in over chunks: ``None`` (float32; float64 for float64 inputs),
            ``weight.dtype`` or a wider float. With bfloat16/float16 weights, ``weight.dtype``
            (Liger-Kernel's default) needs 1x the weight's size for its gradient where float32
            needs 3x at the end of the loop (the accumulator and its rounded copy), and rounds
            once per chunk instead of once in all: the choice for a vocabulary projection that
            barely fits. ``backend``: how each chunk's loss and logits gradient are computed:
            ``"torch"`` (the row-wise torch passes), ``"triton"`` (one Triton kernel launch per
            chunk that writes the gradient over the chunk's logits) or ``"auto"`` (Triton on
            CUDA when it imports and supports the options); the projections are torch matrix
            products either way. ``z_loss`` and ``softcap`` (see
            :class:`~encouraging_loss.options.LossOptions`) are applied per chunk, their
            gradients added to each chunk's logits gradient (around the torch passes; inside
            the Triton kernel).

    Returns:
        The loss in ``hidden``'s dtype: a scalar, or the target's shape for ``"none"``; with
        ``return_lse``, ``(loss, lse)``.

    Raises:
        TypeError, ValueError: naming the argument that is wrong.

    Example:
        >>> import torch
        >>> from encouraging_loss import encouraging_loss, linear_encouraging_loss
        >>> hidden = torch.randn(6, 4, requires_grad=True)
        >>> projection = torch.randn(10, 4, requires_grad=True)
        >>> target = torch.tensor([1, 0, 9, -100, 3, 3])
        >>> loss = linear_encouraging_loss(hidden, projection, target, chunk_size=4)
        >>> loss.backward()
        >>> materialised = encouraging_loss(hidden @ projection.T, target)
        >>> bool(torch.allclose(loss, materialised))
        True

        Per-token weights (here: the later tokens of a sequence count less):

        >>> weights = torch.linspace(1.0, 0.5, 6)
        >>> weighted = linear_encouraging_loss(hidden, projection, target, token_weight=weights)
        >>> logits = hidden @ projection.T
        >>> bool(torch.allclose(weighted, encouraging_loss(logits, target, token_weight=weights)))
        True

        The z-loss and softcapping, chunk by chunk, and the logsumexp of each token:

        >>> loss, lse = linear_encouraging_loss(hidden, projection, target, z_loss=1e-4,
        ...                                     softcap=30.0, return_lse=True, chunk_size=4)
        >>> expected = encouraging_loss(logits, target, z_loss=1e-4, softcap=30.0)
        >>> bool(torch.allclose(loss, expected)), lse.shape
        (True, torch.Size([6]))
    """
    options = LinearLossOptions.of(**options)
    check_bool("return_lse", return_lse)
    return linear_loss_with_options(hidden, weight, target, bias, options, class_weight,
                                    bonus_weight, token_weight, return_lse)  # fmt: skip


def linear_loss_with_options(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    options: LinearLossOptions,
    class_weight: torch.Tensor | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_encouraging_loss` with its options already built (what the module calls).

    Args:
        hidden: (..., H) hidden states.
        weight: (C, H) projection.
        target: (...) class indices.
        bias: optional (C,) bias.
        options: the loss options.
        class_weight: optional (C,) class weights.
        bonus_weight: optional (C,) bonus weights.
        token_weight: optional per-token weights (the target's shape).
        return_lse: also return each token's logsumexp.

    Returns:
        The loss (and the logsumexp), as :func:`linear_encouraging_loss` returns it.
    """
    check_linear_inputs(hidden, weight, target, bias)
    num_classes = weight.shape[0]
    class_weight = check_class_vector("class_weight", class_weight, num_classes, hidden)
    bonus_weight = check_class_vector("bonus_weight", bonus_weight, num_classes, hidden)
    token_weight = check_token_weight(token_weight, target.shape, hidden, options.validate_args)
    accumulation_dtype = check_accumulation_dtype(options.accumulation_dtype, weight.dtype)
    if options.validate_args and not torch.compiler.is_compiling():
        check_target_range(target, num_classes, options.ignore_index)

    dtype = compute_dtype_for(hidden.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if class_weight is not None:
        class_weight = class_weight.to(dtype)
    if bonus_weight is not None:
        bonus_weight = bonus_weight.to(dtype)
    rows = IndexTargetRows(target, num_classes, class_weight, bonus_weight, options, dtype,
                           token_weight)  # fmt: skip
    chunk_size = options.chunk_size
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], hidden.shape[-1], num_classes)
    triton_rows = logit_terms = None
    if use_triton_backend(flat_hidden, target, options):
        # The kernels compute the softcap, the z-loss and the lse themselves.
        triton_rows = TritonRows(target, class_weight, bonus_weight, options, token_weight,
                                 return_lse)  # fmt: skip
    elif options.with_logit_terms or return_lse:
        # The torch chunks: the softcap and the z-loss around each chunk's loss.
        logit_terms = ChunkLogitTerms(options, target, token_weight, dtype, return_lse)
    result = fused_linear_loss(flat_hidden, weight, bias, rows, options.reduction, chunk_size,
                               triton_rows, accumulation_dtype, logit_terms)  # fmt: skip
    lse = None
    if return_lse:
        lse = logit_terms.lse if triton_rows is None else triton_rows.lse
    return finished_loss(result, options.reduction, target.shape, hidden.dtype, lse)


def finished_loss(result, reduction: str, shape, dtype, lse=None):
    """A fused linear loss as returned: the target's ``shape`` for ``"none"``, in ``dtype``,
    and ``(loss, lse)`` when ``lse`` (the rows' logsumexp) is given."""
    if reduction == "none":
        result = result.reshape(shape)
    result = result.to(dtype)
    return result if lse is None else (result, lse.reshape(shape))


@option_attributes(LinearLossOptions)
class LinearEncouragingLoss(nn.Module):
    """Module form of :func:`linear_encouraging_loss`: ``criterion(hidden, weight, target, bias)``.

    Holds the loss options (:class:`~encouraging_loss.options.LinearLossOptions`, checked here
    once; each is an attribute); the projection stays the model's (pass ``lm_head.weight``).

    Args:
        class_weight: optional (C,) class weights (a buffer).
        ignore_index: class-index target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1].
        bonus_weight: optional (C,) bonus weights (a buffer).
        return_lse: ``forward`` returns ``(loss, lse)`` (see :func:`linear_encouraging_loss`).
        **options: the other options of :class:`~encouraging_loss.options.LinearLossOptions`.

    Example:
        >>> import torch
        >>> from encouraging_loss import LinearEncouragingLoss
        >>> criterion = LinearEncouragingLoss(log_end=0.75, label_smoothing=0.1)
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> hidden, target = torch.randn(2, 5, 8), torch.randint(0, 50, (2, 5))
        >>> criterion(hidden, head.weight, target).backward()
        >>> head.weight.grad.shape
        torch.Size([50, 8])
        >>> mask = torch.ones(2, 5)  # per-token weights, a call argument like the target
        >>> mask[1, 3:] = 0.0
        >>> criterion(hidden, head.weight, target, token_weight=mask).shape
        torch.Size([])
    """

    @takes_options(LinearLossOptions)
    def __init__(
        self,
        class_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        bonus_weight: torch.Tensor | None = None,
        return_lse: bool = False,
        **options,
    ):
        super().__init__()
        self.return_lse = check_bool("return_lse", return_lse)
        self.register_buffer("class_weight", class_weight)
        self.register_buffer("bonus_weight", bonus_weight)
        self.options = LinearLossOptions(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            **options,
        )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``hidden @ weight.T + bias`` (see :func:`linear_encouraging_loss`);
        ``token_weight``: optional per-token weights of the target's shape."""
        return linear_loss_with_options(
            hidden, weight, target, bias, self.options, self.class_weight, self.bonus_weight,
            token_weight, self.return_lse,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"bonus={self.bonus!r}, log_end={self.log_end}, bonus_scale={self.bonus_scale}, "
            f"chunk_size={self.chunk_size}, accumulation_dtype={self.accumulation_dtype}"
        )
