"""HF config.json <-> our model flags (argparse dest names, as in `ee_args.json`).

Supported (import and export):
* Llama family, model_type "llama" (RMSNorm, RoPE, SwiGLU, GQA, tied or untied embeddings,
  no biases or biases everywhere; RoPE scaling "llama3" as megatron-core implements it);
* "mistral": Llama plus a sliding window, imported only when no sequence can exceed the
  window (max_position_embeddings <= sliding_window), where it changes nothing; exported
  back as Llama (the same computation);
* "qwen2" (Qwen2/2.5): Llama plus biases on q/k/v only (`--add-qkv-bias`);
* "qwen3": Llama plus per-head RMSNorm of queries and keys (`--qk-layernorm`), head_dim
  independent of hidden/heads (`--kv-channels`);
* "gpt2": learned positions, LayerNorm, biases, GELU exact ("gelu") or tanh-approximated
  ("gelu_new", "gelu_pytorch_tanh", "gelu_fast": `--openai-gelu`), tied or untied.
Anything that would compute something else (other RoPE scalings, llama3 scaling with other
than megatron-core's fixed low/high-frequency factors and original context, MoE, partial
biases, a window shorter than the context, ...) is refused with a ConversionError rather
than converted wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from megatron.early_exit.convert.errors import ConversionError

LLAMA, MISTRAL, QWEN2, QWEN3, GPT2 = "llama", "mistral", "qwen2", "qwen3", "gpt2"
SUPPORTED = (LLAMA, MISTRAL, QWEN2, QWEN3, GPT2)
ROPE_FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3)
# megatron-core 0.16.1's RotaryEmbedding takes only the llama3 `factor`; these are fixed in
# its _apply_scaling (the values of Llama 3.1/3.2/3.3).
LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Training sequence length written into converted checkpoints (a training choice; the
# model's own limit is max_position_embeddings).
DEFAULT_SEQ_LENGTH = 2048
_EXACT_GELU = ("gelu",)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class HFArch:
    family: str  # one of SUPPORTED
    flags: dict[str, Any]  # our model flags (dest names)
    config: dict[str, Any]  # the HF config.json


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(
            f"{hf_dir!r} is not a directory (expected a Hugging Face model folder)"
        )
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir!r} has no config.json: not a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return config


def _get(config: dict, key: str, default: Any = None, required: bool = True) -> Any:
    if key in config and config[key] is not None:
        return config[key]
    if required and default is None:
        raise ConversionError(f"config.json lacks {key!r}")
    return default


def _rope_flags(config: dict) -> dict[str, Any]:
    """rotary_base / use_rope_scaling / rope_scaling_factor for an HF config (either the
    `rope_parameters` of transformers >= 5 or the older `rope_scaling` + `rope_theta`)."""
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    flags: dict[str, Any] = {"use_rope_scaling": False, "rope_scaling_factor": 8.0}
    if rope_type == "llama3":
        for key, want in LLAMA3_FIXED.items():
            got = params.get(key)
            if got is None or float(got) != float(want):
                raise ConversionError(
                    f"RoPE scaling 'llama3' with {key}={got} is not supported: megatron-core "
                    f"0.16.1 fixes it at {want} (only `factor` is configurable)"
                )
        if float(params.get("attention_factor") or 1.0) != 1.0:
            raise ConversionError(
                "RoPE scaling 'llama3' with attention_factor != 1 is not supported"
            )
        flags.update(use_rope_scaling=True, rope_scaling_factor=float(_get(params, "factor")))
    elif rope_type != "default":
        raise ConversionError(
            f"RoPE scaling {rope_type!r} is not supported (only plain RoPE and 'llama3')"
        )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta {theta} is not an integer (--rotary-base is an int)")
    flags["rotary_base"] = int(theta)
    return flags


def _window(config: dict, family: str) -> int | None:
    """The sliding window some layers use, or None."""
    window = config.get("sliding_window")
    if family == MISTRAL:
        return window
    if family in (QWEN2, QWEN3):
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or "sliding_attention" in layer_types:
            return window
    return None


def _common_checks(config: dict) -> None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
        if config.get(key):
            raise ConversionError(f"mixture-of-experts models are not supported ({key} is set)")


def flags_from_hf(config: dict[str, Any], max_positions: int | None = None) -> HFArch:
    """Our model flags for an HF config; ConversionError if we cannot compute the same.

    `max_positions` caps max_position_embeddings (e.g. to import a sliding-window model
    limited to its window)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    _common_checks(config)
    if model_type == GPT2:
        flags = _gpt2_flags(config)
    else:
        flags = _rope_family_flags(config, model_type)
    if max_positions:
        if max_positions > flags["max_position_embeddings"]:
            raise ConversionError(
                f"--max-position-embeddings {max_positions} exceeds the model's "
                f"{flags['max_position_embeddings']}"
            )
        flags["max_position_embeddings"] = max_positions
        flags["seq_length"] = min(flags["seq_length"], max_positions)
    window = _window(config, model_type)
    if window is not None and int(window) < flags["max_position_embeddings"]:
        raise ConversionError(
            f"sliding_window {window} < max_position_embeddings "
            f"{flags['max_position_embeddings']}: longer sequences would attend differently and "
            "our attention has no window (megatron-core 0.16.1's local attention builds its "
            f"window mask on CUDA only); pass --max-position-embeddings {window} to import the "
            "model limited to its window"
        )
    return HFArch(model_type, flags, config)


