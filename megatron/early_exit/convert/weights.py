"""Full (unsharded) tensors: HF names/layouts <-> ours (megatron-core local spec, TP1PP1).

Layouts that differ:
* QKV: HF keeps q/k/v projections apart (GPT-2: one Conv1D [h, 3h] = [q | k | v]);
  megatron-core's fused `linear_qkv` is grouped by query group: for each group g,
  [q heads of g, k_g, v_g] rows.
* SwiGLU: HF gate_proj/up_proj; megatron-core `linear_fc1` = [gate; up] rows.
* GPT-2 Conv1D weights are [in, out]: transposed.
* Qwen2's q/k/v-only biases group like the weights; Qwen3's per-head q_norm/k_norm are
  megatron-core's q_layernorm/k_layernorm as they are.
RoPE needs no permutation: megatron-core's non-interleaved rotary (rotary_interleaved
False) is HF Llama's rotate_half layout. The vocabulary is not padded here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron.early_exit.convert.errors import ConversionError
from megatron.early_exit.convert.hf_arch import GPT2

WORD = "embedding.word_embeddings.weight"
POS = "embedding.position_embeddings.weight"
OUTPUT = "output_layer.weight"
# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _dims(flags: dict[str, Any]) -> tuple[int, int, int]:
    heads = flags["num_attention_heads"]
    groups = flags["num_query_groups"] if flags.get("group_query_attention") else heads
    head_dim = flags.get("kv_channels") or flags["hidden_size"] // heads
    return heads, groups, head_dim


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, d: int):
    rest = q.shape[1:]
    per = heads // groups
    parts = (
        q.reshape(groups, per * d, *rest),
        k.reshape(groups, d, *rest),
        v.reshape(groups, d, *rest),
    )
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * d, *rest).contiguous()


def split_qkv(w: torch.Tensor, heads: int, groups: int, d: int):
    rest = w.shape[1:]
    per = heads // groups
    q, k, v = w.reshape(groups, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return (
        q.reshape(heads * d, *rest).contiguous(),
        k.reshape(groups * d, *rest).contiguous(),
        v.reshape(groups * d, *rest).contiguous(),
    )


class _Source:
    """HF tensors by name; remembers what was used so leftovers can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ConversionError(f"the Hugging Face weights lack {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def check_all_used(self) -> None:
        left = sorted(
            n for n in self.tensors if n not in self.used and not n.endswith(_IGNORED_SUFFIXES)
        )
        if left:
            raise ConversionError(
                f"{len(left)} Hugging Face tensors do not fit the architecture in config.json, "
                f"e.g. {left[:3]} (unsupported variant or mismatched files)"
            )


def hf_to_ours(family: str, flags: dict[str, Any], hf: dict[str, torch.Tensor]) -> dict:
    src = _Source(hf)
    out = _gpt2_to_ours(flags, src) if family == GPT2 else _llama_to_ours(flags, src)
    src.check_all_used()
    return out


def ours_to_hf(family: str, flags: dict[str, Any], ours: dict[str, torch.Tensor]) -> dict:
    src = _Source({k: v for k, v in ours.items() if not k.endswith("_extra_state")})
    out = _ours_to_gpt2(flags, src) if family == GPT2 else _ours_to_llama(flags, src)
    src.check_all_used()
    return {k: v.contiguous() for k, v in out.items()}


def _layer(i: int) -> str:
    return f"decoder.layers.{i}."


# ----------------------------------------------------------------------------- Llama
def _suffixes(flags: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(suffixes of the QKV projection, of the other linear layers)."""
    bias = not flags.get("disable_bias_linear", False)
    rest = ("weight", "bias") if bias else ("weight",)
    qkv = ("weight", "bias") if bias or flags.get("add_qkv_bias") else ("weight",)
    return qkv, rest


def _llama_to_ours(flags: dict, src: _Source) -> dict:
    """Llama, Mistral, Qwen2, Qwen3 (same names; biases and QK norms as the flags say)."""
    heads, groups, d = _dims(flags)
    qkv_suffixes, suffixes = _suffixes(flags)
    out = {WORD: src.take("model.embed_tokens.weight")}
    for i in range(flags["num_layers"]):
        h, o = f"model.layers.{i}.", _layer(i)
        out[o + "input_layernorm.weight"] = src.take(h + "input_layernorm.weight")
        out[o + "pre_mlp_layernorm.weight"] = src.take(h + "post_attention_layernorm.weight")
        a, m = h + "self_attn.", h + "mlp."
        for suffix in qkv_suffixes:
            qkv = [src.take(f"{a}{p}_proj.{suffix}") for p in "qkv"]
            out[o + f"self_attention.linear_qkv.{suffix}"] = group_qkv(*qkv, heads, groups, d)
        if flags.get("qk_layernorm"):
            for p in "qk":
                out[o + f"self_attention.{p}_layernorm.weight"] = src.take(f"{a}{p}_norm.weight")
        for suffix in suffixes:
            out[o + f"self_attention.linear_proj.{suffix}"] = src.take(f"{a}o_proj.{suffix}")
            gate, up = src.take(f"{m}gate_proj.{suffix}"), src.take(f"{m}up_proj.{suffix}")
            out[o + f"mlp.linear_fc1.{suffix}"] = torch.cat([gate, up], dim=0)
            out[o + f"mlp.linear_fc2.{suffix}"] = src.take(f"{m}down_proj.{suffix}")
    out["decoder.final_layernorm.weight"] = src.take("model.norm.weight")
    if flags.get("untie_embeddings_and_output_weights"):
        out[OUTPUT] = src.take("lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")  # a tied copy some checkpoints store anyway
    return out


def _ours_to_llama(flags: dict, src: _Source) -> dict:
    heads, groups, d = _dims(flags)
    qkv_suffixes, suffixes = _suffixes(flags)
    out = {"model.embed_tokens.weight": src.take(WORD)}
    for i in range(flags["num_layers"]):
        h, o = f"model.layers.{i}.", _layer(i)
        out[h + "input_layernorm.weight"] = src.take(o + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = src.take(o + "pre_mlp_layernorm.weight")
        a, m = h + "self_attn.", h + "mlp."
        for suffix in qkv_suffixes:
            q, k, v = split_qkv(
                src.take(o + f"self_attention.linear_qkv.{suffix}"), heads, groups, d
            )
            out.update(
                {f"{a}q_proj.{suffix}": q, f"{a}k_proj.{suffix}": k, f"{a}v_proj.{suffix}": v}
            )
        if flags.get("qk_layernorm"):
            for p in "qk":
                out[f"{a}{p}_norm.weight"] = src.take(o + f"self_attention.{p}_layernorm.weight")
        for suffix in suffixes:
            out[f"{a}o_proj.{suffix}"] = src.take(o + f"self_attention.linear_proj.{suffix}")
            gate, up = src.take(o + f"mlp.linear_fc1.{suffix}").chunk(2, dim=0)
            out[f"{m}gate_proj.{suffix}"], out[f"{m}up_proj.{suffix}"] = gate, up
            out[f"{m}down_proj.{suffix}"] = src.take(o + f"mlp.linear_fc2.{suffix}")
    out["model.norm.weight"] = src.take("decoder.final_layernorm.weight")
    if flags.get("untie_embeddings_and_output_weights"):
        out["lm_head.weight"] = src.take(OUTPUT)
    return out


# ----------------------------------------------------------------------------- GPT-2
def _gpt2_prefix(src: _Source) -> str:
    return "transformer." if src.has("transformer.wte.weight") else ""


def _gpt2_to_ours(flags: dict, src: _Source) -> dict:
    heads, _, d = _dims(flags)
    p = _gpt2_prefix(src)
    out = {WORD: src.take(p + "wte.weight"), POS: src.take(p + "wpe.weight")}
    t: Callable[[torch.Tensor], torch.Tensor] = lambda w: w.t().contiguous()  # noqa: E731
    for i in range(flags["num_layers"]):
        h, o = f"{p}h.{i}.", _layer(i)
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for s in ("weight", "bias"):
                out[f"{o}{ours}.{s}"] = src.take(f"{h}{theirs}.{s}")
        qkv_w = t(src.take(h + "attn.c_attn.weight")).chunk(3, dim=0)
        qkv_b = src.take(h + "attn.c_attn.bias").chunk(3, dim=0)
        out[o + "self_attention.linear_qkv.weight"] = group_qkv(*qkv_w, heads, heads, d)
        out[o + "self_attention.linear_qkv.bias"] = group_qkv(*qkv_b, heads, heads, d)
        out[o + "self_attention.linear_proj.weight"] = t(src.take(h + "attn.c_proj.weight"))
        out[o + "self_attention.linear_proj.bias"] = src.take(h + "attn.c_proj.bias")
        out[o + "mlp.linear_fc1.weight"] = t(src.take(h + "mlp.c_fc.weight"))
        out[o + "mlp.linear_fc1.bias"] = src.take(h + "mlp.c_fc.bias")
        out[o + "mlp.linear_fc2.weight"] = t(src.take(h + "mlp.c_proj.weight"))
        out[o + "mlp.linear_fc2.bias"] = src.take(h + "mlp.c_proj.bias")
    out["decoder.final_layernorm.weight"] = src.take(p + "ln_f.weight")
    out["decoder.final_layernorm.bias"] = src.take(p + "ln_f.bias")
    if flags.get("untie_embeddings_and_output_weights"):
        out[OUTPUT] = src.take("lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")  # tied to wte
    return out


def _ours_to_gpt2(flags: dict, src: _Source) -> dict:
    heads, _, d = _dims(flags)
    p = "transformer."
    out = {p + "wte.weight": src.take(WORD), p + "wpe.weight": src.take(POS)}
    for i in range(flags["num_layers"]):
        h, o = f"{p}h.{i}.", _layer(i)
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for s in ("weight", "bias"):
                out[f"{h}{theirs}.{s}"] = src.take(f"{o}{ours}.{s}")
        q, k, v = split_qkv(src.take(o + "self_attention.linear_qkv.weight"), heads, heads, d)
        out[h + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()
        qb, kb, vb = split_qkv(src.take(o + "self_attention.linear_qkv.bias"), heads, heads, d)
        out[h + "attn.c_attn.bias"] = torch.cat([qb, kb, vb], dim=0)
        out[h + "attn.c_proj.weight"] = src.take(o + "self_attention.linear_proj.weight").t()
        out[h + "attn.c_proj.bias"] = src.take(o + "self_attention.linear_proj.bias")
        out[h + "mlp.c_fc.weight"] = src.take(o + "mlp.linear_fc1.weight").t()
        out[h + "mlp.c_fc.bias"] = src.take(o + "mlp.linear_fc1.bias")
        out[h + "mlp.c_proj.weight"] = src.take(o + "mlp.linear_fc2.weight").t()
        out[h + "mlp.c_proj.bias"] = src.take(o + "mlp.linear_fc2.bias")
    out[p + "ln_f.weight"] = src.take("decoder.final_layernorm.weight")
    out[p + "ln_f.bias"] = src.take("decoder.final_layernorm.bias")
    if flags.get("untie_embeddings_and_output_weights"):
        out["lm_head.weight"] = src.take(OUTPUT)
    return out
