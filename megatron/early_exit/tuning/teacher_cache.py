"""Teacher cache for EE-Tuning: run the frozen model once, train the exit heads many times.

tools/cache_teacher.py runs the frozen model (embedding .. LM head) once over exactly the
samples a `--tune-exit` run with the same flags reads, and stores per token

* the hidden state each exit head reads (the output of layer n, or its input with
  --pre-exit), in fp16 (default), bf16, fp32 or fp64;
* the labels and the loss mask;
* the final layer's top-k token ids and their log-probabilities under the full softmax
  (float32; float64 for a float64 model), for sparse top-k exit distillation.

`--tune-exit --teacher-cache DIR` then trains the exit heads from DIR without running the
backbone (the processes build it only up to the deepest exit, to hold the exits' tied
embedding and to save a complete checkpoint). Exit losses: cross entropy with the labels,
or with --exit-distillation KL(top-k teacher || exit) over k + 1 buckets, the rest of the
vocabulary being one bucket (as exit distillation across pipeline stages,
docs/exit_distillation.md; at k = vocabulary size this is today's distillation).
With fp32/fp64 hidden states and full k, the exit-head gradients equal the uncached run's
(tests/unit/test_teacher_cache.py); fp16 rounds each hidden value to ~3 significant digits
(relative error <= 2^-11), a perturbation far below what the exits learn from.

Layout of DIR: meta.json (written last: a cache without it is incomplete), and per split
(train, valid) `labels.npy` int32 [N, s], `loss_mask.npy` float32 [N, s],
`hidden_<layer>.npy` [N, s, h], `topk_ids.npy` int32 [N, s, k], `topk_log_probs.npy` [N, s, k].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron.early_exit.config import RunConfig
from megatron.early_exit.data.gpt_data import samples_per_split
from megatron.early_exit.errors import CheckpointError, ConfigError, DataError
from megatron.early_exit.model import EarlyExitGPTModel, ExitForwardOutput, ExitState
from megatron.early_exit.model.gpt_model import TopKTeacher
from megatron.early_exit.pipeline.losses import add_weighted_exit_losses

CACHE_VERSION = 1
META = "meta.json"
# name -> (numpy storage dtype, torch dtype); bf16 is stored as its 16 raw bits.
HIDDEN_DTYPES = {
    "fp16": (np.float16, torch.float16),
    "bf16": (np.int16, torch.bfloat16),
    "fp32": (np.float32, torch.float32),
    "fp64": (np.float64, torch.float64),
}
FP16_MAX = 65504.0


@dataclass
class CachedBatch:
    """A microbatch of cached samples (the trainer's Batch for `--teacher-cache`)."""

    labels: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s]
    hidden: dict[int, torch.Tensor]  # exit layer -> [b, s, h]
    topk_ids: torch.Tensor  # [b, s, k]
    topk_log_probs: torch.Tensor  # [b, s, k]

    def to(self, device: torch.device) -> CachedBatch:
        return CachedBatch(
            self.labels.to(device),
            self.loss_mask.to(device),
            {n: h.to(device) for n, h in self.hidden.items()},
            self.topk_ids.to(device),
            self.topk_log_probs.to(device),
        )


def backbone_fingerprint(model: EarlyExitGPTModel, deepest: int) -> list[float]:
    """Sums of the parameters the exits depend on (embedding, layers 1..deepest), float64:
    tells a cache built from another backbone apart. One stage (PP=1), TP=1."""
    total, squares = 0.0, 0.0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("embedding.") or (
            name.startswith("decoder.layers.") and int(parts[2]) < deepest
        ):
            d = p.detach().double()
            total += float(d.sum())
            squares += float((d * d).sum())
    return [total, squares]


def _same_fingerprint(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b, strict=True))


