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

import logging
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.identity_op import IdentityOp

from megatron.early_exit.inference import rows_kernel
from megatron.early_exit.inference.projection import MAX_COLUMN_ROWS, column_major, project


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
            self._cache["mask"] = rows_kernel.visible_keys(self.pos + 1, self.max_pos + 1)
        return self._cache["mask"]

    def attention_mask_or_none(self) -> torch.Tensor | None:
        """None when no row needs masking: one row per sequence, all at the newest position
        (every cached key is visible), the usual decode step."""
        if "needs_mask" not in self._cache:
            self._cache["needs_mask"] = self.pos.shape[1] > 1 or bool(
                (self.pos != self.max_pos).any()
            )
        return self.attention_mask() if self._cache["needs_mask"] else None

    def key_limits(self) -> torch.Tensor | None:
        """[b, n] keys visible to each row (its position + 1), or None where every row sees
        every cached key: the mask as the C attention takes it (rows_kernel.attention)."""
        if "limits" not in self._cache:
            masked = self.attention_mask_or_none() is not None
            self._cache["limits"] = (self.pos + 1).contiguous() if masked else None
        return self._cache["limits"]

    def rows_slice(self) -> slice | None:
        """The cache rows as a slice when seq_idx is a run of consecutive rows (a view
        instead of an advanced-indexing copy of every layer's cache)."""
        if "rows" not in self._cache:
            idx = self.seq_idx.tolist()
            run = idx == list(range(idx[0], idx[0] + len(idx))) if idx else False
            self._cache["rows"] = slice(idx[0], idx[0] + len(idx)) if run else None
        return self._cache["rows"]

    def step_index(self) -> tuple:
        """The KV-cache indices of a layer step (see `_attn_part`): (write sequences,
        write positions, source entries or None for all, read rows or None, first read
        row, key length)."""
        if "step" not in self._cache:
            rows, cols, seq, pos = self.valid_index()
            w_rows = None if bool(self.valid.all()) else (rows, cols)
            run = self.rows_slice()
            r_seq, r_start = (None, run.start) if run is not None else (self.seq_idx, 0)
            self._cache["step"] = (seq, pos, w_rows, r_seq, r_start, self.max_pos + 1)
        return self._cache["step"]

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
class StepConfig:
    """The static part of a lean layer (same for every layer of a model: one compiled graph)."""

    heads: int  # attention heads on this TP rank
    groups: int  # KV groups on this TP rank
    head_dim: int
    scale: float | None
    gated: bool
    act: object
    rms_norm: bool  # RMSNorm, else LayerNorm
    norm_shape: tuple[int, ...]
    eps1: float | None
    eps2: float | None


class StepWeights(NamedTuple):
    """The layer's parameters (None: no bias / no norm bias)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor | None
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor | None
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor | None
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor | None
    # Column-major copies of the wide weights for 1-3-row chunks (projection.column_major),
    # filled per call so that a compiled step gets them as inputs; None: F.linear.
    qkv_t: torch.Tensor | None = None
    fc1_t: torch.Tensor | None = None


@dataclass(frozen=True)
class LeanLayer:
    cfg: StepConfig
    w: StepWeights
    tp_group: object  # tensor-parallel group of the row-parallel reductions
    tp: int


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
    ln1, ln2 = layer.input_layernorm, layer.pre_mlp_layernorm
    if type(ln1) is not type(ln2):
        return None
    qkv, proj, fc1, fc2 = attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2
    cfg_ = StepConfig(
        heads=attn.num_attention_heads_per_partition,
        groups=attn.num_query_groups_per_partition,
        head_dim=attn.hidden_size_per_attention_head,
        scale=getattr(attn.core_attention, "softmax_scale", None),
        gated=cfg.gated_linear_unit,
        act=cfg.activation_func,
        rms_norm=isinstance(ln1, torch.nn.RMSNorm),
        norm_shape=tuple(ln1.normalized_shape),
        eps1=ln1.eps,
        eps2=ln2.eps,
    )
    w = StepWeights(
        ln1.weight, getattr(ln1, "bias", None), qkv.weight, qkv.bias, proj.weight, proj.bias,
        ln2.weight, getattr(ln2, "bias", None), fc1.weight, fc1.bias, fc2.weight, fc2.bias,
    )  # fmt: skip
    return LeanLayer(cfg_, w, proj.tp_group, torch.distributed.get_world_size(proj.tp_group))


def _norm(c: StepConfig, x: torch.Tensor, w, b, eps) -> torch.Tensor:
    if c.rms_norm:
        return F.rms_norm(x, c.norm_shape, w, eps)
    return F.layer_norm(x, c.norm_shape, w, b, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding on the first cos.shape[-1] channels of x."""
    d = cos.shape[-1]
    r, rest = x[..., :d], x[..., d:]
    x1, x2 = r.chunk(2, dim=-1)
    out = r * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


