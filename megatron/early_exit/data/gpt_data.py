"""Real GPT data: megatron-core GPTDataset / BlendedDataset over IndexedDataset files.

`build_gpt_datasets` turns Megatron-style settings (``--data-path``, ``--split``, sequence
length, seed, cache dir, sample counts per split) into train/valid/test datasets through
megatron-core's BlendedMegatronDatasetBuilder. Samples are addressed by global sample
index exactly like mock.py, so `microbatch_iterator` here is a drop-in replacement for
`mock.microbatch_iterator` and every TP/PP/DP layout sees the same samples.

Distributed building (what is chosen and why)
---------------------------------------------
Every rank of this framework consumes batches (each pipeline stage calls the data
iterator), so by default the datasets are built on *every* rank: `is_built_on_rank`
returns True everywhere. megatron-core itself orders the work: global rank 0 builds the
index caches (document/sample/shuffle/blend indices, ``*.npy`` under `data_cache_path`)
first, all ranks meet at a barrier, then the other ranks load (mmap) those caches. Only
global rank 0 ever writes caches (megatron-core hard-codes this), so with several nodes
`data_cache_path` (default: ``<dir of the first prefix>/cache``) must be on a
filesystem every node sees; a rank that cannot see rank 0's cache gets a DataError
saying so. Call `build_gpt_datasets` on all ranks (it has collective barriers).
Without an initialised torch.distributed it builds inside a temporary single-process
gloo group (megatron-core's BlendedDataset needs one as soon as a cache path is set).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy
import torch
import torch.distributed as dist

from megatron.early_exit.data.mock import Batch
from megatron.early_exit.data.mock import microbatch_iterator as mock_microbatch_iterator
from megatron.early_exit.data.tokenizers import Tokenizer
from megatron.early_exit.errors import DataError

_PAD_NONE = -1  # megatron-core's "no pad token" id: never present in the data


class MegatronTokenizerAdapter:
    """Our Tokenizer, shaped the way GPTDatasetConfig / MegatronDataset use a tokenizer.

    megatron-core reads `vocab_size` (token dtype), `eod` (masks/position resets), `pad`
    (padding and loss masking; -1 when there is none, or when it equals EOD, so real EOD
    tokens are never masked as padding) and `unique_identifiers` (part of the cache key).

    `data_fingerprints` ({prefix: fingerprint}) are added to the identifiers: megatron-core
    keys its index caches on the dataset *path* only, so without them re-running
    preprocessing into the same prefix would silently reuse stale indices.
    """

    def __init__(self, tokenizer: Tokenizer, data_fingerprints: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(tokenizer).__name__),
                ("vocab_size", tokenizer.vocab_size),
                ("eod", tokenizer.eod),
            ]
        )
        if data_fingerprints:
            self.unique_identifiers["data"] = dict(data_fingerprints)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self.tokenizer.eod

    @property
    def bos(self) -> int | None:
        return self.tokenizer.bos

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad
        return _PAD_NONE if pad is None or pad == self.tokenizer.eod else pad

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.detokenize(ids)


# ---------------------------------------------------------------------------- settings
def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron --data-path syntax: ["PREFIX", ...] or ["W1", "PREFIX1", "W2", "PREFIX2", ...].

    Returns (prefixes, weights or None). Weights must all be positive numbers.
    """
    items = [str(x).strip() for x in data_path]
    if not items or any(not x for x in items):
        raise DataError(f"--data-path needs one or more dataset prefixes, got {list(data_path)}")

    def number(x: str) -> float | None:
        try:
            return float(x)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(number(w) is not None for w in items[0::2]):
        weights = [number(w) for w in items[0::2]]
        prefixes = items[1::2]
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise DataError(f"--data-path weights must be positive numbers, got {bad}")
        if any(number(p) is not None for p in prefixes):
            raise DataError(f"--data-path: expected 'WEIGHT PREFIX' pairs, got {items}")
        return prefixes, weights
    numeric = [x for x in items if number(x) is not None]
    if numeric:
        raise DataError(
            f"--data-path mixes weights and prefixes ambiguously: {items}; use either "
            "'PREFIX ...' or 'WEIGHT PREFIX WEIGHT PREFIX ...'"
        )
    return items, None


