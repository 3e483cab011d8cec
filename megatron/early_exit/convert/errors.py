"""One error type for bad conversion input, and the CLI wrapper that turns it into exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatron.early_exit.errors import ConversionError


def run_cli(main: Callable[[], int | None]) -> int:
    """Run `main`; user errors print one line `error: ...` and give exit code 2."""
    import warnings

    # megatron-core and torch.distributed.checkpoint warn about optional CPU fallbacks.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import megatron.early_exit  # noqa: F401  (guards broken GPU accelerators first)
    from megatron.early_exit.checkpoint.files import CheckpointError
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.data.tokenizers import TokenizerError

    try:
        return int(main() or 0)
    except (ConversionError, ConfigError, TokenizerError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