class CacheSplit:
    """One split of a cache as a dataset: `.batch(indices) -> CachedBatch` (memory-mapped)."""

    def __init__(self, directory: str, exits: list[int], hidden_dtype: str) -> None:
        def load(name):
            return np.load(os.path.join(directory, name), mmap_mode="r")

        self.directory = directory
        self.labels = load("labels.npy")
        self.loss_mask = load("loss_mask.npy")
        self.hidden = {n: load(f"hidden_{n}.npy") for n in exits}
        self.topk_ids = load("topk_ids.npy")
        self.topk_log_probs = load("topk_log_probs.npy")
        self.torch_dtype = HIDDEN_DTYPES[hidden_dtype][1]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> CachedBatch:
        idx = list(indices)

        def rows(a):
            return torch.from_numpy(np.ascontiguousarray(a[idx]))

        hidden = {n: rows(h).view(self.torch_dtype) for n, h in self.hidden.items()}
        return CachedBatch(
            rows(self.labels).long(),
            rows(self.loss_mask),
            hidden,
            rows(self.topk_ids),
            rows(self.topk_log_probs),
        )


class TeacherCache:
    """An opened cache, checked against the run that trains from it."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory = directory
        self.meta = meta
        self._checked = False

    @property
    def meta_path(self) -> str:
        return os.path.join(self.directory, META)

    @classmethod
    def open(cls, directory: str, run: RunConfig) -> TeacherCache:
        path = os.path.join(directory, META)
        if not os.path.isfile(path):
            raise ConfigError(
                f"--teacher-cache {directory}: no {META} (missing, or an unfinished cache); "
                "write it with tools/cache_teacher.py"
            )
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--teacher-cache: cannot read {path}: {exc}") from None
        cache = cls(directory, meta)
        cache._check_run(run)
        return cache

    def _check_run(self, run: RunConfig) -> None:
        meta, path = self.meta, self.meta_path
        if meta.get("version") != CACHE_VERSION:
            raise ConfigError(f"teacher cache {path}: version {meta.get('version')}, "
                              f"expected {CACHE_VERSION}; rebuild it")  # fmt: skip
        ours = expected_meta(run)
        for key, flag_name in (
            ("exit_layer_nums", "--exit-layer-nums"),
            ("pre_exit", "--pre-exit"),
            ("seq_length", "--seq-length"),
            ("hidden_size", "--hidden-size"),
            ("tokenizer", "the tokenizer (--tokenizer-type/--tokenizer-model)"),
            ("padded_vocab_size", "the vocabulary size"),
        ):
            if meta.get(key) != ours[key]:
                raise ConfigError(
                    f"teacher cache {path} was built for {key} {meta.get(key)} but this run "
                    f"has {ours[key]} ({flag_name}); rebuild it with tools/cache_teacher.py"
                )

    def datasets(self, run: RunConfig, global_batch_size: int):
        """(train, valid or None) for the trainer, after checking they hold enough samples."""
        t = run.training
        eval_iters = t.eval_iters if t.eval_interval else 0
        need = samples_per_split(t.train_iters, global_batch_size, t.eval_interval, eval_iters)
        exits, dtype = self.meta["exit_layer_nums"], self.meta["hidden_dtype"]
        out = []
        for name, needed in (("train", need[0]), ("valid", need[1])):
            have = self.meta["splits"].get(name, 0)
            if needed > have:
                raise DataError(
                    f"teacher cache {self.meta_path} holds {have} {name} samples but this run "
                    f"reads {needed} (--train-iters/--global-batch-size/--eval-interval/"
                    "--eval-iters); rebuild it with tools/cache_teacher.py and this run's flags"
                )
            out.append(
                CacheSplit(os.path.join(self.directory, name), exits, dtype) if needed else None
            )
        return out[0], out[1]

    def check_backbone(self, model: EarlyExitGPTModel, load: str | None) -> None:
        """Once, after the checkpoint is loaded: the cache came from this backbone."""
        if self._checked:
            return
        ours = backbone_fingerprint(model, max(self.meta["exit_layer_nums"]))
        if not _same_fingerprint(ours, self.meta["backbone_fingerprint"]):
            raise CheckpointError(
                f"teacher cache {self.meta_path} was built from another backbone "
                f"({self.meta.get('checkpoint')}) than --load {load}; rebuild it"
            )
        self._checked = True


def expected_meta(run: RunConfig) -> dict:
    """The fields a cache must share with the run that trains from it."""
    return {
        "exit_layer_nums": list(run.exits.exit_layer_nums),
        "pre_exit": bool(run.exits.pre_exit),
        "seq_length": run.model.seq_length,
        "hidden_size": run.model.hidden_size,
        "tokenizer": {"type": run.data.tokenizer_type, "vocab_size": run.data.vocab_size},
        "padded_vocab_size": run.padded_vocab_size(),
    }


def cached_forward(model: EarlyExitGPTModel, batch: CachedBatch) -> ExitForwardOutput:
    """What the backbone's forward would return to the exit losses: the exit states."""
    dtype = model.embedding.word_embeddings.weight.dtype  # PP=1: the model's own dtype
    rotary = None
    if model.config.early_exit.use_exit_block and model.position_embedding_type == "rope":
        rotary = model.rotary_pos_emb(batch.labels.shape[1])  # exit blocks attend
    states = {
        n: ExitState(h.transpose(0, 1).contiguous().to(dtype), None, rotary)
        for n, h in batch.hidden.items()
    }
    return ExitForwardOutput(None, states)


