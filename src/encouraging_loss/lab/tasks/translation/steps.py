"""Training steps: teacher-forced losses of padded sentence pairs (materialised logits, or the
core's fused linear + EL without them), their token statistics, teacher-forced evaluation,
and :class:`TranslationBatches`, the batches the shared trainer trains on."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from encouraging_loss import EncouragingLoss, linear_encouraging_loss

from ... import diagnostics
from .data import IGNORE_INDEX, PAD, Encoded, epoch_batches
from .model import Seq2SeqTransformer

# Logits per row chunk when the fused path's training statistics are computed (16 MiB float32).
STATISTICS_CHUNK_LOGITS = 1 << 22


def _forced(model, src, tgt, device, states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced flat float32 logits ``(B*T, V)`` (or decoder states ``(B*T, d)``, in the
    forward's dtype) and next-token targets ``(B*T,)`` (pads = ``-100``)."""
    src, tgt = src.to(device), tgt.to(device)
    out = model(src, tgt[:, :-1], return_states=True) if states else model(src, tgt[:, :-1])
    flat = out.reshape(-1, out.shape[-1])
    targets = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, IGNORE_INDEX).reshape(-1)
    return (flat if states else flat.float()), targets


def fused_loss_options(criterion: nn.Module) -> dict:
    """The keywords of :func:`encouraging_loss.linear_encouraging_loss` for ``criterion``, an
    ``nn.CrossEntropyLoss`` (EL with bonus scale 0) or ``EncouragingLoss`` of mean reduction
    (read at every step, so that a schedule's ``bonus_scale`` applies).

    Raises:
        ValueError: naming ``criterion`` for another loss or reduction.
    """
    # Exact types: FocalLoss, Poly1Loss or a subclass may compute something else.
    if type(criterion) is nn.CrossEntropyLoss:
        bonus_options: dict = {"bonus_scale": 0.0}
    elif type(criterion) is EncouragingLoss:
        bonus_options = criterion.keyword_options()
    else:
        raise ValueError(
            "criterion: the fused linear path computes nn.CrossEntropyLoss and EncouragingLoss "
            f"only, got {type(criterion).__name__}"
        )
    if criterion.reduction != "mean":
        raise ValueError(
            f"criterion: the fused linear path needs reduction='mean', got {criterion.reduction!r}"
        )
    options = {"class_weight": criterion.weight, "ignore_index": criterion.ignore_index}
    options.update(reduction="mean", label_smoothing=criterion.label_smoothing)
    return {**options, **bonus_options}


def teacher_forced_loss(
    model: Seq2SeqTransformer,
    criterion: nn.Module,
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    fused_linear: bool = False,
    amp: bool = False,
    forward: nn.Module | None = None,
) -> tuple[torch.Tensor, Callable[[], dict]]:
    """The loss of one batch of ``(B, Ls)`` source and ``(B, Lt)`` target ids, and its statistics.

    Materialised: ``criterion`` on the flat ``(tokens, vocab)`` logits. ``fused_linear``: the
    decoder states, ``model.output`` and the targets go to
    :func:`encouraging_loss.linear_encouraging_loss`, which never forms those logits (the same
    loss within rounding). ``amp``: bfloat16 autocast on CUDA (the fused loss then gets
    bfloat16 states and weight). ``forward``: the module the forward runs through (the DDP
    wrapper under ``torchrun``, so that gradients reach its hooks); ``None`` = ``model``.

    Returns:
        ``(loss, statistics)``; ``statistics()``, called after ``loss.backward()`` and before the
        optimiser step, sums over non-pad tokens ``loss`` (x tokens), ``ce`` (plain CE),
        ``correct``, ``count``, and ``well_norm``/``total_norm``, the norms of the loss's
        gradient on each token's logits (tokens with p_y > 0.5 / all).

    Raises:
        ValueError: from :func:`fused_loss_options` for a criterion the fused path lacks.
    """
    device = model.output.weight.device
    forward = model if forward is None else forward
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        flat, targets = _forced(forward, src, tgt, device, states=fused_linear)
    if not fused_linear:
        flat.retain_grad()
        loss = criterion(flat, targets)
        return loss, lambda: _materialised_statistics(loss, flat, targets)
    options = fused_loss_options(criterion)
    # Outside autocast, with the dtype autocast would give the materialised projection.
    dtype = torch.bfloat16 if amp else model.output.weight.dtype
    weight = model.output.weight.to(dtype)
    bias = None if model.output.bias is None else model.output.bias.to(dtype)
    states = flat.to(dtype)
    loss = linear_encouraging_loss(states, weight, targets, bias, **options).float()
    return loss, lambda: _fused_statistics(criterion, states, weight, bias, targets)


def _token_statistics(logits, gold, grad) -> dict[str, torch.Tensor]:
    """CE sum, correct count, and the well-classified and total norms of rows of ``grad``."""
    p_true = logits.softmax(1).gather(1, gold[:, None]).squeeze(1)
    norms = grad.norm(dim=1)
    ce = nn.functional.cross_entropy(logits, gold, reduction="sum")
    correct = (logits.argmax(1) == gold).sum()
    well, total = norms[p_true > 0.5].sum(), norms.sum()
    return {"ce": ce, "correct": correct, "well_norm": well, "total_norm": total}


@torch.no_grad()
def _materialised_statistics(loss: torch.Tensor, flat, targets) -> dict:
    """:func:`teacher_forced_loss`'s statistics from the logits and their retained gradient."""
    keep = targets != IGNORE_INDEX
    gold = targets[keep]
    sums = _token_statistics(flat.detach()[keep], gold, flat.grad[keep])
    count = len(gold)
    return {"loss": loss.item() * count, "count": count, **{k: v.item() for k, v in sums.items()}}


