"""Token frequencies for a frequency-ranked draft vocabulary (self-speculative decoding).

With a large vocabulary the draft exit's output projection dominates the cost of a draft
token (SmolLM2-135M: 49152 x 576, about 8.7 transformer layers). Scoring only the N most
frequent tokens (FR-Spec, arXiv 2502.14856) makes that projection V/N times cheaper; the
full model still verifies, so the output stays exact (see speculative.py).

`count_token_ids` counts the token ids of datasets written by tools/preprocess_data.py;
`save_token_counts` stores the counts as `token_counts.npy` in a checkpoint's latest
iteration directory, where `inference.loading.build_engine` finds them; `top_token_ids`
picks the draft vocabulary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy
import torch

from megatron.early_exit.errors import TokenCountError

COUNTS_FILE = "token_counts.npy"
_CHUNK = 1 << 22  # tokens per bincount call: bounded memory on any dataset size


def _open(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        for ext in (".bin", ".idx"):
            if prefix.endswith(ext) and IndexedDataset.exists(prefix[: -len(ext)]):
                raise TokenCountError(
                    f"--data-path {prefix}: pass the prefix without {ext}: {prefix[: -len(ext)]}"
                )
        raise TokenCountError(
            f"--data-path {prefix}: dataset not found ({prefix}.bin/.idx missing; expected a "
            "prefix written by tools/preprocess_data.py)"
        )
    try:
        return IndexedDataset(prefix, mmap=True)
    except Exception as exc:  # noqa: BLE001  (corrupt .idx: numpy/struct errors of all kinds)
        raise TokenCountError(f"--data-path {prefix}: unreadable dataset: {exc}") from None


def _doc_ranges(pointers: numpy.ndarray, lengths: numpy.ndarray, itemsize: int):
    """(start, end) token ranges of the .bin to count: one range when the documents are
    stored back to back (as the builder writes them), else one per document."""
    starts = pointers.astype(numpy.int64) // itemsize
    ends = starts + lengths.astype(numpy.int64)
    if len(starts) == 0:
        return []
    if starts[0] == 0 and bool((starts[1:] == ends[:-1]).all()):
        return [(0, int(ends[-1]))]
    return list(zip(starts.tolist(), ends.tolist()))


def count_token_ids(prefixes: Sequence[str], vocab_size: int | None = None) -> numpy.ndarray:
    """Occurrences of every token id over all datasets: int64 [vocab_size] (default: the
    largest id + 1). An id >= vocab_size is an error (another tokenizer's dataset)."""
    if not prefixes:
        raise TokenCountError("give one or more dataset prefixes with --data-path")
    if vocab_size is not None and vocab_size < 1:
        raise TokenCountError(f"--vocab-size must be >= 1, got {vocab_size}")
    counts = numpy.zeros(vocab_size or 0, dtype=numpy.int64)
    for prefix in prefixes:
        ds = _open(prefix)
        dtype = numpy.dtype(ds.index.dtype)
        ranges = _doc_ranges(ds.index.sequence_pointers, ds.sequence_lengths, dtype.itemsize)
        size = os.path.getsize(prefix + ".bin") // dtype.itemsize
        if ranges and max(e for _, e in ranges) > size:
            raise TokenCountError(f"--data-path {prefix}: the .bin is shorter than its .idx says")
        tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r") if size else None
        for beg, end in ranges:
            for a in range(beg, end, _CHUNK):
                part = numpy.bincount(tokens[a : min(end, a + _CHUNK)])
                if vocab_size is not None and len(part) > vocab_size:
                    bad = int(numpy.flatnonzero(part[vocab_size:])[0]) + vocab_size
                    raise TokenCountError(
                        f"--data-path {prefix}: token id {bad} is outside the vocabulary of "
                        f"{vocab_size}; was it tokenized with another tokenizer?"
                    )
                if len(part) > len(counts):
                    counts = numpy.pad(counts, (0, len(part) - len(counts)))
                counts[: len(part)] += part
        del tokens, ds
    return counts


def checkpoint_vocab_size(root: str) -> int:
    """The vocabulary an engine loaded from checkpoint `root` has (its tokenizer's)."""
    from megatron.early_exit.checkpoint.files import read_checkpoint_args, read_tracker
    from megatron.early_exit.data.tokenizers import TokenizerConfig, build_tokenizer

    read_tracker(root)  # a clear error when root holds no checkpoint
    args = read_checkpoint_args(root)
    if args is None:
        raise TokenCountError(
            f"{root}: the checkpoint has no ee_args.json; pass --vocab-size explicitly"
        )
    fields = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")
    cfg = TokenizerConfig(**{k: args[k] for k in fields if args.get(k) is not None})
    return int(build_tokenizer(cfg).vocab_size)


def save_token_counts(root: str, counts: numpy.ndarray) -> str:
    """Write counts to `<latest iteration dir of root>/token_counts.npy` atomically."""
    from megatron.early_exit.checkpoint.files import checkpoint_dir, read_tracker

    iter_dir = checkpoint_dir(root, read_tracker(root))
    if not os.path.isdir(iter_dir):
        raise TokenCountError(f"{root}: the tracker points to {iter_dir}, which is missing")
    path = os.path.join(iter_dir, COUNTS_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".token_counts.", suffix=".npy", dir=iter_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.save(f, numpy.asarray(counts, dtype=numpy.int64))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_token_counts(iter_dir: str) -> torch.Tensor | None:
    """`iter_dir/token_counts.npy` as an int64 tensor; None when the file is absent."""
    path = os.path.join(iter_dir, COUNTS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        arr = numpy.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TokenCountError(f"{path} is unreadable: {exc}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr < 0).any():
        raise TokenCountError(
            f"{path}: expected a 1-D array of counts >= 0, got {arr.dtype} {arr.shape}"
        )
    return torch.from_numpy(arr.astype(numpy.int64))


def check_counts(counts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts for ids [0, vocab_size): shorter arrays are padded with zeros (ids never seen);
    counts for ids >= vocab_size mean another tokenizer's data."""
    counts = torch.as_tensor(counts).detach().to("cpu", torch.int64).flatten()
    if len(counts) > vocab_size and bool(counts[vocab_size:].any()):
        raise TokenCountError(
            f"token counts cover {len(counts)} ids with counts beyond the model's vocabulary "
            f"of {vocab_size}: they were made with another tokenizer (tools/count_tokens.py)"
        )
    if bool((counts < 0).any()):
        raise TokenCountError("token counts must be >= 0")
    out = torch.zeros(vocab_size, dtype=torch.int64)
    n = min(len(counts), vocab_size)
    out[:n] = counts[:n]
    return out


def top_token_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The n most frequent ids (ties: lower id first), in ascending id order (so that an
    argmax over the subset breaks ties like an argmax over the full vocabulary)."""
    order = torch.sort(-counts, stable=True).indices  # stable: equal counts keep id order
    return torch.sort(order[:n]).values