def samples_per_split(
    train_iters: int, global_batch_size: int, eval_interval: int | None, eval_iters: int
) -> list[int]:
    """Samples to build per split, as Megatron counts them.

    train: train_iters * gbs; valid: `num_validations` * eval_iters * gbs (the trainer
    validates at the start, every interval and after the last iteration); test: eval_iters * gbs.
    """
    train = train_iters * global_batch_size
    if eval_iters <= 0:
        return [train, 0, 0]
    runs = num_validations(train_iters, eval_interval) if eval_interval else 1
    return [train, runs * eval_iters * global_batch_size, eval_iters * global_batch_size]


def num_validations(train_iters: int, eval_interval: int) -> int:
    """Validations of a run from iteration 0: at the start, every interval, at the end."""
    return 1 + train_iters // eval_interval + (1 if train_iters % eval_interval else 0)


def _check_split(split: str) -> None:
    parts = [x.strip() for x in str(split).split(",")]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise DataError(
            f"--split {split!r}: expected up to 3 comma-separated weights, e.g. 949,50,1"
        )
    if sum(values) <= 0:
        raise DataError(f"--split {split!r}: the weights sum to 0")


def _check_prefix(prefix: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if IndexedDataset.exists(prefix):
        return
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and IndexedDataset.exists(prefix[: -len(ext)]):
            raise DataError(
                f"--data-path {prefix}: pass the prefix without {ext}: {prefix[: -len(ext)]}"
            )
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    raise DataError(
        f"--data-path {prefix}: dataset not found ({' and '.join(missing)} missing; "
        "expected the PREFIX_{key}_document written by tools/preprocess_data.py)"
    )


def data_fingerprint(prefix: str) -> str:
    """Cheap, node-independent identity of an IndexedDataset's contents: file sizes plus a
    hash of the head and tail of the .idx (which holds every document length)."""
    h = hashlib.md5(usedforsecurity=False)
    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    h.update(f"{size}:{os.path.getsize(prefix + '.bin')}".encode())
    with open(idx, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def _split_ranges(n: int, split_matrix) -> list[tuple[int, int] | None]:
    """Document ranges per split, rounded exactly as megatron-core's builder does."""
    out = []
    for bookends in split_matrix:
        if bookends is None:
            out.append(None)
        else:
            out.append((int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))))
    return out


def _check_contents(prefixes, tokenizer, split_matrix, sizes, split) -> None:
    """Fail early with a clear message where megatron-core would loop forever or misread."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("train", "valid", "test")
    for prefix in prefixes:
        ds = IndexedDataset(prefix, mmap=True)
        capacity = numpy.iinfo(ds.index.dtype).max + 1
        if tokenizer.vocab_size > capacity:
            raise DataError(
                f"--data-path {prefix}: its tokens are {numpy.dtype(ds.index.dtype).name}, too "
                f"small for this tokenizer's vocabulary of {tokenizer.vocab_size}; it was "
                "written with another tokenizer (re-run tools/preprocess_data.py)"
            )
        lengths = ds.sequence_lengths
        for name, rng, size in zip(names, _split_ranges(len(lengths), split_matrix), sizes):
            if rng is None or size == 0:  # None: one epoch of the split
                continue
            beg, end = rng
            if end <= beg or int(lengths[beg:end].sum()) == 0:
                raise DataError(
                    f"--data-path {prefix}: the {name} split is empty ({len(lengths)} documents, "
                    f"--split {split} gives it documents [{beg}, {end})) but "
                    f"{'an epoch of' if size is None else size} {name} samples are needed; "
                    "use more data or another --split"
                )
        del ds


@contextlib.contextmanager
def _process_group():
    """megatron-core's builder needs torch.distributed once caches are involved."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def default_cache_path(prefixes: Sequence[str]) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")


