"""Multi30k de→en: the raw files, a joint BPE vocabulary (``tokenizers``), padded id tensors,
and the length-bucketed batches of one epoch."""

from __future__ import annotations

import gzip
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from ... import data as lab_data
from ... import io as lab_io
from .recipes import DATASET, SOURCE_LANG, TARGET_LANG

SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
PAD, UNK, BOS, EOS = range(4)
IGNORE_INDEX = -100  # padded target positions; every loss of the lab ignores it


def require_module(module: str):
    """Import ``module`` (``tokenizers``, ``sacrebleu``), or say how to install it.

    Raises:
        RuntimeError: naming the module and the ``pip install`` that provides it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"the translation task needs {module}: pip install {module} "
            "(or the project's [lab] extra)"
        ) from error


def load_multi30k(data_root: str | None = None) -> tuple[dict[str, tuple[list, list]], Path]:
    """Read the raw, line-aligned Multi30k de/en files under ``data_root/multi30k``.

    Returns:
        ``({"train"|"val"|"test": (german, english)}, folder)``; sentences are stripped lines.

    Raises:
        lab_data.DatasetNotFoundError: if a file is missing.
        ValueError: if a split's two files have different line counts.
    """
    files = tuple(
        f"{stem}.{lang}.gz" for stem in SPLIT_FILES.values() for lang in (SOURCE_LANG, TARGET_LANG)
    )
    folder = lab_data.find_data_folder(DATASET, files, data_root)
    splits = {}
    for split, stem in SPLIT_FILES.items():
        sides = []
        for lang in (SOURCE_LANG, TARGET_LANG):
            with gzip.open(folder / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as handle:
                sides.append([line.strip() for line in handle.read().splitlines()])
        if len(sides[0]) != len(sides[1]):
            raise ValueError(
                f"data_root: {folder}/{stem} has {len(sides[0])} German and {len(sides[1])} "
                "English lines"
            )
        splits[split] = (sides[0], sides[1])
    return splits, folder


def subset(pairs: tuple[list, list], limit: int | None, seed: int) -> tuple[list, list]:
    """A fixed random subset (drawn by ``seed``) of ``limit`` ``(sources, targets)`` pairs in
    their order; ``None`` keeps all."""
    if limit is None or limit >= len(pairs[0]):
        return pairs
    keep = torch.randperm(len(pairs[0]), generator=torch.Generator().manual_seed(seed))[:limit]
    keep = sorted(keep.tolist())
    return [pairs[0][i] for i in keep], [pairs[1][i] for i in keep]


def train_tokenizer(sentences: list[str], vocab_size: int, path: Path | None = None):
    """A ``tokenizers.Tokenizer``: joint BPE of ``vocab_size`` ids (specials included) learned
    on both languages' training sentences, saved to ``path`` (atomically) unless ``None``.

    Metaspace pre-tokenisation makes ``decode`` the exact inverse on whitespace, so hypotheses
    are scored against the raw references.

    Raises:
        ValueError: if ``vocab_size`` is too small.
    """
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size: must exceed {len(SPECIALS)}, got {vocab_size}")
    require_module("tokenizers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2, show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer)
    if path is not None:
        lab_io.atomic_write_text(path, tokenizer.to_str())
    return tokenizer


def load_tokenizer(path: Path):
    """Load a ``tokenizer.json`` saved by :func:`train_tokenizer`."""
    require_module("tokenizers")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@dataclass
class Encoded:
    """One split as padded id tensors.

    Attributes:
        src: ``(N, Ls)`` source ids ending in ``</s>``, padded with ``<pad>``.
        tgt: ``(N, Lt)`` target ids ``<s> ... </s>``, padded.
        src_len, tgt_len: ``(N,)`` source and target lengths.
        references, sources: the raw target (for BLEU) and source sentences.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    src_len: torch.Tensor
    tgt_len: torch.Tensor
    references: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.src_len)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and target ids of ``index``, trimmed to the batch's longest sentence."""
        ls, lt = int(self.src_len[index].max()), int(self.tgt_len[index].max())
        return self.src[index, :ls], self.tgt[index, :lt]


def encode_pairs(tokenizer, pairs: tuple[list, list], max_tokens: int) -> Encoded:
    """Tokenise ``(sources, targets)`` into padded tensors, cut to ``max_tokens`` ids.

    Raises:
        ValueError: if ``max_tokens`` leaves no room for a token between the specials.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens: must be at least 3 (<s>, a token, </s>), got {max_tokens}")
    sources, targets = pairs
    src_ids = [e.ids[: max_tokens - 1] + [EOS] for e in tokenizer.encode_batch(sources)]
    tgt_ids = [[BOS] + e.ids[: max_tokens - 2] + [EOS] for e in tokenizer.encode_batch(targets)]

    def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        padded = pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=PAD)
        return padded, torch.tensor([len(r) for r in rows])

    src, src_len = pad(src_ids)
    tgt, tgt_len = pad(tgt_ids)
    return Encoded(src, tgt, src_len, tgt_len, list(targets), list(sources))


def epoch_batches(lengths: torch.Tensor, batch: int, seed: int, pool: int = 32) -> list:
    """One epoch's ``N // batch`` batches of pair indices, for ``(N,)`` target ``lengths``.

    Pairs are shuffled, cut into pools of ``pool`` batches, sorted by target length inside a
    pool (about half the padding compute of random batches on Multi30k), cut into batches, and
    the batches shuffled, all drawn by ``seed`` (a resumed run needs no sampler state). The
    last partial batch is dropped, as in the shared trainer.

    Raises:
        ValueError: if ``batch`` or ``pool`` is not positive, or ``batch > N``.
    """
    if batch < 1 or pool < 1 or batch > len(lengths):
        raise ValueError(f"batch/pool: need 1 <= batch <= {len(lengths)} and pool >= 1")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    order = order[: len(order) - len(order) % batch]
    batches = []
    for start in range(0, len(order), pool * batch):
        chunk = order[start : start + pool * batch]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]
