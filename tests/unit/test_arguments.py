"""Megatron-style flags: the registry is pinned, and each flag lands in the right field."""

from __future__ import annotations

from typing import ClassVar  # a dataclass resolves string ClassVar annotations here

import pytest
import torch

from megatron.early_exit.arguments import build_parser, config_from_args, parse_run_config
from megatron.early_exit.config import EarlyExitTransformerConfig, build_transformer_config

pytestmark = pytest.mark.unit

BASE = ["--mock-data", "--vocab-size", "128"]

# Every option string of the training CLI. Adding, renaming or removing a flag must
# update this list on purpose (and the docs), never by accident.
EXPECTED_FLAGS = [
    "--account-for-embedding-in-pipeline-split",
    "--account-for-loss-in-pipeline-split",
    "--adam-beta1",
    "--adam-beta2",
    "--adam-eps",
    "--add-qkv-bias",
    "--attention-dropout",
    "--backward-forward-ratio",
    "--bf16",
    "--clip-grad",
    "--data-cache-path",
    "--data-path",
    "--ddp-bucket-size",
    "--decoder-first-pipeline-num-layers",
    "--decoder-last-pipeline-num-layers",
    "--disable-bias-linear",
    "--dry-run",
    "--eval-interval",
    "--eval-iters",
    "--exit-confidence-head",
    "--exit-confidence-loss-weight",
    "--exit-distillation",
    "--exit-distillation-top-k",
    "--exit-interval",
    "--exit-layer-nums",
    "--exit-layer-temperature",
    "--exit-layer-weight",
    "--exit-layer-weight-init",
    "--exit-layer-weight-warmup-iters",
    "--exit-layer-weight-warmup-style",
    "--exit-loss-curriculum",
    "--exit-loss-curriculum-iters",
    "--exit-loss-curriculum-period",
    "--ffn-hidden-size",
    "--fill-explicit-bubbles",
    "--finetune",
    "--fp16",
    "--global-batch-size",
    "--group-query-attention",
    "--hidden-dropout",
    "--hidden-size",
    "--inference-compile",
    "--inference-decode-threads",
    "--init-method-std",
    "--initial-loss-scale",
    "--kv-channels",
    "--layer-dropout-depth-scale",
    "--layer-dropout-rate",
    "--layer-dropout-time-scale",
    "--load",
    "--log-interval",
    "--log-memory-to-tensorboard",
    "--log-timers-to-tensorboard",
    "--loss-scale",
    "--lr",
    "--lr-decay-iters",
    "--lr-decay-style",
    "--lr-warmup-iters",
    "--make-vocab-size-divisible-by",
    "--max-position-embeddings",
    "--merge-file",
    "--metrics-file",
    "--micro-batch-size",
    "--min-lr",
    "--mock-data",
    "--no-batch-p2p-comm",
    "--no-inference-column-major-copies",
    "--no-inference-rows-kernel",
    "--no-load-optim",
    "--no-load-rng",
    "--norm-epsilon",
    "--normalization",
    "--num-attention-heads",
    "--num-fill-cooldown-microbatches",
    "--num-fill-warmup-microbatches",
    "--num-layers",
    "--num-layers-per-virtual-pipeline-stage",
    "--num-query-groups",
    "--openai-gelu",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--pipeline-model-parallel-size",
    "--position-embedding-type",
    "--pre-exit",
    "--print-pipeline-schedule",
    "--qk-layernorm",
    "--recompute-granularity",
    "--recompute-method",
    "--recompute-num-layers",
    "--rope-scaling-factor",
    "--rotary-base",
    "--rotary-percent",
    "--save",
    "--save-interval",
    "--seed",
    "--seq-length",
    "--sequence-parallel",
    "--split",
    "--swiglu",
    "--teacher-cache",
    "--tensor-model-parallel-size",
    "--tensorboard-dir",
    "--tensorboard-log-interval",
    "--timing-log-level",
    "--tokenizer-model",
    "--tokenizer-type",
    "--train-iters",
    "--tune-exit",
    "--tune-exit-pipeline-parallel-size",
    "--tune-exit-truncate-backbone",
    "--untie-embeddings-and-output-weights",
    "--untie-exit-output-weights",
    "--use-distributed-optimizer",
    "--use-dynamic-exit-layer-weight",
    "--use-exit-block",
    "--use-exit-mlp",
    "--use-exit-norm",
    "--use-rope-scaling",
    "--virtual-pipeline-model-parallel-size",
    "--vocab-file",
    "--vocab-size",
    "--wandb-exp-name",
    "--wandb-project",
    "--wandb-save-dir",
    "--weight-decay",
]


