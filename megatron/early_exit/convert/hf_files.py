"""Files of a Hugging Face folder: weights, tokenizer; and atomic output directories."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from megatron.early_exit.convert.errors import ConversionError

EXIT_HEADS_FILE = "early_exit_heads.safetensors"
# Rows of our padded vocabulary beyond the real one (kept so a round trip loses nothing).
VOCAB_PADDING_FILE = "megatron_vocab_padding.safetensors"
TOKENIZER_SUBDIR = "tokenizer"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- weights
def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of *.safetensors (preferred) or pytorch_model*.bin, as float32 on CPU."""
    st = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    st = [p for p in st if os.path.basename(p) not in (EXIT_HEADS_FILE, VOCAB_PADDING_FILE)]
    bins = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
    if not st and not bins:
        raise ConversionError(
            f"{hf_dir!r} has no weights: expected *.safetensors or pytorch_model*.bin"
        )
    _check_index(hf_dir, st, "model.safetensors.index.json")
    _check_index(hf_dir, bins, "pytorch_model.bin.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for path in st or bins:
        part = read_safetensors(path) if st else _read_bin(path)
        dup = set(part) & set(tensors)
        if dup:
            raise ConversionError(f"tensor {sorted(dup)[0]!r} appears in two weight files")
        tensors.update(part)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _check_index(hf_dir: str, files: list[str], index_name: str) -> None:
    path = os.path.join(hf_dir, index_name)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            wanted = set(json.load(f)["weight_map"].values())
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is unreadable ({exc})") from None
    missing = sorted(wanted - {os.path.basename(p) for p in files})
    if missing:
        raise ConversionError(f"{index_name} lists weight files that are missing: {missing[:3]}")


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file ({exc})") from None


def _read_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles
        raise ConversionError(f"{path} is not a readable PyTorch weights file ({exc})") from None
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return sd


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


# ----------------------------------------------------------------------------- tokenizer
def import_tokenizer(hf_dir: str, dest_iter_dir: str) -> dict[str, Any]:
    """Copy the HF tokenizer into `dest_iter_dir/tokenizer/`; return our tokenizer flags
    with paths relative to the iteration dir (None if the folder has no tokenizer)."""
    sub = os.path.join(dest_iter_dir, TOKENIZER_SUBDIR)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        os.makedirs(sub, exist_ok=True)
        for name in _HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(sub, name))
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER_SUBDIR}
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):  # GPT-2 slow-tokenizer files
        os.makedirs(sub, exist_ok=True)
        shutil.copy2(vocab, os.path.join(sub, "encoder.json"))
        shutil.copy2(merges, os.path.join(sub, "vocab.bpe"))
        return {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": f"{TOKENIZER_SUBDIR}/encoder.json",
            "merge_file": f"{TOKENIZER_SUBDIR}/vocab.bpe",
        }
    return None


def export_tokenizer(flags: dict[str, Any], hf_dir: str) -> bool:
    """Copy our checkpoint's tokenizer files into an HF folder; False if there are none."""
    kind = flags.get("tokenizer_type")
    if kind == "HuggingFaceTokenizer":
        src = flags["tokenizer_model"]
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        json_path = src if os.path.isfile(src) else os.path.join(src, "tokenizer.json")
        if not os.path.isfile(json_path):
            raise ConversionError(f"the checkpoint's tokenizer {json_path!r} is missing")
        shutil.copy2(json_path, os.path.join(hf_dir, "tokenizer.json"))
        for name in _HF_TOKENIZER_FILES[1:]:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(hf_dir, name))
        if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
            _write_json(
                os.path.join(hf_dir, "tokenizer_config.json"), _fast_tokenizer_config(flags)
            )
        return True
    if kind == "GPT2BPETokenizer":
        for src, name in ((flags["vocab_file"], "vocab.json"), (flags["merge_file"], "merges.txt")):
            if not os.path.isfile(src):
                raise ConversionError(f"the checkpoint's tokenizer file {src!r} is missing")
            shutil.copy2(src, os.path.join(hf_dir, name))
        cfg = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
        }
        _write_json(os.path.join(hf_dir, "tokenizer_config.json"), cfg)
        return True
    return False


def _fast_tokenizer_config(flags: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast"}


def special_ids(flags: dict[str, Any]) -> dict[str, int | None]:
    """bos/eos/pad ids of our checkpoint's tokenizer (None when it has no tokenizer)."""
    from megatron.early_exit.data.tokenizers import TokenizerConfig, build_tokenizer

    kind = flags.get("tokenizer_type") or "NullTokenizer"
    if kind == "NullTokenizer":
        return {"bos": None, "eos": None, "pad": None}
    tok = build_tokenizer(
        TokenizerConfig(
            tokenizer_type=kind,
            vocab_file=flags.get("vocab_file"),
            merge_file=flags.get("merge_file"),
            tokenizer_model=flags.get("tokenizer_model"),
            vocab_size=flags.get("vocab_size"),
        )
    )
    return {"bos": tok.bos, "eos": tok.eod, "pad": tok.pad}


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


write_json = _write_json


# ----------------------------------------------------------------------------- atomic dirs
def check_output_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise ConversionError(f"output {path!r} exists and is not empty (pass --overwrite)")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool) -> Iterator[str]:
    """Yield a staging dir beside `path`; on success it replaces `path`, on failure it is
    removed, so an interrupted conversion never leaves a valid-looking output."""
    check_output_dir(path, overwrite)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
