"""Add early-exit heads to an existing checkpoint (before EE-Tuning with --tune-exit).

    python tools/checkpoint/add_exits.py --load ckpt/smollm2 --save ckpt/smollm2-exits \
        --exit-layer-nums 8 15 23 --use-exit-norm --use-exit-mlp
    # then: torchrun ... pretrain_early_exit_gpt.py --load ckpt/smollm2-exits --tune-exit ...

By default the new heads copy the model's own parts (final norm -> exit norm, output
embedding -> untied exit output, layer n's MLP -> exit MLP, last layer -> exit block);
--random-init initialises them randomly instead. The new checkpoint is iteration 0, holds
the whole model plus the heads, records the exit flags in ee_args.json and is written to a
temporary directory that is renamed into place when complete. Bad input (missing or corrupt
checkpoint, exit layer out of range or already present) exits with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="source checkpoint root (with ee_args.json)")
    p.add_argument("--save", required=True, help="new checkpoint root (must not exist or be empty)")
    p.add_argument(
        "--exit-layer-nums", type=int, nargs="*", default=[], help="1-based layers to add"
    )
    p.add_argument(
        "--exit-confidence-head",
        action="store_true",
        help="a learned confidence estimator per exit (zero-initialised; train it with "
        "--tune-exit --exit-confidence-head); alone, adds them to the existing exits",
    )
    p.add_argument("--use-exit-norm", action="store_true")
    p.add_argument("--use-exit-mlp", action="store_true")
    p.add_argument("--use-exit-block", action="store_true")
    p.add_argument("--untie-exit-output-weights", action="store_true")
    p.add_argument(
        "--exit-layer-temperature",
        type=float,
        nargs="+",
        default=[],
        help="one value, or one per new exit",
    )
    p.add_argument("--random-init", action="store_true", help="random heads instead of copies")
    p.add_argument("--seed", type=int, default=1234, help="seed for --random-init")
    p.add_argument(
        "--copy-mlp-output",
        action="store_true",
        help="copy the layer's MLP exactly; by default its output projection starts at zero so "
        "the new head begins as final norm + LM head on the layer's hidden state",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()
    from megatron.early_exit.platform import destroy_distributed
    from megatron.early_exit.tuning.add_exits import AddExitsOptions, add_exits

    opts = AddExitsOptions(
        load=args.load,
        save=args.save,
        exit_layer_nums=args.exit_layer_nums,
        use_exit_norm=args.use_exit_norm,
        use_exit_mlp=args.use_exit_mlp,
        use_exit_block=args.use_exit_block,
        untie_exit_output_weights=args.untie_exit_output_weights,
        exit_layer_temperature=args.exit_layer_temperature,
        random_init=args.random_init,
        seed=args.seed,
        zero_mlp_output=not args.copy_mlp_output,
        exit_confidence_head=args.exit_confidence_head,
    )

    def run() -> int:
        path = add_exits(opts)
        what = f"exits at layers {sorted(args.exit_layer_nums)}" if args.exit_layer_nums else ""
        if args.exit_confidence_head:
            what += (" with " if what else "") + "confidence heads"
        print(f"added {what}: {path}")
        return 0

    try:  # run_cli turns user errors (AddExitsError, ConfigError, ...) into `error:` + exit 2
        return run_cli(run)
    finally:
        destroy_distributed()


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
