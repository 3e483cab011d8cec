"""Where checkpoints live on disk, and the flags that describe the model inside one.

Every checkpoint directory holds `ee_args.json`: the architecture, exit-head and tokenizer
flags it was saved with (argparse dest names). `parse_run_config` uses them as defaults
when `--load` is given, so `--load DIR` alone restores the model and its tokenizer; flags
given on the command line still win. Tokenizer files may be recorded relative to the
checkpoint directory (converters copy them there), which keeps a checkpoint movable.

This module is deliberately light (no megatron-core import): the CLI parser reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from megatron.early_exit.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
ARGS_FILE = "ee_args.json"

# Exit flags that change the parameters (loss weights are training choices, not recorded).
_EXIT_KEYS = (
    "exit_layer_nums",
    "pre_exit",
    "use_exit_norm",
    "use_exit_mlp",
    "use_exit_block",
    "untie_exit_output_weights",
    "exit_layer_temperature",
)
_TOKENIZER_KEYS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")
_PATH_KEYS = ("vocab_file", "merge_file", "tokenizer_model")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int:
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint in {root!r}: {TRACKER_FILE} is missing")
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} is corrupt (expected an iteration number, got {text!r})")
    return int(text)


def args_from_run(run) -> dict[str, Any]:
    """The flag values (dest names) that rebuild `run`'s model and tokenizer."""
    out = dict(asdict(run.model))
    exits = asdict(run.exits)
    out.update({k: exits[k] for k in _EXIT_KEYS})
    data = asdict(run.data)
    out.update({k: data[k] for k in _TOKENIZER_KEYS})
    for key in _PATH_KEYS:  # absolute, so the checkpoint does not depend on the launch cwd
        if out.get(key):
            out[key] = os.path.abspath(out[key])
    return out


def write_checkpoint_args(iter_dir: str, args: dict[str, Any]) -> None:
    with open(os.path.join(iter_dir, ARGS_FILE), "w") as f:
        json.dump(args, f, indent=1, sort_keys=True)


def read_checkpoint_args(root: str) -> dict[str, Any] | None:
    """Flags recorded in the latest checkpoint under `root`; None when it has none."""
    try:
        iter_dir = checkpoint_dir(root, read_tracker(root))
    except CheckpointError:
        return None
    path = os.path.join(iter_dir, ARGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            args = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(args, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    for key in _PATH_KEYS:
        value = args.get(key)
        if value and not os.path.isabs(value):
            args[key] = os.path.join(iter_dir, value)
    return args
