"""Pretrain an early-exit GPT. Launch with torchrun, e.g.

    torchrun --nproc-per-node 2 pretrain_early_exit_gpt.py --mock-data --vocab-size 256 \
        --pipeline-model-parallel-size 2 --exit-layer-nums 1 3 --train-iters 20
"""

import sys


def main(argv=None, on_checkpoint_staged=None) -> int:
    """`on_checkpoint_staged(iteration)`: called on every rank mid-save (tests inject faults)."""
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    from megatron.early_exit.arguments import parse_args, parse_run_config
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.data.tokenizers import TokenizerError, build_tokenizer
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env

    try:
        # A dry run checks a GPU launch script anywhere: validate as on CUDA (bf16 allowed)
        # and never touch devices or process groups.
        dry_run = parse_args(argv).dry_run
        platform = None if dry_run else init_platform()
        is_cuda = dry_run or platform.is_cuda
        run = parse_run_config(argv, world_size_from_env(), device_is_cuda=is_cuda)
        tokenizer = build_tokenizer(run.data.tokenizer_config())
        run.resolve_vocab(tokenizer.vocab_size)
    except (ConfigError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        return dry_run_report(run)

    from megatron.early_exit.data.gpt_data import DataError
    from megatron.early_exit.errors import CheckpointError
    from megatron.early_exit.model.specs import transformer_engine_usable
    from megatron.early_exit.training.trainer import Trainer
    from megatron.early_exit.tuning import ExitTuning

    try:
        use_te = transformer_engine_usable(platform.is_cuda)
        mode = ExitTuning(run) if run.training.tune_exit else None  # None: pretraining
        trainer = Trainer(
            run,
            platform,
            use_te=use_te,
            tokenizer=tokenizer,
            mode=mode,
            on_checkpoint_staged=on_checkpoint_staged,
        )
        trainer.train()
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    return 0


def dry_run_report(run) -> int:
    import json

    from megatron.early_exit import perf_model
    from megatron.early_exit.training.layout import describe_run

    layout = describe_run(run)
    print("dry run: configuration is valid")
    print(layout.format())
    print(perf_model.format_stage_costs(run))
    print(perf_model.format_memory_estimate(run))
    report = {**layout.to_dict(), **perf_model.to_dict(run)}
    print("DRY_RUN_JSON " + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
