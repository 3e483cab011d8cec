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

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.identity_op import IdentityOp


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

    def attention_mask_or_none(self) -> torch.Tensor | None:
        """None when no row needs masking: one row per sequence, all at the newest position
        (every cached key is visible), the usual decode step."""
        if "needs_mask" not in self._cache:
            self._cache["needs_mask"] = self.pos.shape[1] > 1 or bool(
                (self.pos != self.max_pos).any()
            )
        return self.attention_mask() if self._cache["needs_mask"] else None

    def rows_slice(self) -> slice | None:
        """The cache rows as a slice when seq_idx is a run of consecutive rows (a view
        instead of an advanced-indexing copy of every layer's cache)."""
        if "rows" not in self._cache:
            idx = self.seq_idx.tolist()
            run = idx == list(range(idx[0], idx[0] + len(idx))) if idx else False
            self._cache["rows"] = slice(idx[0], idx[0] + len(idx)) if run else None
        return self._cache["rows"]

    def rope(self, freqs: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, b, 1, d] of the chunk's positions, shared by every layer."""
        key = ("rope", dtype)
        if key not in self._cache:
            f = freqs[self.pos.t()]
            self._cache[key] = (torch.cos(f).to(dtype), torch.sin(f).to(dtype))
        return self._cache[key]


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
        rows = chunk.rows_slice()
        if rows is not None:
            return self.k[rows, :length], self.v[rows, :length]
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
    plan = lean_plan(layer)
    if plan is not None:
        return lean_layer_forward(plan, hidden, chunk, cache, freqs)
    return module_layer_forward(layer, hidden, chunk, cache, freqs)


def module_layer_forward(
    layer, hidden: torch.Tensor, chunk: Chunk, cache: KVCache, freqs: torch.Tensor | None
) -> torch.Tensor:
    """layer_forward through the layer's own submodules (any spec the engine supports)."""
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


# ------------------------------------------------------------------ lean decode path
# The module path above costs ~1.5 ms of Python per layer and token (megatron-core's
# linear wrappers are autograd Functions, RoPE recomputes cos/sin per call): about as
# much as the matmuls of a 135M model on a CPU core. For the plain local-spec layer
# (torch norms, megatron-core's Column/RowParallelLinear, no QK norm or gate) the same
# arithmetic is done here on the layer's own parameters; anything else (TE modules, fused
# activations, clamped GLU) keeps the module path. tests/unit/test_inference.py checks
# both paths give the same outputs and KV.


@dataclass(frozen=True)
class LeanLayer:
    ln1: torch.nn.Module
    ln2: torch.nn.Module
    qkv: torch.nn.Module
    proj: torch.nn.Module
    fc1: torch.nn.Module
    fc2: torch.nn.Module
    heads: int  # attention heads on this TP rank
    groups: int  # KV groups on this TP rank
    head_dim: int
    scale: float | None
    gated: bool
    act: object


_LEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lean_plan(layer) -> LeanLayer | None:
    """The layer's parameters for the lean path, or None if it needs the module path."""
    if layer in _LEAN:
        return _LEAN[layer]
    _LEAN[layer] = plan = _make_plan(layer)
    return plan


def _make_plan(layer) -> LeanLayer | None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = layer.config
    attn, mlp = layer.self_attention, layer.mlp
    norms = (torch.nn.LayerNorm, torch.nn.RMSNorm)
    ok = (
        isinstance(layer.input_layernorm, norms)
        and isinstance(layer.pre_mlp_layernorm, norms)
        and type(getattr(attn, "linear_qkv", None)) is ColumnParallelLinear
        and type(getattr(attn, "linear_proj", None)) is RowParallelLinear
        and type(getattr(mlp, "linear_fc1", None)) is ColumnParallelLinear
        and type(getattr(mlp, "linear_fc2", None)) is RowParallelLinear
        and isinstance(getattr(attn, "q_layernorm", None), (IdentityOp, type(None)))
        and isinstance(getattr(attn, "k_layernorm", None), (IdentityOp, type(None)))
        and not getattr(cfg, "attention_output_gate", False)
        and cfg.num_query_groups >= attn.world_size
        and not cfg.sequence_parallel
        and not cfg.bias_activation_fusion
        and not getattr(cfg, "use_te_activation_func", False)
        and getattr(cfg, "activation_func_clamp_value", None) is None
        and getattr(cfg, "glu_linear_offset", 0.0) == 0.0
        and not cfg.apply_residual_connection_post_layernorm
        and not getattr(cfg, "rotary_interleaved", False)
        and isinstance(layer.cross_attention, IdentityOp)
        and not attn.linear_qkv.gather_output
        and not mlp.linear_fc1.gather_output
        and attn.linear_proj.input_is_parallel
        and mlp.linear_fc2.input_is_parallel
    )
    if not ok:
        return None
    return LeanLayer(
        ln1=layer.input_layernorm,
        ln2=layer.pre_mlp_layernorm,
        qkv=attn.linear_qkv,
        proj=attn.linear_proj,
        fc1=mlp.linear_fc1,
        fc2=mlp.linear_fc2,
        heads=attn.num_attention_heads_per_partition,
        groups=attn.num_query_groups_per_partition,
        head_dim=attn.hidden_size_per_attention_head,
        scale=getattr(attn.core_attention, "softmax_scale", None),
        gated=cfg.gated_linear_unit,
        act=cfg.activation_func,
    )


def _row_parallel(linear, x: torch.Tensor) -> torch.Tensor:
    """RowParallelLinear (input already split): local matmul, sum over TP, then the bias."""
    out = F.linear(x, linear.weight)
    if torch.distributed.get_world_size(linear.tp_group) > 1:
        out = reduce_from_tensor_model_parallel_region(out, group=linear.tp_group)
    return out if linear.bias is None else out + linear.bias


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding on the first cos.shape[-1] channels of x."""
    d = cos.shape[-1]
    r, rest = x[..., :d], x[..., d:]
    x1, x2 = r.chunk(2, dim=-1)
    out = r * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def lean_layer_forward(
    p: LeanLayer, hidden: torch.Tensor, chunk: Chunk, cache: KVCache, freqs
) -> torch.Tensor:
    n, b = hidden.shape[0], hidden.shape[1]
    x = p.ln1(hidden)
    mixed = F.linear(x, p.qkv.weight, p.qkv.bias)
    per_group = p.heads // p.groups
    mixed = mixed.view(n, b, p.groups, (per_group + 2) * p.head_dim)
    q, k, v = mixed.split([per_group * p.head_dim, p.head_dim, p.head_dim], dim=3)
    q = q.reshape(n, b, p.heads, p.head_dim)
    if freqs is not None:
        cos, sin = chunk.rope(freqs, q.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    cache.write(chunk, k, v)
    kc, vc = cache.read(chunk, chunk.max_pos + 1)  # [b, T, g, d]
    ctx = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        kc.permute(0, 2, 1, 3).to(q.dtype),
        vc.permute(0, 2, 1, 3).to(q.dtype),
        attn_mask=chunk.attention_mask_or_none(),
        scale=p.scale,
        enable_gqa=p.heads != p.groups,
    )
    hidden = hidden + _row_parallel(p.proj, ctx.permute(2, 0, 1, 3).reshape(n, b, -1))
    h = F.linear(p.ln2(hidden), p.fc1.weight, p.fc1.bias)
    if p.gated:
        gate, lin = h.chunk(2, dim=-1)
        h = p.act(gate) * lin
    else:
        h = p.act(h)
    return hidden + _row_parallel(p.fc2, h)
