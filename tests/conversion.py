"""Helpers for conversion tests: tiny random HF models and running the CLIs/workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "checkpoint"
_QUIET = {"PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning", "OMP_NUM_THREADS": "1"}


# Tiny random models of every supported family, made with transformers' own config classes.
FAMILIES = ("llama", "llama_tied", "llama3", "qwen2", "qwen3", "mistral", "gpt2", "gpt2_new")


def tiny_hf_config(kind: str):
    """The transformers config of `make_tiny_hf(kind)`."""
    import transformers

    rope = dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    if kind in ("llama", "llama_tied"):
        tied = kind == "llama_tied"
        return transformers.LlamaConfig(
            **rope, num_key_value_heads=4 if tied else 2, rope_theta=5000.0,
            tie_word_embeddings=tied,
        )  # fmt: skip
    if kind == "llama3":  # Llama 3.x: llama3 RoPE scaling (theta and factor of 3.2)
        scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=8192)  # fmt: skip
        return transformers.LlamaConfig(
            **rope, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=scaling,
            tie_word_embeddings=True,
        )  # fmt: skip
    if kind == "qwen2":
        return transformers.Qwen2Config(
            **rope, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True
        )
    if kind == "qwen3":  # head_dim 32 != 64 / 4
        return transformers.Qwen3Config(
            **rope, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
            tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "mistral":  # window == max positions: it never cuts anything
        return transformers.MistralConfig(
            **rope, num_key_value_heads=2, sliding_window=64, tie_word_embeddings=False
        )
    if kind in ("gpt2", "gpt2_new"):
        return transformers.GPT2Config(
            vocab_size=200, n_embd=64, n_layer=4, n_head=4, n_positions=64,
            activation_function="gelu" if kind == "gpt2" else "gelu_new", resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1, bos_token_id=0,
            eos_token_id=1, tie_word_embeddings=kind == "gpt2",
        )  # fmt: skip
    raise ValueError(kind)


def make_tiny_hf(kind: str, out: str | os.PathLike, seed: int = 0) -> str:
    """Save a random tiny HF model of one of FAMILIES ("llama": GQA, untied; "llama_tied":
    MHA, tied; "gpt2_new": published GPT-2's tanh GELU, untied).

    Norm weights and biases are perturbed so that a wrong mapping cannot hide behind
    their default values; weights use std 0.1 so logits are not all near zero.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out))
    return str(out)


def run_tool(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tools/checkpoint/<name>.py; returns the completed process (no check)."""
    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **_QUIET},
    )  # fmt: skip


def run_worker(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `megatron.early_exit.convert.workers` (under torchrun when nproc > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron.early_exit.convert.workers"]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "megatron.early_exit.convert.workers",
        ]  # fmt: skip
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **_QUIET},
    )  # fmt: skip


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(proc.args)}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )
    return proc


def verify(load, hf_dir, out_json, tp: int = 1, pp: int = 1, extra: tuple = ()) -> dict:
    """Parity of our checkpoint at TP/PP against an HF folder (see workers.verify)."""
    args = ["verify", "--load", load, "--hf-dir", hf_dir, "--tp", tp, "--pp", pp, "--out", out_json]
    checked(run_worker(tp * pp, *args, *extra))
    return json.loads(Path(out_json).read_text())


def compare(a, b, out_json) -> dict:
    checked(run_worker(1, "compare", "--load", a, "--other", b, "--out", out_json))
    return json.loads(Path(out_json).read_text())


def load_stage(root):
    """A converted checkpoint as a TP1PP1 Stage, with the flags it recorded."""
    from megatron.early_exit.convert.megatron_side import (
        Stage,
        build_run,
        read_raw_args,
        resolved_args,
    )

    flags = resolved_args(*read_raw_args(str(root)))
    stage = Stage(build_run(flags))
    stage.load(str(root))
    return stage, flags
