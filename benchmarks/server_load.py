"""Load benchmark of the generation server: requests/s and p50/p99 latency for 1, 4 and 8
concurrent clients, early exit off vs on, in one run against one server (2 processes, PP=2).

    .venv/bin/python benchmarks/server_load.py                # trains a tiny model first
    .venv/bin/python benchmarks/server_load.py --load outputs/demo/checkpoint --threshold 0.5

Results: outputs/benchmarks/server_load.{json,md,png} (--write-results: benchmarks/results/).
Each client sends greedy /v1/completions requests back to back; the server queues and
batches concurrent requests with the same early-exit settings (--max-batch-size).
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


def torchrun_cmd(script: Path, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
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
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--per-client", type=int, default=6)
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
    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        torchrun_cmd(
            ROOT / "tools" / "run_text_generation_server.py",
            [
                "--load",
                str(ckpt),
                "--pipeline-model-parallel-size",
                "2",
                "--port",
                str(port),
                "--max-batch-size",
                str(args.max_batch_size),
            ],
        ),
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not start; see " + str(tmp / "server.log"))
            time.sleep(0.5)

        def body_for(ee_on: bool):
            def make(i: int) -> dict:
                if kind == "ids":
                    prompt = " ".join(str((i * 7 + k) % 190 + 1) for k in range(4 + i % 5))
                else:
                    prompt = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:"][i % 4]
                ee = {"mode": "early_exit", "threshold": args.threshold} if ee_on else None
                body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0}
                if ee:
                    body["early_exit"] = ee
                return body

            return make

        rows = []
        post(port, body_for(False)(0))  # warm-up
        post(port, body_for(True)(0))
        total = 2 * args.per_client * sum(args.clients)
        bar = progress(total=total, desc="server load", unit="req")
        for clients in args.clients:
            for ee_on in (False, True):
                row = measure(port, clients, args.per_client, body_for(ee_on), bar)
                row["early_exit"] = ee_on
                rows.append(row)
                bar.echo(
                    f"clients={clients} early_exit={'on ' if ee_on else 'off'} "
                    f"{row['requests_per_s']:.2f} req/s  p50 {row['p50_s'] * 1e3:.0f} ms  "
                    f"p99 {row['p99_s'] * 1e3:.0f} ms  "
                    f"mean exit layer {row['mean_exit_layer']:.2f}"
                )
        bar.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    meta = {
        "checkpoint": str(ckpt) if args.load else "tiny (4 layers, hidden 64, 4 train iters)",
        "layout": "2 processes, PP=2, CPU",
        "max_tokens": args.max_tokens,
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
        "| clients | early exit | req/s | tokens/s | p50 ms | p99 ms | mean exit layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {'on' if r['early_exit'] else 'off'} | "
            f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s'] * 1e3:.0f} | "
            f"{r['p99_s'] * 1e3:.0f} | {r['mean_exit_layer']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for ee_on in (False, True):
            rs = [r for r in rows if r["early_exit"] == ee_on]
            label = "early exit on" if ee_on else "early exit off"
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
        a.legend()
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print("wrote", out.with_suffix(".json"), out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
