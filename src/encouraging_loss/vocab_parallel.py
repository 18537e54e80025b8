"""Vocabulary-parallel encouraging loss: logits (or a projection) sharded over the vocabulary.

In tensor-parallel training (Megatron-LM's ``vocab_parallel_cross_entropy``) the output layer is
split by vocabulary columns: rank r of a ``torch.distributed`` process group holds the logits of
the columns [start_r, start_r + width_r), a contiguous slice in rank order (equal or uneven
widths). The loss here needs only all-reduces of per-row ((N,)-sized) tensors: the max and the
sum of exp over the non-target columns, the target logit from the rank that holds it, and with
label smoothing the sums of the logits and of the bonus over the columns. No rank gathers the
vocabulary, and the result equals :func:`~encouraging_loss.encouraging_loss` of the full logits
(same maths, exact as p_y -> 1; see :mod:`encouraging_loss.ops.vocab_shard`).

Every rank calls the loss with the same rows (tokens), target and options, and its own columns;
the loss it returns is the same on every rank, and backward gives each rank the gradient of its
own columns. Each call all-gathers the ranks' shard widths (a few integers per rank), which
places the shard and lets every rank raise the same error for a vocabulary split that does not
match the arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ._validate import check_bool, check_tensor, check_token_weight
from .functional import compute_dtype_for
from .linear import check_linear_inputs, finished_loss
from .ops.fused_linear import check_accumulation_dtype, default_chunk_size, fused_linear_loss
from .ops.logit_terms import ChunkLogitTerms, CompensatedSoftcap, compensates, softcapped
from .ops.vocab_shard import VocabShard, VocabShardEL, VocabShardRows
from .options import LinearLossOptions, LossOptions, option_attributes, takes_options

__all__ = [
    "VocabParallelEncouragingLoss",
    "vocab_parallel_encouraging_loss",
    "vocab_parallel_linear_encouraging_loss",
    "vocab_parallel_loss_with_options",
]


def checked_group(group):
    """The process group to reduce over (None: the default group), checked to be usable."""
    if not dist.is_available():
        raise RuntimeError("the vocabulary-parallel loss needs torch.distributed, which this "
                           "build of torch lacks")  # fmt: skip
    if not dist.is_initialized():
        raise RuntimeError(
            "group: the vocabulary-parallel loss needs an initialised process group; call "
            "torch.distributed.init_process_group(...) first (e.g. in a script run by torchrun)"
        )
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None (the default group), got "
            f"{type(group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group


def _check_class_vector_form(name: str, value, like: torch.Tensor) -> int:
    """The length of an optional full-vocabulary vector (-1 for None), its form checked here
    (its length against the vocabulary once the shards' widths are known)."""
    if value is None:
        return -1
    check_tensor(name, value, floating=True)
    if value.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per class of the full vocabulary (V,), "
            f"got shape {tuple(value.shape)}"
        )
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the logits are on {like.device}")
    return value.numel()


