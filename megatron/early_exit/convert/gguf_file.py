"""GGUF (llama.cpp) -> Hugging Face folder: dequantized float32 weights, config.json,
and a tokenizer.json rebuilt from the file's tokenizer metadata.

Supported: general.architecture "llama" (e.g. SmolLM2), "qwen2" (Qwen2/2.5: q/k/v biases),
"qwen3" (q/k norms, head_dim from attention.key_length) and "gpt2" (tanh GELU, Conv1D
weights transposed back), with a byte-level BPE
tokenizer (tokenizer.ggml.model "gpt2"; pre-tokenizers GPT-2, SmolLM, Qwen2, Llama 3).
llama.cpp's converter permutes the rows of Llama's attn_q/attn_k from HF's rotate-half
RoPE layout to its interleaved one; we invert that (Qwen tensors are not permuted).
Refused: other architectures, RoPE scaling (llama.cpp stores Llama 3.1's as a
`rope_freqs` tensor), MoE.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from megatron.early_exit.convert.errors import ConversionError
from megatron.early_exit.convert.hf_files import atomic_dir, write_json, write_safetensors
from megatron.early_exit.progress import progress

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# general.architecture -> (HF model_type, class, Q/K rows permuted by llama.cpp)
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
    "gpt2": ("gpt2", "GPT2LMHeadModel", False),
}
# GPT-2: llama.cpp stores the Conv1D weights transposed ([out, in], as nn.Linear) and a
# copy of the tied embedding as `output`.
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TOP = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp pre-tokenizer names we can rebuild: GPT-2's regex (ByteLevel's own), SmolLM's
# (digits one by one, then GPT-2's), and the regex splits of Qwen2 and Llama 3 (the
# `pretokenizer` patterns of their tokenizer.json files).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_SPLIT_REGEX = {"qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}
_PRE_TOKENIZERS = ("default", "gpt2", "smollm", *_SPLIT_REGEX)
_CONTROL, _USER_DEFINED = 3, 4


def _reader(path: str):
    if not os.path.isfile(path):
        raise ConversionError(f"GGUF file {path!r} does not exist")
    try:
        import gguf
    except ImportError as exc:
        raise ConversionError(f"GGUF conversion needs the `gguf` package ({exc})") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors on bad files
        raise ConversionError(f"{path} is not a readable GGUF file ({exc})") from None


def _meta(reader, key: str, default: Any = None, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise ConversionError(f"the GGUF file lacks metadata {key!r}")
        return default
    return field.contents()


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(HF config dict, HF-named float32 tensors, tokenizer metadata)."""
    import gguf

    r = _reader(path)
    arch = _meta(r, "general.architecture")
    if arch not in _ARCHS:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported (only {', '.join(_ARCHS)})"
        )
    model_type, architecture, permuted = _ARCHS[arch]
    p = f"{arch}."
    heads = int(_meta(r, p + "attention.head_count"))
    kv_heads = int(_meta(r, p + "attention.head_count_kv", heads))
    hidden = int(_meta(r, p + "embedding_length"))
    if _meta(r, p + "expert_count", 0, required=False):
        raise ConversionError("mixture-of-experts GGUF models are not supported")
    if _meta(r, p + "rope.scaling.type", "none", required=False) not in ("none", None):
        raise ConversionError("GGUF models with RoPE scaling are not supported")
    tensors: dict[str, torch.Tensor] = {}
    for t in progress(r.tensors, desc="dequantize GGUF", unit="tensor"):
        if t.name == "rope_freqs.weight":
            raise ConversionError(
                "GGUF models with RoPE frequency factors (rope_freqs, Llama 3.1 scaling) are "
                "not supported; convert the Hugging Face folder instead"
            )
        name = _gpt2_name(t.name) if arch == "gpt2" else _hf_name(t.name)
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ConversionError(
                f"cannot dequantize {t.name} ({t.tensor_type.name}): {exc}"
            ) from None
        w = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(
            [int(n) for n in reversed(t.shape)]
        )
        if arch == "gpt2" and name.startswith("transformer.h.") and w.dim() == 2:
            w = w.t().contiguous()  # back to Conv1D's [in, out] (norms and biases are 1-D)
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, kv_heads)
        tensors[name] = w
    tokens = list(_meta(r, "tokenizer.ggml.tokens"))
    embed = tensors.get("model.embed_tokens.weight", tensors.get("transformer.wte.weight"))
    if embed is None:
        raise ConversionError("the GGUF file has no token_embd.weight")
    if embed.shape[0] != len(tokens):
        raise ConversionError(
            f"token_embd has {embed.shape[0]} rows but the tokenizer has {len(tokens)} tokens"
        )
    head_dim = int(
        _meta(r, p + "attention.key_length", None, required=False)
        or _meta(r, p + "rope.dimension_count", hidden // heads, required=False)
    )
    tok = {
        "model": _meta(r, "tokenizer.ggml.model"),
        "pre": _meta(r, "tokenizer.ggml.pre", "default", required=False),
        "tokens": tokens,
        "token_type": list(_meta(r, "tokenizer.ggml.token_type", [], required=False)),
        "merges": list(_meta(r, "tokenizer.ggml.merges", [], required=False)),
        "chat_template": _meta(r, "tokenizer.chat_template", "", required=False) or None,
        "add_bos_token": bool(_meta(r, "tokenizer.ggml.add_bos_token", False, required=False)),
    }
    for key in ("bos", "eos", "unknown", "padding"):
        value = _meta(r, f"tokenizer.ggml.{key}_token_id", -1, required=False)
        tok[f"{key}_id"] = int(value) if value is not None and int(value) >= 0 else None
    num_layers = int(_meta(r, p + "block_count"))
    if arch == "gpt2":
        return _gpt2_config(r, p, tensors, tok), tensors, tok
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(_meta(r, p + "feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(r, p + "context_length", 2048, required=False)),
        "rms_norm_eps": float(_meta(r, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(r, p + "rope.freq_base", 10000.0, required=False)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_meta(r, p + "rope.freq_base", 10000.0, required=False)),
        },
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": tok["bos_id"],
        "eos_token_id": tok["eos_id"],
        "pad_token_id": tok["padding_id"],
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "qwen3":
        config["attention_bias"] = False
    return config, tensors, tok


def _gpt2_config(r, p: str, tensors: dict, tok: dict) -> dict[str, Any]:
    wte, out = tensors["transformer.wte.weight"], tensors.get("lm_head.weight")
    tied = out is None or torch.equal(out, wte)
    if tied:
        tensors.pop("lm_head.weight", None)
    n_pos = int(_meta(r, p + "context_length"))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": len(tok["tokens"]),
        "n_embd": int(_meta(r, p + "embedding_length")),
        "n_inner": int(_meta(r, p + "feed_forward_length")),
        "n_layer": int(_meta(r, p + "block_count")),
        "n_head": int(_meta(r, p + "attention.head_count")),
        "n_positions": n_pos,
        "n_ctx": n_pos,
        "activation_function": "gelu_new",  # ggml_gelu is the tanh approximation
        "layer_norm_epsilon": float(_meta(r, p + "attention.layer_norm_epsilon")),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": tied,
        "bos_token_id": tok["bos_id"],
        "eos_token_id": tok["eos_id"],
        "pad_token_id": tok["padding_id"],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _gpt2_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GPT2_LAYER:
        return f"transformer.h.{parts[1]}.{_GPT2_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GPT2_TOP:
        return f"{_GPT2_TOP[parts[0]]}.{parts[1]}"
    raise ConversionError(f"GGUF tensor {gguf_name!r} has no GPT-2 equivalent")


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ConversionError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent (unsupported variant)"
    )


def build_tokenizer_json(tok: dict[str, Any]):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's byte-level BPE tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if tok["model"] != "gpt2":
        raise ConversionError(
            f"GGUF tokenizer model {tok['model']!r} is not supported (only byte-level BPE 'gpt2')"
        )
    if tok["pre"] not in _PRE_TOKENIZERS:
        raise ConversionError(
            f"GGUF pre-tokenizer {tok['pre']!r} is not supported ({', '.join(_PRE_TOKENIZERS)})"
        )
    if not tok["merges"]:
        raise ConversionError("the GGUF tokenizer has no merges")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if tok["pre"] == "smollm":  # llama.cpp: digits split one by one, then the GPT-2 regex
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif tok["pre"] in _SPLIT_REGEX:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[tok["pre"]]), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    types = tok["token_type"] or [1] * len(tok["tokens"])
    special = [t for t, k in zip(tok["tokens"], types) if k == _CONTROL]
    user = [t for t, k in zip(tok["tokens"], types) if k == _USER_DEFINED]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tk.get_vocab_size(with_added_tokens=True) != len(tok["tokens"]):
        raise ConversionError("rebuilt tokenizer's vocabulary size differs from the GGUF's")
    return tk


def tokenizer_config(tok: dict[str, Any], max_length: int) -> dict[str, Any]:
    tokens = tok["tokens"]
    name = {
        k: (tokens[tok[f"{k}_id"]] if tok[f"{k}_id"] is not None else None)
        for k in ("bos", "eos", "unknown", "padding")
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name["bos"],
        "eos_token": name["eos"],
        "unk_token": name["unknown"],
        "pad_token": name["padding"],
        "add_bos_token": tok["add_bos_token"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if tok.get("chat_template"):
        cfg["chat_template"] = tok["chat_template"]
    return {k: v for k, v in cfg.items() if v is not None}


def gguf_to_hf(path: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Write an HF folder for the GGUF model; returns its config.json."""
    config, tensors, tok = read_gguf(path)
    tokenizer = build_tokenizer_json(tok)
    max_length = config.get("max_position_embeddings") or config["n_positions"]
    tok_cfg = tokenizer_config(tok, max_length)
    with atomic_dir(out, overwrite) as staging:
        write_safetensors(tensors, os.path.join(staging, "model.safetensors"), {"format": "pt"})
        write_json(os.path.join(staging, "config.json"), config)
        gen = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config[k] is not None
        }
        write_json(os.path.join(staging, "generation_config.json"), gen)
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
        write_json(os.path.join(staging, "tokenizer_config.json"), tok_cfg)
        specials = {k: v for k, v in tok_cfg.items() if k.endswith("_token")}
        write_json(os.path.join(staging, "special_tokens_map.json"), specials)
    return config
