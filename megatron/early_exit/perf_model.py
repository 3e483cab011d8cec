"""FLOP model of a run's pipeline stages, and the layer split that balances them (pure arithmetic).

Forward FLOPs of one microbatch per stage, per GPU (divided by TP), from the layer shapes:
2 FLOPs per weight per token for every matmul, plus the attention scores QK^T and AV
(2 x 2 s h per token, the full square as dense kernels compute it). A stage's cost is its
layers, its exit heads (vocabulary projection, plus the exit MLP / block when configured)
and, on the last stage, the LM head. Embedding lookups and norms are not counted.
Backward is taken as a constant multiple of forward for every part, so the stage that is
slowest in forward is the pipeline's bottleneck.

`--dry-run` prints these costs and `suggest_split` (the first/last-stage layer counts, or
megatron-core's account-for-embedding/loss split, that minimise the slowest stage for the
given exits); benchmarks/perf_model.py simulates the 1F1B schedule on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.stage_split import StageSplit
from megatron.early_exit.training.layout import layer_params, mlp_params, norm_params

if TYPE_CHECKING:
    from megatron.early_exit.config import RunConfig


@dataclass
class StageCost:
    """Forward FLOPs of one microbatch on one stage (per GPU: divided by TP)."""

    layers: float
    exits: float  # exit heads on this stage
    lm_head: float  # LM head projection (last stage)

    @property
    def total(self) -> float:
        return self.layers + self.exits + self.lm_head


@dataclass(frozen=True)
class UnitCosts:
    """Forward FLOPs of one microbatch for one layer, one exit head, the LM head."""

    layer: float
    exit_head: float
    lm_head: float
    tp: int


def unit_costs(run: RunConfig) -> UnitCosts:
    m, e = run.model, run.exits
    tokens = run.training.micro_batch_size * m.seq_length
    h, s = m.hidden_size, m.seq_length
    matmul = layer_params(run) - 2 * norm_params(run)  # biases are negligible
    layer = tokens * (2 * matmul + 4 * s * h)
    head = tokens * 2 * h * run.padded_vocab_size()
    exit_extra = (layer if e.use_exit_block else 0) + (
        tokens * 2 * mlp_params(run) if e.use_exit_mlp else 0
    )
    return UnitCosts(layer, head + exit_extra, head, run.parallel.tensor_model_parallel_size)


def costs_for_split(
    units: UnitCosts, split: StageSplit, exit_layers: list[int], with_exits: bool = True
) -> list[StageCost]:
    out = []
    pp = split.pipeline_size
    for stage, count in enumerate(split.counts()):
        # stage_of knows virtual stages (a stage's layers are then not contiguous).
        n_exits = sum(split.stage_of(n) == stage for n in exit_layers) if with_exits else 0
        out.append(
            StageCost(
                layers=count * units.layer / units.tp,
                exits=n_exits * units.exit_head / units.tp,
                lm_head=units.lm_head / units.tp if stage == pp - 1 else 0.0,
            )
        )
    return out


def stage_costs(run: RunConfig, with_exits: bool = True) -> list[StageCost]:
    """The run's stages with its own (even or uneven) layer split."""
    split = run.parallel.stage_split(run.model.num_layers)
    return costs_for_split(unit_costs(run), split, run.exits.exit_layer_nums, with_exits)


def candidate_splits(
    num_layers: int, pipeline_size: int, virtual: int | None = None
) -> list[StageSplit]:
    """Every split megatron-core accepts: even, first and/or last stage sizes, or the
    account-for-embedding/loss splits (with `virtual` model chunks per stage: those whose
    stages divide into them)."""
    base = StageSplit(num_layers, pipeline_size, virtual=virtual)
    options = [base]
    if pipeline_size == 1:
        return options
    sizes = [None, *range(1, num_layers)]
    options += [replace(base, first=f, last=la) for f in sizes for la in sizes if f or la]
    options += [
        replace(base, account_for_embedding=e, account_for_loss=lo)
        for e, lo in ((True, False), (False, True), (True, True))
    ]
    valid = []
    for split in options:
        try:
            split.chunk_counts()
        except ConfigError:
            continue
        valid.append(split)
    return valid


def split_flags(split: StageSplit) -> list[str]:
    """The command-line flags of a split ([] for the even one)."""
    flags = []
    if split.first is not None:
        flags += ["--decoder-first-pipeline-num-layers", str(split.first)]
    if split.last is not None:
        flags += ["--decoder-last-pipeline-num-layers", str(split.last)]
    if split.account_for_embedding:
        flags.append("--account-for-embedding-in-pipeline-split")
    if split.account_for_loss:
        flags.append("--account-for-loss-in-pipeline-split")
    return flags


