"""Performance model of the EE-LLM paper configurations at scale (pure math, no GPU).

    python benchmarks/perf_model.py [--out DIR | --write-results] [--rho 2.0]

For each of examples/ee_training/{1.3B,7B,13B,30B}.sh it reads the script's real flags
(the script runs with a stand-in interpreter that records its argv; then our own parser and
validation build the RunConfig), computes per-stage forward FLOPs per microbatch from the
layer shapes (attention, SwiGLU MLP, vocabulary projections of the exits and the LM head),
and simulates the 1F1B pipeline schedule with a list scheduler (every stage runs its ops in
1F1B order, as early as its dependencies allow). From the simulation:

- the pipeline bubble fraction (and the textbook (P-1)/(m+P-1) next to it),
- the exit overhead: extra FLOPs of the exit heads, and the extra iteration time,
- the bubble-filling gain: how many extra "fill" microbatches (partial forward to an exit,
  backward of that exit's loss) fit into the warm-up and cool-down bubbles without making
  the iteration longer, and how many extra exit-training samples that gives.

Writes perf_model.json, perf_model.md (with the assumptions) and perf_model.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODELS = ("1.3B", "7B", "13B", "30B")
# Nodes of 8 GPUs per model for the headline numbers: DP=8 everywhere, so the number of
# microbatches per pipeline is 2048 / (micro batch x 8).
NODES = {"1.3B": 4, "7B": 4, "13B": 8, "30B": 16}
VOCAB = 32000  # the paper's Llama-2 tokenizer
SWEEP_M = (4, 8, 16, 32, 64, 128, 256)
EFFECTIVE_TFLOPS = 400.0  # illustrative bf16 throughput per GPU for the seconds column


# ============================================================ configurations from the scripts
def script_argv(model: str, nnodes: int) -> tuple[int, list[str]]:
    """World size and pretrain argv that examples/ee_training/<model>.sh would dry-run."""
    with tempfile.TemporaryDirectory() as tmp:
        log, stub = os.path.join(tmp, "argv"), os.path.join(tmp, "python")
        with open(stub, "w") as f:
            f.write('#!/bin/bash\n{ echo "$WORLD_SIZE"; printf "%s\\n" "$@"; } > "$ARGV_LOG"\n')
        os.chmod(stub, 0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(DRY_RUN="1", PYTHON=stub, ARGV_LOG=log, NNODES=str(nnodes))
        for key in ("GPUS_PER_NODE", "DATA_PATH", "EXTRA_ARGS", "GLOBAL_BATCH"):
            env.pop(key, None)
        script = os.path.join(ROOT, "examples", "ee_training", f"{model}.sh")
        subprocess.run(["bash", script], env=env, check=True, capture_output=True)
        with open(log) as f:
            lines = f.read().splitlines()
    world, argv = int(lines[0]), lines[1:]
    assert argv[:2] == ["pretrain_early_exit_gpt.py", "--dry-run"], argv[:2]
    return world, argv[2:]


def paper_run(model: str, nnodes: int):
    import warnings

    from megatron.early_exit.arguments import parse_run_config

    warnings.filterwarnings("ignore", category=UserWarning)  # SP is off at TP=1: expected

    world, argv = script_argv(model, nnodes)
    run = parse_run_config(argv, world, device_is_cuda=True)  # bf16: these target GPUs
    run.resolve_vocab(VOCAB)
    return run


# ============================================================ FLOPs
# The per-stage FLOP model lives in the package (megatron/early_exit/perf_model.py), where
# --dry-run uses it too.
from megatron.early_exit.cli import add_results_args  # noqa: E402
from megatron.early_exit.perf_model import StageCost, stage_costs  # noqa: E402


# ============================================================ 1F1B simulation
@dataclass(frozen=True)
class Op:
    kind: str  # "F"/"B" regular, "f"/"b" fill (partial depth, exit losses only)
    mb: int
    depth: int = 0  # a fill's number of stages (its backward starts on stage depth-1)


def one_f_one_b(stage: int, stages: int, m: int, fill: bool = False, first: int = 0) -> list[Op]:
    """1F1B order of one stage: warm-up forwards, alternating F/B, cool-down backwards.
    Fill microbatches (fill=True) go through `stages` stages and are numbered from `first`."""
    f, b = ("f", "b") if fill else ("F", "B")
    d = stages if fill else 0
    warm = min(stages - stage - 1, m)
    ops = [Op(f, first + i, d) for i in range(warm)]
    for i in range(m - warm):
        ops += [Op(f, first + warm + i, d), Op(b, first + i, d)]
    return ops + [Op(b, first + i, d) for i in range(m - warm, m)]


def simulate(
    orders: list[list[Op]],
    fwd: list[float],
    bwd: list[float],
    fill_fwd: list[float],
    fill_bwd: list[float],
) -> tuple[float, list[float]]:
    """List-schedule every stage's op order; returns (iteration time, busy time per stage).

    Dependencies: a forward needs the previous stage's forward of that microbatch; a
    backward needs the next stage's backward (a fill's backward starts on its deepest
    stage, `depth - 1`, after its forward there).
    """
    P = len(orders)
    end: dict[tuple[int, Op], float] = {}
    free = [0.0] * P
    busy = [0.0] * P
    pos = [0] * P
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(P):
            while pos[r] < len(orders[r]):
                op = orders[r][pos[r]]
                if op.kind in "Ff":
                    dep = (r - 1, op) if r > 0 else None
                    cost = fwd[r] if op.kind == "F" else fill_fwd[r]
                else:
                    last = P - 1 if op.kind == "B" else op.depth - 1
                    fw = Op("F" if op.kind == "B" else "f", op.mb, op.depth)
                    dep = (r + 1, op) if r < last else (r, fw)
                    cost = bwd[r] if op.kind == "B" else fill_bwd[r]
                if dep is not None and dep not in end:
                    break
                start = max(free[r], end[dep] if dep is not None else 0.0)
                free[r] = end[(r, op)] = start + cost
                busy[r] += cost
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks: op orders are inconsistent")
    return max(free), busy


@dataclass
class Pipeline:
    """Per-stage forward/backward costs of regular and fill microbatches."""

    fwd: list[float]
    bwd: list[float]
    fill_fwd: list[float]
    fill_bwd: list[float]

    @classmethod
    def from_costs(cls, costs: list[StageCost], rho: float) -> Pipeline:
        fwd = [c.total for c in costs]
        # A fill microbatch runs the stage's layers and its exits, never the LM head.
        fill = [c.layers + c.exits for c in costs]
        return cls(fwd, [rho * x for x in fwd], fill, [rho * x for x in fill])

    def run(self, m: int, *fills: tuple[str, int, int, int]):
        """Each fill = (phase, depth, count, slot): `count` fill microbatches through stages
        0..depth-1, inserted before the stage's first regular backward (phase "warmup") or
        after its `slot`-th cool-down backward (phase "cooldown")."""
        P = len(self.fwd)
        orders = [one_f_one_b(r, P, m) for r in range(P)]
        numbered = 0
        for phase, depth, count, slot in fills:
            for r in range(depth):
                sub = one_f_one_b(r, depth, count, fill=True, first=numbered)
                order = orders[r]
                first_b = next(i for i, op in enumerate(order) if op.kind == "B")
                if phase == "warmup":
                    at = first_b
                else:  # cool-down backwards are the stage's trailing run of B ops
                    last_f = max(i for i, op in enumerate(order) if op.kind == "F")
                    at = min(last_f + 1 + slot, len(order))
                orders[r] = order[:at] + sub + order[at:]
            numbered += count
        return simulate(orders, self.fwd, self.bwd, self.fill_fwd, self.fill_bwd)


def bubble_fraction(pipe: Pipeline, m: int) -> float:
    """Idle share of all stages (pipeline fill/drain plus stage imbalance)."""
    T, busy = pipe.run(m)
    return 1.0 - sum(busy) / (len(busy) * T)


def schedule_bubble_fraction(pipe: Pipeline, m: int) -> float:
    """Share of the iteration beyond the bottleneck stage's own work: the warm-up/cool-down
    bubble proper, comparable with (P-1)/(m+P-1)."""
    T, _ = pipe.run(m)
    return 1.0 - m * max(f + b for f, b in zip(pipe.fwd, pipe.bwd)) / T


def max_free_fills(pipe: Pipeline, m: int, phase: str, depth: int) -> tuple[int, int, float]:
    """Most fill microbatches of `depth` that leave the iteration time unchanged; returns
    (count, best slot, relative cost of one more)."""
    T0, _ = pipe.run(m)
    P = len(pipe.fwd)
    slots = [0] if phase == "warmup" else list(range(P))
    best = (0, 0)
    for slot in slots:
        n = 0
        while n < 4 * P and pipe.run(m, (phase, depth, n + 1, slot))[0] <= T0 * (1 + 1e-9):
            n += 1
        if n > best[0]:
            best = (n, slot)
    T1, _ = pipe.run(m, (phase, depth, best[0] + 1, best[1]))
    return best[0], best[1], T1 / T0 - 1.0


def best_combined_fills(pipe: Pipeline, m: int, depths: list[int]) -> list[tuple]:
    """Warm-up and cool-down fills together at no extra time, the most stage-passes first.

    The phases share one slack budget (delaying stage 0's early backwards uses slack the
    cool-down would have had), so they are searched jointly, not added up."""
    T0, _ = pipe.run(m)
    P = len(pipe.fwd)

    def free(*fills) -> bool:
        return pipe.run(m, *[f for f in fills if f[2]])[0] <= T0 * (1 + 1e-9)

    best, best_work = [], 0
    for dw in depths:
        nw = 0
        while free(("warmup", dw, nw + 1, 0)):
            nw += 1
        for w in range(nw + 1):
            warm = ("warmup", dw, w, 0)
            for dc in depths:
                for slot in range(P):
                    c = 0
                    while c < 4 * P and free(warm, ("cooldown", dc, c + 1, slot)):
                        c += 1
                    work = w * dw + c * dc
                    if work > best_work or (work == best_work and w + c > sum(f[2] for f in best)):
                        best_work = work
                        best = [f for f in (warm, ("cooldown", dc, c, slot)) if f[2]]
    return best


# ============================================================ report
def analyse(model: str, rho: float) -> dict:
    run = paper_run(model, NODES[model])
    from megatron.early_exit.training.layout import describe_run

    layout = describe_run(run)
    P, dp, mbs = layout.pipeline_parallel, layout.data_parallel, layout.micro_batch_size
    m = layout.num_microbatches
    costs = stage_costs(run)
    pipe = Pipeline.from_costs(costs, rho)
    plain = Pipeline.from_costs(stage_costs(run, with_exits=False), rho)
    T, _ = pipe.run(m)
    T_plain, _ = plain.run(m)
    backbone_flops = sum(c.layers + c.lm_head for c in costs)
    exit_flops = sum(c.exits for c in costs)
    exit_stages = sorted(set(layout.exit_stages().values()))
    fills = {}
    for phase in ("warmup", "cooldown"):
        for last_exit_stage in exit_stages:
            depth = last_exit_stage + 1
            n, slot, more = max_free_fills(pipe, m, phase, depth)
            fills[f"{phase}_depth{depth}"] = {
                "phase": phase,
                "depth_stages": depth,
                "exits_trained": [str(n) for n, s in layout.exit_stages().items() if s < depth],
                "free_fill_microbatches": n,
                "slot": slot,
                "one_more_costs": more,
                "extra_exit_samples_per_iteration": n * mbs * dp,
            }
    combined = best_combined_fills(pipe, m, [s + 1 for s in exit_stages])
    extra = sum(count for _, _, count, _ in combined)
    return {
        "model": model,
        "nodes": NODES[model],
        "world_size": layout.world_size,
        "tp": layout.tensor_parallel,
        "pp": P,
        "dp": dp,
        "micro_batch_size": mbs,
        "microbatches": m,
        "params_billion": layout.params_total / 1e9,
        "stage_forward_tflop_per_microbatch": [c.total / 1e12 for c in costs],
        "bubble_fraction_analytic": (P - 1) / (m + P - 1),
        "bubble_fraction_simulated": bubble_fraction(pipe, m),
        "bubble_fraction_schedule": schedule_bubble_fraction(pipe, m),
        "bubble_fraction_simulated_no_exits": bubble_fraction(plain, m),
        "bubble_fraction_vs_m": {str(k): schedule_bubble_fraction(pipe, k) for k in SWEEP_M},
        "exit_flops_overhead": exit_flops / backbone_flops,
        "exit_time_overhead": T / T_plain - 1.0,
        "iteration_seconds_at_effective_tflops": T / (EFFECTIVE_TFLOPS * 1e12),
        "fills": fills,
        "combined_fills": [
            {"phase": ph, "depth_stages": d, "count": c, "slot": sl} for ph, d, c, sl in combined
        ],
        "free_fill_microbatches_total": extra,
        "extra_exit_samples_per_iteration": extra * mbs * dp,
        "extra_exit_samples_fraction": extra / m,
    }


def write_markdown(results: list[dict], rho: float, path: str) -> None:
    lines = [
        "# Performance model of the EE-LLM paper configurations",
        "",
        "Produced by `python benchmarks/perf_model.py` (pure math + schedule simulation, no "
        "GPU). Configurations are read from `examples/ee_training/*.sh` through our own parser.",
        "",
        "| model | GPUs (TP x PP x DP) | microbatches m | bubble (P-1)/(m+P-1) | bubble simulated "
        "(warm-up/cool-down) | idle simulated (incl. stage imbalance) | exit FLOPs overhead "
        "| exit time overhead | free fill microbatches, both phases together "
        "| extra exit-training samples / iteration |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fills = " + ".join(
            f"{f['count']} {f['phase']} (depth {f['depth_stages']})" for f in r["combined_fills"]
        )
        lines.append(
            f"| {r['model']} ({r['params_billion']:.2f}B) | {r['world_size']} ({r['tp']} x "
            f"{r['pp']} x {r['dp']}) | {r['microbatches']} | "
            f"{100 * r['bubble_fraction_analytic']:.2f}% | "
            f"{100 * r['bubble_fraction_schedule']:.2f}% | "
            f"{100 * r['bubble_fraction_simulated']:.2f}% | "
            f"{100 * r['exit_flops_overhead']:.2f}% | {100 * r['exit_time_overhead']:.2f}% | "
            f"{fills or 'none'} | "
            f"{r['extra_exit_samples_per_iteration']} "
            f"(+{100 * r['extra_exit_samples_fraction']:.2f}% of {r['microbatches']} x "
            f"{r['micro_batch_size']} x {r['dp']}) |"
        )
    lines += ["", "## Fill microbatches per phase and depth, each phase alone", ""]
    lines += [
        "| model | phase | depth (stages) | exits trained | free fills | one more costs |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for v in r["fills"].values():
            lines.append(
                f"| {r['model']} | {v['phase']} | {v['depth_stages']} | "
                f"{', '.join(v['exits_trained'])} | {v['free_fill_microbatches']} | "
                f"+{100 * v['one_more_costs']:.2f}% iteration time |"
            )
    lines += ["", "## Warm-up/cool-down bubble against the number of microbatches (simulated)", ""]
    lines += ["| model | " + " | ".join(f"m={k}" for k in SWEEP_M) + " |"]
    lines += ["|---" * (len(SWEEP_M) + 1) + "|"]
    for r in results:
        cells = " | ".join(f"{100 * r['bubble_fraction_vs_m'][str(k)]:.1f}%" for k in SWEEP_M)
        lines.append(f"| {r['model']} | {cells} |")
    lines += [
        "",
        "## Assumptions",
        "",
        f"- Layouts: the scripts' TP/PP and micro batch, global batch 2048, nodes of 8 GPUs "
        f"({', '.join(f'{k}: {v} nodes' for k, v in NODES.items())}), i.e. DP=8 and "
        "m = 2048 / (micro batch x 8) microbatches per pipeline and iteration. Vocabulary "
        f"{VOCAB} (Llama-2), padded as the model pads it.",
        "- Cost of a microbatch on a stage = its forward FLOPs / TP: 2 FLOPs per weight and "
        "token for every matmul (QKV, attention output, SwiGLU MLP), 4·s·h per token for the "
        "attention scores (full square), 2·h·V per token for each vocabulary projection (exit "
        "heads on their stage, LM head on the last stage). Norms, embeddings lookups, "
        "softmax/cross-entropy, communication (TP, SP, pipeline p2p, DP all-reduce) and the "
        "optimizer step are ignored; so are kernel-efficiency differences between layers.",
        f"- Backward = rho x forward with rho = {rho} (the paper's backward/forward ratio) for "
        "regular and fill microbatches alike.",
        "- Schedule: plain 1F1B (no interleaving). Every stage runs its ops in 1F1B order; an "
        "op starts as soon as the stage is free and its input (previous stage's forward, next "
        "stage's backward) is done. Bubble fraction = idle / (P x iteration time), averaged "
        "over stages (includes idling of lighter stages: stage costs differ by the vocabulary "
        "projections); the warm-up/cool-down bubble alone is 1 - m x (f+b of the slowest "
        "stage) / iteration time. Exit time overhead = simulated iteration time with vs "
        "without exit heads.",
        "- Fill microbatches (bubble filling): a fill of depth d runs the forward of stages "
        "0..d-1 (layers + exit heads, no LM head) and the backward of the exit losses it "
        "reached, back to stage 0. Warm-up fills run, on each of those stages, in their own "
        "1F1B order right before the stage's first regular backward (the stage waits there for "
        "the first gradient); cool-down fills are inserted after the k-th cool-down backward "
        "(the best k is searched). A count is *free* when the simulated iteration time does not "
        "grow at all. Depths are those whose deepest stage holds an exit. Both phases draw on "
        "one slack budget (stage 0's idle time can shift between them), so the headline count "
        "is searched with both phases in one schedule, maximising fill stage-passes.",
        "- Extra exit-training samples = free fills x micro batch x DP. They train only the "
        "exits they reach and the layers below them: the objective changes (see the "
        "bubble-filling docs).",
        f"- Seconds are illustrative only: FLOPs / {EFFECTIVE_TFLOPS:.0f} TFLOP/s per GPU.",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: list[dict], rho: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ms = list(SWEEP_M)
    P = results[0]["pp"]
    ax1.plot(ms, [100 * (P - 1) / (m + P - 1) for m in ms], "k--", label="(P-1)/(m+P-1), P=4")
    for r in results:
        ax1.plot(ms, [100 * r["bubble_fraction_vs_m"][str(m)] for m in ms], "o-",
                 label=f"{r['model']} simulated")  # fmt: skip
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("microbatches per iteration (m)")
    ax1.set_ylabel("pipeline bubble fraction (%)")
    ax1.set_title("1F1B bubble, PP=4")
    ax1.legend(fontsize=8)
    names = [r["model"] for r in results]
    x = range(len(names))
    w = 0.27
    ax2.bar([i - w for i in x], [100 * r["exit_flops_overhead"] for r in results], w,
            label="exit FLOPs / backbone FLOPs")  # fmt: skip
    ax2.bar(list(x), [100 * r["exit_time_overhead"] for r in results], w,
            label="exit time overhead (simulated)")  # fmt: skip
    ax2.bar([i + w for i in x], [100 * r["extra_exit_samples_fraction"] for r in results], w,
            label="free extra exit-training samples")  # fmt: skip
    ax2.set_xticks(list(x), [f"{r['model']}\nm={r['microbatches']}" for r in results])
    ax2.set_ylabel("% of one iteration")
    ax2.set_title(f"exit overhead and bubble-filling gain (rho={rho})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--rho", type=float, default=2.0, help="backward/forward time ratio")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.rho <= 0:
        p.error("--rho must be > 0")
    results = [analyse(model, args.rho) for model in MODELS]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "perf_model.json"), "w") as f:
        json.dump({"rho": args.rho, "results": results}, f, indent=2)
    write_markdown(results, args.rho, os.path.join(args.out, "perf_model.md"))
    if not args.no_plot:
        plot(results, args.rho, os.path.join(args.out, "perf_model.png"))
    for r in results:
        print(
            f"{r['model']:>5}: m={r['microbatches']:<4} bubble "
            f"{100 * r['bubble_fraction_schedule']:.2f}% (analytic "
            f"{100 * r['bubble_fraction_analytic']:.2f}%), exit FLOPs "
            f"+{100 * r['exit_flops_overhead']:.2f}%, exit time "
            f"+{100 * r['exit_time_overhead']:.2f}%, free fills "
            f"{r['free_fill_microbatches_total']} (+{r['extra_exit_samples_per_iteration']} "
            "exit samples/iteration)"
        )
    print(f"wrote {args.out}/perf_model.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
