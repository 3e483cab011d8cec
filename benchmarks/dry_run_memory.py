"""The dry run's memory estimate per GPU for the paper configurations (pure math, no GPU).

    python benchmarks/dry_run_memory.py [--out DIR | --write-results]

For examples/ee_training/{1.3B,7B,13B,30B}.sh (their real flags, as benchmarks/perf_model.py
reads them) it prints what `--dry-run` estimates per GPU for the worst pipeline stage:
parameters, gradients, optimizer state and activations without recomputation, with
selective and with full (uniform, 1 layer per chunk) recomputation; the estimate's terms are
in megatron/early_exit/perf_model.py (`memory_estimate`). Writes dry_run_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("none", "selective", "full")


def estimate(model: str) -> dict:
    from perf_model import NODES, paper_run

    from megatron.early_exit.perf_model import GPU_BYTES, memory_estimate

    run = copy.deepcopy(paper_run(model, NODES[model]))
    run.recompute.recompute_granularity = "full"
    run.recompute.recompute_method, run.recompute.recompute_num_layers = "uniform", 1
    stages = memory_estimate(run)
    scripted = paper_run(model, NODES[model]).recompute.recompute_granularity or "none"
    worst = {m: max(s.total(m) for s in stages) for m in MODES}
    s0 = max(stages, key=lambda s: s.total("none"))
    gib = 2**30
    return {
        "model": model,
        "nodes": NODES[model],
        "script_recompute": scripted,
        "worst_stage": s0.stage,
        "params_gib": s0.params / gib,
        "grads_gib": s0.grads / gib,
        "optimizer_gib": s0.optimizer / gib,
        "activations_gib": {m: s0.activations[m] / gib for m in MODES},
        "worst_stage_total_gib": {m: worst[m] / gib for m in MODES},
        "fits_80gb": {m: worst[m] <= GPU_BYTES for m in MODES},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    results = [estimate(m) for m in ("1.3B", "7B", "13B", "30B")]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dry_run_memory.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "# Dry-run memory estimate per GPU, paper configurations",
        "",
        "Produced by `python benchmarks/dry_run_memory.py` from the flags of "
        "examples/ee_training/*.sh (bf16, seq 2048) with `--dry-run`'s estimate "
        "(megatron/early_exit/perf_model.py: Adam state in fp32 with a master copy, fp32 "
        "gradients, activations after Korthikanti et al. 2022 with unfused attention, 1F1B "
        "microbatches in flight, exit and LM-head logits). An estimate, not a measurement.",
        "",
        "| model | nodes | script | worst stage | params + grads + optimizer GiB | "
        "activations GiB none / selective / full | total GiB none / selective / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        state = r["params_gib"] + r["grads_gib"] + r["optimizer_gib"]
        acts = " / ".join(f"{r['activations_gib'][m]:.1f}" for m in MODES)
        tot = " / ".join(
            f"{r['worst_stage_total_gib'][m]:.1f}{'' if r['fits_80gb'][m] else ' (>80 GB)'}"
            for m in MODES
        )
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['script_recompute']} | {r['worst_stage']} | "
            f"{state:.1f} | {acts} | {tot} |"
        )
    with open(os.path.join(a.out, "dry_run_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not a.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.25
        for i, m in enumerate(MODES):
            xs = [k + (i - 1) * width for k in range(len(results))]
            state = [r["params_gib"] + r["grads_gib"] + r["optimizer_gib"] for r in results]
            acts = [r["activations_gib"][m] for r in results]
            ax.bar(
                xs, state, width, color="0.7", label="params+grads+optimizer" if i == 0 else None
            )
            ax.bar(xs, acts, width, bottom=state, label=f"activations: {m}")
        ax.axhline(80e9 / 2**30, color="k", ls="--", lw=1, label="80 GB")
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([r["model"] for r in results])
        ax.set_ylabel("GiB per GPU (worst stage)")
        ax.set_title("--dry-run memory estimate, paper configurations")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "dry_run_memory.png"), dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
