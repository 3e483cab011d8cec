"""Hugging Face model folder -> our dist checkpoint (loadable at any TP/PP).

    python tools/checkpoint/hf_to_megatron.py --hf-dir /path/to/hf --out ckpt/smollm2
    # then: torchrun ... pretrain_early_exit_gpt.py --load ckpt/smollm2 --finetune ...

Supported model_type: "llama" (Llama 1-3.x, RoPE scaling "llama3" included), "mistral"
(when no sequence can exceed the sliding window), "qwen2" (Qwen2/2.5), "qwen3", "gpt2"
(exact or tanh GELU); tied or untied embeddings. Anything else is refused. The
model/tokenizer flags are recorded in ee_args.json and the tokenizer is copied into the
checkpoint, so `--load DIR` alone restores both. Exit heads exported by
megatron_to_hf.py (early_exit_heads.safetensors) are imported back. Bad input exits
with code 2 and leaves no partial output.
"""

import argparse
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hf-dir",
        required=True,
        help="folder with config.json + *.safetensors or pytorch_model.bin",
    )
    p.add_argument(
        "--out", required=True, help="checkpoint root to create (iter_0000000/ + tracker)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--allow-no-tokenizer",
        action="store_true",
        help="record a NullTokenizer if the folder has no tokenizer",
    )
    p.add_argument(
        "--seq-length", type=int, default=None, help="training sequence length to record"
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="vocab padding multiple (default 128)",
    )
    p.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="cap the model's positions (e.g. to a sliding window, which then never applies)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()

    def run():
        from megatron.early_exit.convert.hf_convert import hf_to_megatron
        from megatron.early_exit.platform.distributed import destroy_distributed

        try:
            flags = hf_to_megatron(
                args.hf_dir,
                args.out,
                overwrite=args.overwrite,
                allow_no_tokenizer=args.allow_no_tokenizer,
                seq_length=args.seq_length,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                max_position_embeddings=args.max_position_embeddings,
            )
        finally:
            destroy_distributed()
        print(
            f"wrote {args.out} ({flags['num_layers']} layers, hidden {flags['hidden_size']}, "
            f"tokenizer {flags['tokenizer_type']})"
        )

    return run_cli(run)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
