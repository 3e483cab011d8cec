"""Our side of a conversion: build a stage of the model from recorded flags, load or save
it with the checkpoint package (the same functions training uses), and run it (TP/PP-aware
forward and a cache-free greedy loop used as the reference in tests).

Converters run in one process (TP1PP1, full tensors); checkpoints are dist checkpoints
sharded by global tensor, so they load at any TP/PP.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from megatron.early_exit.checkpoint.files import TOKENIZER_PATH_KEYS
from megatron.early_exit.convert.errors import ConversionError
from megatron.early_exit.convert.hf_files import VOCAB_PADDING_FILE  # noqa: F401
from megatron.early_exit.convert.weights import OUTPUT, WORD
from megatron.early_exit.progress import progress

EXIT_PREFIX = "exit_heads."


def build_run(flags: dict[str, Any], tp: int = 1, pp: int = 1, world_size: int = 1):
    """A RunConfig for the model described by `flags` at the given layout (validated)."""
    from megatron.early_exit.arguments import build_parser, config_from_args

    parser = build_parser()
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in flags.items() if k in known})
    args = parser.parse_args(
        ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    )
    run = config_from_args(args, world_size)
    run.parallel.validate(run.model.num_layers)
    run.model.validate(tp)
    run.exits.validate(run.model.num_layers)
    if not flags.get("vocab_size"):
        raise ConversionError("the model flags lack vocab_size")
    run.data.vocab_size = int(flags["vocab_size"])
    return run


def read_raw_args(root: str) -> tuple[str, dict[str, Any]]:
    """(iteration dir, ee_args.json as written: relative paths unresolved)."""
    import json

    from megatron.early_exit.checkpoint.files import ARGS_FILE, latest_checkpoint_dir

    iter_dir = latest_checkpoint_dir(root)  # CheckpointError naming what is missing
    path = os.path.join(iter_dir, ARGS_FILE)
    if not os.path.isfile(path):
        raise ConversionError(
            f"{path} is missing: the checkpoint does not record its model flags (saved by an "
            "older version?); re-save it with the current trainer"
        )
    try:
        with open(path) as f:
            return iter_dir, json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is unreadable ({exc})") from None


def resolved_args(iter_dir: str, raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key in TOKENIZER_PATH_KEYS:
        if out.get(key) and not os.path.isabs(out[key]):
            out[key] = os.path.join(iter_dir, out[key])
    return out


class Stage:
    """This rank's model stage (process groups created on first use)."""

    def __init__(self, run) -> None:
        from megatron.early_exit.config import build_transformer_config
        from megatron.early_exit.model.build import build_stage_model, init_model_parallel, unwrap
        from megatron.early_exit.platform import init_platform

        self.run = run
        self.platform = init_platform(force_cpu=True)
        self.config = build_transformer_config(run, use_te=False)
        init_model_parallel(run, self.config, self.platform)
        self.model = unwrap(build_stage_model(run, self.config, self.platform, use_te=False))
        self.model.eval()

    # ------------------------------------------------------------------ weights
    def set_full_weights(self, tensors: dict[str, torch.Tensor], real_vocab: int) -> None:
        """Copy full (TP1PP1) tensors into the model; pad vocab rows with zeros unless the
        padding rows are given (`<name>` rows beyond `real_vocab`)."""
        sd = self.model.state_dict()
        wanted = {k for k in sd if not k.endswith("_extra_state")}
        missing = sorted(wanted - set(tensors))
        extra = sorted(set(tensors) - set(sd))
        if missing or extra:
            raise ConversionError(
                "converted tensors do not match the model built from the flags: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, value in tensors.items():
            target = sd[name]
            if name in (WORD, OUTPUT) or (name.startswith(EXIT_PREFIX) and "output_layer" in name):
                value = pad_rows(value, target.shape[0], real_vocab, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ConversionError(
                    f"{name}: shape {tuple(value.shape)} does not match the model's "
                    f"{tuple(target.shape)} (config.json and weights disagree?)"
                )
            sd[name] = value.to(target.dtype)
        self.model.load_state_dict(sd, strict=True)

    def full_weights(self) -> dict[str, torch.Tensor]:
        if dist.get_world_size() != 1:
            raise RuntimeError("full_weights needs a TP1PP1 world of one")
        return {
            k: v.detach().clone()
            for k, v in self.model.state_dict().items()
            if not k.endswith("_extra_state")
        }

    # ------------------------------------------------------------------ checkpoints
    def load(self, root: str) -> int:
        from megatron.early_exit.checkpoint.store import load_checkpoint

        return load_checkpoint(root, self.model, load_rng=False)

    def save(self, staging_root: str, args: dict[str, Any], extra: dict | None = None) -> str:
        """Save as iteration 0 (no optimizer state) under `staging_root`; returns the
        iteration dir."""
        from megatron.early_exit.checkpoint.files import checkpoint_dir
        from megatron.early_exit.checkpoint.store import save_checkpoint

        save_checkpoint(staging_root, 0, self.model, extra=extra or {}, args=args)
        return checkpoint_dir(staging_root, 0)

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits [b, s, V_padded] on last-stage ranks, None elsewhere."""
        return forward_logits(self.model, tokens)

    @torch.no_grad()
    def greedy(self, prompt: list[int], new_tokens: int, real_vocab: int) -> list[int]:
        """Greedy decoding by full recomputation (no KV cache); every rank gets the ids."""
        ids = list(prompt)
        last_rank = dist.get_world_size() - 1  # a rank of the last pipeline stage
        steps = progress(
            range(new_tokens), desc="greedy check", unit="token", enabled=dist.get_rank() == 0
        )
        for _ in steps:
            logits = forward_logits(self.model, torch.tensor([ids]))
            nxt = torch.zeros(1, dtype=torch.long)
            if logits is not None:
                nxt[0] = logits[0, -1, :real_vocab].argmax()
            dist.broadcast(nxt, src=last_rank)
            ids.append(int(nxt))
        return ids[len(prompt) :]


def pad_rows(value: torch.Tensor, rows: int, real: int, name: str) -> torch.Tensor:
    if value.shape[0] == rows:
        return value
    if value.shape[0] != real or rows < real:
        raise ConversionError(
            f"{name}: {value.shape[0]} vocabulary rows, expected {real} (config vocab_size)"
        )
    pad = torch.zeros(rows - real, *value.shape[1:], dtype=value.dtype)
    return torch.cat([value, pad], dim=0)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """One forward through all pipeline stages (plain send/recv), TP-gathered logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens if first else None, positions, None).output
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)


def copy_relative_files(src_iter_dir: str, dst_iter_dir: str, raw_args: dict[str, Any]) -> None:
    """Copy tokenizer files recorded relative to the source checkpoint."""
    for key in TOKENIZER_PATH_KEYS:
        rel = raw_args.get(key)
        if not rel or os.path.isabs(rel):
            continue
        top = rel.split("/")[0]
        src, dst = os.path.join(src_iter_dir, top), os.path.join(dst_iter_dir, top)
        if os.path.exists(dst):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)
        else:
            raise ConversionError(f"the checkpoint's tokenizer file {src!r} is missing")
