"""Megatron-LM / EE-LLM compatible command-line flags -> typed `RunConfig`.

This is the only module that knows about flags. Every flag is registered here once;
`tests/unit/test_arguments.py` pins the full list so flags do not grow silently.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron.early_exit.checkpoint.files import CheckpointError, read_checkpoint_args
from megatron.early_exit.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ExitConfig,
    FillConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
)
from megatron.early_exit.data.tokenizers import add_tokenizer_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_early_exit_gpt.py",
        description="Pretrain an early-exit GPT with 3D parallelism (launch with torchrun).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("early exit")
    g.add_argument(
        "--exit-layer-nums",
        type=int,
        nargs="+",
        default=[],
        help="1-based layers that get an exit (after the layer; before with --pre-exit)",
    )
    g.add_argument("--pre-exit", action="store_true")
    g.add_argument("--use-exit-norm", action="store_true")
    g.add_argument("--use-exit-mlp", action="store_true")
    g.add_argument("--use-exit-block", action="store_true")
    g.add_argument("--untie-exit-output-weights", action="store_true")
    g.add_argument("--exit-layer-temperature", type=float, nargs="+", default=[])
    g.add_argument("--exit-layer-weight", type=float, nargs="+", default=[])
    g.add_argument("--exit-layer-weight-init", type=float, nargs="+", default=[])
    g.add_argument("--exit-layer-weight-warmup-iters", type=int, default=0)
    g.add_argument(
        "--exit-layer-weight-warmup-style", choices=["linear", "cosine"], default="linear"
    )
    g.add_argument("--use-dynamic-exit-layer-weight", action="store_true")
    g.add_argument(
        "--exit-distillation",
        action="store_true",
        help="train exits on KL(final layer || exit) instead of cross entropy with the data "
        "(the final layer's distribution is detached; needs PP=1)",
    )

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--no-batch-p2p-comm", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument(
        "--eval-interval", type=int, default=None, help="validate every N iterations and at the end"
    )
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation")
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="stop after an iteration divisible by this (saving if --save)",
    )
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument(
        "--tune-exit",
        action="store_true",
        help="EE-Tuning: freeze the loaded backbone, train only the exit heads on exit losses",
    )
    g.add_argument(
        "--tune-exit-pipeline-parallel-size",
        type=int,
        default=None,
        help="with --tune-exit: run (and load) only the first k pipeline stages; all exits "
        "must live there (world size TP x k x DP)",
    )

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="seeded synthetic token ids")
    g.add_argument(
        "--data-path", nargs="+", default=[], help="PREFIX or weighted blend 'W1 P1 W2 P2 ...'"
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument("--data-cache-path", default=None, help="index cache (shared by all nodes)")
    add_tokenizer_arguments(g)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")

    g = p.add_argument_group("bubble filling")
    g.add_argument(
        "--fill-explicit-bubbles",
        action="store_true",
        help="train exits with extra microbatches in 1F1B pipeline bubbles",
    )
    g.add_argument(
        "--num-fill-warmup-microbatches", type=int, default=None, help="default: automatic"
    )
    g.add_argument(
        "--num-fill-cooldown-microbatches", type=int, default=None, help="default: automatic"
    )
    g.add_argument(
        "--backward-forward-ratio",
        type=float,
        default=2.0,
        help="backward/forward time, for the automatic fill counts",
    )
    g.add_argument(
        "--print-pipeline-schedule",
        action="store_true",
        help="print each stage's order of forward/backward/fill steps at start-up",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--metrics-file", default=None)
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="parse and validate for WORLD_SIZE GPUs, print the parallel layout and parameter "
        "counts, and exit without creating process groups",
    )
    return p


def config_from_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    vpp = None
    pp = args.pipeline_model_parallel_size
    if (
        args.num_layers_per_virtual_pipeline_stage is not None
        and pp > 0
        and args.num_layers % pp == 0
    ):
        per_stage = args.num_layers // max(args.pipeline_model_parallel_size, 1)
        n = args.num_layers_per_virtual_pipeline_stage
        if n <= 0 or per_stage % n:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {n} must divide the {per_stage} "
                "layers of each pipeline stage"
            )
        vpp = per_stage // n
    return RunConfig(
        model=ModelConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            ffn_hidden_size=args.ffn_hidden_size,
            kv_channels=args.kv_channels,
            seq_length=args.seq_length,
            max_position_embeddings=args.max_position_embeddings,
            normalization=args.normalization,
            norm_epsilon=args.norm_epsilon,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            rotary_percent=args.rotary_percent,
            swiglu=args.swiglu,
            group_query_attention=args.group_query_attention,
            num_query_groups=args.num_query_groups,
            untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
            disable_bias_linear=args.disable_bias_linear,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            init_method_std=args.init_method_std,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        ),
        exits=ExitConfig(
            exit_layer_nums=list(args.exit_layer_nums),
            pre_exit=args.pre_exit,
            use_exit_norm=args.use_exit_norm,
            use_exit_mlp=args.use_exit_mlp,
            use_exit_block=args.use_exit_block,
            untie_exit_output_weights=args.untie_exit_output_weights,
            exit_layer_temperature=list(args.exit_layer_temperature),
            exit_layer_weight=list(args.exit_layer_weight),
            exit_layer_weight_init=list(args.exit_layer_weight_init),
            exit_layer_weight_warmup_iters=args.exit_layer_weight_warmup_iters,
            exit_layer_weight_warmup_style=args.exit_layer_weight_warmup_style,
            use_dynamic_exit_layer_weight=args.use_dynamic_exit_layer_weight,
            exit_distillation=args.exit_distillation,
        ),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=args.sequence_parallel,
            use_distributed_optimizer=args.use_distributed_optimizer,
            batch_p2p_comm=not args.no_batch_p2p_comm,
            tune_exit_pipeline_parallel_size=args.tune_exit_pipeline_parallel_size,
            world_size=world_size,
        ),
        training=TrainingConfig(
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            train_iters=args.train_iters,
            exit_interval=args.exit_interval,
            eval_interval=args.eval_interval,
            eval_iters=args.eval_iters,
            lr=args.lr,
            min_lr=args.min_lr,
            lr_decay_style=args.lr_decay_style,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters,
            clip_grad=args.clip_grad,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            seed=args.seed,
            bf16=args.bf16,
            fp16=args.fp16,
            loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale,
            tune_exit=args.tune_exit,
        ),
        data=DataConfig(
            mock_data=args.mock_data,
            data_path=list(args.data_path),
            split=args.split,
            data_cache_path=args.data_cache_path,
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
        ),
        checkpoint=CheckpointConfig(
            save=args.save,
            load=args.load,
            save_interval=args.save_interval,
            no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng,
            finetune=args.finetune,
        ),
        logging=LoggingConfig(log_interval=args.log_interval, metrics_file=args.metrics_file),
        fill=FillConfig(
            fill_explicit_bubbles=args.fill_explicit_bubbles,
            num_fill_warmup_microbatches=args.num_fill_warmup_microbatches,
            num_fill_cooldown_microbatches=args.num_fill_cooldown_microbatches,
            backward_forward_ratio=args.backward_forward_ratio,
            print_pipeline_schedule=args.print_pipeline_schedule,
        ),
    )


def parse_run_config(
    argv: Sequence[str] | None, world_size: int, device_is_cuda: bool = False
) -> RunConfig:
    """Parse and validate; raises ConfigError (before any process group exists)."""
    args = parse_args(argv)
    return config_from_args(args, world_size).validate(device_is_cuda=device_is_cuda)


def parse_args(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse flags; with `--load DIR`, the checkpoint's recorded model/tokenizer flags are the
    defaults (flags given on the command line still win)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "load", None):
        try:
            saved = read_checkpoint_args(args.load)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from exc
        if saved:
            known = {a.dest for a in parser._actions}
            parser.set_defaults(**{k: v for k, v in saved.items() if k in known})
            args = parser.parse_args(argv)
    return args
