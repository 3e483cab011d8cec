"""torchrun entry points: parity against transformers, and re-saving at another layout.

    torchrun --nproc-per-node 4 -m megatron.early_exit.convert.workers verify \
        --load CKPT --hf-dir HF --tp 2 --pp 2 --text-file T.txt --num-tokens 64 --out r.json
    torchrun --nproc-per-node 4 -m megatron.early_exit.convert.workers reshard \
        --load CKPT --save OUT --tp 2 --pp 2

`verify` loads our checkpoint at the given layout, runs one forward through every stage
and compares the full-vocabulary logits of the real tokens with the HF model's on the
same input (float32); with --generate N it also compares N greedy tokens (ours: full
recomputation without a KV cache; HF: `generate`). Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron.early_exit.convert.workers")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--load", required=True)
    v.add_argument("--hf-dir", required=True)
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--text-file", default=None, help="tokenized with the checkpoint's tokenizer")
    v.add_argument("--num-tokens", type=int, default=32)
    v.add_argument("--generate", type=int, default=0)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", required=True)
    r = sub.add_parser("reshard")
    r.add_argument("--load", required=True)
    r.add_argument("--save", required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--pp", type=int, default=1)
    r.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("compare", help="are two checkpoints' model tensors bitwise equal?")
    c.add_argument("--load", required=True)
    c.add_argument("--other", required=True)
    c.add_argument("--out", required=True)
    return p


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _flags(root: str) -> dict:
    from megatron.early_exit.convert.megatron_side import read_raw_args, resolved_args

    iter_dir, raw = read_raw_args(root)
    return resolved_args(iter_dir, raw)


def _input_ids(args, flags: dict) -> list[int]:
    vocab = int(flags["vocab_size"])
    if args.text_file:
        from megatron.early_exit.data.tokenizers import TokenizerConfig, build_tokenizer

        tok = build_tokenizer(
            TokenizerConfig(
                tokenizer_type=flags["tokenizer_type"],
                vocab_file=flags.get("vocab_file"),
                merge_file=flags.get("merge_file"),
                tokenizer_model=flags.get("tokenizer_model"),
                vocab_size=vocab,
            )
        )
        with open(args.text_file, encoding="utf-8") as f:
            ids = tok.tokenize(f.read())
        if len(ids) < args.num_tokens:
            raise SystemExit(f"--text-file gives only {len(ids)} tokens")
        return ids[: args.num_tokens]
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.num_tokens,), generator=g).tolist()


def verify(args) -> dict | None:
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    flags = _flags(args.load)
    run = build_run(flags, args.tp, args.pp, _world())
    stage = Stage(run)
    stage.load(args.load)
    ids = _input_ids(args, flags)
    result = hf_parity(stage, args.hf_dir, ids, int(flags["vocab_size"]), args.generate)
    if result is not None:
        result["layout"] = {"tp": args.tp, "pp": args.pp}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if "greedy" not in k}))
    dist.barrier()
    return result


def hf_parity(stage, hf_dir: str, ids: list[int], vocab: int, generate: int = 0) -> dict | None:
    """Our logits (and greedy tokens) vs transformers' on `ids`; every rank must call it.
    Returns the comparison on the last rank, None on the others."""
    t0 = time.perf_counter()
    logits = stage.logits(torch.tensor([ids]))
    ours_s = time.perf_counter() - t0
    ours_tokens = stage.greedy(ids, generate, vocab) if generate else []
    if logits is None or dist.get_rank() != dist.get_world_size() - 1:
        return None
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        hf_tokens = []
        if generate:
            gen = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=generate,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            hf_tokens = gen[0, len(ids) :].tolist()
    ours = logits[..., :vocab].float()
    diff = (ours - ref[..., :vocab]).abs()
    return {
        "num_tokens": len(ids),
        "vocab_size": vocab,
        "padded_vocab_size": int(logits.shape[-1]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(ref.abs().max()),
        "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
        "ours_greedy": ours_tokens,
        "hf_greedy": hf_tokens,
        "greedy_equal": ours_tokens == hf_tokens,
        "ours_forward_s": ours_s,
    }


def reshard(args) -> None:
    """Load at (tp, pp), check a forward runs, save atomically at that layout."""
    import shutil

    from megatron.early_exit.checkpoint.files import write_checkpoint_args
    from megatron.early_exit.convert.errors import ConversionError
    from megatron.early_exit.convert.hf_files import check_output_dir
    from megatron.early_exit.convert.megatron_side import (
        Stage,
        build_run,
        copy_relative_files,
        read_raw_args,
        resolved_args,
    )

    src_iter, raw = read_raw_args(args.load)
    flags = resolved_args(src_iter, raw)
    if int(os.environ.get("RANK", "0")) == 0:  # before the process group exists
        check_output_dir(args.save, args.overwrite)
    run = build_run(flags, args.tp, args.pp, _world())
    stage = Stage(run)
    iteration = stage.load(args.load)
    ids = torch.arange(min(8, run.model.seq_length)) % int(flags["vocab_size"])
    logits = stage.logits(ids.unsqueeze(0))
    # Only last-stage ranks see logits: agree on the verdict so every rank raises (no rank
    # is left waiting in the barrier below).
    ok = torch.tensor([int(logits is None or bool(torch.isfinite(logits).all()))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok):
        raise ConversionError("the loaded model produces non-finite logits")
    final = os.path.abspath(args.save)
    staging = f"{final}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    iter_dir = stage.save(staging, args=None, extra={"resharded_from": os.path.abspath(args.load)})
    if dist.get_rank() == 0:
        copy_relative_files(src_iter, iter_dir, raw)
        write_checkpoint_args(iter_dir, raw)
        old = f"{final}.old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        print(f"wrote {args.save} at TP{args.tp}PP{args.pp} (source iteration {iteration})")
    dist.barrier()


def compare(args) -> dict:
    """Load both checkpoints at TP1PP1 in one process and compare every model tensor."""
    from megatron.early_exit.convert.megatron_side import Stage, build_run

    tensors = []
    for root in (args.load, args.other):
        stage = Stage(build_run(_flags(root)))
        stage.load(root)
        tensors.append(stage.full_weights())
    a, b = tensors
    differing = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    result = {
        "equal": a.keys() == b.keys() and not differing,
        "num_tensors": len(a),
        "only_in_load": sorted(a.keys() - b.keys()),
        "only_in_other": sorted(b.keys() - a.keys()),
        "differing": differing,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()
    args = _parser().parse_args(argv)

    def go():
        from megatron.early_exit.platform.distributed import destroy_distributed

        try:
            {"verify": verify, "reshard": reshard, "compare": compare}[args.cmd](args)
        finally:
            destroy_distributed()

    return run_cli(go)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
