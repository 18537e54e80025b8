"""The model: a pre-norm Transformer encoder-decoder from torch building blocks, with shared
embeddings and an incremental decoder step for greedy and beam-search decoding."""

from __future__ import annotations

import math

import torch
from torch import nn

from .data import PAD


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The Transformer's fixed sinusoidal position encodings ``(length, width)``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class Seq2SeqTransformer(nn.Module):
    """Pre-norm Transformer encoder-decoder from ``nn.TransformerEncoder/DecoderLayer``.

    Args:
        vocab_size: joint vocabulary size.
        d_model, heads, feedforward: width, attention heads, feed-forward width.
        encoder_layers, decoder_layers: depths.
        dropout: dropout everywhere.
        share_embeddings: tie source, target and output embeddings (needs a joint vocabulary).
        max_positions: longest sequence the position table covers.

    Raises:
        ValueError: for non-positive sizes or ``d_model`` not divisible by ``heads``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        feedforward: int = 256,
        dropout: float = 0.1,
        share_embeddings: bool = True,
        max_positions: int = 256,
    ):
        super().__init__()
        sizes = dict(vocab_size=vocab_size, d_model=d_model, heads=heads, feedforward=feedforward)
        sizes.update(encoder_layers=encoder_layers, decoder_layers=decoder_layers)
        for arg, value in sizes.items():
            if value < 1:
                raise ValueError(f"{arg}: must be positive, got {value}")
        if d_model % heads or d_model % 2:
            raise ValueError(f"d_model: {d_model} must be even and divisible by heads={heads}")
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.target_embed = (
            self.embed if share_embeddings else nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        )
        table = sinusoidal_positions(max_positions, d_model)
        self.register_buffer("positions", table, persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = dict(d_model=d_model, nhead=heads, dim_feedforward=feedforward, dropout=dropout)
        layer.update(batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer),
            encoder_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(d_model)
        )
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        for embedding in dict.fromkeys([self.embed, self.target_embed]):  # each matrix once
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            with torch.no_grad():
                embedding.weight[PAD].zero_()
        if share_embeddings:
            self.output.weight = self.embed.weight

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(
            embedding(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]]
        )

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``(B, Ls, d)`` and the source padding mask ``(B, Ls)``."""
        mask = src == PAD
        return self.encoder(self._embed(self.embed, src), src_key_padding_mask=mask), mask

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder states ``(B, Lt, d)`` for the target prefix ``tgt_in`` (causal)."""
        length = tgt_in.shape[1]
        causal = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=tgt_in.device), diagonal=1
        )
        return self.decoder(
            self._embed(self.target_embed, tgt_in),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == PAD,
            memory_key_padding_mask=src_mask,
        )

    def decode_step(
        self,
        token: torch.Tensor,
        position: int,
        memory: torch.Tensor,
        src_mask: torch.Tensor,
        cache: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One incremental decoder step (inference, eval mode): the state of the newest token.

        Equal to ``decode(prefix)[:, -1]`` (causal attention makes earlier positions independent
        of later ones) at one position's cost: each layer caches its normalised inputs, the keys
        and values of its self-attention.

        Args:
            token, position: ``(B,)`` ids at the 0-based ``position`` (``<s>`` is 0).
            memory, src_mask: ``(B, Ls, d)`` encoder states, ``(B, Ls)`` source padding mask.
            cache: what the previous step returned (``None`` at position 0; reorder its rows
                with the beams).

        Returns:
            ``(state (B, d), cache)``.
        """
        x = self.target_embed(token)[:, None] * math.sqrt(self.d_model)
        x = self.dropout(x + self.positions[position])
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            h = layer.norm1(x)
            past = h if cache is None else torch.cat([cache[i], h], dim=1)
            new_cache.append(past)
            x = x + layer.dropout1(layer.self_attn(h, past, past, need_weights=False)[0])
            attended = layer.multihead_attn(
                layer.norm2(x), memory, memory, key_padding_mask=src_mask, need_weights=False
            )[0]
            x = x + layer.dropout2(attended)
            h = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x)))))
            x = x + layer.dropout3(h)
        return self.decoder.norm(x)[:, 0], new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states (the fused linear + EL training path skips them)."""
        return self.output(hidden)

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, return_states: bool = False
    ) -> torch.Tensor:
        """Teacher-forced logits ``(B, Lt, vocab)``, or decoder states ``(B, Lt, d)``.

        Args:
            src, tgt_in: ``(B, Ls)`` source ids, ``(B, Lt)`` target prefix ids (``<s>`` first).
            return_states: the decoder states instead of the logits (for the fused linear + EL
                path; going through ``forward`` keeps a DDP wrapper in the loop).
        """
        memory, src_mask = self.encode(src)
        states = self.decode(tgt_in, memory, src_mask)
        return states if return_states else self.logits(states)