def build_gpt_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: Tokenizer,
    num_samples: Sequence[int | None],
    data_cache_path: str | None = None,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple:
    """(train, valid, test) datasets; each a GPTDataset / BlendedDataset, or None.

    `num_samples`: samples needed per split (see `samples_per_split`); a split gets at least
    that many (more epochs are drawn if the corpus is small). A split whose --split weight
    is 0 is None. Call on every rank (collective); see the module docstring.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_data_path(data_path)
    if len(prefixes) == 1:
        weights = None  # a single dataset needs no blending
    elif weights is None:
        # megatron-core builds an unweighted blend as one epoch, whatever was asked;
        # weighting by token counts gives the same mixture at the requested size.
        weights = [float(_num_tokens(p)) for p in prefixes]
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise DataError(f"num_samples needs 3 non-negative counts, got {list(num_samples)}")
    if weights is not None and any(n is None for n in num_samples):
        raise DataError("a weighted --data-path blend needs a sample count for every split")
    if seq_length < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    _check_split(split)
    for prefix in prefixes:
        _check_prefix(prefix)
    cache = data_cache_path or default_cache_path(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache,
        tokenizer=MegatronTokenizerAdapter(tokenizer, {p: data_fingerprint(p) for p in prefixes}),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    sizes = list(num_samples)
    _check_contents(prefixes, tokenizer, config.split_matrix, sizes, split)
    # Splits nobody reads are not built (an empty one would make megatron-core loop
    # forever); the document ranges of the others stay as --split defines them.
    config.split_matrix = [
        None if size == 0 else rng for rng, size in zip(config.split_matrix, sizes)
    ]
    if all(rng is None for rng in config.split_matrix):
        return (None, None, None)
    on_rank = is_built_on_rank or (lambda: True)
    with _process_group():
        try:
            datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, on_rank, config).build()
        except FileNotFoundError as exc:
            raise DataError(
                f"dataset index cache missing on rank {dist.get_rank()}: {exc.filename}; "
                f"global rank 0 writes it to {cache}, which every rank must see (use a "
                "shared --data-cache-path)"
            ) from None
    for name, ds, size in zip(("train", "valid", "test"), datasets, sizes):
        if ds is not None and size is not None and len(ds) < size:
            raise DataError(
                f"the {name} split has {len(ds)} samples but {size} are needed; use more data, "
                "another --split, or fewer iterations"
            )
    return tuple(datasets)


def _num_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return int(IndexedDataset(prefix, mmap=True).sequence_lengths.sum())


# ---------------------------------------------------------------------------- batches
def batch_from_samples(dataset, indices: Sequence[int]) -> Batch:
    """Global samples `indices` of a GPTDataset/BlendedDataset as one Batch [b, s]."""
    n = len(dataset)
    samples = []
    for i in indices:
        if not 0 <= i < n:
            raise IndexError(
                f"sample {i} requested from a dataset of {n} samples (built for fewer "
                "iterations / evaluations than are being run)"
            )
        samples.append(dataset[i])
    return Batch(
        tokens=torch.stack([s["tokens"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        loss_mask=torch.stack([s["loss_mask"] for s in samples]).float(),
        position_ids=torch.stack([s["position_ids"] for s in samples]),
    )


class BatchSource:
    """Adapts a megatron-core dataset to the `.batch(indices)` protocol of mock.py."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def batch(self, indices: Sequence[int]) -> Batch:
        return batch_from_samples(self.dataset, indices)


def microbatch_iterator(
    dataset,
    iteration: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> Iterator[Batch]:
    """This DP rank's microbatches of one iteration's global batch (same as mock.py's)."""
    return mock_microbatch_iterator(
        BatchSource(dataset),
        iteration,
        global_batch_size,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
    )
