"""The converters' error type (defined with the other user errors in errors.py).

Command-line tools turn it into one `error:` line and exit status 2 (cli.run_cli).
"""

from megatron.early_exit.errors import ConversionError

__all__ = ["ConversionError"]
