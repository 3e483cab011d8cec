"""Check a checkpoint's files before reading them.

A missing or truncated file deep inside a dist checkpoint otherwise surfaces as a traceback
from torch or pickle that names neither the file nor the problem. `checked_checkpoint_dir`
finds the latest iteration and checks, cheaply (no tensor is read), that megatron-core's
`metadata.json`, the common state `common.pt`, torch's index `.metadata` and every shard
file the index lists are there and long enough. Each failure is one CheckpointError line
naming the file.
"""

from __future__ import annotations

import json
import os
import zipfile

from megatron.early_exit.checkpoint.files import latest_checkpoint_dir
from megatron.early_exit.errors import CheckpointError

METADATA_FILE = "metadata.json"  # megatron-core: which backends wrote the checkpoint
COMMON_FILE = "common.pt"  # megatron-core: the non-sharded (common) state, a torch archive
INDEX_FILE = ".metadata"  # torch.distributed.checkpoint: where each tensor's bytes are


def check_checkpoint_files(iter_dir: str) -> None:
    """Raise CheckpointError if a file of the dist checkpoint `iter_dir` is missing or short."""
    for name in (METADATA_FILE, COMMON_FILE, INDEX_FILE):
        if not os.path.isfile(os.path.join(iter_dir, name)):
            raise CheckpointError(f"{iter_dir} is not a complete checkpoint: {name} is missing")
    path = os.path.join(iter_dir, METADATA_FILE)
    try:
        with open(path) as f:
            backends = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if not isinstance(backends, dict) or "sharded_backend" not in backends:
        raise CheckpointError(f"{path} is corrupt: no sharded_backend entry")
    path = os.path.join(iter_dir, COMMON_FILE)
    try:  # torch archives are zip files: a truncated one has no central directory
        zipfile.ZipFile(path).close()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    _check_shards(iter_dir)


def _check_shards(iter_dir: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(iter_dir, INDEX_FILE)
    try:
        index = FileSystemReader(iter_dir).read_metadata()
    except Exception as exc:  # noqa: BLE001  (pickle raises many types on a damaged file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason})") from None
    needed: dict[str, int] = {}
    for item in (index.storage_data or {}).values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = os.path.join(iter_dir, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"{shard} is missing (the index {INDEX_FILE} lists it)")
        have = os.path.getsize(shard)
        if have < size:
            raise CheckpointError(
                f"{shard} is truncated: {have} bytes, the index {INDEX_FILE} needs {size}"
            )


def checked_checkpoint_dir(root: str) -> str:
    """The latest iteration directory under `root`, its files checked (see module docstring)."""
    path = latest_checkpoint_dir(root)
    check_checkpoint_files(path)
    return path


def read_common_state(iter_dir: str) -> dict:
    """megatron-core's common (non-sharded) state of a checked checkpoint."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(iter_dir)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        path = os.path.join(iter_dir, COMMON_FILE)
        raise CheckpointError(f"{path} is unreadable ({reason})") from None
