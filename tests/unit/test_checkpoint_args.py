"""Checkpoints record their model/tokenizer flags; `--load DIR` restores them as defaults."""

import json
import os

import pytest

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.checkpoint.files import (
    ARGS_FILE,
    TRACKER_FILE,
    args_from_run,
    checkpoint_dir,
    read_checkpoint_args,
    write_checkpoint_args,
)
from megatron.early_exit.config import ConfigError

pytestmark = pytest.mark.unit

ARCH = [
    "--num-layers", "6", "--hidden-size", "32", "--num-attention-heads", "4",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--exit-layer-nums", "2", "4", "--use-exit-mlp", "--untie-exit-output-weights",
    "--vocab-size", "300",
]  # fmt: skip


def _checkpoint(root, args, iteration=3):
    d = checkpoint_dir(str(root), iteration)
    os.makedirs(d)
    write_checkpoint_args(d, args)
    (root / TRACKER_FILE).write_text(f"{iteration}\n")
    return d


def test_load_alone_restores_architecture_and_tokenizer(tmp_path):
    saved = parse_run_config([*ARCH, "--mock-data"], world_size=1)
    _checkpoint(tmp_path, args_from_run(saved))
    run = parse_run_config(["--mock-data", "--load", str(tmp_path)], world_size=1)
    assert run.model == saved.model
    assert run.exits.exit_layer_nums == [2, 4]
    assert run.exits.use_exit_mlp and run.exits.untie_exit_output_weights
    assert run.data.vocab_size == 300


def test_command_line_flags_win_over_checkpoint(tmp_path):
    saved = parse_run_config([*ARCH, "--mock-data"], world_size=1)
    _checkpoint(tmp_path, args_from_run(saved))
    run = parse_run_config(
        ["--mock-data", "--load", str(tmp_path), "--exit-layer-nums", "3", "--seq-length", "32"],
        world_size=1,
    )
    assert run.exits.exit_layer_nums == [3]
    assert run.model.seq_length == 32
    assert run.model.num_layers == 6


def test_relative_tokenizer_paths_resolve_against_checkpoint(tmp_path):
    d = _checkpoint(
        tmp_path, {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "t.json"}
    )
    args = read_checkpoint_args(str(tmp_path))
    assert args["tokenizer_model"] == os.path.join(d, "t.json")


def test_checkpoint_without_args_file_changes_nothing(tmp_path):
    d = _checkpoint(tmp_path, {})
    os.remove(os.path.join(d, ARGS_FILE))
    assert read_checkpoint_args(str(tmp_path)) is None
    run = parse_run_config(
        ["--mock-data", "--vocab-size", "64", "--load", str(tmp_path)], world_size=1
    )
    assert run.model.num_layers == 4  # the parser default


def test_corrupt_args_file_is_a_config_error(tmp_path):
    d = _checkpoint(tmp_path, {})
    with open(os.path.join(d, ARGS_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="ee_args.json is unreadable"):
        parse_run_config(["--mock-data", "--load", str(tmp_path)], world_size=1)
    with open(os.path.join(d, ARGS_FILE), "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_run_config(["--mock-data", "--load", str(tmp_path)], world_size=1)