def _rope_family_flags(c: dict, family: str) -> dict[str, Any]:
    hidden = _get(c, "hidden_size")
    heads = _get(c, "num_attention_heads")
    kv_heads = _get(c, "num_key_value_heads", heads)
    head_dim = _get(c, "head_dim", hidden // heads)
    act = _get(c, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(
            f"hidden_act {act!r} is not supported for {family} (only silu/SwiGLU)"
        )
    attn_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
    qkv_bias = False
    if family == QWEN2:  # q/k/v biases always, none elsewhere
        attn_bias = mlp_bias = False
        qkv_bias = True
    elif family == QWEN3 and attn_bias:
        raise ConversionError(
            "qwen3 with attention_bias=True is not supported: our model has biases on every "
            "linear layer or on q/k/v only"
        )
    if attn_bias != mlp_bias:
        raise ConversionError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: our model "
            "has biases on every linear layer or on none"
        )
    if c.get("pretraining_tp", 1) not in (1, None):
        raise ConversionError("pretraining_tp != 1 is not supported")
    if float(c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported")
    max_pos = int(_get(c, "max_position_embeddings", DEFAULT_SEQ_LENGTH))
    flags = dict(
        num_layers=_get(c, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=_get(c, "intermediate_size"),
        kv_channels=head_dim if head_dim * heads != hidden else None,
        seq_length=min(max_pos, DEFAULT_SEQ_LENGTH),
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        norm_epsilon=float(_get(c, "rms_norm_eps", 1e-6)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        swiglu=True,
        openai_gelu=False,
        group_query_attention=kv_heads != heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
        disable_bias_linear=not attn_bias,
        add_qkv_bias=qkv_bias,
        qk_layernorm=family == QWEN3,
        hidden_dropout=0.0,
        attention_dropout=float(c.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(c.get("initializer_range", 0.02)),
        vocab_size=_get(c, "vocab_size"),
        **_rope_flags(c),
    )
    return flags


def _gpt2_flags(c: dict) -> dict[str, Any]:
    act = c.get("activation_function", "gelu_new")
    if act not in _EXACT_GELU + _TANH_GELU:
        raise ConversionError(
            f"activation_function {act!r} is not supported (only {_EXACT_GELU + _TANH_GELU})"
        )
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("GPT-2 attention-scaling variants are not supported")
    if c.get("add_cross_attention"):
        raise ConversionError("GPT-2 with cross attention is not supported")
    hidden = _get(c, "n_embd")
    n_pos = int(_get(c, "n_positions"))
    return dict(
        num_layers=_get(c, "n_layer"),
        hidden_size=hidden,
        num_attention_heads=_get(c, "n_head"),
        ffn_hidden_size=c.get("n_inner") or 4 * hidden,
        kv_channels=None,
        seq_length=n_pos,
        max_position_embeddings=n_pos,
        normalization="LayerNorm",
        norm_epsilon=float(_get(c, "layer_norm_epsilon", 1e-5)),
        position_embedding_type="learned_absolute",
        rotary_base=10000,
        rotary_percent=1.0,
        use_rope_scaling=False,
        rope_scaling_factor=8.0,
        swiglu=False,
        openai_gelu=act in _TANH_GELU,
        group_query_attention=False,
        num_query_groups=None,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True),
        disable_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(c.get("initializer_range", 0.02)),
        vocab_size=_get(c, "vocab_size"),
    )


def family_of(flags: dict[str, Any]) -> str:
    """Which HF family our model flags correspond to (for export)."""
    f = flags
    bias = not f.get("disable_bias_linear")
    qkv_bias, qk_norm = bool(f.get("add_qkv_bias")), bool(f.get("qk_layernorm"))
    rope_style = (
        f.get("normalization") == "RMSNorm"
        and f.get("position_embedding_type") == "rope"
        and f.get("swiglu")
        and float(f.get("rotary_percent", 1.0)) == 1.0
    )
    gpt2 = (
        f.get("normalization") == "LayerNorm"
        and f.get("position_embedding_type") == "learned_absolute"
        and not f.get("swiglu")
        and bias
        and not qk_norm
        and not f.get("group_query_attention")
        and f.get("kv_channels") in (None, f["hidden_size"] // f["num_attention_heads"])
    )
    if rope_style and qk_norm and not bias and not qkv_bias:
        return QWEN3
    if rope_style and not qk_norm and qkv_bias and not bias:
        return QWEN2
    if rope_style and not qk_norm:  # (qkv bias with all biases is all biases)
        return LLAMA
    if gpt2:
        return GPT2
    raise ConversionError(
        "this checkpoint's architecture has no Hugging Face equivalent we export to: need "
        "Llama style (RMSNorm + rope + swiglu; Qwen2: + q/k/v biases only; Qwen3: + QK "
        "norm, no biases) or GPT-2 style (LayerNorm + learned positions + GELU + biases)"
    )


def _rope_parameters(f: dict[str, Any]) -> dict[str, Any]:
    theta = float(f.get("rotary_base", 10000))
    if not f.get("use_rope_scaling"):
        return {"rope_type": "default", "rope_theta": theta}
    return {
        "rope_type": "llama3",
        "factor": float(f.get("rope_scaling_factor", 8.0)),
        **{k: float(v) if k != "original_max_position_embeddings" else v
           for k, v in LLAMA3_FIXED.items()},
        "rope_theta": theta,
    }  # fmt: skip


_ARCHITECTURES = {
    LLAMA: "LlamaForCausalLM",
    QWEN2: "Qwen2ForCausalLM",
    QWEN3: "Qwen3ForCausalLM",
    GPT2: "GPT2LMHeadModel",
}


def hf_config_from_flags(flags: dict[str, Any], specials: dict[str, int | None]) -> dict[str, Any]:
    """A config.json for the transformers class computing what our model does."""
    f = flags
    family = family_of(f)
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    ffn = f.get("ffn_hidden_size") or (4 * hidden)
    max_pos = f.get("max_position_embeddings") or f["seq_length"]
    tied = not f.get("untie_embeddings_and_output_weights", False)
    common = dict(
        architectures=[_ARCHITECTURES[family]],
        model_type=family,
        vocab_size=f["vocab_size"],
        bos_token_id=specials.get("bos"),
        eos_token_id=specials.get("eos"),
        pad_token_id=specials.get("pad"),
        torch_dtype="float32",
        initializer_range=f.get("init_method_std", 0.02),
        tie_word_embeddings=tied,
        use_cache=True,
    )
    if family == GPT2:
        return dict(
            n_embd=hidden,
            n_head=heads,
            n_layer=f["num_layers"],
            n_inner=ffn,
            n_positions=max_pos,
            n_ctx=max_pos,
            activation_function="gelu_new" if f.get("openai_gelu") else "gelu",
            layer_norm_epsilon=f.get("norm_epsilon", 1e-5),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
            **common,
        )
    groups = f["num_query_groups"] if f.get("group_query_attention") else heads
    rope = _rope_parameters(f)
    config = dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=f["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=f.get("kv_channels") or hidden // heads,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=f.get("norm_epsilon", 1e-5),
        rope_theta=rope["rope_theta"],
        rope_parameters=rope,
        attention_dropout=0.0,
        **common,
    )
    if family == LLAMA:
        bias = not f.get("disable_bias_linear", False)
        config.update(attention_bias=bias, mlp_bias=bias)
    elif family == QWEN3:
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config
