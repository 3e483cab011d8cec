"""The errors a user can cause, in one module.

Each says what is wrong in one line, naming the flag or file: command-line tools print it as
`error: ...` and exit with status 2, the server answers HTTP 400, and nothing prints a
traceback. `UserError` is their common base; each also keeps the builtin base it always had
(ValueError or RuntimeError), so existing `except` clauses still catch it.

This module imports nothing: every layer (platform, data, config, pipeline, ...) may raise
these without importing the layers above it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; reported as one line, never as a traceback."""


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent configuration, reported before any work starts."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is missing, incomplete, corrupt or for another model."""


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be built from the given settings/files."""


class DataError(UserError, ValueError):
    """The data settings or files cannot give the requested datasets (one-line message)."""


class PreprocessError(UserError):
    """Bad input for corpus preprocessing (the CLI exits with status 2)."""


class TokenCountError(UserError, ValueError):
    """Missing or inconsistent datasets, checkpoints or token-count files."""


class ConversionError(UserError, ValueError):
    """Missing/mismatched files, unsupported architectures, impossible layouts."""


class AddExitsError(UserError, RuntimeError):
    """Bad input for adding exits to a checkpoint; reported as one line, exit code 2."""


class InferenceError(UserError, ValueError):
    """Bad generation input (the server maps it to HTTP 400)."""


__all__ = [
    "AddExitsError",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "InferenceError",
    "PreprocessError",
    "TokenCountError",
    "TokenizerError",
    "UserError",
]
