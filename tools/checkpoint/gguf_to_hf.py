"""GGUF (llama.cpp) file -> Hugging Face model folder (float32 safetensors + tokenizer).

    python tools/checkpoint/gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out hf/smollm2
    python tools/checkpoint/gguf_to_hf.py --asset smollm2-135m-gguf --out hf/smollm2

Quantized tensors are dequantized with the `gguf` package; llama.cpp's Q/K row
permutation is undone; tokenizer.json (byte-level BPE, its special tokens), tokenizer
and generation configs are rebuilt from the file's metadata. Supported: architectures
llama (e.g. SmolLM2), qwen2, qwen3 and gpt2 with a byte-level BPE tokenizer
(pre-tokenizers gpt2, smollm, qwen2, llama-bpe). Feed the folder to
hf_to_megatron.py. Bad input exits with code 2 and leaves no partial output.
"""

import argparse
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="path of the .gguf file")
    src.add_argument(
        "--asset", help="a fetched asset name (tools/fetch_assets.py), e.g. smollm2-135m-gguf"
    )
    p.add_argument("--out", required=True, help="HF folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()

    def run():
        from megatron.early_exit.convert.gguf_file import gguf_to_hf

        path = args.gguf
        if args.asset:
            from megatron.early_exit import assets

            assets.fetch(args.asset)
            path = str(assets.main_path(args.asset))
        config = gguf_to_hf(path, args.out, overwrite=args.overwrite)
        print(
            f"wrote {args.out} ({config['num_hidden_layers']} layers, hidden "
            f"{config['hidden_size']}, vocab {config['vocab_size']})"
        )

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