# Every generation flag of tools/generate.py (inference.generate_config.GenerateConfig), pinned
# the same way.
EXPECTED_SERVER_FLAGS = [
    "--allowed-hosts", "--api-key", "--chat-template", "--dist-timeout", "--host",
    "--limit-concurrency", "--max-batch-size", "--max-body-bytes", "--max-queue",
    "--model-name", "--port",
    "--request-timeout", "--scheduler", "--shutdown-grace", "--timeout-keep-alive",
    "--timeout-request-read",
]  # fmt: skip

EXPECTED_GENERATE_FLAGS = [
    "--add-bos",
    "--batch-size",
    "--draft-exit-layer",
    "--draft-length",
    "--draft-threshold",
    "--draft-vocab-size",
    "--early-exit-thres",
    "--eos-token-id",
    "--exit-layers",
    "--help-generate",
    "--ignore-eos",
    "--logprobs",
    "--max-new-tokens",
    "--method",
    "--metric",
    "--mode",
    "--output-json",
    "--prompt",
    "--prompt-ids",
    "--prompts-file",
    "--sampling-seed",
    "--stop",
    "--target-agreement",
    "--temperature",
    "--threshold",
    "--top-k",
    "--top-p",
]


def _option_strings(parser) -> list[str]:
    return sorted(
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    )


def test_flag_registry_is_pinned():
    flags = _option_strings(build_parser())
    assert len(flags) == len(set(flags)), "a flag is registered twice"
    added = sorted(set(flags) - set(EXPECTED_FLAGS))
    removed = sorted(set(EXPECTED_FLAGS) - set(flags))
    assert not added and not removed, f"flags added: {added}; flags removed: {removed}"
    assert flags == EXPECTED_FLAGS  # also pins that the literal list stays sorted


def _generate_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_flag_registry_is_pinned():
    flags = _option_strings(_generate_tool().generation_parser())
    assert len(flags) == len(set(flags)), "a flag is registered twice"
    added = sorted(set(flags) - set(EXPECTED_GENERATE_FLAGS))
    removed = sorted(set(EXPECTED_GENERATE_FLAGS) - set(flags))
    assert not added and not removed, f"flags added: {added}; flags removed: {removed}"
    assert flags == EXPECTED_GENERATE_FLAGS


def test_server_flag_registry_is_pinned():
    import argparse

    from megatron.early_exit.flags import add_flags, from_args, option_strings
    from megatron.early_exit.server.config import ServerConfig

    assert option_strings(ServerConfig) == EXPECTED_SERVER_FLAGS
    p = argparse.ArgumentParser(allow_abbrev=False)
    add_flags(p, ServerConfig)
    assert from_args(ServerConfig, p.parse_args([])) == ServerConfig()


def test_parser_defaults_are_the_config_defaults():
    # argparse is generated from the fields: parsing nothing gives the dataclass defaults.
    from megatron.early_exit.config import RunConfig
    from megatron.early_exit.flags import from_args
    from megatron.early_exit.inference.generate_config import GenerateConfig

    assert config_from_args(build_parser().parse_args([]), world_size=1) == RunConfig()
    gen, rest = _generate_tool().parse_generate_config([])
    assert gen == GenerateConfig() and rest == []
    gen = from_args(GenerateConfig, _generate_tool().generation_parser().parse_args([]))
    assert gen == GenerateConfig()


