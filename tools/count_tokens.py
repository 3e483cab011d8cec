"""Count token ids in indexed datasets (for self-speculative decoding's draft vocabulary).

    python tools/count_tokens.py --data-path data/my_text_document --save CKPT
    # -> CKPT/iter_N/token_counts.npy (int64 [vocab]); generate/serve with --load CKPT and
    #    --draft-vocab-size 8192 (the draft exit then scores only the 8192 most frequent ids)

The data must be tokenized with the checkpoint's own tokenizer (tools/preprocess_data.py
with its tokenizer flags; examples/ee_tuning/tune_smollm2.sh runs this step for SmolLM2).
Without --save, --output FILE.npy writes the counts anywhere. --vocab-size defaults to the
checkpoint's vocabulary with --save, else to the largest id + 1. Bad input: one `error:`
line and exit code 2. See megatron/early_exit/inference/draft_vocab.py.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes written by tools/preprocess_data.py")  # fmt: skip
    p.add_argument("--save", metavar="CKPT", help="write token_counts.npy into this checkpoint")
    p.add_argument("--output", metavar="FILE", help="write the counts to this .npy file")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="length of the counts (default: the checkpoint's vocabulary with "
                   "--save, else the largest id + 1)")  # fmt: skip
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import numpy

    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    from megatron.early_exit.errors import UserError
    from megatron.early_exit.inference import draft_vocab as dv

    try:
        if not args.save and not args.output:
            raise dv.TokenCountError("nowhere to write: give --save CKPT and/or --output FILE")
        vocab = args.vocab_size
        if vocab is None and args.save:
            vocab = dv.checkpoint_vocab_size(args.save)
        counts = dv.count_token_ids(args.data_path, vocab)
        written = []
        if args.save:
            written.append(dv.save_token_counts(args.save, counts))
        if args.output:
            try:
                numpy.save(args.output, counts)
            except OSError as exc:
                raise dv.TokenCountError(f"--output {args.output}: {exc}") from None
            written.append(args.output)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seen = int((counts > 0).sum())
    print(f"{int(counts.sum())} tokens, {seen} of {len(counts)} ids seen -> {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
