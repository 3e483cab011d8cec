"""Tokenize a text corpus into megatron-core IndexedDataset files (.bin/.idx).

Two input modes, chosen by file name:

* JSON lines (any name not ending in ``.txt``): one document per line, the text under
  each of ``json_keys``; every key gets its own dataset ``PREFIX_{key}_document.bin/.idx``.
* plain text (names ending in ``.txt``): one document per file, written to
  ``PREFIX_{key}_document.bin/.idx`` with the single key of ``json_keys`` (``text``).

The input is streamed: the main process reads raw lines (or file names) and hands them
to a pool of workers in chunks, keeping a bounded number in flight; workers decode,
parse and tokenize, and results are written in input order, so any number of workers
produces byte-identical files. Files are written under temporary names and renamed only
after everything succeeded (every ``.bin`` first, then every ``.idx``), so a failed run
leaves nothing that looks like a valid dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy

from megatron.early_exit.data.tokenizers import (
    Tokenizer,
    TokenizerError,
    add_tokenizer_arguments,
    build_tokenizer,
    tokenizer_config_from_args,
)
from megatron.early_exit.errors import PreprocessError
from megatron.early_exit.progress import progress

TokenizerFactory = Callable[[], Tokenizer]

_TMP_SUFFIX = ".tmp"


@dataclass
class PreprocessResult:
    documents: int  # input documents (JSON lines / text files) processed
    tokens: int  # tokens written, over all keys
    seconds: float
    input_bytes: int
    outputs: list[str]  # dataset prefixes written (PREFIX_{key}_document)
    skipped_empty: dict[str, int] = field(default_factory=dict)  # key -> empty documents

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The .bin dtype for a vocabulary: uint16 when every id fits, else int32.

    Same threshold as megatron-core's GPTDatasetConfig.token_dtype_code (> 65536 -> int32).
    """
    if vocab_size <= numpy.iinfo(numpy.uint16).max + 1:
        return numpy.uint16
    if vocab_size <= numpy.iinfo(numpy.int32).max + 1:
        return numpy.int32
    raise PreprocessError(f"vocabulary of {vocab_size} tokens does not fit int32 token ids")


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron's naming: PREFIX_{key}_document (pass this to --data-path)."""
    return f"{output_prefix}_{key}_document"


def is_text_input(path: str) -> bool:
    return path.endswith(".txt")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Paths and globs -> existing files (globs sorted), in the given order, no duplicates."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"input {pattern!r}: the pattern matches no files")
        else:
            if not os.path.exists(pattern):
                raise PreprocessError(f"input file not found: {pattern}")
            if not os.path.isfile(pattern):
                raise PreprocessError(f"input is not a file: {pattern}")
            matches = [pattern]
        for m in matches:
            if m not in seen:  # a set: inputs can be hundreds of thousands of shards
                seen.add(m)
                files.append(m)
    if not files:
        raise PreprocessError("no input files given")
    return files


# ---------------------------------------------------------------------------- workers
# A work item is (path, line number, raw line bytes) for JSON lines, or (path, 0, None)
# for a text file (the worker reads it: one document per file).
_Item = tuple[str, int, "bytes | None"]

_worker_state: dict = {}


def _init_worker(
    factory: TokenizerFactory, keys: tuple[str, ...], append_eod: bool, dtype: type
) -> None:
    tokenizer = factory()
    _worker_state.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, dtype=dtype)


def _where(path: str, lineno: int) -> str:
    return f"{path}:{lineno}" if lineno else path


def _encode(text: str, where: str, key: str) -> numpy.ndarray:
    tokenizer: Tokenizer = _worker_state["tokenizer"]
    try:
        ids = list(tokenizer.tokenize(text))
    except TokenizerError as exc:
        raise PreprocessError(f"{where}: key {key!r}: {exc}") from None
    if _worker_state["append_eod"]:
        ids.append(tokenizer.eod)
    arr = numpy.asarray(ids, dtype=numpy.int64)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= tokenizer.vocab_size:
            bad = lo if lo < 0 else hi
            raise PreprocessError(
                f"{where}: key {key!r}: token id {bad} outside the tokenizer's vocabulary "
                f"[0, {tokenizer.vocab_size})"
            )
    return arr.astype(_worker_state["dtype"])


