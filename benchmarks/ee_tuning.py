"""EE-Tuning cost per iteration: partial stage loading vs full loading vs full training.

    python benchmarks/ee_tuning.py [--out DIR | --write-results] [--smollm2-metrics M.jsonl]

One small GPT (PP=2, exits only on the first stage) is saved, exits are added with
tools/checkpoint/add_exits.py, and three variants run from that checkpoint:

* ``tune_partial``: ``--tune-exit --tune-exit-pipeline-parallel-size 1``: one process
  loads and runs only stage 1 of 2 (the layers the exits need);
* ``tune_full``: ``--tune-exit`` on both stages (2 processes; stage 2 runs forward only);
* ``full_training``: ordinary training of the same model, all parameters, LM + exit
  losses, 1F1B (2 processes).

Each variant is launched several times in alternating order (A B C | C B A | ...), so slow
drifts of the shared machine hit all alike. Per launch we take the median iteration time
after warm-up and every rank's peak RSS (``resource.getrusage``); the tables report the
median over launches. With ``--smollm2-metrics`` (the metrics of
examples/ee_tuning/tune_smollm2.sh) the PNG also shows the exits' validation-loss curves
of the real SmolLM2-135M tuning run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform as pyplatform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("tune_partial", "tune_full", "full_training")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--exit-layer-nums", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iters", type=int, default=8, help="iterations per launch")
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=3, help="launches per variant")
    p.add_argument("--smollm2-metrics", default=None, help="metrics.jsonl of tune_smollm2.sh")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--curves-only",
        action="store_true",
        help="keep the timing results already in --out; only replace the SmolLM2 curves",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _model_args(a) -> list[str]:
    return [
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab_size),
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear",
    ]  # fmt: skip


def _variant_args(a, name: str, ckpt: str) -> tuple[int, list[str]]:
    common = [
        "--load", ckpt, "--mock-data", "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.iters),
        "--lr", "1e-4", "--lr-decay-style", "constant", "--pipeline-model-parallel-size", "2",
    ]  # fmt: skip
    if name == "tune_partial":
        return 1, [*common, "--tune-exit", "--tune-exit-pipeline-parallel-size", "1"]
    if name == "tune_full":
        return 2, [*common, "--tune-exit"]
    return 2, common


def _torchrun(nproc: int, args: list[str], env: dict | None = None) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port), *args,
    ]  # fmt: skip
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env)
    if proc.returncode != 0:
        raise SystemExit(f"launch failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _worker(argv: list[str]) -> int:
    """One rank of a launch: the real entry point, then this rank's peak RSS."""
    from pretrain_early_exit_gpt import main

    rc = main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.path.join(os.environ["EE_BENCH_RSS_DIR"], f"rank{os.environ['RANK']}"), "w") as f:
        f.write(str(peak_kib * 1024))
    return rc


def measure(a) -> dict:
    from megatron.early_exit.progress import progress

    work = tempfile.mkdtemp(prefix="ee_tuning_bench_")
    # the launches' own output is captured: count launches (2 to set up, then the variants)
    bar = progress(total=2 + a.rounds * len(VARIANTS), desc="EE-Tuning benchmark", unit="launch")
    try:
        base, ckpt = os.path.join(work, "base"), os.path.join(work, "exits")
        _torchrun(1, ["pretrain_early_exit_gpt.py", *_model_args(a), "--mock-data",
                      "--train-iters", "0", "--save", base])  # fmt: skip
        bar.update()
        subprocess.run(
            [sys.executable, "tools/checkpoint/add_exits.py", "--load", base, "--save", ckpt,
             "--exit-layer-nums", *map(str, a.exit_layer_nums), "--use-exit-norm",
             "--use-exit-mlp"],
            check=True, capture_output=True, cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        )  # fmt: skip
        bar.update()
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for name in order:
                nproc, args = _variant_args(a, name, ckpt)
                metrics = os.path.join(work, f"{name}_{r}.jsonl")
                rss_dir = os.path.join(work, f"rss_{name}_{r}")
                os.makedirs(rss_dir)
                _torchrun(
                    nproc,
                    [__file__, "--worker", *args, "--metrics-file", metrics],
                    env={"EE_BENCH_RSS_DIR": rss_dir},
                )
                records = _read_jsonl(metrics)
                times = [x["iteration_time_s"] for x in records if x["split"] == "train"]
                rss = [int(Path(f).read_text()) for f in sorted(glob.glob(f"{rss_dir}/rank*"))]
                runs[name].append(
                    {
                        "iteration_time_s": statistics.median(times[a.warmup :]),
                        "peak_rss_per_rank_bytes": rss,
                        "exit_losses_last": records[-1]["exit_losses"],
                    }
                )
                bar.update()
                bar.echo(f"round {r} {name}: {runs[name][-1]['iteration_time_s'] * 1e3:.0f} "
                         f"ms/iter, peak RSS {[round(x / 2**20) for x in rss]} MiB")  # fmt: skip
        bar.close()
    finally:
        bar.close(summary=False)
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "processes": len(rs[0]["peak_rss_per_rank_bytes"]),
            "iteration_time_s": statistics.median(x["iteration_time_s"] for x in rs),
            "peak_rss_max_rank_mib": statistics.median(
                max(x["peak_rss_per_rank_bytes"]) / 2**20 for x in rs
            ),
            "peak_rss_total_mib": statistics.median(
                sum(x["peak_rss_per_rank_bytes"]) / 2**20 for x in rs
            ),
            "launches": rs,
        }
    ref = summary["full_training"]
    for name in VARIANTS:
        s = summary[name]
        s["time_vs_full_training"] = s["iteration_time_s"] / ref["iteration_time_s"]
        s["total_rss_vs_full_training"] = s["peak_rss_total_mib"] / ref["peak_rss_total_mib"]
    return summary


