"""Print the per-stage pipeline schedule (forward/backward/fill order) of a training command.

    python tools/print_pipeline_schedule.py [--world-size N] <pretrain_early_exit_gpt.py flags>

Takes the training flags, validates them as a run would (bad fill counts are reported as
the same ConfigError) and prints the action lists the 1F1B executor runs on every stage.
--world-size defaults to tensor x pipeline parallel size (one data-parallel replica).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--world-size", type=int, default=None)
    pre.add_argument("--tensor-model-parallel-size", type=int, default=1)
    pre.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    rest = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--world-size" in rest:
        i = rest.index("--world-size")
        del rest[i : i + 2]
    world = (
        known.world_size or known.tensor_model_parallel_size * known.pipeline_model_parallel_size
    )

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.config import ConfigError
    from megatron.early_exit.pipeline.fill_plan import schedule_for_run

    try:
        run = parse_run_config(rest, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(schedule_for_run(run).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
