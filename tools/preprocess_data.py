"""Tokenize a corpus into megatron-core IndexedDataset files (.bin/.idx) for --data-path.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/my \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \
        --merge-file gpt2-merges.txt --append-eod --workers 8
    # -> data/my_text_document.bin/.idx; train with --data-path data/my_text_document

JSON lines input (one document per line, text under --json-keys) or .txt files (one
document per file). See `--help` and megatron/early_exit/data/preprocess.py.
"""

import sys


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    from megatron.early_exit.data.preprocess import main as preprocess_main

    return preprocess_main(argv)


if __name__ == "__main__":
    sys.exit(main())