# The step is split at the two tensor-parallel reductions (row-parallel outputs are summed
# over TP ranks before their bias) into pure tensor functions: `_attn_part` (norm, QKV,
# RoPE, KV write, attention, output projection) and `_mlp_part`; `_layer_step` is both
# with TP = 1. Pure functions of tensors (parameters are arguments, not module state) so
# that one torch.compile'd graph serves every layer of every model with the same shapes.


def _attn_part(
    c: StepConfig,
    w: StepWeights,
    hidden: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    w_seq: torch.Tensor,
    w_pos: torch.Tensor,
    w_rows: tuple[torch.Tensor, torch.Tensor] | None,
    r_seq: torch.Tensor | None,
    r_start: int,
    length: int,
    mask: torch.Tensor | None,
    seq_rows: torch.Tensor,
    limits: torch.Tensor | None,
) -> torch.Tensor:
    """Attention half of a layer on hidden [n, b, h]: the output projection before its TP
    sum and bias. K/V of rows (w_seq, w_pos) are written (w_rows: the (b, j) chunk entries
    they come from; None = every entry, row-major); keys [0, length) of the cache rows
    r_seq (None: the run r_start.. of b rows) are attended, under `mask` [b, 1, n, T].
    seq_rows [b] and limits [b, n] say the same for the C attention (Chunk.key_limits)."""
    n, b = hidden.shape[0], hidden.shape[1]
    g, d, per = c.groups, c.head_dim, c.heads // c.groups
    x = _norm(c, hidden, w.ln1_w, w.ln1_b, c.eps1)
    mixed = project(x, w.qkv_w, w.qkv_b, w.qkv_t).view(n, b, g, per + 2, d)
    qk, v = mixed[:, :, :, : per + 1], mixed[:, :, :, per + 1]  # a group's heads, then K, V
    if cos is not None:  # one RoPE call for the queries and keys of every group
        qk = _rope(qk, cos.unsqueeze(2), sin.unsqueeze(2))
    q, k = qk[:, :, :, :per].reshape(n, b, c.heads, d), qk[:, :, :, per]
    if w_rows is None:  # [n, b, g, d] -> [b * n, g, d] in (b, j) order
        k_new, v_new = k.transpose(0, 1).reshape(-1, g, d), v.transpose(0, 1).reshape(-1, g, d)
    else:
        k_new, v_new = k[w_rows[1], w_rows[0]], v[w_rows[1], w_rows[0]]
    k_cache.index_put_((w_seq, w_pos), k_new.to(k_cache.dtype))
    v_cache.index_put_((w_seq, w_pos), v_new.to(v_cache.dtype))
    scale = c.scale if c.scale is not None else d**-0.5
    q = q.contiguous()  # a view (not a copy) with one KV group; the C attention takes rows
    if torch.compiler.is_compiling():  # the kernel as an op (dynamo cannot trace ctypes)
        if rows_kernel.attention_in_graph(q, k_cache):
            ctx = torch.ops.ee_megatron.decode_attention(
                q, k_cache, v_cache, seq_rows, limits, length, scale
            )
            return project(ctx.view(n, b, c.heads * d), w.proj_w)
    else:
        ctx = rows_kernel.attention(q, k_cache, v_cache, seq_rows, limits, length, scale)
        if ctx is not None:  # a decode step on one thread: [n, b, heads, d]
            return project(ctx.view(n, b, c.heads * d), w.proj_w)
    if r_seq is None:
        kc, vc = k_cache[r_start : r_start + b, :length], v_cache[r_start : r_start + b, :length]
    else:
        kc, vc = k_cache[r_seq, :length], v_cache[r_seq, :length]
    return project(_sdpa(q, kc, vc, mask, scale).reshape(n, b, c.heads * d), w.proj_w)