def test_every_flag_has_help():
    for parser in (build_parser(), _generate_tool().generation_parser()):
        for action in parser._actions:
            assert action.help, f"{action.option_strings} has no help text"


def test_registry_declares_a_config_in_a_few_lines():
    # The pattern a new config (e.g. the server's) follows; see flags.py.
    import argparse
    from dataclasses import dataclass

    from megatron.early_exit.flags import add_flags, flag, from_args, option_strings

    @dataclass
    class DemoConfig:
        FLAG_GROUP: ClassVar[str] = "demo"
        host: str = flag("127.0.0.1", help="bind address")
        port: int = flag(5000, help="port")
        api_key: str | None = flag(None, help="key")
        strict: bool = flag(True, name="--no-strict", help="relax")
        tags: list[str] = flag([], append=True, help="repeatable")
        ids: list[int] | None = flag(None, help="one or more")

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_flags(parser, DemoConfig)
    assert option_strings(DemoConfig) == [
        "--api-key", "--host", "--ids", "--no-strict", "--port", "--tags",
    ]  # fmt: skip
    assert from_args(DemoConfig, parser.parse_args([])) == DemoConfig()
    cfg = from_args(
        DemoConfig,
        parser.parse_args(
            ["--port", "7", "--no-strict", "--tags", "a", "--tags", "b", "--ids", "1", "2"]
        ),
    )
    assert (cfg.port, cfg.strict, cfg.tags, cfg.ids, cfg.host) == (
        7,
        False,
        ["a", "b"],
        [1, 2],
        "127.0.0.1",
    )
    assert DemoConfig().tags == [] and DemoConfig().tags is not DemoConfig().tags


def test_registry_refuses_a_true_flag_without_a_negative_name():
    import argparse
    from dataclasses import dataclass

    from megatron.early_exit.flags import add_flags, flag

    @dataclass
    class Bad:
        on: bool = flag(True, help="cannot be switched off")

    with pytest.raises(TypeError, match="--no-"):
        add_flags(argparse.ArgumentParser(), Bad)


def test_no_abbreviations():
    # Megatron scripts are copy-pasted; a prefix must not silently select another flag.
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--exit-layer-num", "1"])


def test_defaults():
    run = parse_run_config(BASE, 1)
    assert run.exits.exit_layer_nums == []
    assert run.exits.pre_exit is False
    assert run.exits.untie_exit_output_weights is False
    assert run.exits.temperature(0) == 1.0
    assert run.exits.exit_layer_weight_warmup_style == "linear"
    assert run.parallel.batch_p2p_comm is True
    assert run.parallel.sequence_parallel is False
    assert run.parallel.virtual_pipeline_model_parallel_size is None
    assert run.parallel.data_parallel_size == 1
    assert run.training.params_dtype == torch.float32
    assert run.data.tokenizer_type == "NullTokenizer"
    assert run.data.vocab_size == 128
    assert run.checkpoint.save is None and run.checkpoint.save_interval is None


