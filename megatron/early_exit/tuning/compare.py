"""Read a dist checkpoint's model tensors in one process and compare two checkpoints.

    python -m megatron.early_exit.tuning.compare BACKBONE_CKPT TUNED_CKPT

checks that every backbone tensor of BACKBONE_CKPT is bit-identical in TUNED_CKPT (EE-Tuning
must not touch them) and prints how many exit-head tensors changed. Exit code 1 on a
difference, 2 (one `error:` line) on a missing or damaged checkpoint. Needs no process
group (the reads are local).
"""

from __future__ import annotations

import sys

import torch


def read_model_tensors(root: str) -> dict[str, torch.Tensor]:
    """Every model tensor (full, unsharded) of the latest checkpoint under `root`."""
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing

    from megatron.early_exit.checkpoint import checked_checkpoint_dir

    path = checked_checkpoint_dir(root)  # CheckpointError naming a missing or damaged file
    metadata = dist_checkpointing.load_tensors_metadata(path)
    out = {
        key: torch.empty(md.global_shape, dtype=md.dtype)
        for key, md in metadata.items()
        if not key.startswith("optimizer.")
    }
    dcp.load(out, checkpoint_id=path, no_dist=True)
    return out


def compare_backbone(before: str, after: str) -> tuple[list[str], list[str], list[str]]:
    """(backbone tensors that differ or are missing, exit tensors changed, exit tensors same)."""
    a, b = read_model_tensors(before), read_model_tensors(after)
    bad = [
        k
        for k in a
        if not k.startswith("exit_heads.") and (k not in b or not torch.equal(a[k], b[k]))
    ]
    exits = [k for k in b if k.startswith("exit_heads.")]
    changed = [k for k in exits if k not in a or not torch.equal(a[k], b[k])]
    same = [k for k in exits if k not in changed]
    return bad, changed, same


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    from megatron.early_exit.cli import run_cli

    result = []
    rc = run_cli(lambda: result.extend(compare_backbone(*argv)))
    if rc:
        return rc
    bad, changed, same = result
    if bad:
        print(f"backbone changed: {len(bad)} tensors differ, e.g. {bad[:3]}")
        return 1
    print(
        f"backbone bit-identical; exit-head tensors changed: {len(changed)}, unchanged: {len(same)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
