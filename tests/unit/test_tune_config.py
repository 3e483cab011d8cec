"""--tune-exit / --tune-exit-pipeline-parallel-size: validation and the runtime layout."""

import pytest

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ConfigError
from megatron.early_exit.tuning.session import runtime_run

pytestmark = pytest.mark.unit

BASE = ["--num-layers", "8", "--mock-data", "--vocab-size", "100", "--load", "/nonexistent"]
EXITS = ["--exit-layer-nums", "2", "4", "--use-exit-norm"]


def parse(*argv, world=1):
    return parse_run_config([*BASE, *argv], world)


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--tune-exit-pipeline-parallel-size", "1", *EXITS], 1, "needs --tune-exit"),
        (["--tune-exit"], 1, "tools/checkpoint/add_exits.py"),
        (["--tune-exit", *EXITS, "--pipeline-model-parallel-size", "2",
          "--tune-exit-pipeline-parallel-size", "3"], 1, "must be in 1..2"),
        (["--tune-exit", *EXITS, "--pipeline-model-parallel-size", "4",
          "--tune-exit-pipeline-parallel-size", "1"], 1, "there is an exit at layer 4"),
        (["--tune-exit", *EXITS, "--pipeline-model-parallel-size", "4",
          "--tune-exit-pipeline-parallel-size", "2", "--micro-batch-size", "1",
          "--global-batch-size", "3"], 4, "3 is not divisible by --micro-batch-size 1 x "
         "data-parallel size 2"),
        (["--tune-exit", *EXITS, "--pipeline-model-parallel-size", "4",
          "--tune-exit-pipeline-parallel-size", "2"], 3, "world size 3 is not divisible"),
    ],
)  # fmt: skip
def test_bad_tuning_flags(argv, world, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv, world=world)


def test_tuning_layout_with_data_parallel_replicas():
    # 4 ranks running the first 2 of 4 stages: DP=2 over the tuned stages, not over PP=4.
    run = parse(
        "--tune-exit", *EXITS, "--pipeline-model-parallel-size", "4",
        "--tune-exit-pipeline-parallel-size", "2", "--micro-batch-size", "1",
        "--global-batch-size", "4", world=4,
    )  # fmt: skip
    assert run.parallel.data_parallel_size == 2
    assert run.training.num_microbatches(2) == 2
    rt = runtime_run(run)
    assert (rt.model.num_layers, rt.parallel.pipeline_model_parallel_size) == (4, 2)


def test_tune_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="--load CHECKPOINT"):
        parse_run_config(["--mock-data", "--vocab-size", "100", "--tune-exit", *EXITS], 1)


def test_runtime_layout_runs_the_first_k_stages():
    run = parse(
        "--tune-exit", *EXITS, "--pipeline-model-parallel-size", "4",
        "--tune-exit-pipeline-parallel-size", "2", world=2,
    )  # fmt: skip
    assert run.parallel.data_parallel_size == 1
    rt = runtime_run(run)
    assert (rt.model.num_layers, rt.parallel.pipeline_model_parallel_size) == (4, 2)
    assert rt.exits.exit_layer_nums == [2, 4] and run.model.num_layers == 8
    full = parse("--tune-exit", *EXITS, "--pipeline-model-parallel-size", "2", world=2)
    assert runtime_run(full) is full
