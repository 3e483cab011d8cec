"""Generate text with early exit from a checkpoint, at any TP/PP. Launch with torchrun:

    torchrun --nproc-per-node 2 tools/generate.py --load CKPT \
        --pipeline-model-parallel-size 2 --prompt "ROMEO:" --max-new-tokens 64 \
        --mode early_exit --threshold 0.8

`--load` restores architecture and tokenizer from the checkpoint's ee_args.json; model
and parallelism flags are the training ones (pretrain_early_exit_gpt.py). Generation flags
are below (`--help-generate`). Rank 0 prints the results and writes `--output-json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids")
    g.add_argument(
        "--prompts-file", default=None, help="one prompt per line, or JSONL with 'prompt' keys"
    )
    g.add_argument("--add-bos", action="store_true")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--eos-token-id", type=int, default=None, help="default: the tokenizer's")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--mode", choices=["none", "early_exit", "self_speculative"], default="none")
    g.add_argument("--method", choices=["kv_recompute", "pipeline"], default=None)
    g.add_argument("--metric", choices=["max_prob", "margin", "entropy"], default="max_prob")
    g.add_argument("--threshold", "--early-exit-thres", type=float, default=0.8)
    g.add_argument("--exit-layers", type=int, nargs="+", default=None)
    g.add_argument("--draft-exit-layer", type=int, default=None)
    g.add_argument("--draft-length", type=int, default=4)
    g.add_argument("--draft-threshold", type=float, default=0.0)
    g.add_argument(
        "--draft-vocab-size", type=int, default=None,
        help="self_speculative: draft over the N most frequent tokens only (needs the "
        "checkpoint's token_counts.npy from tools/count_tokens.py)",
    )  # fmt: skip
    g.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all)")
    g.add_argument("--output-json", default=None)
    g.add_argument("--help-generate", action="help")
    return p


def check_generation_args(args) -> None:
    """Reject bad counts before any model is built (ValueError naming the flag)."""
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--max-new-tokens", args.max_new_tokens, 0),
        ("--top-k", args.top_k, 0),
        ("--draft-length", args.draft_length, 1),
        ("--draft-vocab-size", args.draft_vocab_size, 1),
        ("--eos-token-id", args.eos_token_id, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")


def read_prompt_texts(args) -> list[str]:
    """--prompt texts, then --prompts-file lines (plain text, or JSON objects with "prompt")."""
    texts = list(args.prompt)
    if not args.prompts_file:
        return texts
    path = args.prompts_file
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts-file {path}: cannot read: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts-file {path} line {n}: invalid JSON: {exc}") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str):
            raise ValueError(
                f'--prompts-file {path} line {n}: expected a JSON object with a string "prompt"'
            )
        texts.append(prompt)
    return texts


def parse_prompt_ids(args) -> list[list[int]]:
    """--prompt-ids values: comma-separated non-negative token ids."""
    out = []
    for value in args.prompt_ids:
        try:
            ids = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--prompt-ids {value!r}: expected comma-separated integer token ids"
            ) from None
        if not ids or min(ids) < 0:
            raise ValueError(f"--prompt-ids {value!r}: expected one or more token ids >= 0")
        out.append(ids)
    return out


def write_json_atomic(path: str, data) -> None:
    """Write to a temporary file next to `path`, then rename: never a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prompts(args, engine, texts: list[str], prompt_ids: list[list[int]]) -> list[list[int]]:
    ids = [engine.tokenize(t) for t in texts] + prompt_ids
    if args.add_bos:
        bos = getattr(engine.tokenizer, "bos", None)
        if bos is None:
            raise ValueError("--add-bos: the tokenizer defines no BOS token")
        ids = [[bos, *p] for p in ids]
    if not ids:
        raise ValueError("no prompts: give --prompt, --prompt-ids or --prompts-file")
    return ids


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import megatron.early_exit  # noqa: F401
    from megatron.early_exit.arguments import build_parser, parse_args
    from megatron.early_exit.checkpoint.files import CheckpointError
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.data.tokenizers import TokenizerError
    from megatron.early_exit.inference.api import (
        EarlyExitParams,
        GenerationRequest,
        InferenceError,
        SamplingParams,
    )
    from megatron.early_exit.inference.loading import build_engine, inference_run_config
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed

    gen_args, rest = generation_parser().parse_known_args(argv)
    try:  # every rank checks the same inputs, so all exit together before any setup
        check_generation_args(gen_args)
        texts, prompt_ids = read_prompt_texts(gen_args), parse_prompt_ids(gen_args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    platform = init_platform()
    try:
        margs = parse_args(rest, build_parser())
        run = inference_run_config(None, platform.is_cuda, args=margs)
        engine = build_engine(run, platform)
    except (ConfigError, TokenizerError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    try:
        prompts = _prompts(gen_args, engine, texts, prompt_ids)
        sampling = dict(
            max_new_tokens=gen_args.max_new_tokens,
            temperature=gen_args.temperature,
            top_k=gen_args.top_k,
            top_p=gen_args.top_p,
            seed=gen_args.sampling_seed,
            stop_sequences=list(gen_args.stop),
            ignore_eos=gen_args.ignore_eos,
            eos_token_id=gen_args.eos_token_id,
            logprobs=gen_args.logprobs,
        )
        ee = EarlyExitParams(
            mode=gen_args.mode,
            method=gen_args.method,
            metric=gen_args.metric,
            threshold=gen_args.threshold,
            exit_layers=gen_args.exit_layers,
            draft_exit_layer=gen_args.draft_exit_layer,
            draft_length=gen_args.draft_length,
            draft_threshold=gen_args.draft_threshold,
            draft_vocab_size=gen_args.draft_vocab_size,
        )
        reqs = [GenerationRequest(p, SamplingParams(**sampling), ee) for p in prompts]
        bs = gen_args.batch_size or len(reqs)
        results = []
        for k in range(0, len(reqs), bs):
            results += engine.generate(reqs[k : k + bs])
    except (InferenceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        destroy_distributed()
        return 2
    if dist.get_rank() == 0:
        out = []
        for p, r in zip(prompts, results):
            d = r.to_dict()
            d["prompt_token_ids"] = p
            out.append(d)
            st = r.stats
            print(
                f"--- prompt ({len(p)} tokens) -> {r.finish_reason}, {len(r.token_ids)} tokens, "
                f"avg layers {st.avg_layers_used:.2f}, {st.tokens_per_s:.1f} tok/s"
            )
            print(r.text if r.text is not None else r.token_ids)
        if gen_args.output_json:
            write_json_atomic(gen_args.output_json, out)
    destroy_distributed()
    return 0


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
