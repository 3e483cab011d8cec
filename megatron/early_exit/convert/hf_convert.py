"""Hugging Face folder <-> our dist checkpoint (single process, full tensors).

Export writes the backbone as a standard LlamaForCausalLM / Qwen2ForCausalLM /
Qwen3ForCausalLM / GPT2LMHeadModel folder (see hf_arch for the families), plus
what HF has no place for, so nothing is lost and import restores it bit for bit:
* `early_exit_heads.safetensors`: exit-head tensors under our names (`exit_heads.N.*`),
  described by the `early_exit` entry of config.json (our exit flags);
* `megatron_vocab_padding.safetensors`: rows of the padded vocabulary beyond the real
  one, only when they are not all zero;
* `ee_megatron` in config.json: our flags that HF does not carry (vocab padding
  multiple, training sequence length);
* with exits: `modeling_early_exit.py` (hf_modeling_early_exit.py, copied) and an
  `auto_map` entry, so `from_pretrained(..., trust_remote_code=True)` gives the family's
  CausalLM plus the exit heads (per-exit logits, lossy early exit, self-speculative
  decoding with transformers' assisted generation). Without trust_remote_code the folder
  is the plain family model. Exit heads with a transformer block (--use-exit-block) get
  no modeling file (the heads are still exported and import back).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from megatron.early_exit.config import EXIT_ARCH_FIELDS
from megatron.early_exit.convert.errors import ConversionError
from megatron.early_exit.convert.hf_arch import (
    family_of,
    flags_from_hf,
    hf_config_from_flags,
    read_hf_config,
)
from megatron.early_exit.convert.hf_files import (
    EXIT_HEADS_FILE,
    VOCAB_PADDING_FILE,
    atomic_dir,
    check_output_dir,
    export_tokenizer,
    import_tokenizer,
    read_hf_weights,
    read_safetensors,
    special_ids,
    write_json,
    write_safetensors,
)
from megatron.early_exit.convert.megatron_side import (
    EXIT_PREFIX,
    Stage,
    build_run,
    read_raw_args,
    resolved_args,
)
from megatron.early_exit.convert.weights import OUTPUT, WORD, hf_to_ours, ours_to_hf

_EXTRA_FLAG_KEYS = ("make_vocab_size_divisible_by", "seq_length", "init_method_std")
MODELING_FILE = "modeling_early_exit.py"
_MODELING_SOURCE = os.path.join(os.path.dirname(__file__), "hf_modeling_early_exit.py")


def _vocab_rows(name: str) -> bool:
    return name in (WORD, OUTPUT) or (name.startswith(EXIT_PREFIX) and ".output_layer." in name)


# ----------------------------------------------------------------------------- import
def hf_to_megatron(
    hf_dir: str,
    out: str,
    overwrite: bool = False,
    allow_no_tokenizer: bool = False,
    seq_length: int | None = None,
    make_vocab_size_divisible_by: int | None = None,
    max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """Convert; returns the recorded flags (ee_args.json)."""
    config = read_hf_config(hf_dir)
    arch = flags_from_hf(config, max_position_embeddings)
    flags = dict(arch.flags)
    flags.update(
        {k: v for k, v in (config.get("ee_megatron") or {}).items() if k in _EXTRA_FLAG_KEYS}
    )
    if seq_length:
        if seq_length > flags["max_position_embeddings"]:
            raise ConversionError(
                f"--seq-length {seq_length} exceeds max_position_embeddings "
                f"{flags['max_position_embeddings']}"
            )
        flags["seq_length"] = seq_length
    if make_vocab_size_divisible_by:
        flags["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    ee = config.get("early_exit")
    tensors = hf_to_ours(arch.family, flags, read_hf_weights(hf_dir))
    if ee:
        flags.update({k: ee[k] for k in EXIT_ARCH_FIELDS if k in ee})
        path = os.path.join(hf_dir, ee.get("file", EXIT_HEADS_FILE))
        if not os.path.isfile(path):
            raise ConversionError(f"config.json has an early_exit entry but {path} is missing")
        heads = read_safetensors(path)
        bad = [k for k in heads if not k.startswith(EXIT_PREFIX)]
        if bad:
            raise ConversionError(f"{path}: tensors outside exit heads, e.g. {bad[:3]}")
        tensors.update({k: v.float() for k, v in heads.items()})
    padding_path = os.path.join(hf_dir, VOCAB_PADDING_FILE)
    if os.path.isfile(padding_path):
        for name, rows in read_safetensors(padding_path).items():
            if name not in tensors:
                raise ConversionError(f"{padding_path}: {name!r} matches no converted tensor")
            tensors[name] = torch.cat([tensors[name], rows.float()], dim=0)
    vocab = int(flags["vocab_size"])
    for name in (WORD, OUTPUT):
        if name in tensors and tensors[name].shape[0] < vocab:
            raise ConversionError(
                f"{name} has {tensors[name].shape[0]} rows but config.json says vocab_size {vocab}"
            )

    check_output_dir(out, overwrite)
    run = build_run(flags)  # validates the flags (heads vs hidden size, exits, ...)
    stage = Stage(run)
    stage.set_full_weights(tensors, vocab)
    with atomic_dir(out, overwrite) as staging:
        iter_dir = stage.save(staging, args=None, extra={"converted_from": os.path.abspath(hf_dir)})
        tok = import_tokenizer(hf_dir, iter_dir)
        if tok is None:
            if not allow_no_tokenizer:
                raise ConversionError(
                    f"{hf_dir!r} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                    "pass --allow-no-tokenizer to record a NullTokenizer instead"
                )
            tok = {"tokenizer_type": "NullTokenizer"}
        args = record_args(run, tok, iter_dir)
    return args


def record_args(run, tok: dict[str, Any], iter_dir: str) -> dict[str, Any]:
    """Write ee_args.json: model/exit flags and tokenizer (paths relative to iter_dir)."""
    from megatron.early_exit.checkpoint.files import args_from_run, write_checkpoint_args
    from megatron.early_exit.data.tokenizers import TokenizerConfig, build_tokenizer

    args = args_from_run(run)
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        args[key] = tok.get(key)
    args["tokenizer_type"] = tok["tokenizer_type"]
    resolved = {
        k: (os.path.join(iter_dir, v) if v else v) for k, v in tok.items() if k != "tokenizer_type"
    }
    if tok["tokenizer_type"] != "NullTokenizer":
        tokenizer = build_tokenizer(
            TokenizerConfig(tokenizer_type=tok["tokenizer_type"], **resolved)
        )
        if tokenizer.vocab_size > run.data.vocab_size:
            raise ConversionError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{run.data.vocab_size} (mismatched files?)"
            )
    write_checkpoint_args(iter_dir, args)
    return args


# ----------------------------------------------------------------------------- export
def megatron_to_hf(root: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Export; returns the written config.json."""
    iter_dir, raw = read_raw_args(root)
    flags = resolved_args(iter_dir, raw)
    family = family_of(flags)
    check_output_dir(out, overwrite)
    run = build_run(flags)
    flags["ffn_hidden_size"] = run.model.resolved_ffn_hidden_size()
    flags["max_position_embeddings"] = run.model.resolved_max_position_embeddings()
    stage = Stage(run)
    stage.load(root)
    full = stage.full_weights()
    vocab = int(flags["vocab_size"])
    padding = {}
    for name in [n for n in full if _vocab_rows(n)]:
        rows = full[name]
        if rows.shape[0] > vocab:
            if rows[vocab:].any():
                padding[name] = rows[vocab:]
            full[name] = rows[:vocab]
    # The exits' confidence estimators (--exit-confidence-head) are not exported: the HF
    # early-exit model has no use for them (inference with metric "learned" is ours).
    flags["exit_confidence_head"] = False
    full = {k: v for k, v in full.items() if ".confidence." not in k}
    exits = {k: v for k, v in full.items() if k.startswith(EXIT_PREFIX)}
    backbone = {k: v for k, v in full.items() if not k.startswith(EXIT_PREFIX)}
    hf = ours_to_hf(family, flags, backbone)
    config = hf_config_from_flags(flags, special_ids(flags))
    config["ee_megatron"] = {k: flags[k] for k in _EXTRA_FLAG_KEYS if k in flags}
    remote_code = False
    if flags.get("exit_layer_nums"):
        config["early_exit"] = {k: flags.get(k) for k in EXIT_ARCH_FIELDS}
        config["early_exit"]["file"] = EXIT_HEADS_FILE
        config["early_exit"]["head"] = _exit_head_shape(flags)
        remote_code = not flags.get("use_exit_block")
        if remote_code:
            cls = "EarlyExit" + config["architectures"][0]
            config["auto_map"] = {"AutoModelForCausalLM": f"modeling_early_exit.{cls}"}
    with atomic_dir(out, overwrite) as staging:
        write_safetensors(hf, os.path.join(staging, "model.safetensors"), {"format": "pt"})
        write_json(os.path.join(staging, "config.json"), config)
        write_json(
            os.path.join(staging, "generation_config.json"),
            {
                k: config[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if config.get(k) is not None
            },
        )
        export_tokenizer(flags, staging)
        if remote_code:
            shutil.copy2(_MODELING_SOURCE, os.path.join(staging, MODELING_FILE))
        if exits:
            write_safetensors(
                exits, os.path.join(staging, EXIT_HEADS_FILE), {"format": "ee-megatron"}
            )
        if padding:
            write_safetensors(
                padding, os.path.join(staging, VOCAB_PADDING_FILE), {"format": "ee-megatron"}
            )
    return config


def _exit_head_shape(flags: dict[str, Any]) -> dict[str, Any]:
    """What the modeling file needs to build an exit head (hf_modeling_early_exit.py)."""
    activation = "silu" if flags.get("swiglu") else "gelu"
    if flags.get("openai_gelu"):
        activation = "gelu_tanh"
    return {
        "hidden_size": flags["hidden_size"],
        "ffn_hidden_size": flags["ffn_hidden_size"],
        "gated": bool(flags.get("swiglu")),
        "activation": activation,
        "bias": not flags.get("disable_bias_linear", False),
        "normalization": flags.get("normalization", "LayerNorm"),
        "eps": flags.get("norm_epsilon", 1e-5),
    }
