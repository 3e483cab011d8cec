"""Chunked transformer-layer forward with a per-sequence KV cache.

We drive megatron-core's TransformerLayer submodules ourselves (norms, QKV projection,
RoPE, output projection, MLP, bias-dropout-add) and only replace the attention core, so
that every sequence of a batch can have its own cache length in every layer: early exit
leaves deep layers behind, and KV recomputation / verification feeds them a *chunk* of
several positions at once. A chunk is [n, b] positions: row j of sequence i is position
`pos[i, j]`; rows with `valid[i, j] = False` are padding (computed, never written).
Attention of a row at position q covers cached keys at positions <= q of its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


@dataclass
class Chunk:
    """Which positions a forward covers: pos/valid are [b, n]; seq_idx [b] rows of the cache.

    Index tensors and the attention mask are computed once per chunk and reused by every
    layer that processes it (decode steps are dominated by such small per-layer costs).
    """

    seq_idx: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    max_pos: int = -1
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.max_pos < 0:
            self.max_pos = int(self.pos.max())

    def valid_index(self):
        """(row, col, cache sequence, position) of every valid entry."""
        if "vi" not in self._cache:
            rows, cols = self.valid.nonzero(as_tuple=True)
            self._cache["vi"] = (rows, cols, self.seq_idx[rows], self.pos[rows, cols])
        return self._cache["vi"]

    def attention_mask(self) -> torch.Tensor:
        """[b, 1, n, T] True where a row may attend (key position <= its position)."""
        if "mask" not in self._cache:
            keys = torch.arange(self.max_pos + 1, device=self.pos.device)
            self._cache["mask"] = keys.view(1, 1, 1, -1) <= self.pos.view(
                self.pos.shape[0], 1, -1, 1
            )
        return self._cache["mask"]


class KVCache:
    """K/V of one attention module for every sequence: [B, max_len, groups, head_dim]."""

    def __init__(self, batch: int, max_len: int, groups: int, head_dim: int, dtype, device):
        shape = (batch, max_len, groups, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, chunk: Chunk, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, b, g, d] for the chunk's rows; only valid rows are stored."""
        b_rows, j_cols, seq, pos = chunk.valid_index()
        self.k[seq, pos] = k[j_cols, b_rows].to(self.k.dtype)
        self.v[seq, pos] = v[j_cols, b_rows].to(self.v.dtype)

    def read(self, chunk: Chunk, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[chunk.seq_idx, :length], self.v[chunk.seq_idx, :length]


def _attention(attn, x: torch.Tensor, chunk: Chunk, cache: KVCache, freqs) -> torch.Tensor:
    qkv = attn.get_query_key_value_tensors(x, None)
    q, k, v = qkv[0], qkv[-2], qkv[-1]  # [n, b, heads, d]; a gate (if any) is unsupported
    if len(qkv) == 4:
        raise NotImplementedError("gated attention is not supported by the inference engine")
    if freqs is not None:
        f = freqs[chunk.pos.t()]  # [n, b, 1, d]
        q = apply_rotary_pos_emb(q, f, config=attn.config)
        k = apply_rotary_pos_emb(k, f, config=attn.config)
    cache.write(chunk, k, v)
    length = chunk.max_pos + 1
    kc, vc = cache.read(chunk, length)  # [b, T, g, d]
    heads, groups = q.shape[2], kc.shape[2]
    if heads != groups:
        kc = kc.repeat_interleave(heads // groups, dim=2)
        vc = vc.repeat_interleave(heads // groups, dim=2)
    qb = q.permute(1, 2, 0, 3)  # [b, h, n, d]
    kb, vb = kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)
    mask = chunk.attention_mask()
    scale = getattr(attn.core_attention, "softmax_scale", None)
    ctx = F.scaled_dot_product_attention(
        qb, kb.to(qb.dtype), vb.to(qb.dtype), attn_mask=mask, scale=scale
    )
    n, b = x.shape[0], x.shape[1]
    ctx = ctx.permute(2, 0, 1, 3).reshape(n, b, -1)
    return attn.linear_proj(ctx)


def layer_forward(
    layer, hidden: torch.Tensor, chunk: Chunk, cache: KVCache, freqs: torch.Tensor | None
) -> torch.Tensor:
    """megatron-core TransformerLayer forward (eval) on a chunk [n, b, h] with a KV cache."""
    residual = hidden
    x = layer.input_layernorm(hidden)
    attn_out = _attention(layer.self_attention, x, chunk, cache, freqs)
    hidden = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
        attn_out, residual, layer.hidden_dropout
    )
    residual = hidden
    x = layer.pre_mlp_layernorm(hidden)
    mlp_out = layer.mlp(x)
    return layer.mlp_bda(False, layer.config.bias_dropout_fusion)(
        mlp_out, residual, layer.hidden_dropout
    )


def new_cache(layer, batch: int, max_len: int, dtype, device) -> KVCache:
    attn = layer.self_attention
    return KVCache(
        batch,
        max_len,
        attn.num_query_groups_per_partition,
        attn.hidden_size_per_attention_head,
        dtype,
        device,
    )
