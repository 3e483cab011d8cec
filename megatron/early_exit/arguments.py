"""Megatron-LM / EE-LLM compatible command-line flags -> typed `RunConfig`.

The flags are declared on the config fields (config.py, with `flags.flag`); this module
generates the training parser from them and adds what a command line needs beyond a
config: checkpoint-recorded defaults for `--load`, and the virtual-pipeline arithmetic.
`tests/unit/test_arguments.py` pins the full list so flags do not grow silently.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron.early_exit.checkpoint.files import read_checkpoint_args
from megatron.early_exit.config import ConfigError, RunConfig
from megatron.early_exit.errors import CheckpointError
from megatron.early_exit.flags import add_flags, from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_early_exit_gpt.py",
        description="Pretrain an early-exit GPT with 3D parallelism (launch with torchrun).",
        allow_abbrev=False,
    )
    add_flags(p, RunConfig)
    return p


def config_from_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The RunConfig of parsed flags (not validated yet)."""
    run = from_args(RunConfig, args)
    run.parallel.world_size = world_size
    run.parallel.virtual_pipeline_model_parallel_size = _virtual_stages(args)
    return run


def _virtual_stages(args: argparse.Namespace) -> int | None:
    """Megatron's arithmetic: layers per stage / layers per virtual stage (or the count
    given by --virtual-pipeline-model-parallel-size)."""
    n = args.num_layers_per_virtual_pipeline_stage
    given = args.virtual_pipeline_model_parallel_size
    pp = args.pipeline_model_parallel_size
    if given is not None and given < 1:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {given}")
    if n is None:
        return given
    if args.decoder_first_pipeline_num_layers is not None or (
        args.decoder_last_pipeline_num_layers is not None
    ):  # as Megatron-LM: stages of different sizes have no common chunk size
        raise ConfigError(
            "--num-layers-per-virtual-pipeline-stage does not fit uneven stages "
            "(--decoder-first/last-pipeline-num-layers): give the number of model chunks per "
            "stage with --virtual-pipeline-model-parallel-size"
        )
    # The embedding / loss count as layers of the split (--account-for-*-in-pipeline-split).
    layers = args.num_layers + bool(args.account_for_embedding_in_pipeline_split)
    layers += bool(args.account_for_loss_in_pipeline_split)
    if pp <= 0 or layers % pp:
        return given
    per_stage = layers // pp
    if n <= 0 or per_stage % n:
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage {n} must divide the {per_stage} "
            "layers of each pipeline stage"
        )
    if given is not None and given != per_stage // n:
        raise ConfigError(
            f"--virtual-pipeline-model-parallel-size {given} disagrees with "
            f"--num-layers-per-virtual-pipeline-stage {n} ({per_stage} layers per stage "
            f"make {per_stage // n} virtual stages); give one of them"
        )
    return per_stage // n


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
