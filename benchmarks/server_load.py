"""Load benchmark of the generation server: requests/s and p50/p99 latency for 1, 4, 8 and
16 concurrent clients, continuous batching vs queue batching (one server each, `--scheduler`),
early exit off vs on.

    .venv/bin/python benchmarks/server_load.py                # trains a tiny model first (PP=2)
    .venv/bin/python benchmarks/server_load.py --load /work/cache/smollm2/ours --pp 1 \
        --early-exit off --out outputs/benchmarks/server_load_smollm2

Results: outputs/benchmarks/server_load.{json,md,png} (--write-results: benchmarks/results/).
Each client sends greedy /v1/completions requests back to back, with max_tokens varying per
request (so sequences finish at different steps, where continuous batching refills the slot
at once and queue batching waits for the batch's longest request). Early exit uses
`--method` (kv_recompute: continuous batching covers it; pipeline falls back to queue). The
load average of the machine is recorded per point (a shared machine skews timings).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script: Path, args: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]


def train_tiny(out: Path) -> Path:
    ckpt = out / "ckpt"
    args = [
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "64",
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "200",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--pipeline-model-parallel-size",
        "2",
        "--exit-layer-nums",
        "1",
        "3",
        "--train-iters",
        "4",
        "--save",
        str(ckpt),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        torchrun_cmd(ROOT / "pretrain_early_exit_gpt.py", args),
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    return ckpt


def post(port: int, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {out}")
    return time.perf_counter() - t0, out


def measure(port: int, clients: int, per_client: int, body_for, bar=None) -> dict:
    bodies = [body_for(c * per_client + k) for c in range(clients) for k in range(per_client)]
    lock = threading.Lock()  # the clients' threads share one progress bar

    def client(c: int) -> list[tuple[float, dict]]:
        out = []
        for b in bodies[c * per_client : (c + 1) * per_client]:
            out.append(post(port, b))
            if bar is not None:
                with lock:
                    bar.update()
        return out

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
    layers = [x for r in results for x in r[1]["choices"][0]["exit_layers"]]
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "mean_exit_layer": sum(layers) / len(layers) if layers else None,
        "wall_s": wall,
        "load_avg_1m": [round(load0, 1), round(os.getloadavg()[0], 1)],  # start, end
    }


def main(argv=None) -> int:
    from megatron.early_exit.progress import progress

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None, help="checkpoint (default: train a tiny one)")
    p.add_argument(
        "--prompt-kind",
        choices=["ids", "text"],
        default=None,
        help="ids for NullTokenizer checkpoints (default without --load)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.0052,
        help="early-exit threshold of the 'on' runs (0.0052 suits the tiny model)",
    )
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--per-client", type=int, default=3)
    p.add_argument("--schedulers", nargs="+", choices=["continuous", "queue"],
                   default=["continuous", "queue"], help="one server each")  # fmt: skip
    p.add_argument("--early-exit", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="off for checkpoints without exits")  # fmt: skip
    p.add_argument("--method", choices=["kv_recompute", "pipeline"], default="kv_recompute",
                   help="early-exit decode method of the 'on' runs")  # fmt: skip
    p.add_argument("--pp", type=int, default=2, help="pipeline stages = processes")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    # Committed results are only replaced on request (--write-results); both set args.out.
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "server_load"),
                   help="output path prefix (default: outputs/benchmarks/server_load)")  # fmt: skip
    p.add_argument("--write-results", dest="out", action="store_const",
                   const=str(RESULTS / "server_load"),
                   help="write benchmarks/results/server_load.* (committed) instead")  # fmt: skip
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ee_server_bench_"))
    ckpt = Path(args.load) if args.load else train_tiny(tmp)
    kind = args.prompt_kind or ("text" if args.load else "ids")

    def body_for(ee_on: bool):
        def make(i: int) -> dict:
            if kind == "ids":
                prompt = " ".join(str((i * 7 + k) % 190 + 1) for k in range(4 + i % 5))
            else:
                prompt = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:"][i % 4]
            # lengths vary per request: sequences of one batch finish at different steps
            n = max(1, args.max_tokens // 2 + (i * 5) % (args.max_tokens // 2 + 1))
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0}
            if ee_on:
                body["early_exit"] = {"mode": "early_exit", "threshold": args.threshold,
                                      "method": args.method}  # fmt: skip
            return body

        return make

    rows = []
    ee_modes = [m == "on" for m in args.early_exit]
    total = len(args.schedulers) * len(ee_modes) * args.per_client * sum(args.clients)
    bar = progress(total=total, desc="server load", unit="req")
    for sched in args.schedulers:
        port = free_port()
        log = open(tmp / f"server_{sched}.log", "w")  # noqa: SIM115
        server = subprocess.Popen(
            torchrun_cmd(
                ROOT / "tools" / "run_text_generation_server.py",
                ["--load", str(ckpt), "--pipeline-model-parallel-size", str(args.pp),
                 "--port", str(port), "--max-batch-size", str(args.max_batch_size),
                 "--scheduler", sched],
                nproc=args.pp,
            ),
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.time() + 600
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start; see {tmp}/server_{sched}.log")
                time.sleep(0.5)
            for ee_on in ee_modes:
                post(port, body_for(ee_on)(0))  # warm-up
            for clients in args.clients:
                for ee_on in ee_modes:
                    row = measure(port, clients, args.per_client, body_for(ee_on), bar)
                    row["early_exit"] = ee_on
                    row["scheduler"] = sched
                    rows.append(row)
                    layer = row["mean_exit_layer"]
                    bar.echo(
                        f"{sched:10s} clients={clients:2d} early_exit={'on ' if ee_on else 'off'} "
                        f"{row['requests_per_s']:.2f} req/s  {row['tokens_per_s']:.1f} tok/s  "
                        f"p50 {row['p50_s'] * 1e3:.0f} ms  p99 {row['p99_s'] * 1e3:.0f} ms  "
                        f"mean exit layer {layer if layer is None else round(layer, 2)}  "
                        f"load {row['load_avg_1m']}"
                    )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    bar.close()

    meta = {
        "checkpoint": str(ckpt) if args.load else "tiny (4 layers, hidden 64, 4 train iters)",
        "layout": f"{args.pp} processes, PP={args.pp}, CPU",
        "max_tokens": f"{max(1, args.max_tokens // 2)}..{args.max_tokens} (varies per request)",
        "early_exit_method": args.method,
        "per_client": args.per_client,
        "threshold": args.threshold,
        "max_batch_size": args.max_batch_size,
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Server load benchmark",
        "",
        "Greedy `/v1/completions`, " + ", ".join(f"{k}={v}" for k, v in meta.items()),
        "",
        "| scheduler | clients | early exit | req/s | tokens/s | p50 ms | p99 ms |"
        " mean exit layer | load avg (start, end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layer = r["mean_exit_layer"]
        lines.append(
            f"| {r['scheduler']} | {r['clients']} | {'on' if r['early_exit'] else 'off'} | "
            f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s'] * 1e3:.0f} | {r['p99_s'] * 1e3:.0f} | "
            f"{'-' if layer is None else f'{layer:.2f}'} | {r['load_avg_1m']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for sched, ee_on in [(a, b) for a in args.schedulers for b in ee_modes]:
            rs = [r for r in rows if r["early_exit"] == ee_on and r["scheduler"] == sched]
            label = f"{sched}, early exit {'on' if ee_on else 'off'}"
            a.plot([r["clients"] for r in rs], [r["requests_per_s"] for r in rs], "o-", label=label)
            b.plot(
                [r["clients"] for r in rs],
                [r["p50_s"] * 1e3 for r in rs],
                "o-",
                label=f"p50, {label}",
            )
            b.plot(
                [r["clients"] for r in rs],
                [r["p99_s"] * 1e3 for r in rs],
                "x--",
                label=f"p99, {label}",
            )
        a.set(xlabel="concurrent clients", ylabel="requests/s", title="throughput")
        b.set(xlabel="concurrent clients", ylabel="latency (ms)", title="latency")
        a.legend(fontsize=7)
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print("wrote", out.with_suffix(".json"), out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
