"""Cache the frozen teacher for EE-Tuning: run the model once, tune the exits from disk.

    torchrun --nproc-per-node 1 tools/cache_teacher.py --teacher-cache DIR \\
        [--teacher-top-k 64] [--teacher-cache-dtype fp16|bf16|fp32|fp64] TUNING FLAGS...
    torchrun --nproc-per-node 1 pretrain_early_exit_gpt.py --teacher-cache DIR TUNING FLAGS...

TUNING FLAGS are those of the `--tune-exit` run that will read the cache (--load, data,
--seq-length, batch sizes, --train-iters, --eval-interval/--eval-iters, exit flags): the
cache holds exactly the train and validation samples that run reads. Per token it stores the
exit heads' input hidden states and the final layer's top-k ids and log-probabilities
(megatron/early_exit/tuning/teacher_cache.py documents the format and the effect of fp16
and of top-k). One process, TP=1, PP=1. Bad input: one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], add_help=False, allow_abbrev=False
    )
    p.add_argument("--teacher-top-k", type=int, default=64,
                   help="final-layer token ids kept per token (sparse distillation)")  # fmt: skip
    p.add_argument("--teacher-cache-dtype", default="fp16",
                   choices=["fp16", "bf16", "fp32", "fp64"],
                   help="storage dtype of the cached hidden states")  # fmt: skip
    return p


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        tool_parser().print_help()
        return 0
    own, rest = tool_parser().parse_known_args(argv)
    if "--tune-exit" not in rest:
        rest.append("--tune-exit")

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.data.gpt_data import samples_per_split
    from megatron.early_exit.errors import UserError
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env

    try:
        world = world_size_from_env()
        if world != 1:
            raise UserError(f"run tools/cache_teacher.py in one process (world size {world})")
        run = parse_run_config(rest, world)
        out_dir = run.training.teacher_cache
        if out_dir is None:
            raise UserError("nowhere to write: give --teacher-cache DIR")
        if run.parallel.tensor_model_parallel_size != 1:
            raise UserError("tools/cache_teacher.py runs with --tensor-model-parallel-size 1")
        # The teacher needs the whole model: no cache reading, no truncation here.
        run.training.teacher_cache = None
        run.training.tune_exit_truncate_backbone = False
        from megatron.early_exit.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(run.data.tokenizer_config())
        run.resolve_vocab(tokenizer.vocab_size)
        platform = init_platform()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron.early_exit.training.trainer import Trainer
    from megatron.early_exit.tuning import ExitTuning
    from megatron.early_exit.tuning.teacher_cache import write_cache

    try:
        trainer = Trainer(run, platform, tokenizer=tokenizer, mode=ExitTuning(run))
        t = run.training
        gbs = trainer.global_batch_size
        eval_iters = t.eval_iters if t.eval_interval else 0
        n_train, n_valid, _ = samples_per_split(t.train_iters, gbs, t.eval_interval, eval_iters)
        splits = {"train": (trainer.dataset, n_train)}
        if n_valid:
            splits["valid"] = (trainer.valid_dataset, n_valid)
        start = time.perf_counter()
        meta = write_cache(
            out_dir,
            trainer.state.unwrapped,
            splits,
            run,
            own.teacher_top_k,
            own.teacher_cache_dtype,
            run.checkpoint.load,
        )
        elapsed = time.perf_counter() - start
        tokens = sum(meta["splits"].values()) * run.model.seq_length
        print(
            f"teacher cache written to {out_dir}: {meta['splits']} samples, top-{meta['top_k']}, "
            f"{own.teacher_cache_dtype} hidden states; {tokens / elapsed:.1f} tokens/s",
            flush=True,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
