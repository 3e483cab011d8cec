"""Where checkpoints live on disk, and the flags that describe the model inside one.

Every checkpoint directory holds `ee_args.json`: the architecture, exit-head and tokenizer
flags it was saved with (argparse dest names). `parse_run_config` uses them as defaults
when `--load` is given, so `--load DIR` alone restores the model and its tokenizer; flags
given on the command line still win. Tokenizer files may be recorded relative to the
checkpoint directory (converters copy them there), which keeps a checkpoint movable.

This module is deliberately light (no megatron-core import at import time): the CLI
parser reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from megatron.early_exit.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
ARGS_FILE = "ee_args.json"

# Tokenizer files, recorded absolute or relative to the iteration directory.
TOKENIZER_PATH_KEYS = ("vocab_file", "merge_file", "tokenizer_model")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int:
    """The iteration the tracker of `root` points to (CheckpointError naming the problem)."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isdir(root):
        why = "the directory does not exist" if not os.path.exists(root) else "not a directory"
        raise CheckpointError(f"no checkpoint in {root!r}: {TRACKER_FILE} is missing ({why})")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint in {root!r}: {TRACKER_FILE} is missing")
    try:
        with open(path) as f:
            text = f.read(64).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if not text.isdigit():
        raise CheckpointError(f"{path} is corrupt (expected an iteration number, got {text!r})")
    return int(text)


def latest_checkpoint_dir(root: str) -> str:
    """The iteration directory the tracker of `root` points to, which must exist."""
    iteration = read_tracker(root)
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{os.path.join(root, TRACKER_FILE)} points to iteration {iteration} but {path} is "
            "missing"
        )
    return path


def args_from_run(run) -> dict[str, Any]:
    """The flag values (dest names) that rebuild `run`'s model and tokenizer: the whole
    architecture, the exit flags tagged RECORDED in config.py, the tokenizer flags."""
    from megatron.early_exit.config import EXIT_ARCH_FIELDS, TOKENIZER_FIELDS

    out = dict(asdict(run.model))
    exits = asdict(run.exits)
    out.update({k: exits[k] for k in EXIT_ARCH_FIELDS})
    data = asdict(run.data)
    out.update({k: data[k] for k in TOKENIZER_FIELDS})
    for key in TOKENIZER_PATH_KEYS:  # absolute, so the checkpoint does not depend on the launch cwd
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
    for key in TOKENIZER_PATH_KEYS:
        value = args.get(key)
        if value and not os.path.isabs(value):
            args[key] = os.path.join(iter_dir, value)
    return args