def test_exit_flags_map_to_exit_config():
    argv = [
        *BASE,
        "--num-layers",
        "6",
        "--exit-layer-nums",
        "2",
        "4",
        "--pre-exit",
        "--use-exit-norm",
        "--use-exit-mlp",
        "--use-exit-block",
        "--untie-exit-output-weights",
        "--exit-layer-temperature",
        "2.0",
        "--exit-layer-weight",
        "0.25",
        "0.5",
        "--exit-layer-weight-init",
        "0.0",
        "0.1",
        "--exit-layer-weight-warmup-iters",
        "7",
        "--exit-layer-weight-warmup-style",
        "cosine",
        "--use-dynamic-exit-layer-weight",
        "--exit-distillation",
    ]
    exits = parse_run_config(argv, 1).exits
    assert exits.exit_layer_nums == [2, 4]
    assert exits.num_exits == 2
    assert exits.pre_exit is True
    assert exits.use_exit_norm is True
    assert exits.use_exit_mlp is True
    assert exits.use_exit_block is True
    assert exits.untie_exit_output_weights is True
    assert exits.exit_layer_temperature == [2.0]
    # One temperature applies to every exit.
    assert [exits.temperature(i) for i in range(2)] == [2.0, 2.0]
    assert exits.exit_layer_weight == [0.25, 0.5]
    assert [exits.target_weight(i) for i in range(2)] == [0.25, 0.5]
    assert exits.exit_layer_weight_init == [0.0, 0.1]
    assert exits.exit_layer_weight_warmup_iters == 7
    assert exits.exit_layer_weight_warmup_style == "cosine"
    assert exits.use_dynamic_exit_layer_weight is True
    assert exits.exit_distillation is True


def test_per_exit_temperature():
    argv = [*BASE, "--exit-layer-nums", "1", "3", "--exit-layer-temperature", "0.5", "4"]
    exits = parse_run_config(argv, 1).exits
    assert [exits.temperature(i) for i in range(2)] == [0.5, 4.0]


def test_model_flags_map_to_model_config():
    argv = [
        *BASE,
        "--num-layers",
        "2",
        "--hidden-size",
        "96",
        "--num-attention-heads",
        "6",
        "--group-query-attention",
        "--num-query-groups",
        "2",
        "--seq-length",
        "32",
        "--normalization",
        "RMSNorm",
        "--position-embedding-type",
        "rope",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
    ]
    m = parse_run_config(argv, 1).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (2, 96, 6)
    assert m.group_query_attention is True and m.num_query_groups == 2
    assert m.seq_length == 32 and m.resolved_max_position_embeddings() == 32
    assert m.normalization == "RMSNorm"
    assert m.position_embedding_type == "rope"
    assert m.swiglu is True
    # Llama convention: 8/3 * hidden rounded up to a multiple of 64.
    assert m.resolved_ffn_hidden_size() == 256
    assert m.untie_embeddings_and_output_weights is True
    assert m.disable_bias_linear is True


def test_ffn_hidden_size_default_is_4h():
    assert (
        parse_run_config([*BASE, "--hidden-size", "32"], 1).model.resolved_ffn_hidden_size() == 128
    )


def test_training_and_checkpoint_flags():
    argv = [
        *BASE,
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--train-iters",
        "3",
        "--exit-interval",
        "2",
        "--lr",
        "0.01",
        "--min-lr",
        "0.001",
        "--lr-decay-style",
        "linear",
        "--lr-warmup-iters",
        "2",
        "--clip-grad",
        "0",
        "--seed",
        "7",
        "--save",
        "ckpt",
        "--save-interval",
        "2",
        "--load",
        "old",
        "--finetune",
        "--no-load-optim",
        "--no-load-rng",
        "--log-interval",
        "5",
        "--metrics-file",
        "m.jsonl",
    ]
    run = parse_run_config(argv, 2)
    t = run.training
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters) == (4, 16, 3)
    assert t.exit_interval == 2
    assert (t.lr, t.min_lr, t.lr_decay_style, t.lr_warmup_iters) == (0.01, 0.001, "linear", 2)
    assert t.clip_grad == 0.0 and t.seed == 7
    assert t.num_microbatches(run.parallel.data_parallel_size) == 2
    c = run.checkpoint
    assert (c.save, c.save_interval, c.load) == ("ckpt", 2, "old")
    assert c.finetune and c.no_load_optim and c.no_load_rng
    assert run.logging.log_interval == 5 and run.logging.metrics_file == "m.jsonl"


