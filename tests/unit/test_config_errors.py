"""Impossible configurations fail fast with a ConfigError that names the problem.

Everything here runs through `parse_run_config(argv, world_size)`, the same entry the
training script uses, and must fail before any process group exists.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ConfigError

pytestmark = pytest.mark.unit

# Smallest argv that is valid on its own (4 layers, 4 heads, hidden 64, world size 1).
BASE = ["--mock-data", "--vocab-size", "128"]


def _with_base(*extra: str) -> list[str]:
    return [*BASE, *extra]


# (id, argv, world_size, substrings the message must contain)
CASES = [
    (
        "negative-decode-threads",
        _with_base("--inference-decode-threads", "-1"),
        1,
        ["--inference-decode-threads must be >= 0", "-1"],
    ),
    (
        "exit-layer-0",
        _with_base("--exit-layer-nums", "0"),
        1,
        ["--exit-layer-nums", "exit layer 0 is out of range", "1..4", "1-based"],
    ),
    (
        "exit-layer-num-layers-plus-1",
        _with_base("--exit-layer-nums", "1", "5"),
        1,
        ["exit layer 5 is out of range", "1..4"],
    ),
    (
        "exit-layer-out-of-range-bigger-model",
        _with_base("--num-layers", "8", "--exit-layer-nums", "9"),
        1,
        ["exit layer 9 is out of range", "1..8"],
    ),
    (
        "duplicate-exit-layers",
        _with_base("--exit-layer-nums", "2", "2"),
        1,
        ["--exit-layer-nums has duplicates", "[2, 2]"],
    ),
    (
        "exit-layers-not-increasing",
        _with_base("--exit-layer-nums", "3", "1"),
        1,
        ["--exit-layer-nums must be increasing", "[3, 1]"],
    ),
    (
        "exit-weight-count-too-few",
        _with_base("--exit-layer-nums", "1", "3", "--exit-layer-weight", "0.5"),
        1,
        ["--exit-layer-weight has 1 values but there are 2 exits", "one per exit"],
    ),
    (
        "exit-weight-count-too-many",
        _with_base("--exit-layer-nums", "1", "--exit-layer-weight", "0.5", "0.5"),
        1,
        ["--exit-layer-weight has 2 values but there are 1 exits"],
    ),
    (
        "exit-weight-without-exits",
        _with_base("--exit-layer-weight", "0.5"),
        1,
        ["exit layer weights given but no --exit-layer-nums"],
    ),
    (
        "exit-weight-init-count",
        _with_base(
            "--exit-layer-nums",
            "1",
            "3",
            "--exit-layer-weight-init",
            "0.0",
            "--exit-layer-weight-warmup-iters",
            "10",
        ),
        1,
        ["--exit-layer-weight-init has 1 values but there are 2 exits"],
    ),
    (
        "warmup-iters-without-init",
        _with_base("--exit-layer-nums", "1", "--exit-layer-weight-warmup-iters", "10"),
        1,
        ["--exit-layer-weight-warmup-iters needs --exit-layer-weight-init"],
    ),
    (
        "negative-warmup-iters",
        _with_base("--exit-layer-nums", "1", "--exit-layer-weight-warmup-iters", "-1"),
        1,
        ["--exit-layer-weight-warmup-iters must be >= 0"],
    ),
    (
        "negative-weight",
        _with_base("--exit-layer-nums", "1", "2", "--exit-layer-weight", "0.5", "-0.5"),
        1,
        ["exit layer weights must be >= 0", "-0.5"],
    ),
    (
        "negative-init-weight",
        _with_base(
            "--exit-layer-nums",
            "1",
            "--exit-layer-weight-init",
            "-1",
            "--exit-layer-weight-warmup-iters",
            "5",
        ),
        1,
        ["exit layer weights must be >= 0", "-1"],
    ),
    (
        "temperature-count",
        _with_base("--exit-layer-nums", "1", "2", "3", "--exit-layer-temperature", "1", "2"),
        1,
        ["--exit-layer-temperature takes one value or one per exit (3), got 2"],
    ),
    (
        "temperature-zero",
        _with_base("--exit-layer-nums", "1", "--exit-layer-temperature", "0"),
        1,
        ["--exit-layer-temperature must be > 0", "0.0"],
    ),
    (
        "temperature-negative",
        _with_base("--exit-layer-nums", "1", "2", "--exit-layer-temperature", "1", "-2"),
        1,
        ["--exit-layer-temperature must be > 0", "-2.0"],
    ),
    (
        "heads-not-divisible-by-tp",
        _with_base(
            "--hidden-size", "48", "--num-attention-heads", "3", "--tensor-model-parallel-size", "2"
        ),
        2,
        ["--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"],
    ),
    (
        "query-groups-not-divisible-by-tp",
        _with_base(
            "--group-query-attention",
            "--num-query-groups",
            "1",
            "--tensor-model-parallel-size",
            "2",
        ),
        2,
        ["--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"],
    ),
    (
        "heads-not-divisible-by-query-groups",
        _with_base("--group-query-attention", "--num-query-groups", "3"),
        1,
        ["--num-attention-heads 4 is not divisible by --num-query-groups 3"],
    ),
    (
        "gqa-without-groups",
        _with_base("--group-query-attention"),
        1,
        ["--group-query-attention needs --num-query-groups"],
    ),
    (
        "layers-not-divisible-by-pp",
        _with_base("--num-layers", "3", "--pipeline-model-parallel-size", "2"),
        2,
        ["--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"],
    ),
    (
        "world-not-divisible-by-tp-pp",
        _with_base("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"),
        6,
        ["world size 6 is not divisible by", "tensor-parallel size 2", "= 4"],
    ),
    (
        "world-smaller-than-tp",
        _with_base("--tensor-model-parallel-size", "2"),
        1,
        ["world size 1 is not divisible by"],
    ),
    (
        "global-batch-not-divisible",
        _with_base("--micro-batch-size", "2", "--global-batch-size", "6"),
        2,
        [
            "--global-batch-size 6 is not divisible by --micro-batch-size 2",
            "data-parallel size 2 = 4",
        ],
    ),
    (
        "exit-interval-zero",
        _with_base("--exit-interval", "0"),
        1,
        ["--exit-interval must be > 0"],
    ),
    (
        "min-lr-above-lr",
        _with_base("--lr", "1e-4", "--min-lr", "1e-3"),
        1,
        ["--min-lr 0.001 is larger than --lr 0.0001"],
    ),
    (
        "bf16-on-cpu",
        _with_base("--bf16"),
        1,
        ["--bf16/--fp16 need a CUDA GPU", "CPU"],
    ),
    (
        "fp16-on-cpu",
        _with_base("--fp16"),
        1,
        ["--bf16/--fp16 need a CUDA GPU"],
    ),
    (
        "bf16-with-fp16",
        _with_base("--bf16", "--fp16"),
        1,
        ["--bf16 and --fp16 are mutually exclusive"],
    ),
    (
        "interleaved-pp2-batched-p2p",
        _with_base(
            "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"
        ),
        2,
        ["interleaved", "batched p2p", "wrong losses", "--no-batch-p2p-comm"],
    ),
    (
        "interleaved-microbatches-not-divisible",
        _with_base(
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--no-batch-p2p-comm",
        ),
        2,
        ["number of microbatches (1", "divisible by --pipeline-model-parallel-size 2"],
    ),
    (
        "interleaved-tune-exit-first-k-ranks",
        _with_base(
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "4",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--exit-layer-nums",
            "3",
            "--untie-exit-output-weights",
            "--global-batch-size",
            "8",
            "--tune-exit",
            "--load",
            "/nonexistent",
            "--tune-exit-pipeline-parallel-size",
            "2",
        ),  # fmt: skip
        4,
        [
            "--tune-exit-pipeline-parallel-size runs only the first k pipeline ranks",
            "every rank holds layers from across the model",
        ],
    ),
    (
        "interleaved-pp1",
        _with_base("--virtual-pipeline-model-parallel-size", "2"),
        1,
        ["--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1"],
    ),
    (
        "interleaved-layers-not-divisible",
        _with_base(
            "--num-layers",
            "6",
            "--pipeline-model-parallel-size",
            "2",
            "--virtual-pipeline-model-parallel-size",
            "2",
            "--no-batch-p2p-comm",
        ),
        2,
        [
            "--num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x "
            "--virtual-pipeline-model-parallel-size 2"
        ],
    ),
    (
        "interleaved-both-flags-disagree",
        _with_base(
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "2",
            "--virtual-pipeline-model-parallel-size",
            "4",
        ),
        2,
        [
            "--virtual-pipeline-model-parallel-size 4 disagrees with "
            "--num-layers-per-virtual-pipeline-stage 2"
        ],
    ),
    (
        "interleaved-bubble-filling",
        _with_base(
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "4",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--global-batch-size",
            "8",
            "--fill-explicit-bubbles",
        ),
        4,
        ["--fill-explicit-bubbles", "--num-layers-per-virtual-pipeline-stage"],
    ),
    (
        "interleaved-uneven-layers-per-virtual-stage",
        _with_base(
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--no-batch-p2p-comm",
        ),  # fmt: skip
        2,
        [
            "--num-layers-per-virtual-pipeline-stage does not fit uneven stages",
            "--virtual-pipeline-model-parallel-size",
        ],  # fmt: skip
    ),
    (
        "interleaved-uneven-first-not-divisible",
        _with_base(
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "3",
            "--virtual-pipeline-model-parallel-size",
            "2",
            "--no-batch-p2p-comm",
        ),  # fmt: skip
        2,
        [
            "--decoder-first-pipeline-num-layers 3 is not divisible by "
            "--virtual-pipeline-model-parallel-size 2"
        ],  # fmt: skip
    ),
    (
        "interleaved-account-for-not-divisible",
        _with_base(
            "--num-layers",
            "7",
            "--pipeline-model-parallel-size",
            "2",
            "--account-for-embedding-in-pipeline-split",
            "--virtual-pipeline-model-parallel-size",
            "3",
            "--no-batch-p2p-comm",
        ),  # fmt: skip
        2,
        [
            "--account-for-*-in-pipeline-split",
            "holds 4 layers",
            "--virtual-pipeline-model-parallel-size 3",
        ],  # fmt: skip
    ),
    (
        "interleaved-pp2-first-and-last",
        _with_base(
            "--num-layers",
            "6",
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "2",
            "--decoder-last-pipeline-num-layers",
            "4",
            "--virtual-pipeline-model-parallel-size",
            "2",
            "--no-batch-p2p-comm",
        ),  # fmt: skip
        2,
        [
            "--decoder-first-pipeline-num-layers with --decoder-last-pipeline-num-layers",
            "give only one of them",
        ],  # fmt: skip
    ),
    (
        "virtual-stage-does-not-divide-stage",
        _with_base(
            "--num-layers",
            "6",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "2",
        ),
        2,
        ["--num-layers-per-virtual-pipeline-stage 2 must divide the 3 layers"],
    ),
    (
        "missing-mock-data",
        ["--vocab-size", "128"],
        1,
        ["no training data", "--mock-data"],
    ),
    (
        "null-tokenizer-without-vocab-size",
        ["--mock-data"],
        1,
        ["NullTokenizer needs --vocab-size"],
    ),
    (
        "unknown-tokenizer",
        _with_base("--tokenizer-type", "BertWordPiece"),
        1,
        ["--tokenizer-type 'BertWordPiece' is unknown", "GPT2BPETokenizer"],
    ),
    (
        "mock-data-with-real-tokenizer",
        _with_base("--tokenizer-type", "GPT2BPETokenizer"),
        1,
        ["--mock-data generates token ids"],
    ),
    (
        "mock-and-real-data",
        _with_base("--data-path", "corpus_text_document"),
        1,
        ["--mock-data and --data-path exclude each other"],
    ),
    (
        "save-interval-without-save",
        _with_base("--save-interval", "5"),
        1,
        ["--save-interval needs --save"],
    ),
    (
        "save-interval-zero",
        _with_base("--save", "/tmp/ckpt", "--save-interval", "0"),
        1,
        ["--save-interval must be > 0"],
    ),
    (
        "hidden-not-divisible-by-heads",
        _with_base("--hidden-size", "66"),
        1,
        ["--hidden-size 66 is not divisible by --num-attention-heads 4"],
    ),
    (
        "max-position-below-seq-length",
        _with_base("--seq-length", "64", "--max-position-embeddings", "32"),
        1,
        ["--max-position-embeddings 32 < --seq-length 64"],
    ),
    (
        "log-interval-zero",
        _with_base("--log-interval", "0"),
        1,
        ["--log-interval must be >= 1"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "world_size", "needles"),
    [pytest.param(argv, ws, needles, id=name) for name, argv, ws, needles in CASES],
)
def test_impossible_config_raises_config_error(argv, world_size, needles):
    with pytest.raises(ConfigError) as info:
        parse_run_config(argv, world_size)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    # Validation happens before (and without) any process group.
    assert torch.distributed.is_initialized() is False


def test_config_error_is_a_value_error():
    # Callers that catch ValueError (argparse-style) still see it.
    assert issubclass(ConfigError, ValueError)


def test_bf16_with_fp16_refused_even_on_cuda():
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse_run_config(_with_base("--bf16", "--fp16"), 1, device_is_cuda=True)
    assert torch.distributed.is_initialized() is False


def test_bf16_accepted_when_device_is_cuda():
    run = parse_run_config(_with_base("--bf16"), 1, device_is_cuda=True)
    assert run.training.bf16 is True
    assert run.training.params_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("world_size", "extra", "dp", "gbs", "num_microbatches"),
    [
        (4, ["--micro-batch-size", "2", "--global-batch-size", "8"], 1, 8, 4),
        (8, ["--micro-batch-size", "2", "--global-batch-size", "8"], 2, 8, 2),
        (8, ["--micro-batch-size", "3"], 2, 6, 1),  # default global batch = micro x DP
    ],
)
def test_valid_config_parses(world_size, extra, dp, gbs, num_microbatches):
    argv = _with_base(
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
        "--exit-layer-nums",
        "1",
        "3",
        *extra,
    )
    run = parse_run_config(argv, world_size)
    assert torch.distributed.is_initialized() is False
    assert run.parallel.world_size == world_size
    assert run.parallel.tensor_model_parallel_size == 2
    assert run.parallel.pipeline_model_parallel_size == 2
    assert run.parallel.data_parallel_size == dp
    assert run.training.resolved_global_batch_size(dp) == gbs
    assert run.training.num_microbatches(dp) == num_microbatches
    assert run.exits.exit_layer_nums == [1, 3]
    assert run.exits.num_exits == 2
    # Vocabulary padded so each of the 2 TP shards gets the same share.
    assert run.padded_vocab_size() == 256


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--exit-layer-nums", "1", "--exit-layer-weight-init", "0.5"], "no effect without"),
        (["--exit-layer-nums", "1", "--exit-layer-temperature", "inf"], "must be > 0"),
        (["--num-query-groups", "2"], "needs --group-query-attention"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--adam-beta1", "2"], "--adam-beta1 must be in [0, 1)"),
        (["--lr-decay-iters", "-5"], "--lr-decay-iters must be > 0"),
        (["--rotary-percent", "0"], "--rotary-percent must be in (0, 1]"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--loss-scale", "-1"], "--loss-scale must be > 0"),
        (["--initial-loss-scale", "0"], "--initial-loss-scale must be > 0"),
    ],
)
def test_out_of_range_values_are_refused(argv, needle):
    base = ["--mock-data", "--vocab-size", "128"]
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_run_config([*base, *argv], 1)


def test_tokenizer_vocabulary_larger_than_model_vocabulary_is_refused():
    from megatron.early_exit.arguments import parse_run_config as parse

    run = parse(["--data-path", "corpus", "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-size", "1000"], 1)  # fmt: skip
    with pytest.raises(
        ConfigError, match="the tokenizer has 50257 tokens but --vocab-size is 1000"
    ):
        run.resolve_vocab(50257)
    run.data.vocab_size = None
    run.resolve_vocab(50257)
    assert run.padded_vocab_size() == 50304  # padded to a multiple of 128 x TP
