"""Build an InferenceEngine from Megatron-style flags (`--load CKPT` restores the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megatron.early_exit.inference.engine import InferenceEngine


@dataclasses.dataclass
class _ModelOnly:
    """What load_checkpoint needs from a TrainState when only weights are loaded."""

    model: object
    optimizer: object = None
    scheduler: object = None

    @property
    def unwrapped(self):
        from megatron.early_exit.model.build import unwrap

        return unwrap(self.model)


def build_engine(run, platform=None) -> InferenceEngine:
    """Initialise distributed state, build this rank's stage, load `run.checkpoint.load`."""
    from megatron.early_exit.checkpoint.store import load_checkpoint
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.model.build import build_stage_model, unwrap
    from megatron.early_exit.model.specs import transformer_engine_usable
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import initialize_distributed

    platform = platform or init_platform()
    tokenizer = build_tokenizer(run.data.tokenizer_config())
    run.resolve_vocab(tokenizer.vocab_size)
    run.parallel.sequence_parallel = False  # decode chunks are tiny; SP buys nothing here
    use_te = transformer_engine_usable(platform.is_cuda)
    config = build_transformer_config(run, use_te=use_te)
    initialize_distributed(run, config, platform)
    model = build_stage_model(run, config, platform, use_te)
    counts = None
    if run.checkpoint.load:
        load_checkpoint(
            run.checkpoint.load, _ModelOnly(model), load_optimizer=False, load_rng=False
        )
        counts = _token_counts(run.checkpoint.load, tokenizer.vocab_size)
    return InferenceEngine(
        unwrap(model),
        vocab_size=tokenizer.vocab_size,
        max_sequence_length=run.model.resolved_max_position_embeddings(),
        tokenizer=tokenizer,
        token_counts=counts,
    )


def _token_counts(root: str, vocab_size: int):
    """`token_counts.npy` of the latest checkpoint (tools/count_tokens.py), if any; a bad
    file is a CheckpointError (self-speculative draft_vocab_size needs the counts)."""
    from megatron.early_exit.checkpoint.files import (
        CheckpointError,
        checkpoint_dir,
        read_tracker,
    )
    from megatron.early_exit.inference.draft_vocab import (
        TokenCountError,
        check_counts,
        load_token_counts,
    )

    try:
        counts = load_token_counts(checkpoint_dir(root, read_tracker(root)))
        return None if counts is None else check_counts(counts, vocab_size)
    except TokenCountError as exc:
        raise CheckpointError(str(exc)) from None


def inference_run_config(argv: Sequence[str] | None, device_is_cuda: bool = False, args=None):
    """RunConfig for inference: like parse_run_config, but needs no training data flags."""
    from megatron.early_exit.arguments import config_from_args, parse_args
    from megatron.early_exit.platform.distributed import world_size_from_env

    if args is None:
        args = parse_args(argv)
    if not args.mock_data and not args.data_path:
        # Data flags are training-only; satisfy the shared validation without reading data.
        if args.tokenizer_type == "NullTokenizer":
            args.mock_data = True
        else:
            args.data_path = ["<inference: no data>"]
    return config_from_args(args, world_size_from_env()).validate(device_is_cuda=device_is_cuda)


def engine_from_args(argv: Sequence[str] | None) -> InferenceEngine:
    from megatron.early_exit.platform import init_platform

    platform = init_platform()
    run = inference_run_config(argv, platform.is_cuda)
    return build_engine(run, platform)
