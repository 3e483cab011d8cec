"""EE-Tuning tokens/s on a real checkpoint: today's --tune-exit vs truncated vs teacher cache.

    python benchmarks/ee_tuning_cost.py --load CKPT_WITH_EXITS --data-path PREFIX \\
        [--out DIR | --write-results] [--iters 4 --warmup 1 --rounds 1]

CKPT_WITH_EXITS is a checkpoint with exits added by tools/checkpoint/add_exits.py (e.g.
SmolLM2-135M with exits after 8/15/23, as examples/ee_tuning/tune_smollm2.sh makes it);
PREFIX data tokenized with its tokenizer. Variants, each one launch of `--iters`
iterations in one process (iteration time from --metrics-file, warm-up left out):

* ``today_ce``: ``--tune-exit`` (whole frozen backbone + LM head, exit cross entropy);
* ``truncated_ce``: ``--tune-exit --tune-exit-truncate-backbone`` (layers up to the deepest
  exit only);
* ``cached_ce``: ``--tune-exit --teacher-cache DIR`` (no backbone; exit heads only);
* ``today_kd`` / ``cached_kd``: the same with ``--exit-distillation`` (full teacher vs the
  cached top-k teacher).

The cache is built once by tools/cache_teacher.py (its tokens/s is the one-off teacher
pass). Launch order alternates between rounds; the machine's load average is recorded,
because on a shared machine it moves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("today_ce", "truncated_ce", "cached_ce", "today_kd", "cached_kd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_results_args(p, HERE)
    p.add_argument("--load", required=True, help="checkpoint with exits (add_exits.py)")
    p.add_argument("--data-path", required=True, help="tokenized data prefix")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=4, help="iterations per launch")
    p.add_argument("--warmup", type=int, default=1, help="iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=1, help="launches per variant")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each launch")
    p.add_argument("--top-k", type=int, default=64, help="teacher cache top-k")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-plot", action="store_true")
    return p


def _launch(a, script: str, args: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(port), script, *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"launch failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def _common(a) -> list[str]:
    return [
        "--load", a.load, "--data-path", a.data_path, "--split", "100,0,0",
        "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.micro_batch_size), "--train-iters", str(a.iters),
        "--lr", "1e-4", "--lr-decay-style", "constant", "--log-interval", "1", "--tune-exit",
    ]  # fmt: skip


def _variant_args(name: str, cache: str) -> list[str]:
    extra = {"truncated": ["--tune-exit-truncate-backbone"],
             "cached": ["--teacher-cache", cache], "today": []}[name.split("_")[0]]  # fmt: skip
    return extra + (["--exit-distillation"] if name.endswith("_kd") else [])


def measure(a) -> dict:
    work = tempfile.mkdtemp(prefix="ee_tuning_cost_")
    load = [os.getloadavg()[0]]
    try:
        cache = os.path.join(work, "cache")
        common = [*_common(a), "--data-cache-path", os.path.join(work, "data_cache")]
        cache_wall = _launch(a, "tools/cache_teacher.py", [
            *common, "--teacher-cache", cache, "--teacher-top-k", str(a.top_k)])  # fmt: skip
        meta = json.loads(Path(cache, "meta.json").read_text())
        cache_bytes = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
        per_variant: dict[str, list[float]] = {v: [] for v in a.variants}
        for r in range(a.rounds):
            order = a.variants if r % 2 == 0 else list(reversed(a.variants))
            for name in order:
                metrics = os.path.join(work, f"{name}_{r}.jsonl")
                args = [*common, *_variant_args(name, cache), "--metrics-file", metrics]
                _launch(a, "pretrain_early_exit_gpt.py", args)
                load.append(os.getloadavg()[0])
                recs = [json.loads(x) for x in Path(metrics).read_text().splitlines()]
                times = [x["iteration_time_s"] for x in recs if x.get("split") == "train"]
                per_variant[name].append(statistics.median(times[a.warmup :]))
                print(f"{name} round {r}: {per_variant[name][-1]:.2f} s/iteration", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = a.micro_batch_size * a.seq_length
    rows = {}
    for name, secs in per_variant.items():
        s = statistics.median(secs)
        rows[name] = {"s_per_iteration": s, "tokens_per_s": tokens / s, "launches": len(secs)}
    return {
        "machine": f"{pyplatform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"OMP_NUM_THREADS={a.threads}",
        "load_average_1min": {"min": min(load), "max": max(load), "samples": load},
        "settings": {
            k: getattr(a, k)
            for k in (
                "load",
                "data_path",
                "seq_length",
                "micro_batch_size",
                "iters",
                "warmup",
                "rounds",
                "top_k",
            )
        },  # fmt: skip
        "tokens_per_iteration": tokens,
        "variants": rows,
        "cache": {
            "tokens": meta["splits"]["train"] * a.seq_length,
            "bytes_per_token": cache_bytes / (meta["splits"]["train"] * a.seq_length),
            "launch_wall_s": cache_wall,
            "exit_layer_nums": meta["exit_layer_nums"],
            "hidden_dtype": meta["hidden_dtype"],
            "top_k": meta["top_k"],
        },
    }


def write_md(result: dict, out: str) -> str:
    rows = result["variants"]
    lines = [
        "# EE-Tuning cost per token: today vs truncated backbone vs teacher cache",
        "",
        f"Checkpoint `{result['settings']['load']}`, data `{result['settings']['data_path']}`; "
        f"{result['tokens_per_iteration']} tokens per iteration "
        f"(micro batch {result['settings']['micro_batch_size']} x seq "
        f"{result['settings']['seq_length']}); {result['machine']}. Median over "
        f"{result['settings']['rounds']} launch(es) of {result['settings']['iters']} "
        f"iterations ({result['settings']['warmup']} warm-up). Machine load average (1 min) "
        f"during the run: {result['load_average_1min']['min']:.1f} - "
        f"{result['load_average_1min']['max']:.1f} on 2 cores: absolute figures are "
        "slowed by other jobs, ratios less so.",
        "",
        "| variant | s / iteration | tokens/s | vs today (same objective) |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        base = rows.get("today_" + name.split("_")[1])
        ratio = f"{base['s_per_iteration'] / r['s_per_iteration']:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['s_per_iteration']:.2f} | {r['tokens_per_s']:.1f} | {ratio} |")
    c = result["cache"]
    lines += [
        "",
        f"Teacher cache: exits {c['exit_layer_nums']}, {c['hidden_dtype']} hidden states, "
        f"top-{c['top_k']}; {c['bytes_per_token']:.0f} bytes/token on disk; one launch of "
        f"tools/cache_teacher.py over {c['tokens']} tokens took {c['launch_wall_s']:.0f} s "
        "(start-up included). ce = exit cross entropy, kd = --exit-distillation.",
        "",
    ]
    path = os.path.join(out, "ee_tuning_cost.md")
    Path(path).write_text("\n".join(lines))
    return path


def plot(result: dict, out: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(result["variants"])
    values = [result["variants"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, values, color=["#888" if n.startswith("today") else "#3a7" for n in names])
    ax.set_ylabel("tuning tokens/s")
    ax.set_title("EE-Tuning throughput (higher is better)")
    fig.tight_layout()
    path = os.path.join(out, "ee_tuning_cost.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.iters <= a.warmup:
        print("error: --iters must exceed --warmup", file=sys.stderr)
        return 2
    result = measure(a)
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, "ee_tuning_cost.json").write_text(json.dumps(result, indent=1))
    print(Path(write_md(result, a.out)).read_text())
    if not a.no_plot:
        plot(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