def _process(item: _Item) -> tuple[list[numpy.ndarray], int]:
    """One document -> (token arrays, one per key; input bytes)."""
    path, lineno, raw = item
    where = _where(path, lineno)
    keys: tuple[str, ...] = _worker_state["keys"]
    if raw is None:  # plain-text mode: the whole file is one document
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except OSError as exc:
            raise PreprocessError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise PreprocessError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        return [_encode(text, where, keys[0])], len(raw)
    try:
        doc = json.loads(raw.decode("utf-8").rstrip("\r\n"))
    except UnicodeDecodeError as exc:
        raise PreprocessError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PreprocessError(
            f"{where}: malformed JSON line: {exc.msg} (column {exc.colno})"
        ) from None
    if not isinstance(doc, dict):
        raise PreprocessError(f"{where}: expected a JSON object per line, got {type(doc).__name__}")
    arrays = []
    for key in keys:
        if key not in doc:
            raise PreprocessError(
                f"{where}: key {key!r} not found (--json-keys); keys present: {sorted(doc)}"
            )
        value = doc[key]
        if not isinstance(value, str):
            raise PreprocessError(
                f"{where}: key {key!r} holds {type(value).__name__}, expected a string"
            )
        arrays.append(_encode(value, where, key))
    return arrays, len(raw)


# ---------------------------------------------------------------------------- reading
def _read_items(files: Sequence[str]) -> Iterator[_Item]:
    """Stream work items; blank JSON lines are skipped."""
    for path in files:
        if is_text_input(path):
            yield (path, 0, None)
            continue
        try:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield (path, lineno, line)
        except OSError as exc:
            raise PreprocessError(f"{path}: cannot read: {exc.strerror or exc}") from None


class _Throttle:
    """Bounds the items a Pool has been handed but whose results were not yet consumed.

    Pool.imap's feeder thread drains its input iterable eagerly; wrapping the input in
    `feed()` makes the feeder wait for `done()` calls, so memory stays bounded.
    """

    def __init__(self, limit: int) -> None:
        self._sem = threading.Semaphore(limit)
        self._abort = threading.Event()
        self.error: BaseException | None = None

    def feed(self, items: Iterable[_Item]) -> Iterator[_Item]:
        try:
            for item in items:
                while not self._sem.acquire(timeout=0.1):
                    if self._abort.is_set():
                        return
                if self._abort.is_set():
                    return
                yield item
        except BaseException as exc:  # re-raised by the consumer
            self.error = exc

    def done(self) -> None:
        self._sem.release()

    def abort(self) -> None:
        self._abort.set()