def _sdpa(q, kc, vc, mask, scale: float) -> torch.Tensor:
    """q [n, b, heads, d] over kc, vc [b, T, groups, d] (each sequence's keys), under mask
    [b, 1, n, T] (None: every key): [n, b, heads, d]. Grouped-query attention as one fused
    call per KV group: the `per` query heads of a group and the chunk's n rows share the
    group's keys (no repeat_interleave); one SDPA call instead of product, scale, mask,
    softmax, product."""
    n, b, heads, d = q.shape
    g = kc.shape[2]
    per = heads // g
    qg = q.view(n, b, g, per, d).permute(1, 2, 3, 0, 4).reshape(b, g, per * n, d)
    if mask is not None:  # [b, 1, n, T] -> [b, 1, per * n, T], rows in (head, position) order
        mask = mask.unsqueeze(2).expand(b, 1, per, n, mask.shape[-1]).reshape(b, 1, per * n, -1)
    ctx = F.scaled_dot_product_attention(
        qg,
        kc.permute(0, 2, 1, 3).to(q.dtype),  # [b, g, T, d]
        vc.permute(0, 2, 1, 3).to(q.dtype),
        attn_mask=mask,
        scale=scale,
    )  # [b, g, per * n, d]
    return ctx.view(b, g, per, n, d).permute(3, 0, 1, 2, 4).reshape(n, b, heads, d)


@torch.library.custom_op("ee_megatron::decode_attention", mutates_args=(), device_types="cpu")
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_rows: torch.Tensor,
    limits: torch.Tensor | None,
    length: int,
    scale: float,
) -> torch.Tensor:
    """The C attention as an op a compiled step can call (rows_kernel.attention_in_graph),
    deciding at run time like the eager step: torch's SDPA where the kernel declines."""
    ctx = rows_kernel.attention(q, k_cache, v_cache, seq_rows, limits, length, scale)
    if ctx is not None:
        return ctx
    mask = None if limits is None else rows_kernel.visible_keys(limits, length)
    out = _sdpa(q, k_cache[seq_rows, :length], v_cache[seq_rows, :length], mask, scale)
    return out.contiguous()  # the strides the fake (empty_like) promised


@decode_attention.register_fake
def _(q, k_cache, v_cache, seq_rows, limits, length, scale):
    return torch.empty_like(q)