def cached_teacher(batch: CachedBatch, vocab_size: int) -> TopKTeacher:
    """The cached top k as the (k + 1)-bucket teacher of exit distillation: the k tokens one
    by one and the rest of the vocabulary as one bucket holding the remaining mass (exactly
    0 when k covers the vocabulary, so the KL is then today's full one)."""
    log_probs = batch.topk_log_probs.transpose(0, 1)
    ids = batch.topk_ids.transpose(0, 1).long()
    if ids.shape[-1] >= vocab_size:
        tail = torch.zeros(log_probs.shape[:-1], dtype=log_probs.dtype, device=log_probs.device)
    else:
        tail = (1.0 - log_probs.double().exp().sum(dim=-1)).clamp_min(0.0).to(log_probs.dtype)
    return TopKTeacher(log_probs.contiguous(), ids.contiguous(), tail)


def make_cached_loss_func(
    batch: CachedBatch,
    model: EarlyExitGPTModel,
    exit_weights: dict[int, float],
    dynamic_exit_weight: bool,
    exit_distillation: bool = False,
):
    """The EE-Tuning loss from cached states: the same exit losses as the uncached run, with
    the sparse top-k teacher under --exit-distillation (no frozen LM loss metric). Confidence
    heads learn the final layer's top-1, the cached top-k's first id (topk sorts)."""

    def loss_func(out: ExitForwardOutput):
        metrics: dict[str, torch.Tensor] = {}
        teacher = None
        if exit_distillation:
            teacher = cached_teacher(batch, model.vocab_size)
        top1 = None
        if model.config.early_exit.exit_confidence_head:
            top1 = batch.topk_ids[..., 0].long()  # [b, s]
        total = add_weighted_exit_losses(
            None,
            model,
            out.exit_states,
            batch,
            exit_weights,
            dynamic_exit_weight,
            metrics,
            teacher_log_probs=teacher,
            final_top1=top1,
        )
        return total, metrics

    return loss_func


