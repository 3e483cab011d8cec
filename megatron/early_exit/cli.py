"""What every command-line entry point shares: a quiet start-up and one-line errors.

    def main(argv=None) -> int:
        quiet_startup()
        ...
        return run_cli(work)         # UserError -> `error: ...` on stderr, exit status 2

Importing this module imports `megatron.early_exit`, which first guards against broken
optional GPU accelerators (platform/accelerators.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

from megatron.early_exit.errors import UserError


def quiet_startup() -> None:
    """Hide the warnings megatron-core and torch.distributed raise on every CPU run about
    optional fused kernels (Transformer Engine, Apex) and deprecated internals they call
    themselves. Warnings of this project (e.g. a flag without effect) still show."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.core.*")
        warnings.filterwarnings("ignore", category=category, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")


def run_cli(main: Callable[[], int | None]) -> int:
    """Run `main`; a UserError prints one line `error: ...` and gives exit status 2."""
    try:
        return int(main() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["quiet_startup", "run_cli"]


def add_results_args(parser: argparse.ArgumentParser, benchmarks_dir: str) -> None:
    """`--out DIR` (default outputs/benchmarks/) and `--write-results` (the committed
    benchmarks/results/): a benchmark replaces committed figures only when asked to."""
    repo = os.path.dirname(os.path.abspath(benchmarks_dir))
    parser.add_argument(
        "--out",
        default=os.path.join(repo, "outputs", "benchmarks"),
        help="results folder (default: outputs/benchmarks)",
    )
    parser.add_argument(
        "--write-results",
        dest="out",
        action="store_const",
        const=os.path.join(benchmarks_dir, "results"),
        help="write into the committed benchmarks/results/ instead",
    )
