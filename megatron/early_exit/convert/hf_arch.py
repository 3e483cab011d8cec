"""HF config.json <-> our model flags (argparse dest names, as in `ee_args.json`).

Supported: the Llama family (model_type "llama": RMSNorm, RoPE, SwiGLU, GQA, tied or
untied embeddings, no biases or biases everywhere) and the GPT-2 family (model_type
"gpt2": learned positions, LayerNorm, biases, GELU, tied embeddings). Anything that
would compute something else (RoPE scaling, MoE, partial biases, tanh-GELU while our
model has exact GELU, ...) is refused with a ConversionError rather than converted wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from megatron.early_exit.convert.errors import ConversionError

LLAMA, GPT2 = "llama", "gpt2"
SUPPORTED = (LLAMA, GPT2)
# Training sequence length written into converted checkpoints (a training choice; the
# model's own limit is max_position_embeddings).
DEFAULT_SEQ_LENGTH = 2048
_EXACT_GELU = ("gelu",)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class HFArch:
    family: str  # LLAMA or GPT2
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


def _rope_theta(config: dict) -> int:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConversionError(
            f"RoPE scaling {rope_type!r} is not supported (our model implements plain RoPE)"
        )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta {theta} is not an integer (--rotary-base is an int)")
    return int(theta)


def _common_checks(config: dict) -> None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
        if config.get(key):
            raise ConversionError(f"mixture-of-experts models are not supported ({key} is set)")


def flags_from_hf(config: dict[str, Any]) -> HFArch:
    """Our model flags for an HF config; ConversionError if we cannot compute the same."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)} "
            "(Llama family and GPT-2 family)"
        )
    _common_checks(config)
    if model_type == LLAMA:
        return HFArch(LLAMA, _llama_flags(config), config)
    return HFArch(GPT2, _gpt2_flags(config), config)


def _llama_flags(c: dict) -> dict[str, Any]:
    hidden = _get(c, "hidden_size")
    heads = _get(c, "num_attention_heads")
    kv_heads = _get(c, "num_key_value_heads", heads)
    head_dim = _get(c, "head_dim", hidden // heads)
    act = _get(c, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} is not supported for Llama (only silu/SwiGLU)")
    attn_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
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
        rotary_base=_rope_theta(c),
        rotary_percent=1.0,
        swiglu=True,
        group_query_attention=kv_heads != heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
        disable_bias_linear=not attn_bias,
        hidden_dropout=0.0,
        attention_dropout=float(c.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(c.get("initializer_range", 0.02)),
        vocab_size=_get(c, "vocab_size"),
    )
    return flags


def _gpt2_flags(c: dict) -> dict[str, Any]:
    act = c.get("activation_function", "gelu_new")
    if act in _TANH_GELU:
        raise ConversionError(
            f"activation_function {act!r} (tanh-approximated GELU) is not supported: our "
            "model uses exact GELU, so logits would differ; only activation_function 'gelu'"
        )
    if act not in _EXACT_GELU:
        raise ConversionError(f"activation_function {act!r} is not supported")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx"):
        raise ConversionError("GPT-2 attention-scaling variants are not supported")
    if c.get("add_cross_attention"):
        raise ConversionError("GPT-2 with cross attention is not supported")
    if not c.get("tie_word_embeddings", True):
        raise ConversionError("GPT-2 with untied embeddings is not supported")
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
        swiglu=False,
        group_query_attention=False,
        num_query_groups=None,
        untie_embeddings_and_output_weights=False,
        disable_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(c.get("initializer_range", 0.02)),
        vocab_size=_get(c, "vocab_size"),
    )


def family_of(flags: dict[str, Any]) -> str:
    """Which HF family our model flags correspond to (for export)."""
    f = flags
    llama = (
        f.get("normalization") == "RMSNorm"
        and f.get("position_embedding_type") == "rope"
        and f.get("swiglu")
        and float(f.get("rotary_percent", 1.0)) == 1.0
    )
    gpt2 = (
        f.get("normalization") == "LayerNorm"
        and f.get("position_embedding_type") == "learned_absolute"
        and not f.get("swiglu")
        and not f.get("disable_bias_linear")
        and not f.get("untie_embeddings_and_output_weights")
        and not f.get("group_query_attention")
        and f.get("kv_channels") in (None, f["hidden_size"] // f["num_attention_heads"])
    )
    if llama:
        return LLAMA
    if gpt2:
        return GPT2
    raise ConversionError(
        "this checkpoint's architecture has no Hugging Face equivalent we export to: need "
        "Llama style (RMSNorm + rope + swiglu) or GPT-2 style (LayerNorm + learned positions "
        "+ GELU + biases + tied embeddings)"
    )


def hf_config_from_flags(flags: dict[str, Any], specials: dict[str, int | None]) -> dict[str, Any]:
    """A config.json for LlamaForCausalLM or GPT2LMHeadModel computing what our model does."""
    f = flags
    family = family_of(f)
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    ffn = f.get("ffn_hidden_size") or (4 * hidden)
    max_pos = f.get("max_position_embeddings") or f["seq_length"]
    common = dict(
        vocab_size=f["vocab_size"],
        bos_token_id=specials.get("bos"),
        eos_token_id=specials.get("eos"),
        pad_token_id=specials.get("pad"),
        torch_dtype="float32",
        initializer_range=f.get("init_method_std", 0.02),
    )
    if family == LLAMA:
        groups = f["num_query_groups"] if f.get("group_query_attention") else heads
        return dict(
            architectures=["LlamaForCausalLM"],
            model_type=LLAMA,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=f["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=groups,
            head_dim=f.get("kv_channels") or hidden // heads,
            hidden_act="silu",
            max_position_embeddings=max_pos,
            rms_norm_eps=f.get("norm_epsilon", 1e-5),
            rope_theta=float(f.get("rotary_base", 10000)),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": float(f.get("rotary_base", 10000)),
            },
            attention_bias=not f.get("disable_bias_linear", False),
            mlp_bias=not f.get("disable_bias_linear", False),
            attention_dropout=0.0,
            tie_word_embeddings=not f.get("untie_embeddings_and_output_weights", False),
            use_cache=True,
            **common,
        )
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type=GPT2,
        n_embd=hidden,
        n_head=heads,
        n_layer=f["num_layers"],
        n_inner=ffn,
        n_positions=max_pos,
        n_ctx=max_pos,
        activation_function="gelu",
        layer_norm_epsilon=f.get("norm_epsilon", 1e-5),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        use_cache=True,
        **common,
    )