# ---------------------------------------------------------------------------- writing
class _Outputs:
    """IndexedDatasetBuilders on temporary names; commit() renames, discard() deletes."""

    def __init__(self, prefixes: Sequence[str], dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = list(prefixes)
        self.builders = []
        self._tmp: list[str] = []
        try:
            for prefix in self.prefixes:
                os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
                bin_tmp = self._tmp_name(prefix + ".bin")
                self._tmp.append(bin_tmp)
                self.builders.append(IndexedDatasetBuilder(bin_tmp, dtype=dtype))
        except BaseException:
            self.discard()
            raise

    @staticmethod
    def _tmp_name(path: str) -> str:
        return f"{path}{_TMP_SUFFIX}{os.getpid()}"

    def add(self, i: int, tokens: numpy.ndarray) -> None:
        self.builders[i].add_document(tokens, [int(tokens.size)])

    def commit(self) -> None:
        idx_tmps = []
        for prefix, builder in zip(self.prefixes, self.builders):
            idx_tmp = self._tmp_name(prefix + ".idx")
            self._tmp.append(idx_tmp)
            builder.finalize(idx_tmp)
            idx_tmps.append(idx_tmp)
        # .bin first, .idx last: a dataset counts as present only once its .idx exists.
        for prefix in self.prefixes:
            os.replace(self._tmp_name(prefix + ".bin"), prefix + ".bin")
        for prefix, idx_tmp in zip(self.prefixes, idx_tmps):
            os.replace(idx_tmp, prefix + ".idx")
        self._tmp = []

    def discard(self) -> None:
        for builder in self.builders:
            with contextlib.suppress(Exception):  # best-effort cleanup
                builder.data_file.close()
        for path in self._tmp:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self._tmp = []


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_factory: TokenizerFactory,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    chunksize: int = 64,
    log_interval: int = 10000,
    log: Callable[[str], None] | None = None,
    show_progress: bool = False,
) -> PreprocessResult:
    """Tokenize `inputs` (paths or globs) into PREFIX_{key}_document.bin/.idx.

    `tokenizer_factory` is a picklable zero-argument callable returning a Tokenizer, e.g.
    ``functools.partial(build_tokenizer, TokenizerConfig(...))``; each worker calls it once.
    Raises PreprocessError (and leaves no output files) on any user error.
    `show_progress`: a progress bar over the input bytes (plain lines when not on a terminal).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    keys = tuple(json_keys)
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    if len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys has duplicates: {list(keys)}")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if chunksize < 1:
        raise PreprocessError(f"chunksize must be >= 1, got {chunksize}")
    files = expand_inputs(inputs)
    n_text = sum(is_text_input(f) for f in files)
    if 0 < n_text < len(files):
        raise PreprocessError(
            "inputs mix .txt files (one document per file) with JSON lines files; "
            "preprocess them in separate runs"
        )
    if n_text and len(keys) != 1:
        raise PreprocessError(
            f".txt inputs hold one text per document; pass one --json-keys name, got {list(keys)}"
        )
    try:
        tokenizer = tokenizer_factory()
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None
    dtype = token_dtype(tokenizer.vocab_size)
    init_args = (tokenizer_factory, keys, append_eod, dtype)
    prefixes = [dataset_prefix(output_prefix, k) for k in keys]

    outputs = _Outputs(prefixes, dtype)
    bar = progress(
        total=sum(os.path.getsize(f) for f in files),
        desc="preprocess",
        unit="B",
        unit_scale=True,
        enabled=show_progress,
    )
    if show_progress:
        log = bar.write  # messages must not break the bar
    docs = tokens = nbytes = 0
    skipped = dict.fromkeys(keys, 0)
    start = time.perf_counter()
    pool = None
    throttle = _Throttle(max(4 * workers * chunksize, 2 * chunksize))
    try:
        if workers == 1:
            _init_worker(*init_args)
            results: Iterable = map(_process, _read_items(files))
        else:
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            )
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_process, throttle.feed(_read_items(files)), chunksize)
        for arrays, size in results:
            throttle.done()
            for i, arr in enumerate(arrays):
                if arr.size == 0:
                    skipped[keys[i]] += 1
                    continue
                outputs.add(i, arr)
                tokens += int(arr.size)
            docs += 1
            nbytes += size
            bar.update(size)
            if log_interval > 0 and docs % log_interval == 0:
                elapsed = max(time.perf_counter() - start, 1e-9)
                log(
                    f"processed {docs} documents, {_fmt_count(tokens)} tokens, "
                    f"{nbytes / elapsed / 1e6:.2f} MB/s"
                )
        if throttle.error is not None:
            raise throttle.error
        if docs == 0:
            raise PreprocessError(f"empty corpus: no documents in {', '.join(files)}")
        if tokens == 0:
            raise PreprocessError(
                f"empty corpus: {docs} documents but 0 tokens (every document is empty)"
            )
        outputs.commit()
    except BaseException:
        bar.close(summary=False)
        throttle.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
            pool = None
        outputs.discard()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return PreprocessResult(
        documents=docs,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        input_bytes=nbytes,
        outputs=prefixes,
        skipped_empty={k: v for k, v in skipped.items() if v},
    )


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description=(
            "Tokenize a corpus into megatron-core IndexedDataset files for --data-path. "
            "Input modes: JSON lines (one JSON object per line, text under each --json-keys "
            "key; one dataset PREFIX_{key}_document.bin/.idx per key) or plain text (files "
            "ending in .txt: one document per file; written as PREFIX_{key}_document with "
            "the single --json-keys name, default 'text'). A run's inputs must all use one "
            "mode."
        ),
    )
    p.add_argument(
        "--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
        help="input files or glob patterns (quote globs); .txt = one document per file, "
        "anything else = JSON lines",
    )  # fmt: skip
    p.add_argument("--output-prefix", required=True, help="output path prefix")
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)"
    )
    p.add_argument(
        "--append-eod", action="store_true", help="append the tokenizer's EOD to every document"
    )
    add_tokenizer_arguments(p.add_argument_group("tokenizer"), tokenizer_type_required=True)
    r = p.add_argument_group("runtime")
    r.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    r.add_argument("--chunksize", type=int, default=64, help="documents per task sent to a worker")
    r.add_argument(
        "--log-interval", type=int, default=10000,
        help="print progress every N documents (0: never)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = tokenizer_config_from_args(args)
    try:
        result = preprocess(
            args.input,
            args.output_prefix,
            functools.partial(build_tokenizer, cfg),
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            chunksize=args.chunksize,
            log_interval=args.log_interval,
            show_progress=True,
        )
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    written = ", ".join(f"{p}.bin/.idx" for p in result.outputs)
    skipped = "".join(
        f"; skipped {n} empty '{k}' documents" for k, n in result.skipped_empty.items()
    )
    print(
        f"done: {result.documents} documents, {result.tokens} tokens in {result.seconds:.2f} s "
        f"({_fmt_count(result.tokens_per_s)} tokens/s){skipped}; wrote {written}",
        flush=True,
    )
    return 0
