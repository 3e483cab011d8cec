"""Bubble filling: iteration time and exit-loss samples/s with and without fill microbatches.

    python benchmarks/bubble_filling.py [--out DIR | --write-results]

The launcher starts `torch.distributed.run --nproc-per-node 2` (PP=2) on this file with
`--worker`. Every rank builds one `Trainer` with `--fill-explicit-bubbles` and then times
train steps alternately with the filled schedule and with plain 1F1B (A B | B A | ...),
so drifts of the shared machine hit both alike. Exit-loss samples per iteration count,
for every exit, the samples whose loss on that exit was backpropagated (fill samples
count for the exits they reach). Rank 0 writes raw numbers; the launcher writes
`bubble_filling.json`, `bubble_filling.md` (with the schedule tables) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import statistics
import subprocess
import sys
import tempfile
import time

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
NPROC = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=[2, 4])
    p.add_argument("--fill-warmup", type=int, default=1)
    p.add_argument("--fill-cooldown", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per variant")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw-out", default=None, help=argparse.SUPPRESS)
    return p


def _train_argv(a) -> list[str]:
    return [
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab_size),
        "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.global_batch_size),
        "--exit-layer-nums", *map(str, a.exit_layer_nums),
        "--pipeline-model-parallel-size", "2", "--train-iters", "100000", "--lr", "1e-4",
        "--fill-explicit-bubbles",
        "--num-fill-warmup-microbatches", str(a.fill_warmup),
        "--num-fill-cooldown-microbatches", str(a.fill_cooldown),
    ]  # fmt: skip


def exit_samples(schedule, run, dp: int) -> tuple[int, int]:
    """(without filling, with filling) exit-loss samples per iteration."""
    from megatron.early_exit.pipeline.fill_plan import exit_stages

    P, L = schedule.num_stages, run.model.num_layers
    mbs = run.training.micro_batch_size
    stages = [exit_stages([n], L, P)[0] for n in run.exits.exit_layer_nums]
    main = schedule.num_microbatches * mbs * len(stages) * dp
    fill = sum(mbs * sum(f.floor <= s <= f.depth for s in stages) for f in schedule.fills) * dp
    return main, main + fill


def worker(a) -> None:
    import megatron.early_exit  # noqa: F401, I001
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline.fill_plan import schedule_for_run
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.progress import progress
    from megatron.early_exit.training.trainer import Trainer
    import torch.distributed as dist

    run = parse_run_config(_train_argv(a), world_size_from_env())
    trainer = Trainer(run, init_platform())
    filled = trainer.fill_schedule
    samples = exit_samples(filled, run, trainer.dp_size)
    times = {"plain": [], "filled": []}
    it = 0

    def step(variant: str) -> float:
        nonlocal it
        trainer.fill_schedule = filled if variant == "filled" else None
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(it)
        it += 1
        return time.perf_counter() - start

    # rank 0 counts train steps; the updates sit outside the timed sections
    bar = progress(total=2 * (a.warmup + a.rounds), desc="bubble filling", unit="step",
                   enabled=dist.get_rank() == 0)  # fmt: skip
    for _ in range(a.warmup):
        step("plain")
        step("filled")
        bar.update(2)
    for r in range(a.rounds):
        order = ("plain", "filled") if r % 2 == 0 else ("filled", "plain")
        for v in order:
            times[v].append(step(v))
            bar.update()
    bar.close()
    trainer.fill_schedule = filled
    if dist.get_rank() == 0:
        plain_table = schedule_for_run(_with_fill_off(run)).table()
        with open(a.raw_out, "w") as f:
            json.dump(
                {
                    "times": times,
                    "exit_samples_per_iter": {"plain": samples[0], "filled": samples[1]},
                    "fill_microbatches": filled.num_fill,
                    "schedule_filled": filled.table(),
                    "schedule_plain": plain_table,
                    "model_time": {"plain": filled.base_time, "filled": filled.model_time},
                },
                f,
            )
    destroy_distributed()


def _with_fill_off(run):
    import copy

    off = copy.deepcopy(run)
    off.fill.fill_explicit_bubbles = False
    return off


def _pp4_table(a) -> str:
    from megatron.early_exit.pipeline.fill_plan import exit_stages, plan_schedule

    L = a.num_layers
    M = a.global_batch_size // a.micro_batch_size
    return plan_schedule(4, M, exit_stages(a.exit_layer_nums, L, 4), 2.0).table()


def launch(a) -> None:
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        argv = [a_ for a_ in sys.argv[1:] if a_ != "--no-plot"]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC),
            "--master-addr", "127.0.0.1", "--master-port", "29731", __file__, "--worker",
            "--raw-out", raw_path, *argv,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env)
        with open(raw_path) as f:
            raw = json.load(f)
    t = raw["times"]
    med = {k: statistics.median(v) for k, v in t.items()}
    # Per-round ratios (filled / plain of the same round): robust to machine drift.
    ratios = [f / p for f, p in zip(t["filled"], t["plain"])]
    s = raw["exit_samples_per_iter"]
    result = {
        "config": {k: v for k, v in vars(a).items() if k not in ("worker", "raw_out", "out")},
        "machine": {"cpu": pyplatform.processor() or pyplatform.machine(), "nproc": NPROC},
        "fill_microbatches_per_iteration": raw["fill_microbatches"],
        "iteration_time_s_median": med,
        "iteration_time_ratio_filled_over_plain": {
            "median_of_round_ratios": statistics.median(ratios),
            "ratio_of_medians": med["filled"] / med["plain"],
            "per_round": ratios,
        },
        "exit_samples_per_iteration": s,
        "exit_samples_per_s": {k: s[k] / med[k] for k in med},
        "modelled_iteration_time": raw["model_time"],
        "times_s": t,
    }
    base = os.path.join(a.out, "bubble_filling")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    r = result["iteration_time_ratio_filled_over_plain"]
    eps = result["exit_samples_per_s"]
    md = [
        "# Bubble filling benchmark (PP=2, 2 processes, CPU gloo, shared machine)",
        "",
        f"Command: `python benchmarks/bubble_filling.py` ({a.rounds} alternating rounds after "
        f"{a.warmup} warm-up iterations per variant).",
        "",
        "| variant | median iteration time (s) | exit-loss samples / iteration | "
        "exit-loss samples / s |",
        "|---|---|---|---|",
        f"| plain 1F1B | {med['plain']:.4f} | {s['plain']} | {eps['plain']:.1f} |",
        f"| filled ({raw['fill_microbatches']} fill microbatch/iter) | {med['filled']:.4f} | "
        f"{s['filled']} | {eps['filled']:.1f} |",
        "",
        "Iteration time filled / plain: median of per-round ratios "
        f"**{r['median_of_round_ratios']:.3f}**, "
        f"ratio of medians {r['ratio_of_medians']:.3f}. Time model (forward 1, backward 2): "
        f"{raw['model_time']['filled']:g} / {raw['model_time']['plain']:g} = "
        f"{raw['model_time']['filled'] / raw['model_time']['plain']:.3f}.",
        "",
        "## Schedule tables",
        "",
        "PP=2, filled:",
        "```",
        raw["schedule_filled"],
        "```",
        "PP=2, plain:",
        "```",
        raw["schedule_plain"],
        "```",
        "PP=4 with the same model and automatic fill counts (not timed: 4 processes on 2 cores "
        "measure contention, not bubbles):",
        "```",
        _pp4_table(a),
        "```",
    ]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    if not a.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(t["plain"], "o-", label="plain 1F1B")
        ax1.plot(t["filled"], "s-", label="filled")
        ax1.set_xlabel("round")
        ax1.set_ylabel("iteration time (s)")
        ax1.legend()
        ax2.bar(["plain", "filled"], [eps["plain"], eps["filled"]], color=["C0", "C1"])
        ax2.set_ylabel("exit-loss samples / s")
        fig.suptitle(f"Bubble filling, PP=2: time ratio {r['median_of_round_ratios']:.3f}")
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=100)
    print("\n".join(md))


def main() -> None:
    a = build_parser().parse_args()
    if a.worker:
        worker(a)
    else:
        launch(a)


if __name__ == "__main__":
    main()
