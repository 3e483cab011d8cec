"""Our checkpoint -> Hugging Face folder that `AutoModelForCausalLM.from_pretrained(dir)`
loads and runs unchanged (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or
GPT2LMHeadModel), tokenizer included.

    python tools/checkpoint/megatron_to_hf.py --load ckpt/smollm2 --out hf/smollm2

Exit heads go to early_exit_heads.safetensors (our tensor names) with an `early_exit`
entry in config.json; non-zero vocabulary padding rows to
megatron_vocab_padding.safetensors; with exits, modeling_early_exit.py lets
`from_pretrained(dir, trust_remote_code=True)` run them in transformers (per-exit logits,
early exit, self-speculative decoding). hf_to_megatron.py imports all of it back, so
ours -> HF -> ours is bit-exact. Runs in one process (the checkpoint reshards to TP1PP1).
"""

import argparse
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--load", required=True, help="our checkpoint root (with latest_checkpointed_iteration.txt)"
    )
    p.add_argument("--out", required=True, help="HF folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()

    def run():
        from megatron.early_exit.convert.hf_convert import megatron_to_hf
        from megatron.early_exit.platform.distributed import destroy_distributed

        try:
            config = megatron_to_hf(args.load, args.out, overwrite=args.overwrite)
        finally:
            destroy_distributed()
        extra = " + exit heads" if "early_exit" in config else ""
        print(f"wrote {args.out} ({config['architectures'][0]}{extra})")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
