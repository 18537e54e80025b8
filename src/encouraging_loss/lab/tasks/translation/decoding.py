"""Decoding and scoring: greedy and beam search (GNMT length penalty) on the model's
incremental decoder step, detokenised translations, and corpus BLEU with ``sacrebleu``."""

from __future__ import annotations

import math
from itertools import takewhile

import torch

from ...diagnostics import eval_mode
from .data import BOS, EOS, PAD, Encoded, require_module
from .model import Seq2SeqTransformer


def _max_length(src: torch.Tensor, model: Seq2SeqTransformer) -> int:
    longest = int((src != PAD).sum(1).max())
    return min(int(1.5 * longest) + 10, model.positions.shape[0] - 1)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor) -> list[list[int]]:
    """Greedy decoding of ``(B, Ls)`` source ids by a model in eval mode: one id list per
    sentence, without ``<s>``/``</s>``."""
    memory, src_mask = model.encode(src)
    ys = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    cache = None
    for position in range(_max_length(src, model)):
        state, cache = model.decode_step(ys[:, -1], position, memory, src_mask, cache)
        logits = model.logits(state)
        logits[:, [PAD, BOS]] = float("-inf")
        step = logits.argmax(-1).masked_fill(done, PAD)
        ys = torch.cat([ys, step[:, None]], dim=1)
        done |= step == EOS
        if bool(done.all()):
            break
    return [_strip(row) for row in ys[:, 1:].tolist()]


def _strip(ids: list[int]) -> list[int]:
    return list(takewhile(lambda token: token not in (EOS, PAD), ids))


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer, src: torch.Tensor, beam: int = 5, alpha: float = 0.6
) -> list[list[int]]:
    """Beam search of ``(B, Ls)`` source ids by a model in eval mode, batched over sentences
    and ``beam`` beams: the best hypothesis per sentence, without ``<s>``/``</s>``.

    A hypothesis ends when it emits ``</s>`` among the top ``beam`` candidates; its score is
    the summed log-probability divided by :func:`length_penalty` (exponent ``alpha``, 0 =
    none). A sentence stops once it has ``beam`` finished hypotheses (or at the length limit,
    where live beams are finished as is).

    Raises:
        ValueError: if ``beam < 1`` or ``alpha < 0``.
    """
    if beam < 1:
        raise ValueError(f"beam: must be at least 1, got {beam}")
    if alpha < 0:
        raise ValueError(f"alpha: must be non-negative, got {alpha}")
    batch, device = len(src), src.device
    memory, src_mask = model.encode(src)
    memory = memory.repeat_interleave(beam, dim=0)
    src_mask = src_mask.repeat_interleave(beam, dim=0)
    ys = torch.full((batch * beam, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool)
    max_length = _max_length(src, model)
    cache = None
    for position in range(max_length):
        state, cache = model.decode_step(ys[:, -1], position, memory, src_mask, cache)
        logp = model.logits(state).float().log_softmax(-1)
        logp[:, [PAD, BOS]] = float("-inf")
        vocab = logp.shape[1]
        candidates = (scores.view(-1, 1) + logp).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        origin, token = top_index // vocab, top_index % vocab
        is_eos = token == EOS
        # Finished hypotheses: </s> among the first `beam` candidates of an active sentence.
        for b, j in (is_eos[:, :beam] & active.to(device)[:, None]).nonzero().tolist():
            score = top_scores[b, j].item()
            if math.isfinite(score):
                prefix = ys[b * beam + origin[b, j].item(), 1:].tolist()
                finished[b].append((score / length_penalty(len(prefix) + 1, alpha), prefix))
        # Live beams: the best `beam` candidates that do not end the sentence.
        live_scores = top_scores.masked_fill(is_eos, float("-inf"))
        keep_scores, keep = live_scores.topk(beam, dim=1)
        first_row = torch.arange(batch, device=device)[:, None] * beam
        rows = (first_row + origin.gather(1, keep)).view(-1)
        ys = torch.cat([ys[rows], token.gather(1, keep).view(-1, 1)], dim=1)
        cache = [layer_cache[rows] for layer_cache in cache]
        scores = keep_scores
        for b in range(batch):
            if active[b] and len(finished[b]) >= beam:
                active[b] = False
        if not bool(active.any()):
            break
    out = []
    for b in range(batch):
        if not finished[b]:  # length limit reached without </s>: take the live beams
            for j in range(beam):
                if math.isfinite(scores[b, j].item()):
                    prefix = ys[b * beam + j, 1:].tolist()
                    finished[b].append(
                        (scores[b, j].item() / length_penalty(len(prefix), alpha), prefix)
                    )
        out.append(_strip(max(finished[b], key=lambda item: item[0])[1]) if finished[b] else [])
    return out


def translate(
    model: Seq2SeqTransformer,
    tokenizer,
    data: Encoded,
    device: torch.device,
    beam: int,
    alpha: float,
    batch_size: int,
) -> list[str]:
    """Detokenised translations of every source in ``data``, in its order.

    Sentences are decoded in batches of similar length, ``batch_size // beam`` at a time, with
    :func:`greedy_decode` for ``beam=1`` and :func:`beam_search` (length penalty ``alpha``)
    otherwise, and detokenised by the run's ``tokenizer``.

    Raises:
        ValueError: if ``beam`` or ``batch_size`` is not positive.
    """
    if beam < 1 or batch_size < 1:
        raise ValueError(f"beam, batch_size: must be positive, got {beam}, {batch_size}")
    with eval_mode(model):
        order = torch.argsort(data.src_len, stable=True)
        rows = max(1, batch_size // beam)
        hypotheses: list[str] = [""] * len(data)
        for start in range(0, len(order), rows):
            index = order[start : start + rows]
            src = data.src[index, : int(data.src_len[index].max())].to(device)
            ids = greedy_decode(model, src) if beam == 1 else beam_search(model, src, beam, alpha)
            for i, row in zip(index.tolist(), ids, strict=True):
                hypotheses[i] = tokenizer.decode(row, skip_special_tokens=True)
    return hypotheses


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU ``(score, signature)`` of detokenised hypotheses against one raw reference
    each, with sacrebleu.

    Raises:
        ValueError: if the lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses: {len(hypotheses)} sentences for {len(references)} references"
        )
    require_module("sacrebleu")
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def bleu_signature() -> str:
    """The signature of the BLEU :func:`bleu` computes (the same for every corpus)."""
    return bleu(["a"], ["a"])[1]  # sacrebleu gives a signature only after a first score
