"""What a run config lays out over the GPUs, computed without building anything.

Used by `--dry-run` (check a cluster launch script on a laptop) and by the performance
model in benchmarks/. Parameter counts follow megatron-core's GPT layer exactly (a unit
test compares them with `numel()` of built models), so the numbers can be trusted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at run time: perf_model.py and --dry-run stay light
    from megatron.early_exit.config import RunConfig


@dataclass
class StageLayout:
    stage: int
    first_layer: int  # 1-based, inclusive
    last_layer: int
    exit_layers: list[int]
    embedding: bool  # owns the word (and position) embeddings
    lm_head: bool  # final norm + output layer
    params: int  # held by this stage, summed over its TP ranks, incl. tied-weight copies
    # Virtual stages: the (first, last) layers of each model chunk (first/last_layer span them).
    chunks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class RunLayout:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    sequence_parallel: bool
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    params_dtype: str
    padded_vocab_size: int
    layers_per_stage: int  # the most layers a stage holds (uneven splits differ per stage)
    params_backbone: int  # embeddings + decoder + final norm + LM head (unique weights)
    params_exits: int  # extra unique weights of the exit heads
    stages: list[StageLayout] = field(default_factory=list)

    @property
    def params_total(self) -> int:
        return self.params_backbone + self.params_exits

    def exit_stages(self) -> dict[int, int]:
        return {n: s.stage for s in self.stages for n in s.exit_layers}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params_total"] = self.params_total
        d["exit_stages"] = {str(k): v for k, v in self.exit_stages().items()}
        return d

    def format(self) -> str:
        sp = "on" if self.sequence_parallel else "off"
        lines = [
            f"world size {self.world_size} = TP {self.tensor_parallel} x PP "
            f"{self.pipeline_parallel} x DP {self.data_parallel} (sequence parallel {sp})",
            f"batch: global {self.global_batch_size} = micro {self.micro_batch_size} x DP "
            f"{self.data_parallel} x {self.num_microbatches} microbatches; {self.params_dtype}",
            f"parameters: {_human(self.params_total)} total = {_human(self.params_backbone)} "
            f"backbone + {_human(self.params_exits)} exit heads (padded vocab "
            f"{self.padded_vocab_size})",
        ]
        for s in self.stages:
            if s.chunks:
                spans = ", ".join(f"{a}-{b}" for a, b in s.chunks)
                parts = [f"{len(s.chunks)} model chunks, layers {spans}"]
            else:
                parts = [f"layers {s.first_layer}-{s.last_layer}"]
            if s.embedding:
                parts.append("embedding")
            parts += [f"exit after layer {n}" for n in s.exit_layers]
            if s.lm_head:
                parts.append("LM head")
            per_gpu = s.params / self.tensor_parallel
            lines.append(
                f"  stage {s.stage}: {', '.join(parts)}; {_human(s.params)} params "
                f"(~{_human(per_gpu)} per GPU)"
            )
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def layer_params(run: RunConfig) -> int:
    """One megatron-core GPT transformer layer (input norm, attention, MLP norm, MLP)."""
    m = run.model
    h = m.hidden_size
    head_dim = m.kv_channels or h // m.num_attention_heads
    q = m.num_attention_heads * head_dim
    kv = (m.num_query_groups if m.group_query_attention else m.num_attention_heads) * head_dim
    bias = not m.disable_bias_linear
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if bias else 0)
    return 2 * norm_params(run) + attn + mlp_params(run)


def mlp_params(run: RunConfig) -> int:
    h, f = run.model.hidden_size, run.model.resolved_ffn_hidden_size()
    gates = 2 if run.model.swiglu else 1
    bias = not run.model.disable_bias_linear
    return h * f * gates + f * h + (f * gates + h if bias else 0)


def norm_params(run: RunConfig) -> int:
    return run.model.hidden_size * (1 if run.model.normalization == "RMSNorm" else 2)


def exit_head_params(run: RunConfig) -> int:
    """Unique weights of one exit head (a tied projection reuses the word embeddings)."""
    e = run.exits
    n = layer_params(run) if e.use_exit_block else 0
    n += mlp_params(run) if e.use_exit_mlp else 0
    n += norm_params(run) if e.use_exit_norm else 0
    if e.untie_exit_output_weights:
        n += run.padded_vocab_size() * run.model.hidden_size
    return n


def describe_run(run: RunConfig) -> RunLayout:
    """The layout of a validated run config (its vocabulary resolved)."""
    m, p, t = run.model, run.parallel, run.training
    pp, dp = p.pipeline_model_parallel_size, p.data_parallel_size
    split = p.stage_split(m.num_layers)
    ranges = split.ranges()
    vocab = run.padded_vocab_size()
    word = vocab * m.hidden_size
    positions = (
        m.resolved_max_position_embeddings() * m.hidden_size
        if m.position_embedding_type == "learned_absolute"
        else 0
    )
    tied_lm = not m.untie_embeddings_and_output_weights
    tied_exits = not run.exits.untie_exit_output_weights
    stages = []
    vpp = p.virtual_pipeline_model_parallel_size
    chunk_ranges = split.chunk_ranges()
    for s in range(pp):
        first, last = ranges[s]
        chunks = []
        if vpp is not None:  # chunk c of stage s holds virtual stage c * pp + s
            chunks = chunk_ranges[s]
            first, last = chunks[0][0], chunks[-1][1]
        held = chunks or [(first, last)]
        exits = [n for n in run.exits.exit_layer_nums if any(a <= n <= b for a, b in held)]
        embedding, lm_head = s == 0, s == pp - 1
        n = sum(b - a + 1 for a, b in held) * layer_params(run) + len(exits) * exit_head_params(run)
        if embedding:
            n += word + positions
        if lm_head:  # tied LM head off the first stage: megatron-core keeps a copy
            n += norm_params(run) + (0 if tied_lm and embedding else word)
        # Each chunk with tied exits holds a copy of the word embeddings, unless it holds
        # the embedding itself or a tied LM head (megatron-core's copy).
        for c, (a, b) in enumerate(held):
            own = (embedding and c == 0) or (lm_head and tied_lm and c == len(held) - 1)
            if tied_exits and not own and any(a <= e <= b for e in exits):
                n += word
        stages.append(StageLayout(s, first, last, exits, embedding, lm_head, n, chunks))
    backbone = (
        word
        + positions
        + m.num_layers * layer_params(run)
        + norm_params(run)
        + (0 if tied_lm else word)
    )
    return RunLayout(
        world_size=p.world_size,
        tensor_parallel=p.tensor_model_parallel_size,
        pipeline_parallel=pp,
        data_parallel=dp,
        sequence_parallel=p.sequence_parallel,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.resolved_global_batch_size(dp),
        num_microbatches=t.num_microbatches(dp),
        params_dtype=str(t.params_dtype).removeprefix("torch."),
        padded_vocab_size=vocab,
        layers_per_stage=max(split.counts()),
        params_backbone=backbone,
        params_exits=run.exits.num_exits * exit_head_params(run),
        stages=stages,
    )
