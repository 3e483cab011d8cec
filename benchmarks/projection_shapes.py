"""Projection shapes on this CPU: 1-8 row curves of the LM head and layer matmuls, before and
after the row-count kernel choice (inference/projection.py, with the C rows kernel on one
thread), and what self-speculative
verification of k drafts costs against one decode step.

    python benchmarks/projection_shapes.py [--load CKPT] [--threads 1 2] [--out DIR |
        --write-results] [--name NAME]

Part 1 (no checkpoint needed): F.linear ("before") and projection.project ("after") of k =
1..8 fp32 rows onto the SmolLM2-135M shapes (LM head 49152x576; qkv 960x576, gate-up
3072x576, down 576x1536, attention output 576x576), at each thread count, each weight
called repeatedly (it stays in cache); then the four layer shapes of 30 layers in turn, as a
decode step streams them from memory. Every round times every variant at every k in
alternation; the figure is the median over rounds of the per-round ratio t(k rows) / t(1
row, F.linear).

Part 2 (--load, one process, PP=1): with the checkpoint's decode path (StageState), the
verification of k = 1..4 drafts from each exit (the last draft through 1..e, k+1 positions
through e+1..L, the LM head on k+1 rows) against one full decode step (1 row through 1..L
and the head), before and after, alternated; plus the calibrated cost model's prediction
(inference/cost_model.py). Checkpoints without exits are timed at exits 8/15/23 (the layers
do not depend on a head being there).

Writes NAME.{json,md,png} to --out (default outputs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))
STREAMED = "30 layers' qkv+out+gate_up+down, streamed"
SHAPES = {
    "lm_head 49152x576": (49152, 576),
    "qkv 960x576": (960, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "attn_out 576x576": (576, 576),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", default=None, help="checkpoint for part 2 (verification cost)")
    add_results_args(p, HERE)
    p.add_argument("--name", default="projection_shapes")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7, help="alternated timing rounds")
    p.add_argument("--max-rows", type=int, default=8)
    p.add_argument("--max-drafts", type=int, default=4)
    p.add_argument("--exit-layers", type=int, nargs="+", default=None,
                   help="part 2 draft exits (default: the checkpoint's or 8 15 23)")  # fmt: skip
    return p


def _ms(fn, reps: int) -> float:
    """Best of `reps` calls: on a loaded machine a single call may include a preemption."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def row_curves(threads: int, rounds: int, max_rows: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron.early_exit.inference.projection import project

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i, generator=g) / i**0.5
        xs = {k: torch.randn(k, i, generator=g) for k in range(1, max_rows + 1)}
        reps = max(3, int(3e6 / (o * i)))
        variants = {
            "before": lambda x, w=w: F.linear(x, w),
            "after": lambda x, w=w: project(x, w),
        }
        for x in xs.values():
            for f in variants.values():
                torch.testing.assert_close(f(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        t = {(v, k): [] for v in variants for k in xs}
        for _ in range(rounds):
            for k, x in xs.items():
                for v, f in variants.items():
                    t[(v, k)].append(_ms(lambda f=f, x=x: f(x), reps))
        out[name] = _curves(t, variants, xs)
    out[STREAMED] = streamed_curve(rounds, max_rows, g)
    return out


def _curves(t: dict, variants, ks) -> dict:
    base = t[("before", 1)]
    return {
        v: {
            "ms": [statistics.median(t[(v, k)]) for k in ks],
            "ratio": [statistics.median(a / b for a, b in zip(t[(v, k)], base)) for k in ks],
        }
        for v in variants
    }


def streamed_curve(rounds: int, max_rows: int, g) -> dict:
    """The four layer shapes of 30 layers (distinct weights, 420 MB), each projected in
    turn as a decode step does: the weights stream from memory, unlike the single-shape
    curves above, whose weight stays in cache (and whose 4-8 rows are compute-bound)."""
    import torch
    import torch.nn.functional as F

    from megatron.early_exit.inference.projection import project

    shapes = [SHAPES[s] for s in ("qkv 960x576", "attn_out 576x576", "gate_up 3072x576",
                                  "down 576x1536")]  # fmt: skip
    weights = [torch.randn(o, i, generator=g) / i**0.5 for _ in range(30) for o, i in shapes]
    widths = {w.shape[1] for w in weights}
    xs = {k: {i: torch.randn(k, i, generator=g) for i in widths} for k in range(1, max_rows + 1)}
    variants = {
        "before": lambda x: [F.linear(x[w.shape[1]], w) for w in weights],
        "after": lambda x: [project(x[w.shape[1]], w) for w in weights],
    }
    t = {(v, k): [] for v in variants for k in xs}
    for _ in range(rounds):
        for k, x in xs.items():
            for v, f in variants.items():
                t[(v, k)].append(_ms(lambda f=f, x=x: f(x), 2))
    return _curves(t, variants, xs)


def verification(args, threads: int) -> dict:
    import torch

    from megatron.early_exit.inference import projection, rows_kernel
    from megatron.early_exit.inference.cost_model import calibrate
    from megatron.early_exit.inference.loading import engine_from_args
    from megatron.early_exit.inference.stage import StageState

    torch.set_num_threads(threads)
    engine = _ENGINES.get(args.load) or engine_from_args(["--load", args.load])
    _ENGINES[args.load] = engine
    L = engine.limits.num_layers
    exits = args.exit_layers or list(engine.limits.exit_layers) or [e for e in (8, 15, 23) if e < L]
    cm = calibrate(engine, rounds=max(3, args.rounds // 2))
    ctx, K = 16, args.max_drafts
    st = StageState(engine.model, 1, ctx + K + 2, engine.limits.vocab_size, [])
    g = torch.Generator().manual_seed(0)
    st.hbuf.copy_(torch.randn(st.hbuf.shape, generator=g).to(st.dtype))
    with torch.no_grad():
        for n in range(1, L + 1):
            st.run_layer(n, st.chunk([0], [0], [ctx - 1]))

    def step():  # one full decode step: 1 row through every layer and the head
        one = st.chunk([0], [ctx], [ctx])
        for n in range(1, L + 1):
            st.run_layer(n, one)
        st.final_logits([0], [ctx])

    def verify(e, k):
        one = st.chunk([0], [ctx], [ctx])
        rows = st.chunk([0], [ctx], [ctx + k])
        for n in range(1, e + 1):
            st.run_layer(n, one)
        for n in range(e + 1, L + 1):
            st.run_layer(n, rows)
        st.final_logits([0] * (k + 1), list(range(ctx, ctx + k + 1)))

    keep = projection.MIN_THIN_NUMEL
    fns = {("step", None, 0): step}
    for e in exits:
        for k in range(1, K + 1):
            fns[("verify", e, k)] = lambda e=e, k=k: verify(e, k)
    t = {(v, key): [] for v in ("before", "after") for key in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for v in ("before", "after"):
                projection.MIN_THIN_NUMEL = keep if v == "after" else float("inf")
                rows_kernel.set_rows_kernel(v == "after")
                try:
                    for key, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        t[(v, key)].append((time.perf_counter() - t0) * 1e3)
                finally:
                    projection.MIN_THIN_NUMEL = keep
                    rows_kernel.set_rows_kernel(True)
    res = {"exits": exits, "num_layers": L, "cost_model": cm.to_dict(), "rows": []}
    for e in exits:
        for k in range(1, K + 1):
            row = {"exit": e, "drafts": k, "predicted_ratio": _predicted_ratio(cm, e, k)}
            for v in ("before", "after"):
                a, b = t[(v, ("verify", e, k))], t[(v, ("step", None, 0))]
                row[f"{v}_ms"] = statistics.median(a)
                row[f"{v}_ratio"] = statistics.median(x / y for x, y in zip(a, b))
            row["step_ms"] = statistics.median(t[("after", ("step", None, 0))])
            res["rows"].append(row)
    return res


_ENGINES: dict = {}


def _predicted_ratio(cm, e: int, k: int) -> float:
    """The cost model's verification / decode step, both without the engine's per-step
    overhead (the timed functions above call the stage directly)."""
    over = cm.step_overhead_ms
    return (cm.verification(e, k) - over) / (cm.full_step(1) - over)


def write_md(path: str, meta: dict, res: dict) -> None:
    lines = [
        "# Projection shapes and verification cost (CPU, fp32)",
        "",
        f"Load during the run: {meta['uptime_before']} / {meta['uptime_after']} "
        f"(`uptime`; the machine is shared). {meta['rounds']} rounds, variants timed in "
        "alternation; each figure is the median of per-round values. Row curves: before = "
        "F.linear. Verification: before = F.linear and the column-major copies, without "
        "W @ x^T or the C rows kernel. after = projection.project (on one thread, 1-8 rows "
        "take the C rows kernel; otherwise column-major copies for 1-3 rows of wide weights, "
        "W @ x^T for 2-8 rows, on weights >= 256k elements). The layers of a decode step or "
        "verification run on one thread (--inference-decode-threads 1), the heads on all.",
    ]
    load = _load(meta["uptime_after"])
    if load is not None and load > 2 * (os.cpu_count() or 1):
        lines += ["", f"**Load {load:.0f} on {os.cpu_count()} cores during this run: the figures "
                  "carry that contention (multi-thread figures most); rerun on an idle machine "
                  "before reading small differences.**"]  # fmt: skip
    n = meta["max_rows"]
    for th, curves in res["row_curves"].items():
        lines += ["", f"## Row-count curves, {th} thread(s): t(k rows) / t(1 row, before)", "",
                  "| shape | variant | " + " | ".join(f"k={k}" for k in range(1, n + 1))
                  + " | 1 row ms |",
                  "|---|---|" + "---|" * (n + 1)]  # fmt: skip
        for name, vs in curves.items():
            for v, d in vs.items():
                lines.append(f"| {name} | {v} | " + " | ".join(f"{r:.2f}" for r in d["ratio"])
                             + f" | {d['ms'][0]:.3f} |")  # fmt: skip
    for th, ver in res.get("verification", {}).items():
        cm = ver["cost_model"]
        lines += ["", f"## Verification of k drafts / one decode step, {th} thread(s) "
                  f"({meta['load']}, {ver['num_layers']} layers)", "",
                  f"One decode step (layers + head, 1 row): {ver['rows'][0]['step_ms']:.1f} ms. "
                  f"Cost model: layer {cm['layer_ms'][0]:.3f} ms at 1 row (its weight products "
                  f"{cm['weights_ms'][0]:.3f} ms), LM head {cm['head_ms'][0]:.2f} ms at 1 row, "
                  f"step overhead {cm['step_overhead_ms']:.2f} ms.", "",
                  "| draft exit | k | before ms | before ratio | after ms | after ratio "
                  "| predicted ratio (cost model) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ver["rows"]:
            lines.append(f"| {r['exit']} | {r['drafts']} | {r['before_ms']:.1f} | "
                         f"{r['before_ratio']:.2f}x | {r['after_ms']:.1f} | "
                         f"{r['after_ratio']:.2f}x | {r['predicted_ratio']:.2f}x |")  # fmt: skip
        lines += ["", "| rows | layer ms | weights ms | head ms |", "|---|---|---|---|"]
        for i, k in enumerate(cm["rows"]):
            lines.append(f"| {k} | {cm['layer_ms'][i]:.3f} | {cm['weights_ms'][i]:.3f} | "
                         f"{cm['head_ms'][i]:.2f} |")  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, meta: dict, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = res["row_curves"]
    ver = res.get("verification", {})
    ncol = len(curves) + (1 if ver else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 4), squeeze=False)
    ks = list(range(1, meta["max_rows"] + 1))
    for ax, (th, cs) in zip(axes[0], curves.items()):
        for i, (name, vs) in enumerate(cs.items()):
            c = f"C{i}"
            ax.plot(ks, vs["before"]["ratio"], "o--", color=c, alpha=0.6, label=f"{name} before")
            ax.plot(ks, vs["after"]["ratio"], "o-", color=c, label=f"{name} after")
        ax.axhline(2.0, color="grey", ls=":")
        ax.set(xlabel="rows", ylabel="t(k) / t(1 row, F.linear)", title=f"{th} thread(s)")
        ax.legend(fontsize=6)
    if ver:
        ax = axes[0][-1]
        for j, (th, v) in enumerate(ver.items()):
            for i, e in enumerate(v["exits"]):
                rs = [r for r in v["rows"] if r["exit"] == e]
                kk = [r["drafts"] for r in rs]
                c = f"C{i + 3 * j}"
                ax.plot(kk, [r["before_ratio"] for r in rs], "o--", color=c, alpha=0.6,
                        label=f"exit {e}, {th}t before")  # fmt: skip
                ax.plot(kk, [r["after_ratio"] for r in rs], "o-", color=c,
                        label=f"exit {e}, {th}t after")  # fmt: skip
        ax.axhline(1.3, color="grey", ls=":")
        ax.set(xlabel="drafts k", ylabel="verification / one decode step",
               title="self-speculative verification")  # fmt: skip
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _load(text: str) -> float | None:
    try:
        return float(text.split()[1])
    except (IndexError, ValueError):
        return None


def _uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load " + " ".join(f.read().split()[:3])
    except OSError:
        return "load unknown"


def main() -> None:
    args = build_parser().parse_args()
    if args.load:
        from megatron.early_exit.cli import quiet_startup

        quiet_startup()
        from exit_agreement import _setup_single_process

        _setup_single_process()
    meta = {"load": args.load, "rounds": args.rounds, "max_rows": args.max_rows,
            "threads": args.threads, "uptime_before": _uptime()}  # fmt: skip
    res: dict = {"row_curves": {}, "verification": {}}
    for th in args.threads:
        res["row_curves"][str(th)] = row_curves(th, args.rounds, args.max_rows)
        if args.load:
            res["verification"][str(th)] = verification(args, th)
    meta["uptime_after"] = _uptime()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, **res}, f, indent=1)
    write_md(base + ".md", meta, res)
    plot(base + ".png", meta, res)
    with open(base + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