def _mean_denominator(criterion: nn.Module, gold: torch.Tensor) -> float | torch.Tensor:
    """What a mean-reduced criterion divides the summed loss of targets ``gold`` by."""
    class_weight = getattr(criterion, "weight", None)
    return float(len(gold)) if class_weight is None else class_weight[gold].sum()


@torch.no_grad()
def _fused_statistics(criterion, states, weight, bias, targets) -> dict:
    """:func:`teacher_forced_loss`'s statistics from decoder states, in row chunks of at most
    :data:`STATISTICS_CHUNK_LOGITS` logits: each chunk's loss is recomputed with autograd and
    scaled by its share of the batch's mean denominator, so that its gradient is the batch
    loss's on those rows (the materialised path's numbers without its logits)."""
    keep = targets != IGNORE_INDEX
    states, gold = states.detach()[keep], targets[keep]
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    denominator = _mean_denominator(criterion, gold)
    rows = max(1, STATISTICS_CHUNK_LOGITS // weight.shape[0])
    zero = torch.zeros((), device=states.device)
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(gold), rows):
        chunk_gold = gold[start : start + rows]
        logits = nn.functional.linear(states[start : start + rows], weight, bias).float()
        with torch.enable_grad():
            logits.requires_grad_(True)
            share = _mean_denominator(criterion, chunk_gold) / denominator
            chunk_loss = criterion(logits, chunk_gold) * share
            (grad,) = torch.autograd.grad(chunk_loss, logits)
        parts = {
            "loss": chunk_loss.detach(),
            **_token_statistics(logits.detach(), chunk_gold, grad),
        }
        totals = {k: totals.get(k, zero) + part for k, part in parts.items()}
    sums = {k: total.item() for k, total in totals.items()}
    loss, correct = sums.pop("loss"), int(sums.pop("correct"))
    return {"loss": loss * len(gold), "count": len(gold), "correct": correct, **sums}


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int, device, collect: bool = False) -> dict:
    """Teacher-forced ``{"token_accuracy", "ce", "ppl", "tokens"}`` (plain CE, ``ppl =
    exp(CE)``) over the non-pad tokens of ``data``; with ``collect``, also per-token
    ``margin``, ``energy`` (``-logsumexp``) and ``energy_true`` (``-z_y``) tensors.

    Raises:
        ValueError: if ``data`` is not :class:`Encoded` or ``batch_size`` is not positive.
    """
    if not isinstance(data, Encoded) or batch_size < 1:
        raise ValueError(f"data, batch_size: expected Encoded and >= 1, got {batch_size}")
    with diagnostics.eval_mode(model):
        correct = ce_sum = tokens = 0.0
        parts: dict[str, list[torch.Tensor]] = {"margin": [], "energy": [], "energy_true": []}
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            flat, targets = _forced(model, *data.batch(index), device)
            keep = targets != IGNORE_INDEX
            flat, targets = flat[keep], targets[keep]
            correct += (flat.argmax(1) == targets).sum().item()
            ce_sum += nn.functional.cross_entropy(flat, targets, reduction="sum").item()
            tokens += len(targets)
            if collect:
                parts["margin"].append(diagnostics.margins(flat, targets).cpu())
                energy_true, energy_free = diagnostics.energies(flat, targets)
                parts["energy"].append(energy_free.cpu())
                parts["energy_true"].append(energy_true.cpu())
    ce = ce_sum / max(tokens, 1)
    out = {"token_accuracy": correct / max(tokens, 1), "ce": ce, "ppl": math.exp(min(ce, 50.0))}
    out["tokens"] = int(tokens)
    if collect:
        out.update({k: torch.cat(v) for k, v in parts.items()})
    return out


class TranslationBatches:
    """Padded sentence pairs as the shared trainer's batches: length-bucketed
    (:func:`data.epoch_batches`), the teacher-forced loss ignoring padding (under ``torchrun``
    each rank averages over its own tokens), epochs selected on validation token accuracy.

    Args:
        train, val: encoded training and validation pairs.
        fused_linear: train through the fused linear + EL path (``recipes.use_fused_linear``).

    Raises:
        ValueError: if a split is not :class:`Encoded` or ``fused_linear`` is not a bool.
    """

    def __init__(self, train: Encoded, val: Encoded, fused_linear: bool = False):
        if not (isinstance(train, Encoded) and isinstance(val, Encoded)):
            raise ValueError(f"train, val: expected Encoded splits, got {type(train).__name__}")
        if not isinstance(fused_linear, bool):
            raise ValueError(f"fused_linear: expected a bool, got {fused_linear!r}")
        self.train, self.val, self.fused_linear = train, val, fused_linear
        self.n_train = len(train)

    def epoch_batches(self, batch: int, seed: int) -> list[torch.Tensor]:
        """One epoch's length-bucketed index batches, drawn from a generator of ``seed``."""
        return epoch_batches(self.train.tgt_len, batch, seed)

    def loss(self, step) -> tuple[torch.Tensor, Callable[[], dict]]:
        """The loss of one ``trainer.BatchStep`` and its token statistics after ``backward``."""
        return teacher_forced_loss(
            step.model,
            step.criterion,
            *self.train.batch(step.index),
            fused_linear=self.fused_linear,
            amp=step.amp,
            forward=step.forward,
        )

    def validate(self, model: nn.Module, batch_size: int, device: torch.device) -> dict:
        """Validation token accuracy (selects the epoch), CE and perplexity."""
        val = evaluate(model, self.val, batch_size, device)
        return {"val_accuracy": val["token_accuracy"], "val_nll": val["ce"], "val_ppl": val["ppl"]}