def _mlp_part(
    c: StepConfig, w: StepWeights, hidden: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden after the attention residual, the MLP output before its TP sum and bias)."""
    if w.proj_b is not None:
        attn = attn + w.proj_b
    hidden = hidden + attn
    h = project(_norm(c, hidden, w.ln2_w, w.ln2_b, c.eps2), w.fc1_w, w.fc1_b, w.fc1_t)
    if c.gated:
        gate, lin = h.chunk(2, dim=-1)
        h = c.act(gate) * lin
    else:
        h = c.act(h)
    return hidden, project(h, w.fc2_w)


def _finish(w: StepWeights, hidden: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    return hidden + (mlp if w.fc2_b is None else mlp + w.fc2_b)


def _layer_step(c: StepConfig, w: StepWeights, hidden: torch.Tensor, *attn_args) -> torch.Tensor:
    """The whole layer with TP = 1 (no reductions): one graph when compiled."""
    hidden, mlp = _mlp_part(c, w, hidden, _attn_part(c, w, hidden, *attn_args))
    return _finish(w, hidden, mlp)


def _kernel_takes(steps, rows: int, hidden: torch.Tensor, w: StepWeights) -> bool:
    """Whether the C rows kernel computes this step's products: then it needs no column-major
    copies (nor their memory: about 280 MB for SmolLM2-135M's layers)."""
    if steps is _EAGER:
        return bool(rows_kernel.plan(rows, hidden, w.qkv_w, w.qkv_b))
    rows_kernel.kernel()  # compiled graphs call it when it is loaded (in_graph)
    single = torch.get_num_threads() == 1  # the op computes a layer's product on one thread
    return single and rows_kernel.in_graph(rows, hidden, w.qkv_w)


def lean_layer_forward(
    p: LeanLayer, hidden: torch.Tensor, chunk: Chunk, cache: KVCache, freqs
) -> torch.Tensor:
    cos = sin = None
    if freqs is not None:
        cos, sin = chunk.rope(freqs, hidden.dtype)
    args = (
        cos, sin, cache.k, cache.v, *chunk.step_index(), chunk.attention_mask_or_none(),
        chunk.seq_idx, chunk.key_limits(),
    )  # fmt: skip
    steps = _STEPS.get()
    w = p.w
    rows = hidden.shape[0] * hidden.shape[1]
    if rows <= MAX_COLUMN_ROWS and not _kernel_takes(steps, rows, hidden, w):
        w = w._replace(qkv_t=column_major(w.qkv_w), fc1_t=column_major(w.fc1_w))
    if p.tp == 1:
        return steps.layer(p.cfg, w, hidden, *args)
    attn = reduce_from_tensor_model_parallel_region(
        steps.attn(p.cfg, w, hidden, *args), group=p.tp_group
    )
    hidden, mlp = steps.mlp(p.cfg, w, hidden, attn)
    return _finish(w, hidden, reduce_from_tensor_model_parallel_region(mlp, group=p.tp_group))


# ------------------------------------------------------------------ compiled step
# `compile_mode` "inductor": the step functions above go through torch.compile (inductor
# C++ on CPU), dynamic shapes so that neither the cache length nor the chunk size
# recompiles; the graphs are built on the first decode of the process (tens of seconds on
# a CPU) and reused by every layer, request and engine after that. Any failure (no C++
# compiler, a dynamo error) falls back to the eager functions with one log line.

log = logging.getLogger(__name__)
COMPILE_MODES = ("none", "inductor")


class _Steps:
    def __init__(self, layer, attn, mlp):
        self.layer, self.attn, self.mlp = layer, attn, mlp


_EAGER = _Steps(_layer_step, _attn_part, _mlp_part)


class _StepRegistry:
    """Which step functions lean_layer_forward calls: eager, or compiled once per process."""

    def __init__(self):
        self.mode = "none"
        self._compiled: _Steps | None = None
        self.failed: str | None = None  # why compiling was given up (logged once)

    def set_mode(self, mode: str) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"inference compile mode {mode!r}: expected one of {COMPILE_MODES}")
        if mode != self.mode:  # the compiled functions are kept: switching back reuses them
            self.mode, self.failed = mode, None

    def get(self) -> _Steps:
        if self.mode == "none" or self.failed is not None:
            return _EAGER
        if self._compiled is None:
            self._compiled = _Steps(
                *(self._guarded(f) for f in (_layer_step, _attn_part, _mlp_part))
            )
        return self._compiled

    def _guarded(self, fn):
        compiled = None

        def call(*args):
            nonlocal compiled
            if self.failed is None:
                try:
                    if compiled is None:
                        rows_kernel.kernel()  # loaded before tracing: graphs call it (in_graph)
                        # One graph per (StepConfig, mask/RoPE/bias presence): a process with
                        # several models (tests, exit blocks) needs more than dynamo's default 8.
                        limit = torch._dynamo.config.recompile_limit
                        torch._dynamo.config.recompile_limit = max(limit, 64)
                        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
                    return compiled(*args)
                except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager
                    self.failed = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    )
                    log.warning(
                        "inference compile failed (%s); decoding with the eager step", self.failed
                    )
            return fn(*args)

        return call


_STEPS = _StepRegistry()


def set_compile_mode(mode: str) -> None:
    """ "none" (eager step) or "inductor" (torch.compile'd step, eager on failure)."""
    _STEPS.set_mode(mode)
