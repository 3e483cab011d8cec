"""Checkpoints, for every tool that reads or writes them: training, inference, conversion.

* `files`: the directory layout (tracker, `iter_N/`), and `ee_args.json`, the flags that
  rebuild the model and its tokenizer (light: no megatron-core import).
* `integrity`: cheap checks of a checkpoint's files, so a missing or truncated one is one
  error line naming the file.
* `store`: atomic, reshardable save and load of a model stage (and its optimizer) with
  megatron-core's `dist_checkpointing`.
"""

from megatron.early_exit.checkpoint.files import (
    ARGS_FILE,
    TRACKER_FILE,
    args_from_run,
    checkpoint_dir,
    latest_checkpoint_dir,
    read_checkpoint_args,
    read_tracker,
    write_checkpoint_args,
)
from megatron.early_exit.checkpoint.integrity import checked_checkpoint_dir
from megatron.early_exit.errors import CheckpointError

__all__ = [
    "ARGS_FILE",
    "TRACKER_FILE",
    "CheckpointError",
    "args_from_run",
    "checked_checkpoint_dir",
    "checkpoint_dir",
    "latest_checkpoint_dir",
    "read_checkpoint_args",
    "read_tracker",
    "write_checkpoint_args",
]