@dataclass
class SplitSuggestion:
    split: StageSplit
    costs: list[StageCost]
    current_slowest: float  # FLOPs of the slowest stage with the run's own split

    @property
    def slowest(self) -> float:
        return max(c.total for c in self.costs)

    @property
    def gain(self) -> float:
        """Relative reduction of the slowest stage's work (0: the run's split is best)."""
        return 1.0 - self.slowest / self.current_slowest

    def flags(self) -> list[str]:
        return split_flags(self.split)


def suggest_split(run: RunConfig) -> SplitSuggestion:
    """The split that minimises the slowest stage (ties: the run's own split, then fewer
    flags, then the more even stages)."""
    units = unit_costs(run)
    exits = run.exits.exit_layer_nums
    current = run.parallel.stage_split(run.model.num_layers)
    current_costs = costs_for_split(units, current, exits)

    def key(split: StageSplit):
        costs = costs_for_split(units, split, exits)
        slowest = max(c.total for c in costs)
        return (
            round(slowest / units.layer * units.tp, 9),  # in layer units: robust ties
            split != current,
            len(split_flags(split)),
            sum(c.total**2 for c in costs),
        )

    p = run.parallel
    candidates = candidate_splits(
        run.model.num_layers, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    )
    best = min(candidates, key=key)
    return SplitSuggestion(
        best, costs_for_split(units, best, exits), max(c.total for c in current_costs)
    )


def format_stage_costs(run: RunConfig) -> str:
    """--dry-run lines: each stage's forward TFLOP per microbatch and the suggested split."""
    from megatron.early_exit.training.layout import describe_run

    costs = stage_costs(run)
    layout = describe_run(run)
    slowest = max(c.total for c in costs)
    lines = ["forward TFLOP per microbatch per GPU (layers + exit heads + LM head):"]
    for c, st in zip(costs, layout.stages):
        mark = "  <- slowest" if c.total == slowest and len(costs) > 1 else ""
        spans = st.chunks or [(st.first_layer, st.last_layer)]
        lines.append(
            f"  stage {st.stage} (layers {', '.join(f'{a}-{b}' for a, b in spans)}): "
            f"{c.total / 1e12:.3f} = {c.layers / 1e12:.3f} + {c.exits / 1e12:.3f} + "
            f"{c.lm_head / 1e12:.3f}{mark}"
        )
    if len(costs) > 1:
        s = suggest_split(run)
        if s.gain <= 0:
            lines.append(
                "suggested split: the current one (no split makes the slowest stage faster)"
            )
        else:
            counts = s.split.counts()
            lines.append(
                f"suggested split: {' '.join(s.flags()) or '(even)'} -> layers per stage "
                f"{counts}, slowest stage {s.slowest / 1e12:.3f} TFLOP ({100 * s.gain:.1f}% less)"
            )
    return "\n".join(lines)


# ============================================================ memory per GPU
GPU_BYTES = 80 * 10**9  # the 80 GB class of GPU (H100, A100-80GB) the paper's runs use