def smollm2_curves(path: str | None) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    records = _read_jsonl(path)
    valid = [r for r in records if r["split"] == "valid"]
    train = [r for r in records if r["split"] == "train"]
    return {
        "iterations": [r["iteration"] for r in valid],
        "valid_exit_losses": {
            k: [r["exit_losses"][k] for r in valid] for k in valid[0]["exit_losses"]
        },
        "valid_lm_loss": [r["lm_loss"] for r in valid],
        "train_iteration_time_s_median": statistics.median(r["iteration_time_s"] for r in train),
    }


def write_results(a, summary: dict, curves: dict | None) -> None:
    os.makedirs(a.out, exist_ok=True)
    meta = {
        "model": {k: getattr(a, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                             "seq_length", "vocab_size", "micro_batch_size",
                                             "global_batch_size", "exit_layer_nums")},
        "pipeline": "checkpoint PP=2; exits on stage 1; partial = first 1 of 2 stages",
        "machine": f"{pyplatform.machine()}, {os.cpu_count()} CPUs (shared), gloo, 1 thread/rank",
        "iters_per_launch": a.iters, "warmup": a.warmup, "rounds": a.rounds,
    }  # fmt: skip
    with open(os.path.join(a.out, "ee_tuning.json"), "w") as f:
        json.dump({"setup": meta, "variants": summary, "smollm2": curves}, f, indent=1)
    lines = [
        "# EE-Tuning cost per iteration",
        "",
        f"Model: {meta['model']}. {meta['pipeline']}. {meta['machine']}. Median over "
        f"{a.rounds} alternating launches of {a.iters} iterations ({a.warmup} warm-up).",
        "",
        "| variant | processes | ms / iteration | vs full training | process-s / iteration "
        "| peak RSS max rank (MiB) | peak RSS all ranks (MiB) | vs full training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        s = summary[name]
        lines.append(
            f"| {name} | {s['processes']} | {s['iteration_time_s'] * 1e3:.0f} | "
            f"{s['time_vs_full_training']:.2f}x | {s['processes'] * s['iteration_time_s']:.2f} | "
            f"{s['peak_rss_max_rank_mib']:.0f} | "
            f"{s['peak_rss_total_mib']:.0f} | {s['total_rss_vs_full_training']:.2f}x |"
        )
    lines += [
        "",
        "process-s / iteration = processes x wall time: the compute the variant occupies. The",
        "partial run needs half the processes and reads only stage 1 of the checkpoint; its",
        "wall time is close to the 2-stage pipelined tune_full because the pipeline overlaps",
        "the two stages. Both EE-Tuning variants skip the backbone's backward and optimizer.",
    ]
    if curves:
        its = curves["iterations"]
        lines += [
            "",
            "## SmolLM2-135M EE-Tuning (examples/ee_tuning/tune_smollm2.sh)",
            "",
            f"Validation loss per exit, iteration {its[0]} -> {its[-1]} (frozen LM loss "
            f"{curves['valid_lm_loss'][0]:.3f}); median "
            f"{curves['train_iteration_time_s_median']:.1f} s per training iteration.",
            "",
            "| exit after layer | before | after |",
            "|---|---|---|",
        ]
        for k, v in curves["valid_exit_losses"].items():
            lines.append(f"| {k} | {v[0]:.3f} | {v[-1]:.3f} |")
    with open(os.path.join(a.out, "ee_tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if a.no_plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(15 if curves else 10, 4))
    names = list(VARIANTS)
    axes[0].bar(names, [summary[n]["iteration_time_s"] * 1e3 for n in names], color="C0")
    axes[0].set_ylabel("ms / iteration")
    axes[0].set_title("time per iteration")
    axes[1].bar(names, [summary[n]["peak_rss_total_mib"] for n in names], color="C1")
    axes[1].set_ylabel("MiB (sum over ranks)")
    axes[1].set_title("peak RSS")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=15)
    if curves:
        for k, v in curves["valid_exit_losses"].items():
            axes[2].plot(curves["iterations"], v, marker="o", label=f"exit after layer {k}")
        axes[2].axhline(
            curves["valid_lm_loss"][0], color="gray", ls="--", label="final layer (frozen)"
        )
        axes[2].set_xlabel("iteration")
        axes[2].set_ylabel("validation loss")
        axes[2].set_title("SmolLM2-135M EE-Tuning (Shakespeare)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "ee_tuning.png"), dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    a = build_parser().parse_args(argv)
    if a.curves_only:  # re-tuned SmolLM2, same cost measurements
        with open(os.path.join(a.out, "ee_tuning.json")) as f:
            summary = json.load(f)["variants"]
        write_results(a, summary, smollm2_curves(a.smollm2_metrics))
        return 0
    summary = measure(a)
    write_results(a, summary, smollm2_curves(a.smollm2_metrics))
    for name in VARIANTS:
        s = summary[name]
        print(
            f"{name}: {s['iteration_time_s'] * 1e3:.0f} ms/iter "
            f"({s['time_vs_full_training']:.2f}x), peak RSS total "
            f"{s['peak_rss_total_mib']:.0f} MiB ({s['total_rss_vs_full_training']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
