"""Shared test setup: quiet megatron-core's CPU fallback warnings."""

import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

# First import of the package: blocks broken optional GPU accelerators before any test
# imports megatron.core.
import megatron.early_exit  # noqa: E402, F401