# ---------------------------------------------------------------- writing a cache
@torch.no_grad()
def teacher_record(
    model: EarlyExitGPTModel, batch, top_k: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One microbatch through the frozen model: exit hidden states {layer: [b, s, h]}, and
    the final layer's top-k ids and log-probabilities [b, s, k]."""
    out = model(batch.tokens, batch.position_ids, None)  # no labels: logits [b, s, V]
    logits = out.output if out.output.dtype == torch.float64 else out.output.float()
    log_p = torch.log_softmax(logits, dim=-1)
    values, ids = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
    hidden = {n: s.hidden.transpose(0, 1) for n, s in out.exit_states.items()}
    return hidden, ids.to(torch.int32), values


def write_cache(
    directory: str,
    model: EarlyExitGPTModel,
    splits: dict[str, tuple[object, int]],
    run: RunConfig,
    top_k: int,
    hidden_dtype: str,
    checkpoint: str | None,
    log=print,
) -> dict:
    """Run `model` (full, frozen, eval) over samples 0..n-1 of each split's dataset and write
    the cache under `directory` (must be empty or absent). Returns the metadata."""
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ConfigError(f"cache dtype {hidden_dtype!r}: choose one of {sorted(HIDDEN_DTYPES)}")
    if top_k < 1:
        raise ConfigError(f"--teacher-top-k must be >= 1, got {top_k}")
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConfigError(f"--teacher-cache {directory} exists and is not empty")
    np_dtype, torch_dtype = HIDDEN_DTYPES[hidden_dtype]
    exits = list(run.exits.exit_layer_nums)
    s, h = run.model.seq_length, run.model.hidden_size
    k = min(top_k, run.padded_vocab_size())
    mb = run.training.micro_batch_size
    device = next(model.parameters()).device
    float64 = model.embedding.word_embeddings.weight.dtype == torch.float64
    logp_dtype = np.float64 if float64 else np.float32
    model.eval()
    counts = {}
    for name, (dataset, n) in splits.items():
        if n <= 0:
            continue
        out_dir = os.path.join(directory, name)
        os.makedirs(out_dir, exist_ok=True)

        def mm(file, dtype, shape, _dir=out_dir):
            return np.lib.format.open_memmap(
                os.path.join(_dir, file), mode="w+", dtype=dtype, shape=shape
            )

        labels = mm("labels.npy", np.int32, (n, s))
        mask = mm("loss_mask.npy", np.float32, (n, s))
        hidden = {e: mm(f"hidden_{e}.npy", np_dtype, (n, s, h)) for e in exits}
        ids = mm("topk_ids.npy", np.int32, (n, s, k))
        logps = mm("topk_log_probs.npy", logp_dtype, (n, s, k))
        next_report = 0
        for start in range(0, n, mb):
            idx = list(range(start, min(n, start + mb)))
            batch = dataset.batch(idx).to(device)
            states, top_ids, top_logp = teacher_record(model, batch, k)
            rows = slice(start, start + len(idx))
            labels[rows] = batch.labels.cpu().numpy()
            mask[rows] = batch.loss_mask.float().cpu().numpy()
            ids[rows] = top_ids.cpu().numpy()
            logps[rows] = top_logp.cpu().numpy().astype(logp_dtype)
            for e in exits:
                x = states[e].to(torch_dtype)
                if hidden_dtype == "fp16" and not torch.isfinite(x).all():
                    raise DataError(
                        f"hidden states at exit {e} exceed fp16's range ({FP16_MAX:g}); "
                        "use --teacher-cache-dtype bf16 or fp32"
                    )
                if hidden_dtype == "bf16":
                    x = x.view(torch.int16)  # numpy has no bfloat16: keep the raw bits
                hidden[e][rows] = x.cpu().numpy()
            if start >= next_report:
                log(f"teacher cache: {name} {start + len(idx)}/{n} samples")
                next_report += max(n // 10, mb)
        for a in (labels, mask, ids, logps, *hidden.values()):
            a.flush()
        counts[name] = n
    meta = {
        "version": CACHE_VERSION,
        **expected_meta(run),
        "top_k": k,
        "hidden_dtype": hidden_dtype,
        "splits": counts,
        "checkpoint": checkpoint,
        "backbone_fingerprint": backbone_fingerprint(model, max(exits)),
        "data_path": run.data.data_path,
        "split": run.data.split,
        "seed": run.training.seed,
        "micro_batch_size": mb,
    }
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