@dataclass
class StageMemory:
    """Estimated bytes on one GPU of a stage (see `memory_estimate`)."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: dict[str, float]  # "none" / "selective" / "full" (full: needs a method)

    def total(self, recompute: str) -> float:
        return self.params + self.grads + self.optimizer + self.activations[recompute]


def _dtype_bytes(run: RunConfig) -> int:
    return 2 if (run.training.bf16 or run.training.fp16) else 4


def memory_estimate(run: RunConfig) -> list[StageMemory]:
    """Per-GPU memory of each pipeline stage (an estimate, not a measurement).

    Parameters in the training dtype; gradients in fp32 (grad_reduce_in_fp32); Adam's two
    moments in fp32 plus an fp32 master copy with bf16/fp16, divided by DP with the
    distributed optimizer. Activations per layer and microbatch after Korthikanti et al.
    (2022) for 2-byte activations, s b h (34 + 5 a s / h) / t with sequence parallelism
    (s b h (10 + 24 / t + 5 a s / (h t)) without), scaled by the dtype; the 5 a s / h term
    (attention scores) is what selective recomputation drops, and what fused/flash
    attention never stores. Full recomputation keeps each recomputed chunk's input
    (2-byte s b h, / t with SP) plus one chunk's activations while it is recomputed.
    Stage i of 1F1B holds min(P - i, M) microbatches. Exit heads and the LM head add their
    logits and fp32 softmax (s b V / t) for the microbatch in backward: every local exit at
    once without recomputation, one at a time with it (model/recompute.py).
    """
    from megatron.early_exit.training.layout import describe_run

    layout = describe_run(run)
    m, p, t = run.model, run.parallel, run.training
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    nbytes = _dtype_bytes(run)
    scale = nbytes / 2
    s, b, h, a = m.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    sp = p.sequence_parallel and tp > 1
    if sp:
        base, scores = s * b * h * 34 / tp, s * b * h * 5 * a * s / (h * tp)
    else:
        base, scores = s * b * h * (10 + 24 / tp), s * b * h * 5 * a * s / (h * tp)
    layer_full = (base + scores) * scale
    layer_selective = base * scale
    layer_input = 2 * s * b * h * scale / (tp if sp else 1)
    logits = s * b * run.padded_vocab_size() / tp * (nbytes + 4)
    micro = t.num_microbatches(dp)
    rc = run.recompute
    opt_per_param = (8 + (4 if nbytes == 2 else 0)) / (dp if p.use_distributed_optimizer else 1)
    out = []
    for st in layout.stages:
        n_layers = st.last_layer - st.first_layer + 1
        inflight = min(pp - st.stage, micro)
        heads = len(st.exit_layers) + (1 if st.lm_head else 0)
        params = st.params / tp
        acts = {
            "none": inflight * n_layers * layer_full + heads * logits,
            "selective": inflight * n_layers * layer_selective + min(heads, 1) * logits,
        }
        if rc.recompute_method is not None:
            n = min(rc.recompute_num_layers, n_layers)
            if rc.recompute_method == "uniform":
                chunks = -(-n_layers // n)
                kept = inflight * chunks * layer_input + n * layer_full
            else:  # block: the first n layers recomputed, the rest stored
                kept = inflight * (n * layer_input + (n_layers - n) * layer_full) + layer_full
            acts["full"] = kept + min(heads, 1) * logits
        out.append(
            StageMemory(
                st.stage,
                params=params * nbytes,
                grads=params * 4,
                optimizer=params * opt_per_param,
                activations=acts,
            )
        )
    return out


def format_memory_estimate(run: RunConfig) -> str:
    est = memory_estimate(run)
    rc = run.recompute
    mine = rc.recompute_granularity or "none"
    cols = [c for c in ("none", "selective", "full") if c in est[0].activations]

    def gib(x: float) -> str:
        return f"{x / 2**30:.1f}"

    lines = [
        "memory per GPU estimate, GiB (params + grads + optimizer + activations; activations "
        f"(unfused attention) by recomputation: {', '.join(cols)}; this run: {mine}):"
    ]
    for e in est:
        acts = " / ".join(gib(e.activations[c]) for c in cols)
        total = e.total(mine)
        fits = "fits" if total <= GPU_BYTES else "does NOT fit"
        lines.append(
            f"  stage {e.stage}: {gib(e.params)} + {gib(e.grads)} + {gib(e.optimizer)} + "
            f"[{acts}] = {gib(total)} with {mine}: {fits} an 80 GB GPU"
        )
    return "\n".join(lines)


def to_dict(run: RunConfig) -> dict:
    costs = stage_costs(run)
    out = {
        "stage_forward_flops": [
            {"layers": c.layers, "exits": c.exits, "lm_head": c.lm_head, "total": c.total}
            for c in costs
        ],
        "memory_per_gpu_bytes": [
            {
                "stage": e.stage,
                "params": e.params,
                "grads": e.grads,
                "optimizer": e.optimizer,
                "activations": e.activations,
                "total": e.total(run.recompute.recompute_granularity or "none"),
            }
            for e in memory_estimate(run)
        ],
    }
    if len(costs) > 1:
        s = suggest_split(run)
        out["suggested_split"] = {
            "flags": s.flags(),
            "layers_per_stage": s.split.counts(),
            "slowest_stage_flops": s.slowest,
            "gain": s.gain,
        }
    return out


__all__ = [
    "SplitSuggestion",
    "StageCost",
    "UnitCosts",
    "candidate_splits",
    "costs_for_split",
    "StageMemory",
    "format_memory_estimate",
    "format_stage_costs",
    "memory_estimate",
    "split_flags",
    "stage_costs",
    "suggest_split",
    "unit_costs",
]
