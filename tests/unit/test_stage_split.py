"""The layer split of stage_split.py equals megatron-core's, and bad splits name the flags."""

import pytest

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.stage_split import StageSplit, split_of_config

pytestmark = pytest.mark.unit

SPLITS = [
    StageSplit(8, 2),
    StageSplit(8, 4),
    StageSplit(7, 2, first=3),
    StageSplit(7, 2, last=2),
    StageSplit(10, 4, first=1, last=3),
    StageSplit(9, 3, first=1),
    StageSplit(8, 3, last=2),
    StageSplit(6, 4, account_for_embedding=True, account_for_loss=True),
    StageSplit(7, 4, account_for_embedding=True),
    StageSplit(11, 4, account_for_loss=True),
]


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_split_matches_megatron_core(split):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=split.num_layers,
        hidden_size=16,
        num_attention_heads=2,
        pipeline_model_parallel_size=split.pipeline_size,
        pipeline_dtype=__import__("torch").float32,
        **split.megatron_kwargs(),
    )
    pp = split.pipeline_size
    assert split.counts() == [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    assert split.offsets() == [get_transformer_layer_offset(config, pp_rank=r) for r in range(pp)]
    assert split_of_config(config) == split
    owners = [split.stage_of(n) for n in range(1, split.num_layers + 1)]
    assert owners == sorted(owners) and owners.count(0) == split.counts()[0]


VIRTUAL_SPLITS = [
    StageSplit(8, 2, virtual=2),
    StageSplit(12, 2, first=4, virtual=2),
    StageSplit(6, 2, last=4, virtual=2),
    StageSplit(14, 4, first=2, last=4, virtual=2),
    StageSplit(6, 2, account_for_embedding=True, account_for_loss=True, virtual=2),
    StageSplit(15, 4, account_for_embedding=True, virtual=2),
    StageSplit(10, 3, account_for_embedding=True, account_for_loss=True, virtual=2),
]


@pytest.mark.parametrize("split", VIRTUAL_SPLITS, ids=str)
def test_virtual_split_matches_megatron_core(split):
    """Uneven stages with model chunks: every chunk's layers and offset as megatron-core's."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=split.num_layers,
        hidden_size=16,
        num_attention_heads=2,
        pipeline_model_parallel_size=split.pipeline_size,
        virtual_pipeline_model_parallel_size=split.virtual,
        pipeline_dtype=torch.float32,
        **split.megatron_kwargs(),
    )
    pp, v = split.pipeline_size, split.virtual
    for r, ranges in enumerate(split.chunk_ranges()):
        for c, (first, last) in enumerate(ranges):
            assert last - first + 1 == get_num_layers_to_build(config, vp_stage=c, pp_rank=r)
            assert first - 1 == get_transformer_layer_offset(config, vp_stage=c, pp_rank=r)
    assert [sum(c) for c in split.chunk_counts()] == split.counts()
    assert split_of_config(config) == split
    owners = [split.chunk_of(n) for n in range(1, split.num_layers + 1)]
    assert owners == sorted(owners, key=lambda rc: rc[1] * pp + rc[0])  # virtual-stage order
    assert {c for _, c in owners} == set(range(v))


@pytest.mark.parametrize(
    "split,message",
    [
        (StageSplit(6, 2, virtual=2), "--num-layers 6 is not divisible by"),
        (StageSplit(7, 2, first=3, virtual=2), "--decoder-first-pipeline-num-layers 3 is not"),
        (StageSplit(8, 2, last=3, virtual=2), "the middle pipeline stages hold 5"),
        (StageSplit(9, 3, first=2, last=3, virtual=2), "--decoder-last-pipeline-num-layers 3"),
        (StageSplit(5, 2, account_for_embedding=True, virtual=2), "each pipeline stage holds 3"),
        (StageSplit(6, 2, first=2, last=4, virtual=2), "give only one of them"),
        (
            StageSplit(2, 2, account_for_embedding=True, account_for_loss=True, virtual=2),
            "a model chunk would get no transformer layer",
        ),
    ],
)
def test_bad_virtual_splits_name_the_flags(split, message):
    with pytest.raises(ConfigError, match=message):
        split.chunk_counts()


@pytest.mark.parametrize(
    "split,message",
    [
        (StageSplit(7, 2), "--num-layers 7 is not divisible"),
        (StageSplit(8, 3, first=3), "leaves 5 layers"),
        (StageSplit(4, 2, first=1, last=2), "must add up to --num-layers 4"),
        (StageSplit(8, 2, first=0), "--decoder-first-pipeline-num-layers must be >= 1"),
        (StageSplit(8, 1, first=3), "need --pipeline-model-parallel-size > 1"),
        (StageSplit(8, 2, first=3, account_for_loss=True), "exclude"),
        (StageSplit(8, 4, account_for_embedding=True), "must be divisible"),
        (StageSplit(2, 4, account_for_embedding=True, account_for_loss=True), "no transformer"),
    ],
)
def test_bad_splits_name_the_flags(split, message):
    with pytest.raises(ConfigError, match=message):
        split.counts()


def test_dry_run_layout_and_fill_plan_follow_the_uneven_split():
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline.fill_plan import exit_stages
    from megatron.early_exit.training.layout import describe_run

    argv = [
        "--mock-data", "--vocab-size", "128", "--num-layers", "10",
        "--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
        "--decoder-last-pipeline-num-layers", "3", "--exit-layer-nums", "1", "2", "5", "7",
    ]  # fmt: skip
    run = parse_run_config(argv, world_size=4)
    layout = describe_run(run)
    assert [(s.first_layer, s.last_layer) for s in layout.stages] == [
        (1, 1),
        (2, 4),
        (5, 7),
        (8, 10),
    ]
    assert layout.exit_stages() == {1: 0, 2: 1, 5: 2, 7: 2}
    split = run.parallel.stage_split(10)
    assert exit_stages([1, 2, 5, 7], 10, 4, split) == [0, 1, 2]
    bad = [*argv]
    bad[bad.index("--decoder-first-pipeline-num-layers") + 1] = "2"
    with pytest.raises(ConfigError, match="leaves 5 layers"):
        parse_run_config(bad, world_size=4)