#: The floating dtypes by a small int, for the check that every rank's dtype is the same.
_DTYPES = (None, torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _encoded(value) -> int:
    """An int of ``same`` as sent: a dtype by its index in ``_DTYPES`` (0: not floating)."""
    if isinstance(value, torch.dtype) or value is None:
        return _DTYPES.index(value) if value in _DTYPES else 0
    return value


def _split_mismatch(what: str, got, shard_name: str, widths) -> ValueError:
    return ValueError(
        f"{what} does not match the vocabulary split of the process group: the ranks' "
        f"{shard_name} hold {list(widths)} columns (rank r holds the contiguous columns "
        f"[start_r, start_r + width_r) in rank order), {sum(widths)} in all; got {got}"
    )


def gather_vocab_shard(group, device, shard_name: str, width: int, num_rows: int, *,
                       vocab_size=None, vectors=None, same=None, local_error=None) -> VocabShard:
    """This rank's :class:`VocabShard` from an all-gather of every rank's width, with the checks
    that need all ranks: every rank raises the same error (none is left waiting in a collective).

    Args:
        group: the checked process group.
        device: where the collectives' tensors live (the logits' device).
        shard_name: the name of the sharded argument, for the errors.
        width: this rank's number of columns.
        num_rows: this rank's number of rows (tokens); every rank must have the same.
        vocab_size: the total vocabulary the caller expects, or None.
        vectors: name -> length (-1 for None) of the full-vocabulary vectors (class weights).
        same: name -> an int or a dtype that must be equal on every rank (the chunk size).
        local_error: an error this rank's own checks raised: raised here, after the gather.
    """
    vectors, same = vectors or {}, same or {}
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):  # fmt: skip
        local_error = local_error or TypeError(
            f"vocab_size must be None or a positive int (the full vocabulary), got {vocab_size!r}"
        )
    fields = [width, num_rows, local_error is not None,
              -1 if vocab_size is None or local_error else vocab_size,
              *vectors.values(), *map(_encoded, same.values())]  # fmt: skip
    mine = torch.tensor(fields, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).tolist()
    if local_error is not None:
        raise local_error
    failed = [rank for rank, row in enumerate(table) if row[2]]
    if failed:
        raise ValueError(f"the arguments of rank(s) {failed} of the process group failed their "
                         "checks (that rank's error names them); every rank must call the loss "
                         "with valid arguments")  # fmt: skip
    widths = tuple(row[0] for row in table)
    rows = [row[1] for row in table]
    if len(set(rows)) > 1:
        raise ValueError(
            f"every rank must pass the same rows (tokens) and its own vocabulary columns; the "
            f"ranks' {shard_name} have {rows} rows"
        )
    if min(widths) < 1:
        raise ValueError(f"{shard_name} must hold at least one vocabulary column on every rank; "
                         f"the ranks hold {list(widths)}")  # fmt: skip
    total = sum(widths)
    for rank, row in enumerate(table):
        if row[3] not in (-1, total):
            raise _split_mismatch("vocab_size", f"vocab_size={row[3]} on rank {rank}",
                                  shard_name, widths)  # fmt: skip
        for index, name in enumerate(vectors, start=4):
            if row[index] not in (-1, total):
                raise _split_mismatch(
                    f"{name} (the full vocabulary's, shape ({total},) on every rank)",
                    f"shape ({row[index]},) on rank {rank}", shard_name, widths,
                )  # fmt: skip
    for index, name in enumerate(same, start=4 + len(vectors)):
        values = [row[index] for row in table]
        if len(set(values)) > 1:
            if isinstance(same[name], torch.dtype) or same[name] is None:
                values = [str(_DTYPES[code]) for code in values]
            raise ValueError(f"{name} must be the same on every rank, got {values} by rank")
    rank = dist.get_rank(group)
    return VocabShard(sum(widths[:rank]), widths[rank], total, widths, group)


def check_target_on_ranks(target, token_weight, shard: VocabShard, ignore_index: int) -> None:
    """Every rank passed the same target (and token weights), with class indices in the full
    vocabulary: one all-reduce of (N,)-sized rows, and the same error on every rank."""
    rows = [target.reshape(-1).to(torch.float64)]
    if token_weight is not None:
        rows.append(token_weight.reshape(-1).to(torch.float64))
    rows += [-row for row in rows]
    stacked = shard.all_reduce_(torch.stack(rows), dist.ReduceOp.MAX)
    half = len(rows) // 2
    for name, high, low in zip(("target", "token_weight"), stacked[:half], stacked[half:],
                               strict=False):  # fmt: skip
        if not bool(torch.equal(high, -low)):
            raise ValueError(f"{name} differs between the ranks of the process group: every rank "
                             f"must pass the same {name} (for the same rows)")  # fmt: skip
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= shard.vocab_size)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds class index {value}, outside the full vocabulary [0, "
            f"{shard.vocab_size - 1}] of the ranks' shards (widths {list(shard.widths)}), and "
            f"not ignore_index={ignore_index}"
        )


def _check_options(options) -> None:
    if options.backend == "triton":
        raise ValueError(
            "backend='triton' is not supported by the vocabulary-parallel loss (it runs torch "
            "operations between all-reduces); use 'auto' or 'torch'"
        )


