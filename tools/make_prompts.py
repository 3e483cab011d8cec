"""Turn a general-text corpus into a prompts JSONL file (fixed seed).

    python tools/make_prompts.py botchan --num 16 --seed 0 --out outputs/prompts/botchan.jsonl
    python tools/make_prompts.py fortunes --num all --min-chars 1500 --out tune.jsonl
    python tools/make_prompts.py --list          # corpora and their split (tune/calibrate/measure)

Each line: {"prompt", "corpus", "split", "source", "index"}; read by the benchmarks'
--prompts-file/--prompt-field, tools/calibrate_exits.py and tools/generate.py --prompts-file.
`--num all` writes every passage in a seeded order: tuning text for tools/preprocess_data.py
--json-keys prompt (examples/ee_tuning/tune_smollm2_general.sh).
Corpora and split: megatron/early_exit/data/text_prompts.py. Errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.assets import AssetError  # noqa: E402
from megatron.early_exit.data.text_prompts import CORPORA, SPLIT, make_prompts  # noqa: E402
from megatron.early_exit.errors import UserError  # noqa: E402


def _count(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("corpus", nargs="?", choices=sorted(CORPORA))
    p.add_argument("--num", type=_count, default=16, help="prompts to draw, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=400, help="characters per prompt at least")
    p.add_argument("--out", default=None, help="JSONL file (default: stdout)")
    p.add_argument("--list", action="store_true", help="print the corpora and their split")
    args = p.parse_args(argv)
    if args.list:
        for split, names in SPLIT.items():
            for name in names:
                asset, files, _ = CORPORA[name]
                print(f"{split:10s} {name:14s} {asset}: {', '.join(files)}")
        return 0
    if args.corpus is None:
        p.error("name a corpus (or --list)")
    try:
        rows = make_prompts(args.corpus, args.num, args.seed, args.min_chars)
    except (UserError, AssetError) as e:
        print(f"make_prompts.py: error: {e}", file=sys.stderr)
        return 2
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
