"""Megatron-LM / EE-LLM torch-format checkpoints -> our dist checkpoint.

Layout read (Megatron-LM's legacy `megatron/model` GPT, which EE-LLM extends; see
docs/conversion.md):

    ROOT/latest_checkpointed_iteration.txt        "N" or "release"
    ROOT/iter_{N:07d}/mp_rank_{t:02d}/model_optim_rng.pt            (PP 1)
    ROOT/iter_{N:07d}/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt    (PP > 1)

Each file is a pickled dict: `args` (the run's argparse.Namespace), `iteration`, `model`
(nested state dict of that TP rank's part of that pipeline stage), optimizer and RNG state
(ignored). `model`:

    language_model.embedding.word_embeddings.weight       first stage; vocab rows split by TP
    language_model.embedding.position_embeddings.weight   learned positions only
    language_model.encoder.layers.{i}.*                   i local to the stage
    language_model.encoder.final_norm.*                   last stage
    language_model.output_layer.weight                    last stage, untied only
    language_model.exit_output_layer.{j}.weight           EE-LLM, untied exit outputs,
                                                          j = index among the stage's exits
    word_embeddings_for_head.weight                       copy of the embedding (tied heads)

Layer tensors (older releases say input_layernorm / post_attention_layernorm /
final_layernorm): input_norm, self_attention.query_key_value (rows grouped per query group
[q heads of the group, k, v], each TP rank holding whole groups: megatron-core's layout),
self_attention.dense (split on the input dim), post_attention_norm, mlp.dense_h_to_4h
(with SwiGLU each rank holds [gate_r; up_r]), mlp.dense_4h_to_h; EE-LLM exit layers add
exit_norm and exit_block.* (a whole transformer layer).

Loading is safe: a restricted unpickler allows only tensor rebuilding, plain containers,
argparse.Namespace and numpy arrays; classes of Megatron-LM itself (enums in args) become
inert placeholders; anything else is refused.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import os
import pickle
import re
import types
from typing import Any

import torch

from megatron.early_exit.convert.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"

# ----------------------------------------------------------------------------- safe loading
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes (numpy)
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
# Numpy arrays appear in the RNG state; these rebuild arrays and nothing else.
_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# Classes of the training code itself (enums, config objects): never imported, replaced.
_OPAQUE_PREFIXES = ("megatron.", "transformer_engine.", "apex.")


class Opaque:
    """Placeholder for a Megatron-LM object in a checkpoint (an enum in args, say)."""

    _name = "?"

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self._name}{self.args!r}>"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in _NUMPY or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or (
                isinstance(value, type) and name.endswith("Storage")
            ):
                return value
        if module.startswith(_OPAQUE_PREFIXES):
            return type(name, (Opaque,), {"_name": f"{module}.{name}"})
        raise pickle.UnpicklingError(
            f"refers to {module}.{name}, which is not allowed in a checkpoint "
            "(only tensors, containers, argparse.Namespace and Megatron-LM enums are)"
        )


_SAFE_PICKLE = types.ModuleType("megatron_lm_safe_pickle")
_SAFE_PICKLE.Unpickler = _Unpickler
_SAFE_PICKLE.load = lambda f, **kw: _Unpickler(f, **kw).load()
_SAFE_PICKLE.loads = lambda b, **kw: _Unpickler(io.BytesIO(b), **kw).load()
_SAFE_PICKLE.__name__ = "megatron_lm_safe_pickle"


def safe_load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", pickle_module=_SAFE_PICKLE, weights_only=False)
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing (a partial checkpoint?)") from None
    except Exception as exc:  # torch/pickle raise many types for corrupt or hostile files
        raise ConversionError(f"{path} is not a readable checkpoint file ({exc})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        if isinstance(obj, dict) and "model0" in obj:
            raise ConversionError(
                f"{path}: interleaved (virtual pipeline) checkpoints are not supported; "
                "re-save without --num-layers-per-virtual-pipeline-stage"
            )
        raise ConversionError(f"{path} holds no 'model' state dict (not a Megatron-LM checkpoint)")
    return obj


# ----------------------------------------------------------------------------- files
def iteration_dir(root: str) -> str:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise ConversionError(f"{tracker} is missing: not a Megatron-LM checkpoint root")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        name = "release"
    elif text.isdigit():
        name = f"iter_{int(text):07d}"
    else:
        raise ConversionError(
            f"{tracker} should hold an iteration number or 'release', got {text!r}"
        )
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise ConversionError(f"{tracker} names {name}, but {path} is missing")
    return path


def rank_path(iter_dir: str, tp_rank: int, pp_rank: int, pp: int) -> str:
    sub = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iter_dir, sub, RANK_FILE)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- flags
_REFUSED = {
    "apply_residual_connection_post_layernorm": "residual connections after the norm",
    "squared_relu": "the squared-ReLU activation",
    "use_exit_mlp": (
        "EE-LLM exit MLPs (a second MLP branch inside the exit layer, sharing its attention "
        "and norm; our exit MLP is a residual MLP on the layer's output)"
    ),
    "qk_layernorm": "QK layernorm",
    "add_qkv_bias": "q/k/v-only biases",
}
_EXIT_KEYS = (
    "exit_layer_nums",
    "use_exit_norm",
    "use_exit_block",
    "untie_exit_output_weights",
    "pre_exit",
    "exit_layer_temperature",
    "exit_layer_weight",
    "exit_layer_weight_init",
    "exit_layer_weight_warmup_iters",
    "exit_layer_weight_warmup_style",
    "use_dynamic_exit_layer_weight",
)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Our model flags from the run's saved args; refuses what we cannot rebuild."""
    a = vars(args)
    for key, what in _REFUSED.items():
        if a.get(key):
            raise ConversionError(f"the checkpoint uses {what} ({key}), which is not supported")
    if (a.get("num_experts") or 0) > 1:
        raise ConversionError("mixture-of-experts checkpoints (num_experts) are not supported")
    if a.get("transformer_impl", "local") != "local":
        raise ConversionError(
            f"transformer_impl {a['transformer_impl']!r}: only 'local' state dicts are supported "
            "(EE-LLM's only choice; re-save a Transformer Engine run with --transformer-impl local)"
        )
    if a.get("use_mcore_models"):
        raise ConversionError(
            "the checkpoint was saved with --use-mcore-models; only the legacy GPT layout is "
            "supported"
        )
    missing = [
        k
        for k in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
        if not a.get(k)
    ]
    if missing:
        raise ConversionError(f"the checkpoint's args lack {', '.join(missing)}")
    heads, hidden = a["num_attention_heads"], a["hidden_size"]
    pos = a.get("position_embedding_type") or (
        "rope" if a.get("use_rotary_position_embeddings") else "learned_absolute"
    )
    flags: dict[str, Any] = {
        "num_layers": a["num_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": a.get("ffn_hidden_size") or 4 * hidden,
        "num_attention_heads": heads,
        "group_query_attention": bool(a.get("group_query_attention")),
        "num_query_groups": (a.get("num_query_groups") or heads)
        if a.get("group_query_attention")
        else None,
        "max_position_embeddings": a.get("max_position_embeddings"),
        "seq_length": a.get("seq_length"),
        "position_embedding_type": pos,
        "normalization": a.get("normalization") or "LayerNorm",
        "norm_epsilon": a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
        "swiglu": bool(a.get("swiglu")),
        "openai_gelu": bool(a.get("openai_gelu")),
        "disable_bias_linear": not a.get("add_bias_linear", True),
        "untie_embeddings_and_output_weights": bool(a.get("untie_embeddings_and_output_weights")),
        # The padded rows are real parameters of the source; keep them all.
        "vocab_size": a["padded_vocab_size"],
        "make_vocab_size_divisible_by": a.get("make_vocab_size_divisible_by") or 128,
    }
    if a.get("kv_channels") and a["kv_channels"] != hidden // heads:
        flags["kv_channels"] = a["kv_channels"]
    if pos == "rope":
        flags["rotary_percent"] = a.get("rotary_percent", 1.0)
        flags["rotary_base"] = a.get("rotary_base", 10000)
    if a.get("init_method_std"):
        flags["init_method_std"] = a["init_method_std"]
    for key in _EXIT_KEYS:
        if a.get(key) is not None:
            flags[key] = a[key]
    if flags.get("exit_layer_nums"):
        flags["exit_layer_nums"] = list(flags["exit_layer_nums"])
    return {k: v for k, v in flags.items() if v is not None}


# ----------------------------------------------------------------------------- tensors
_LAYER_NAMES = [  # (theirs, ours, split dim under TP: 0 column, 1 row, None replicated)
    ("input_norm", "input_layernorm", None),
    ("self_attention.query_key_value", "self_attention.linear_qkv", 0),
    ("self_attention.dense", "self_attention.linear_proj", 1),
    ("post_attention_norm", "pre_mlp_layernorm", None),
    ("mlp.dense_h_to_4h", "mlp.linear_fc1", 0),
    ("mlp.dense_4h_to_h", "mlp.linear_fc2", 1),
]
_OLD_NAMES = {
    "input_layernorm.": "input_norm.",
    "post_attention_layernorm.": "post_attention_norm.",
    "final_layernorm.": "final_norm.",
}


def _layer_param(theirs: str) -> tuple[str, int | None, bool]:
    """(our name, split dim, is SwiGLU fc1) for a layer-relative name like
    `self_attention.dense.weight`."""
    for src, dst, dim in _LAYER_NAMES:
        if theirs.startswith(src + "."):
            suffix = theirs[len(src) :]
            # Row-parallel biases are whole on every rank.
            split = None if (dim == 1 and suffix == ".bias") else dim
            return dst + suffix, split, src == "mlp.dense_h_to_4h"
    raise ConversionError(f"unexpected layer tensor {theirs!r} in the checkpoint")


def _merge(parts: list[torch.Tensor], dim: int | None, name: str, swiglu: bool) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ConversionError(
            f"{name}: tensor-parallel ranks disagree on its shape {sorted(shapes)}"
        )
    if dim is None:
        return parts[0]
    if swiglu:  # each rank holds [gate_r; up_r]; ours (TP1) is [gate; up]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def read_megatron_lm(root: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
    """(our flags, our full TP1 tensors, info) of the checkpoint at `root`."""
    iter_dir = iteration_dir(root)
    first = rank_path(iter_dir, 0, 0, 1)
    if os.path.isfile(first):
        pp = 1
    else:
        first = rank_path(iter_dir, 0, 0, 2)
        if not os.path.isfile(first):
            raise ConversionError(f"{iter_dir} has no mp_rank_00/{RANK_FILE} nor mp_rank_00_000/")
        pp = None
    head = safe_load(first)
    args = head.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{first} carries no args Namespace (saved with --no-save-args?)")
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = pp or int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ConversionError("interleaved (virtual pipeline) checkpoints are not supported")
    flags = flags_from_args(args)
    layers, exits = flags["num_layers"], flags.get("exit_layer_nums") or []
    if layers % pp:
        raise ConversionError(f"num_layers {layers} is not divisible by the {pp} pipeline stages")
    per_stage = layers // pp
    swiglu = flags["swiglu"]

    pieces: dict[str, list] = {}  # our name -> [split dim, is swiglu fc1, [per-TP parts]]

    def add(name: str, value, dim, fc1: bool, tp_rank: int) -> None:
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{name} in the checkpoint is not a tensor")
        slot = pieces.setdefault(name, [dim, fc1, [None] * tp])
        slot[2][tp_rank] = value.float()

    for p in range(pp):
        stage_exits = [n for n in exits if p * per_stage < n <= (p + 1) * per_stage]
        for t in range(tp):
            path = rank_path(iter_dir, t, p, pp)
            ckpt = head if (t, p) == (0, 0) else safe_load(path)
            sd = flatten(ckpt["model"])
            for name, value in sd.items():
                for old, new in _OLD_NAMES.items():
                    name = name.replace("." + old, "." + new)
                if name.startswith("language_model.embedding."):
                    rest = name[len("language_model.embedding.") :]
                    if rest == "word_embeddings.weight":
                        add("embedding.word_embeddings.weight", value, 0, False, t)
                    elif rest == "position_embeddings.weight":
                        add("embedding.position_embeddings.weight", value, None, False, t)
                    else:
                        raise ConversionError(f"{path}: unexpected tensor {name!r}")
                elif name.startswith("language_model.encoder.layers."):
                    m = re.match(r"language_model\.encoder\.layers\.(\d+)\.(.+)$", name)
                    number = p * per_stage + int(m.group(1)) + 1  # 1-based, global
                    rest = m.group(2)
                    if rest.startswith("exit_norm."):
                        add(f"exit_heads.{number}.norm.{rest[len('exit_norm.') :]}", value, None,
                            False, t)  # fmt: skip
                    elif rest.startswith("exit_block."):
                        ours, dim, fc1 = _layer_param(rest[len("exit_block.") :])
                        add(f"exit_heads.{number}.block.{ours}", value, dim, fc1 and swiglu, t)
                    else:
                        ours, dim, fc1 = _layer_param(rest)
                        add(f"decoder.layers.{number - 1}.{ours}", value, dim, fc1 and swiglu, t)
                elif name.startswith("language_model.encoder.final_norm."):
                    add("decoder.final_layernorm." + name.rsplit(".", 1)[1], value, None, False, t)
                elif name == "language_model.output_layer.weight":
                    add("output_layer.weight", value, 0, False, t)
                elif name.startswith("language_model.exit_output_layer."):
                    j = int(name.split(".")[2])
                    if j >= len(stage_exits):
                        raise ConversionError(f"{path}: {name!r} but the stage has no exit {j}")
                    add(f"exit_heads.{stage_exits[j]}.output_layer.weight", value, 0, False, t)
                elif name == "word_embeddings_for_head.weight":
                    continue  # a copy of the first stage's embedding (tied heads)
                else:
                    raise ConversionError(f"{path}: unexpected tensor {name!r}")

    tensors = {}
    for name, (dim, fc1, parts) in pieces.items():
        if any(part is None for part in parts):
            raise ConversionError(f"{name} is missing on some tensor-parallel ranks")
        tensors[name] = _merge(parts, dim, name, fc1)
    info = {"tensor_parallel": tp, "pipeline_parallel": pp, "iteration": head.get("iteration")}
    return flags, tensors, info


# ----------------------------------------------------------------------------- convert
def megatron_lm_to_megatron(
    root: str, out: str, overwrite: bool = False, hf_tokenizer: str | None = None
) -> dict[str, Any]:
    """Convert; returns the recorded flags (ee_args.json). Nothing is written on error."""
    from megatron.early_exit.convert.hf_convert import record_args
    from megatron.early_exit.convert.hf_files import atomic_dir, check_output_dir, import_tokenizer
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    flags, tensors, info = read_megatron_lm(root)
    if hf_tokenizer and not os.path.isdir(hf_tokenizer):
        raise ConversionError(f"--hf-tokenizer {hf_tokenizer!r} is not a folder")
    check_output_dir(out, overwrite)
    run = build_run(flags)  # ConfigError (one line) when the args describe no valid model
    stage = Stage(run)
    stage.set_full_weights(tensors, int(flags["vocab_size"]))
    with atomic_dir(out, overwrite) as staging:
        iter_dir = stage.save(
            staging, args=None, extra={"converted_from": os.path.abspath(root), **info}
        )
        tok = import_tokenizer(hf_tokenizer, iter_dir) if hf_tokenizer else None
        if hf_tokenizer and tok is None:
            raise ConversionError(
                f"{hf_tokenizer!r} has no tokenizer.json (or vocab.json + merges.txt)"
            )
        return record_args(run, tok or {"tokenizer_type": "NullTokenizer"}, iter_dir)
