"""Build an InferenceEngine from Megatron-style flags (`--load CKPT` restores the model).

Inference stands on the same runtime layer as training (checkpoint/, model/, platform/)
and needs no training state: the stage is built, its weights loaded, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron.early_exit.inference.engine import InferenceEngine


def build_engine(run, platform=None) -> InferenceEngine:
    """Initialise distributed state, build this rank's stage, load `run.checkpoint.load`."""
    from megatron.early_exit.checkpoint.store import load_checkpoint
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.inference.layers import set_compile_mode
    from megatron.early_exit.inference.projection import (
        set_column_major_copies,
        set_decode_threads,
    )
    from megatron.early_exit.inference.rows_kernel import set_rows_kernel
    from megatron.early_exit.model.build import build_stage_model, init_model_parallel, unwrap
    from megatron.early_exit.model.specs import transformer_engine_usable
    from megatron.early_exit.platform import init_platform

    platform = platform or init_platform()
    set_compile_mode(run.inference.inference_compile)
    set_column_major_copies(run.inference.inference_column_major_copies)
    set_decode_threads(run.inference.inference_decode_threads)
    set_rows_kernel(run.inference.inference_rows_kernel)
    tokenizer = build_tokenizer(run.data.tokenizer_config())
    run.resolve_vocab(tokenizer.vocab_size)
    run.parallel.sequence_parallel = False  # decode chunks are tiny; SP buys nothing here
    use_te = transformer_engine_usable(platform.is_cuda)
    config = build_transformer_config(run, use_te=use_te)
    init_model_parallel(run, config, platform)
    model = build_stage_model(run, config, platform, use_te)
    counts = calibration = None
    if run.checkpoint.load:
        from megatron.early_exit.inference.calibration import find_calibration

        load_checkpoint(run.checkpoint.load, model, load_rng=False)
        counts = _token_counts(run.checkpoint.load, tokenizer.vocab_size)
        calibration = find_calibration(run.checkpoint.load)
    return InferenceEngine(
        unwrap(model),
        vocab_size=tokenizer.vocab_size,
        max_sequence_length=run.model.resolved_max_position_embeddings(),
        tokenizer=tokenizer,
        token_counts=counts,
        calibration=calibration,
    )


def _token_counts(root: str, vocab_size: int):
    """`token_counts.npy` of the latest checkpoint (tools/count_tokens.py), if any; a bad
    file is a CheckpointError (self-speculative draft_vocab_size needs the counts)."""
    from megatron.early_exit.checkpoint.files import latest_checkpoint_dir
    from megatron.early_exit.errors import CheckpointError, TokenCountError
    from megatron.early_exit.inference.draft_vocab import check_counts, load_token_counts

    try:
        counts = load_token_counts(latest_checkpoint_dir(root))
        return None if counts is None else check_counts(counts, vocab_size)
    except TokenCountError as exc:
        raise CheckpointError(str(exc)) from None


def inference_run_config(argv: Sequence[str] | None, device_is_cuda: bool = False, args=None):
    """RunConfig for inference: like parse_run_config, but needs no training data flags.

    With `--load`, the checkpoint is checked first (a missing or damaged one is a
    CheckpointError naming the file), and a checkpoint without recorded flags says so when
    the command line does not describe the model either.
    """
    from megatron.early_exit.arguments import config_from_args, parse_args
    from megatron.early_exit.checkpoint import checked_checkpoint_dir, read_checkpoint_args
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.platform import world_size_from_env

    if args is None:
        args = parse_args(argv)
    recorded = True
    if args.load:
        iter_dir = checked_checkpoint_dir(args.load)
        recorded = read_checkpoint_args(args.load) is not None
    run = config_from_args(args, world_size_from_env())
    if run.parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "inference runs one model chunk per pipeline stage: drop "
            "--num-layers-per-virtual-pipeline-stage / --virtual-pipeline-model-parallel-size "
            "(checkpoints load into any layout)"
        )
    try:
        return run.validate(device_is_cuda=device_is_cuda, needs_data=False)
    except ConfigError as exc:
        if recorded:
            raise
        raise ConfigError(
            f"{exc} (checkpoint {iter_dir} records no model flags, no ee_args.json: give the "
            "model and tokenizer flags on the command line)"
        ) from None


def engine_from_args(argv: Sequence[str] | None) -> InferenceEngine:
    from megatron.early_exit.platform import init_platform

    platform = init_platform()
    run = inference_run_config(argv, platform.is_cuda)
    return build_engine(run, platform)
