"""Test-only writer of Megatron-LM / EE-LLM torch-format checkpoints (the layout
megatron/early_exit/convert/megatron_lm.py reads), from our full (TP1) tensors."""

from __future__ import annotations

import argparse
import collections
import os
import random

import numpy as np
import torch

_LAYER = {  # ours -> theirs, split dim (0 column-parallel, 1 row-parallel, None whole)
    "input_layernorm": ("input_norm", None),
    "self_attention.linear_qkv": ("self_attention.query_key_value", 0),
    "self_attention.linear_proj": ("self_attention.dense", 1),
    "pre_mlp_layernorm": ("post_attention_norm", None),
    "mlp.linear_fc1": ("mlp.dense_h_to_4h", 0),
    "mlp.linear_fc2": ("mlp.dense_4h_to_h", 1),
}


def _split(value: torch.Tensor, dim, tp: int, t: int, swiglu_fc1: bool) -> torch.Tensor:
    if dim is None or (dim == 1 and value.dim() == 1):  # whole, or a row-parallel bias
        return value.clone()
    if swiglu_fc1:  # each rank holds [gate_t; up_t]
        gate, up = value.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[t], up.chunk(tp, dim=0)[t]]).clone()
    return value.chunk(tp, dim=dim)[t].clone()


def _layer_tensors(prefix: str, tensors, tp, t, swiglu) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        module, suffix = rest.rsplit(".", 1)
        theirs, dim = _LAYER[module]
        out[f"{theirs}.{suffix}"] = _split(value, dim, tp, t, swiglu and module == "mlp.linear_fc1")
    return out


def megatron_args(flags: dict, padded_vocab: int, tp: int, pp: int) -> argparse.Namespace:
    from megatron.core.enums import ModelType  # pickled by reference, as Megatron-LM does

    heads = flags["num_attention_heads"]
    return argparse.Namespace(
        num_layers=flags["num_layers"],
        hidden_size=flags["hidden_size"],
        ffn_hidden_size=flags["ffn_hidden_size"],
        num_attention_heads=heads,
        group_query_attention=flags.get("group_query_attention", False),
        num_query_groups=flags.get("num_query_groups", heads),
        kv_channels=flags["hidden_size"] // heads,
        max_position_embeddings=flags["max_position_embeddings"],
        seq_length=flags["seq_length"],
        position_embedding_type=flags["position_embedding_type"],
        rotary_percent=1.0,
        normalization=flags["normalization"],
        norm_epsilon=1e-5,
        swiglu=flags.get("swiglu", False),
        openai_gelu=False,
        add_bias_linear=not flags.get("disable_bias_linear", False),
        untie_embeddings_and_output_weights=flags.get("untie_embeddings_and_output_weights", False),
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=flags["make_vocab_size_divisible_by"],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        transformer_impl="local",
        model_type=ModelType.encoder_or_decoder,
        params_dtype=torch.float32,
        exit_layer_nums=list(flags.get("exit_layer_nums", [])),
        use_exit_norm=flags.get("use_exit_norm", False),
        use_exit_mlp=False,
        use_exit_block=flags.get("use_exit_block", False),
        untie_exit_output_weights=flags.get("untie_exit_output_weights", False),
        exit_layer_temperature=[1.0] * len(flags.get("exit_layer_nums", [])),
        exit_layer_weight=[1.0] * len(flags.get("exit_layer_nums", [])),
        pre_exit=False,
        tune_exit=False,
    )


def write_megatron_lm(root, flags: dict, tensors: dict, tp: int, pp: int, iteration=7) -> None:
    """Save `tensors` (our TP1 names) as Megatron-LM's iter_N/mp_rank_* files."""
    layers = flags["num_layers"]
    per = layers // pp
    exits = list(flags.get("exit_layer_nums", []))
    swiglu = flags.get("swiglu", False)
    word = tensors["embedding.word_embeddings.weight"]
    args = megatron_args(flags, word.shape[0], tp, pp)
    iter_dir = os.path.join(root, f"iter_{iteration:07d}")
    for p in range(pp):
        stage_exits = [n for n in exits if p * per < n <= (p + 1) * per]
        for t in range(tp):
            lm: dict = collections.OrderedDict()
            if p == 0:
                emb = {"word_embeddings": {"weight": word.chunk(tp)[t].clone()}}
                if "embedding.position_embeddings.weight" in tensors:
                    pos = tensors["embedding.position_embeddings.weight"].clone()
                    emb["position_embeddings"] = {"weight": pos}
                lm["embedding"] = emb
            encoder = collections.OrderedDict()
            for i in range(per):
                number = p * per + i + 1
                for k, v in _layer_tensors(
                    f"decoder.layers.{number - 1}.", tensors, tp, t, swiglu
                ).items():
                    encoder[f"layers.{i}.{k}"] = v
                if number in stage_exits:
                    head = f"exit_heads.{number}."
                    for suffix in ("weight", "bias"):
                        if f"{head}norm.{suffix}" in tensors:
                            encoder[f"layers.{i}.exit_norm.{suffix}"] = tensors[
                                f"{head}norm.{suffix}"
                            ].clone()
                    for k, v in _layer_tensors(head + "block.", tensors, tp, t, swiglu).items():
                        encoder[f"layers.{i}.exit_block.{k}"] = v
            if p == pp - 1:
                for suffix in ("weight", "bias"):
                    if f"decoder.final_layernorm.{suffix}" in tensors:
                        encoder[f"final_norm.{suffix}"] = tensors[
                            f"decoder.final_layernorm.{suffix}"
                        ].clone()
                if "output_layer.weight" in tensors:
                    lm["output_layer"] = {
                        "weight": tensors["output_layer.weight"].chunk(tp)[t].clone()
                    }
            lm["encoder"] = encoder
            if stage_exits and flags.get("untie_exit_output_weights"):
                lm["exit_output_layer"] = {
                    f"{j}.weight": tensors[f"exit_heads.{n}.output_layer.weight"]
                    .chunk(tp)[t]
                    .clone()
                    for j, n in enumerate(stage_exits)
                }
            model = {"language_model": lm}
            if p > 0 and (p == pp - 1 or stage_exits) and "output_layer.weight" not in tensors:
                model["word_embeddings_for_head"] = {"weight": word.chunk(tp)[t].clone()}
            sub = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            os.makedirs(os.path.join(iter_dir, sub))
            state = {
                "args": args,
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "model": model,
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                    }
                ],
            }
            torch.save(state, os.path.join(iter_dir, sub, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