def test_no_batch_p2p_comm_flag():
    run = parse_run_config([*BASE, "--no-batch-p2p-comm"], 1)
    assert run.parallel.batch_p2p_comm is False


def test_parallel_flags():
    argv = [
        *BASE,
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--use-distributed-optimizer",
    ]
    p = parse_run_config(argv, 8).parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 2)
    assert p.world_size == 8 and p.data_parallel_size == 2
    assert p.sequence_parallel is True  # kept with TP > 1
    assert p.use_distributed_optimizer is True


def test_sequence_parallel_with_tp1_is_disabled_with_warning():
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect with TP=1"):
        run = parse_run_config([*BASE, "--sequence-parallel"], 2)
    assert run.parallel.sequence_parallel is False


def test_virtual_pipeline_flag_maps_to_virtual_stage_count():
    # Megatron's arithmetic: 4 layers per stage / 2 layers per virtual stage.
    args = build_parser().parse_args(
        [*BASE, "--num-layers", "8", "--pipeline-model-parallel-size", "2",
         "--num-layers-per-virtual-pipeline-stage", "2"]
    )  # fmt: skip
    run = config_from_args(args, world_size=2)
    assert run.parallel.virtual_pipeline_model_parallel_size == 2


def test_interleaved_layout_parses_with_either_flag():
    layout = [*BASE, "--num-layers", "8", "--pipeline-model-parallel-size", "4",
              "--global-batch-size", "16", "--micro-batch-size", "2"]  # fmt: skip
    a = parse_run_config([*layout, "--num-layers-per-virtual-pipeline-stage", "1"], 4)
    b = parse_run_config([*layout, "--virtual-pipeline-model-parallel-size", "2"], 4)
    assert a.parallel.virtual_pipeline_model_parallel_size == 2
    assert b.parallel.virtual_pipeline_model_parallel_size == 2
    config = build_transformer_config(a)
    assert config.virtual_pipeline_model_parallel_size == 2
    # Layer ownership with virtual stages: rank r holds chunks r and r + 4 (one layer each).
    split = a.parallel.stage_split(8)
    assert [split.stage_of(n) for n in range(1, 9)] == [0, 1, 2, 3, 0, 1, 2, 3]
    # --dry-run's layout and stage costs follow the chunks.
    from megatron.early_exit import perf_model
    from megatron.early_exit.training.layout import describe_run

    run = parse_run_config(
        [*layout, "--virtual-pipeline-model-parallel-size", "2", "--exit-layer-nums", "2", "5",
         "--untie-exit-output-weights"], 4
    )  # fmt: skip
    stages = describe_run(run).stages
    assert stages[0].chunks == [(1, 1), (5, 5)] and stages[0].exit_layers == [5]
    assert stages[1].exit_layers == [2] and stages[3].exit_layers == []
    costs = perf_model.stage_costs(run)
    assert costs[0].exits == costs[1].exits > 0 and costs[2].exits == 0
    # The suggestion considers only splits whose stages divide into the 2 model chunks.
    suggested = perf_model.suggest_split(run).split
    assert suggested.virtual == 2 and suggested.chunk_counts()
    assert "suggested split:" in perf_model.format_stage_costs(run)


def test_build_transformer_config_carries_exits():
    argv = [
        *BASE,
        "--tensor-model-parallel-size",
        "2",
        "--exit-layer-nums",
        "1",
        "3",
        "--no-batch-p2p-comm",
    ]
    run = parse_run_config(argv, 2)
    cfg = build_transformer_config(run)
    assert isinstance(cfg, EarlyExitTransformerConfig)
    assert cfg.early_exit is run.exits
    assert cfg.early_exit.exit_layer_nums == [1, 3]
    assert cfg.num_layers == 4 and cfg.hidden_size == 64 and cfg.ffn_hidden_size == 256
    assert cfg.tensor_model_parallel_size == 2
    assert cfg.batch_p2p_comm is False
    assert cfg.params_dtype == torch.float32