def _check_logits_inputs(logits_shard, target, weight, bonus_weight) -> tuple[int, int]:
    """The local checks of the logits form; returns the lengths of the two class vectors."""
    check_tensor("logits_shard", logits_shard, floating=True)
    check_tensor("target", target)
    if logits_shard.dim() < 1 or logits_shard.shape[-1] == 0:
        raise ValueError(
            f"logits_shard must have shape (..., width), this rank's columns of the vocabulary "
            f"last, with width >= 1; got shape {tuple(logits_shard.shape)}"
        )
    if target.is_floating_point():
        raise TypeError("target must hold class indices (an integer dtype): the vocabulary-"
                        "parallel loss does not take probability targets")  # fmt: skip
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(
            f"target must have logits_shard's shape without the vocabulary dimension "
            f"{tuple(logits_shard.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.device != logits_shard.device:
        raise ValueError(f"target is on {target.device} but logits_shard is on "
                         f"{logits_shard.device}")  # fmt: skip
    return (_check_class_vector_form("weight", weight, logits_shard),
            _check_class_vector_form("bonus_weight", bonus_weight, logits_shard))  # fmt: skip


def _shard_rows(target, shard, class_weight, bonus_weight, token_weight, options, dtype,
                return_lse: bool) -> VocabShardRows:
    """The rows of the loss, after the targets' checks across ranks (with ``validate_args``)."""
    if options.validate_args:
        check_target_on_ranks(target, token_weight, shard, options.ignore_index)
    return VocabShardRows(
        target, shard, None if class_weight is None else class_weight.to(dtype),
        None if bonus_weight is None else bonus_weight.to(dtype), options, dtype, token_weight,
        keep_lse=return_lse,
    )  # fmt: skip


@takes_options(LossOptions)
def vocab_parallel_encouraging_loss(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group=None,
    vocab_size: int | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The encouraging loss of logits sharded over the vocabulary across a process group.

    Equals ``encouraging_loss(full_logits, target, ...)`` with ``full_logits`` the ranks'
    shards concatenated in rank order along the vocabulary (the last dimension), in value and
    in each rank's columns' gradient, without any rank holding the full logits: the row
    statistics are all-reduced (see :mod:`encouraging_loss.vocab_parallel`). A collective call:
    every rank of ``group`` calls it with the same rows, target, class vectors and options,
    each with its own columns, and every rank gets the same loss.

    Args:
        logits_shard: (..., width) this rank's columns of the logits, the vocabulary *last*
            (as Megatron-LM lays them out; for (N, V) logits the same as ``F.cross_entropy``'s
            layout). Any floating dtype (half precision is computed in float32).
        target: (...) class indices of the *full* vocabulary (``logits_shard``'s shape without
            the last dimension), or ``ignore_index``; the same on every rank. Probability
            targets are not supported.
        weight: optional (V,) class weights of the full vocabulary, the same on every rank.
        ignore_index: class-index target value that contributes nothing.
        reduction: ``"mean"`` (weighted mean over non-ignored items, as torch), ``"sum"`` or
            ``"none"``.
        label_smoothing: in [0, 1], over the full vocabulary; applied to the cross-entropy and
            the bonus alike.
        group: the ``torch.distributed`` process group the vocabulary is split over (None: the
            default group), initialised. The collectives' tensors live on the logits' device
            (CPU for gloo, CUDA for NCCL).
        vocab_size: optional V the caller expects: an error unless the ranks' widths sum to it.
        bonus_weight: optional (V,) per-class bonus weights of the full vocabulary.
        token_weight: optional per-element weights of the target's shape (as for
            :func:`~encouraging_loss.encouraging_loss`), the same on every rank.
        return_lse: also return each element's (global) logsumexp, as
            :func:`~encouraging_loss.encouraging_loss` does.
        **options: the options of :class:`~encouraging_loss.options.LossOptions`: ``log_end``,
            ``bonus_scale``, ``bonus``, ``bonus_gamma``, ``bonus_start``, ``z_loss``,
            ``softcap`` and ``validate_args`` (which also checks, by one all-reduce, that the
            ranks' targets and token weights agree and lie in the full vocabulary). ``backend``
            must be ``"auto"`` or ``"torch"``.

    Returns:
        The loss, the same on every rank: a scalar, or the target's shape for ``"none"``; with
        ``return_lse``, ``(loss, lse)``.

    Raises:
        RuntimeError: no initialised process group.
        TypeError, ValueError: naming the argument that is wrong, on every rank of the group
            (including a ``vocab_size``, ``weight`` or ``bonus_weight`` that does not match the
            sum of the ranks' widths, and a target outside it).

    Example:
        Run by ``torchrun --nproc_per_node 2 train.py``; each rank holds half of the columns::

            import torch.distributed as dist
            from encouraging_loss import vocab_parallel_encouraging_loss

            dist.init_process_group("gloo")          # "nccl" with CUDA tensors
            rank, world = dist.get_rank(), dist.get_world_size()
            width = vocab_size // world
            shard = full_logits[:, rank * width:(rank + 1) * width]  # or a column-parallel head
            loss = vocab_parallel_encouraging_loss(shard, target, log_end=0.75)
            loss.backward()                          # the gradient of this rank's columns
    """
    options = LossOptions.of(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, **options
    )
    check_bool("return_lse", return_lse)
    return vocab_parallel_loss_with_options(logits_shard, target, options, group, vocab_size,
                                            weight, bonus_weight, token_weight,
                                            return_lse)  # fmt: skip


def vocab_parallel_loss_with_options(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    options: LossOptions,
    group=None,
    vocab_size: int | None = None,
    weight: torch.Tensor | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`vocab_parallel_encouraging_loss` with its options already built (the module's).

    Args:
        logits_shard: (..., width) this rank's columns.
        target: (...) class indices of the full vocabulary.
        options: the loss options.
        group: the process group (None: the default group).
        vocab_size: the expected full vocabulary, or None.
        weight: optional (V,) class weights.
        bonus_weight: optional (V,) bonus weights.
        token_weight: optional per-element weights (the target's shape).
        return_lse: also return each element's logsumexp.

    Returns:
        The loss (and the logsumexp), as :func:`vocab_parallel_encouraging_loss` returns it.
    """
    group = checked_group(group)
    local_error, lengths = None, (-1, -1)
    try:
        _check_options(options)
        lengths = _check_logits_inputs(logits_shard, target, weight, bonus_weight)
        token_weight = check_token_weight(token_weight, target.shape, logits_shard,
                                          options.validate_args)  # fmt: skip
    except (TypeError, ValueError) as error:
        local_error = error
    is_tensor = isinstance(logits_shard, torch.Tensor) and logits_shard.dim() > 0
    width = logits_shard.shape[-1] if is_tensor else 0
    device = logits_shard.device if isinstance(logits_shard, torch.Tensor) else "cpu"
    shard = gather_vocab_shard(
        group, device, "logits_shard", width, target.numel() if local_error is None else 0,
        vocab_size=vocab_size, vectors=dict(zip(("weight", "bonus_weight"), lengths, strict=True)),
        same={"the dtype of logits_shard": getattr(logits_shard, "dtype", None)},
        local_error=local_error,
    )  # fmt: skip
    dtype = compute_dtype_for(logits_shard.dtype)
    rows = _shard_rows(target, shard, weight, bonus_weight, token_weight, options, dtype,
                       return_lse)  # fmt: skip

    def loss_of_capped(capped):
        loss = VocabShardEL.apply(capped.reshape(-1, shard.width), rows)
        if options.reduction == "none":
            return loss.reshape(target.shape), None
        loss = loss.sum()
        return (loss / rows.denominator if options.reduction == "mean" else loss), None

    # The softcap is elementwise: each rank caps its own columns (autograd takes the tanh); a
    # float32 cap's remainder corrects each row by a sum over every rank's columns.
    if compensates(logits_shard, options.softcap):
        loss, _ = CompensatedSoftcap.apply(logits_shard, options.softcap, loss_of_capped, -1,
                                           shard.sum_over_ranks)  # fmt: skip
    else:
        loss, _ = loss_of_capped(softcapped(logits_shard, options.softcap, dtype))
    return finished_loss(loss, options.reduction, target.shape, logits_shard.dtype, rows.lse)


class _SumGradOverRanks(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the group's ranks (Megatron-LM's
    ``copy_to_tensor_model_parallel_region``): ``hidden`` is replicated, and each rank's
    columns give one part of its gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


@takes_options(LinearLossOptions)
def vocab_parallel_linear_encouraging_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target: torch.Tensor,
    bias_shard: torch.Tensor | None = None,
    *,
    group=None,
    vocab_size: int | None = None,
    class_weight: torch.Tensor | None = None,
    bonus_weight: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The loss of ``hidden @ W.T + b`` with the projection W (V, H) sharded over the vocabulary.

    Equals ``linear_encouraging_loss(hidden, W, target, b, ...)`` with ``W`` the ranks'
    ``weight_shard`` concatenated in rank order (and ``b`` their biases), computed as the fused
    linear loss is: ``chunk_size`` rows at a time, each chunk's (chunk, width) logits of this
    rank's rows of W only, their row statistics all-reduced per chunk (see
    :func:`vocab_parallel_encouraging_loss`). So neither the (N, V) logits nor the (N, width)
    shard logits are materialised. A collective call: every rank calls it with the same
    ``hidden``, target and options.

    Gradients: ``weight_shard`` and ``bias_shard`` get the gradient of this rank's rows of the
    projection. ``hidden`` is replicated and every rank's columns contribute to its gradient,
    so backward *all-reduces (sums) the gradient of hidden over the group* (one (N, H)
    all-reduce, as Megatron-LM's column-parallel layer does on its input): each rank's
    ``hidden`` gets the full gradient. Do not sum it over the group again.

    Args:
        hidden: (..., H) hidden states, the same on every rank.
        weight_shard: (width, H) this rank's rows of the projection, as
            ``nn.Linear(H, width).weight``; the same dtype as ``hidden``.
        target: (...) class indices of the full vocabulary (``hidden``'s shape without H).
        bias_shard: optional (width,) this rank's part of the bias.
        group: the process group (None: the default group), initialised.
        vocab_size: optional V the caller expects: an error unless the widths sum to it.
        class_weight: optional (V,) class weights of the full vocabulary.
        bonus_weight: optional (V,) bonus weights of the full vocabulary.
        token_weight: optional per-token weights (the target's shape), the same on every rank.
        return_lse: also return each token's (global) logsumexp.
        **options: the options of :class:`~encouraging_loss.options.LinearLossOptions`, as
            for :func:`~encouraging_loss.linear_encouraging_loss`; ``chunk_size`` must be the
            same on every rank (``None`` picks one from the rows, H and ``V / world_size``),
            ``backend`` ``"auto"`` or ``"torch"``.

    Returns:
        The loss in ``hidden``'s dtype, the same on every rank (a scalar, or the target's shape
        for ``"none"``); with ``return_lse``, ``(loss, lse)``.

    Raises:
        RuntimeError: no initialised process group.
        TypeError, ValueError: naming the argument that is wrong, on every rank (including a
            ``vocab_size``, ``class_weight`` or ``bonus_weight`` that does not match the sum of
            the ranks' widths).

    Example:
        Under ``torchrun``, each rank with its rows of the output layer::

            width = vocab_size // world
            weight_shard = lm_head.weight[rank * width:(rank + 1) * width]  # a parameter
            loss = vocab_parallel_linear_encouraging_loss(hidden, weight_shard, target)
            loss.backward()  # hidden.grad is the full gradient on every rank
    """
    options = LinearLossOptions.of(**options)
    check_bool("return_lse", return_lse)
    group = checked_group(group)
    local_error, lengths, accumulation_dtype = None, (-1, -1), None
    try:
        _check_options(options)
        check_linear_inputs(hidden, weight_shard, target, bias_shard, weight_name="weight_shard",
                            bias_name="bias_shard")  # fmt: skip
        lengths = (_check_class_vector_form("class_weight", class_weight, hidden),
                   _check_class_vector_form("bonus_weight", bonus_weight, hidden))  # fmt: skip
        token_weight = check_token_weight(token_weight, target.shape, hidden,
                                          options.validate_args)  # fmt: skip
        accumulation_dtype = check_accumulation_dtype(options.accumulation_dtype,
                                                      weight_shard.dtype)  # fmt: skip
    except (TypeError, ValueError) as error:
        local_error = error
    ok = local_error is None
    device = hidden.device if isinstance(hidden, torch.Tensor) else "cpu"
    shard = gather_vocab_shard(
        group, device, "weight_shard", weight_shard.shape[0] if ok else 0,
        target.numel() if ok else 0, vocab_size=vocab_size,
        vectors=dict(zip(("class_weight", "bonus_weight"), lengths, strict=True)),
        same={"chunk_size": options.chunk_size or 0, "hidden's size H": hidden.shape[-1] if ok
              else 0, "the dtype of hidden": getattr(hidden, "dtype", None)},
        local_error=local_error,
    )  # fmt: skip
    dtype = compute_dtype_for(hidden.dtype)
    rows = _shard_rows(target, shard, class_weight, bonus_weight, token_weight, options, dtype,
                       return_lse)  # fmt: skip
    num_rows, hidden_size = rows.num_rows, hidden.shape[-1]
    chunk_size = options.chunk_size
    if chunk_size is None:
        # From the global shape, so that every rank takes the same chunks (each is collective).
        world = len(shard.widths)
        chunk_size = default_chunk_size(num_rows, hidden_size, -(-shard.vocab_size // world))
    logit_terms = None
    if options.softcap is not None:
        # Only the softcap, per chunk (the z-loss needs the global logsumexp: the rows add it).
        # A float32 cap's remainder corrects each row by a sum over every rank's columns.
        logit_terms = ChunkLogitTerms(options.replace(z_loss=0.0), target.reshape(-1), None,
                                      dtype, False, shard.sum_over_ranks)  # fmt: skip
    if hidden.requires_grad and torch.is_grad_enabled():
        hidden = _SumGradOverRanks.apply(hidden, group)
    flat_hidden = hidden.reshape(-1, hidden_size).contiguous()
    loss = fused_linear_loss(flat_hidden, weight_shard, bias_shard, rows, options.reduction,
                             chunk_size, None, accumulation_dtype, logit_terms)  # fmt: skip
    return finished_loss(loss, options.reduction, target.shape, hidden.dtype, rows.lse)


@option_attributes(LossOptions)
class VocabParallelEncouragingLoss(nn.Module):
    """Module form of :func:`vocab_parallel_encouraging_loss`: ``criterion(logits_shard, target)``.

    Args:
        weight: optional (V,) class weights of the full vocabulary (a buffer).
        ignore_index: class-index target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1].
        group: the process group (None: the default group, looked up at each call).
        vocab_size: optional expected full vocabulary.
        bonus_weight: optional (V,) bonus weights (a buffer).
        return_lse: ``forward`` returns ``(loss, lse)``.
        **options: the other options of :class:`~encouraging_loss.options.LossOptions`.

    Example:
        Under ``torchrun``::

            criterion = VocabParallelEncouragingLoss(log_end=0.75, label_smoothing=0.1)
            loss = criterion(logits_shard, target)
    """

    @takes_options(LossOptions)
    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        group=None,
        vocab_size: int | None = None,
        bonus_weight: torch.Tensor | None = None,
        return_lse: bool = False,
        **options,
    ):
        super().__init__()
        self.return_lse = check_bool("return_lse", return_lse)
        self.group, self.vocab_size = group, vocab_size
        self.register_buffer("weight", weight)
        self.register_buffer("bonus_weight", bonus_weight)
        self.options = LossOptions(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            **options,
        )  # fmt: skip
        _check_options(self.options)

    def forward(self, logits_shard: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The loss of this rank's columns (see :func:`vocab_parallel_encouraging_loss`)."""
        return vocab_parallel_loss_with_options(
            logits_shard, target, self.options, self.group, self.vocab_size, self.weight,
            self.bonus_weight, token_weight, self.return_lse,
        )  # fmt: skip
