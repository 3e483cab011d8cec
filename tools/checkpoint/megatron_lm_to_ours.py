"""Megatron-LM / EE-LLM torch-format checkpoint -> our dist checkpoint (any TP/PP).

    python tools/checkpoint/megatron_lm_to_ours.py --load /ckpt/ee-llm-1.3b --out ckpt/ee-1.3b \\
        [--hf-tokenizer /path/with/tokenizer.json]

--load is the root with latest_checkpointed_iteration.txt and iter_N/mp_rank_XX[_YYY]/
model_optim_rng.pt (any TP/PP split, EE-LLM exit heads included). The model flags are
derived from the `args` saved in the checkpoint and recorded in ee_args.json; without
--hf-tokenizer a NullTokenizer is recorded. Files are unpickled with a restricted loader
(tensors, containers, argparse.Namespace; Megatron-LM classes become placeholders). Bad
or partial input exits with code 2 and writes nothing. See docs/conversion.md.
"""

import argparse
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="Megatron-LM / EE-LLM checkpoint root")
    p.add_argument("--out", required=True, help="checkpoint root to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--hf-tokenizer", default=None, help="folder with tokenizer.json to record and copy"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()

    def run():
        from megatron.early_exit.convert.megatron_lm import megatron_lm_to_megatron
        from megatron.early_exit.platform.distributed import destroy_distributed

        try:
            flags = megatron_lm_to_megatron(
                args.load, args.out, overwrite=args.overwrite, hf_tokenizer=args.hf_tokenizer
            )
        finally:
            destroy_distributed()
        exits = flags.get("exit_layer_nums") or []
        print(
            f"wrote {args.out} ({flags['num_layers']} layers, hidden {flags['hidden_size']}, "
            f"exits {exits}, tokenizer {flags['tokenizer_type']})"
        )

    return run_cli(run)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
