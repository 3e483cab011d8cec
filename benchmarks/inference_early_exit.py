"""Early-exit inference: speed and agreement vs the full model, both methods, batch 1 and 8.

    python benchmarks/inference_early_exit.py --load CKPT [--hf-dir HF] [--out DIR]
        [--write-results]

Two launches of this file under torchrun (`--worker`): PP=1 (full model, kv_recompute,
self-speculative, and `transformers` generate on the same weights if --hf-dir is given)
and PP=2 (full model, kv_recompute, pipeline). Every ratio compares runs inside the same
launch. Prompts: 8 real text snippets (Shakespeare), greedy, `--new-tokens` tokens each
(EOS ignored, so every configuration generates the same number of tokens).
Writes inference_early_exit.{json,md,png} to --out (default outputs/benchmarks;
--write-results: the committed benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint with exits (ee_args.json)")
    p.add_argument("--hf-dir", default=None, help="the same weights as a HF folder")
    from megatron.early_exit.cli import add_results_args  # the parent process stays light

    add_results_args(p, HERE)
    p.add_argument("--name", default="inference_early_exit")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--draft-lengths", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--exit-layers", type=int, nargs="+", default=None,
                   help="exits lossy early exit may use (default: all)")  # fmt: skip
    p.add_argument("--draft-vocab-sizes", type=int, nargs="+", default=[0],
                   help="draft vocabularies (0: full; others need token_counts.npy)")  # fmt: skip
    p.add_argument("--draft-exits", type=int, nargs="+", default=None,
                   help="exits to draft with (default: all)")  # fmt: skip
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=REPEATS, help="timing: best of N")
    p.add_argument("--transformers-only", action="store_true",
                   help="only full-model decoding vs transformers (--hf-dir)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)
    return p


def shakespeare_prompts(engine, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from different works, taken from the middle of each."""
    from megatron.early_exit import assets

    texts = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(assets.fetch("shakespeare"))
        for f in files
        if f.endswith(".txt")
    )
    out = []
    for path in texts[:: max(1, len(texts) // n)][:n]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read()
        mid = text[len(text) // 2 : len(text) // 2 + 4000]
        ids = engine.tokenize(mid[mid.index("\n") + 1 :])
        out.append(ids[:length])
    return out


REPEATS = 2  # best of: the CPU may be shared; results are identical across repeats


def _timed(engine, reqs, batch: int):
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        res = []
        for k in range(0, len(reqs), batch):
            res += engine.generate(reqs[k : k + batch])
        best = min(best, time.perf_counter() - t0)
    return res, best


def _agreement(ref, got) -> tuple[float, float]:
    """(position-wise token match, matching prefix) as fractions of the generated tokens."""
    same = total = prefix = 0
    for a, b in zip(ref, got):
        n = min(len(a.token_ids), len(b.token_ids))
        m = [x == y for x, y in zip(a.token_ids[:n], b.token_ids[:n])]
        same += sum(m)
        total += len(a.token_ids)
        prefix += m.index(False) if False in m else n
    return same / total, prefix / total


def _predict_early_exit(cm, got, exits: list[int], L: int) -> float | None:
    """tokens/s the cost model predicts for batch-1 lossy early exit with these exit layers:
    each token runs layers 1..e and the exit heads up to e (all of them when it reaches
    the LM head); the token after an early exit catches up: its predecessor's skipped
    layers up to e run on 2 rows (kv_recompute.py). Prefill is not counted."""
    if cm is None:
        return None
    ms = n = 0
    for r in got:
        prev = L
        for e in r.exit_layers:
            heads = [x for x in exits if x <= e and x < L]
            ms += cm.early_exit_token(e, heads)
            if prev < e:
                ms += (e - prev) * (cm.layer(2) - cm.layer(1))
            prev, n = e, n + 1
    return n / ms * 1e3 if ms else None


def _predict_speculative(cm, got, e: int, draft_vocab: int | None) -> float | None:
    """tokens/s the cost model predicts for self-speculative decoding: the drafts and
    verification passes the run made, at their mean draft count. Prefill is not counted."""
    if cm is None:
        return None
    drafted = sum(r.stats.drafted_tokens for r in got)
    passes = sum(r.stats.verify_passes for r in got)
    if not passes:
        return None
    draft = cm.step_overhead_ms + e * cm.layer(1) + cm.exit_head(e, draft_vocab)
    ms = drafted * draft + passes * cm.verification(e, drafted / passes)
    return sum(len(r.token_ids) for r in got) / ms * 1e3


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron.early_exit.inference.api import (
        EarlyExitParams,
        GenerationRequest,
        SamplingParams,
    )
    from megatron.early_exit.inference.loading import engine_from_args
    from megatron.early_exit.progress import progress

    global REPEATS
    REPEATS = args.repeats
    pp = int(os.environ.get("WORLD_SIZE", "1"))
    engine = engine_from_args(["--load", args.load, "--pipeline-model-parallel-size", str(pp)])
    L = engine.limits.num_layers
    ctx = engine.limits.max_sequence_length
    if args.prompt_tokens + args.new_tokens > ctx:  # small models (e.g. the demo: 64)
        args.new_tokens = min(args.new_tokens, ctx - 16)
        args.prompt_tokens = ctx - args.new_tokens
    prompts = shakespeare_prompts(engine, args.num_prompts, args.prompt_tokens)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def reqs(ee: EarlyExitParams):
        return [GenerationRequest(p, sp, ee) for p in prompts]

    engine.generate(reqs(EarlyExitParams())[:1])  # warm-up
    rows = []
    cm = None
    if pp == 1:  # the cost model prices one stage holding every layer
        from megatron.early_exit.inference.cost_model import calibrate

        cm = calibrate(engine)
    ee_exits = sorted(args.exit_layers or engine.limits.exit_layers)
    methods = ["kv_recompute"] + (["pipeline"] if pp > 1 else [])
    if args.transformers_only:
        args.thresholds, args.draft_exits, batches = [], [], (1,)
    else:
        batches = (1, len(prompts))
    draft_layers = args.draft_exits
    if draft_layers is None:
        draft_layers = engine.limits.exit_layers
    drafts = [(k, nv, dl) for k in draft_layers
              for nv in args.draft_vocab_sizes for dl in args.draft_lengths]  # fmt: skip
    total = len(batches) * (1 + len(methods) * len(args.thresholds))
    total += len(drafts) if pp == 1 and 1 in batches else 0
    bar = progress(total=total, desc=f"inference benchmark PP={pp}", unit="config",
                   enabled=dist.get_rank() == 0)  # fmt: skip
    for batch in batches:
        full, t_full = _timed(engine, reqs(EarlyExitParams()), batch)
        n_tok = sum(len(r.token_ids) for r in full)
        tps_full = n_tok / t_full
        rows.append(dict(pp=pp, batch=batch, method="full", threshold=None, tokens_per_s=tps_full,
                         speedup=1.0, avg_exit_layer=float(L), match=1.0, prefix=1.0,
                         predicted_tokens_per_s=None if cm is None
                         else batch / cm.full_step(batch) * 1e3))  # fmt: skip
        bar.update()
        for method in methods:
            for thr in args.thresholds:
                ee = EarlyExitParams(
                    mode="early_exit", method=method, threshold=thr, exit_layers=args.exit_layers
                )
                got, t = _timed(engine, reqs(ee), batch)
                n = sum(len(r.token_ids) for r in got)
                exits = [e for r in got for e in r.exit_layers]
                match, prefix = _agreement(full, got)
                rows.append(dict(pp=pp, batch=batch, method=method, threshold=thr,
                                 tokens_per_s=n / t, speedup=(n / t) / (n_tok / t_full),
                                 avg_exit_layer=sum(exits) / len(exits), match=match,
                                 prefix=prefix,
                                 predicted_tokens_per_s=_predict_early_exit(
                                     cm, got, ee_exits, L) if method == "kv_recompute"
                                 and batch == 1 else None))  # fmt: skip
                bar.update()
        if pp == 1 and batch == 1:
            for k, nv, dl in drafts:
                ee = EarlyExitParams(mode="self_speculative", draft_exit_layer=k, draft_length=dl,
                                     draft_vocab_size=nv or None)  # fmt: skip
                got, t = _timed(engine, reqs(ee), 1)
                n = sum(len(r.token_ids) for r in got)
                acc = sum(r.stats.accepted_tokens for r in got)
                dr = sum(r.stats.drafted_tokens for r in got)
                rows.append(dict(pp=pp, batch=1, method="self_speculative", threshold=None,
                                 draft_exit_layer=k, draft_length=dl, draft_vocab_size=nv or None,
                                 tokens_per_s=n / t, speedup=(n / t) / (n_tok / t_full),
                                 acceptance_rate=acc / dr if dr else 0.0,
                                 match=_agreement(full, got)[0],
                                 lossless=all(a.token_ids == b.token_ids
                                              for a, b in zip(full, got)),
                                 predicted_tokens_per_s=_predict_speculative(
                                     cm, got, k, nv or None)))  # fmt: skip
                bar.update()
            if args.hf_dir and dist.get_rank() == 0:

                def time_ours():
                    return _timed(engine, reqs(EarlyExitParams()), 1)[1]

                rows.append(_hf_compare(args, prompts, full, time_ours))
    bar.close()
    if dist.get_rank() == 0:
        meta = dict(num_layers=L, exits=list(engine.limits.exit_layers), load=args.load,
                    early_exit_layers=args.exit_layers or list(engine.limits.exit_layers),
                    new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                    prompts=len(prompts),
                    threads=torch.get_num_threads())  # fmt: skip
        with open(args.raw, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f)


def _hf_compare(args, prompts, full, time_ours) -> dict:
    """transformers generate (greedy, KV cache, batch 1) on the same weights, same process,
    timed in alternation with our full-model decoding (`time_ours()` -> seconds) so that
    both see the same machine load; the ratio is the median over the pairs."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    pairs = []
    for _ in range(max(REPEATS, 3)):
        t_ours = time_ours()
        n = same = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for p, ours in zip(prompts, full):
                out = model.generate(
                    torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False,
                    min_new_tokens=args.new_tokens, pad_token_id=0,
                )  # fmt: skip
                gen = out[0, len(p) :].tolist()
                n += len(gen)
                same += sum(a == b for a, b in zip(gen, ours.token_ids))
        pairs.append((t_ours, time.perf_counter() - t0))
    n_ours = sum(len(r.token_ids) for r in full)
    ratios = [(n_ours / a) / (n / b) for a, b in pairs]
    return dict(pp=1, batch=1, method="transformers", tokens_per_s=n / min(b for _, b in pairs),
                ours_tokens_per_s=n_ours / min(a for a, _ in pairs),
                ours_over_hf=statistics.median(ratios), ratios=ratios,
                match=same / max(n, 1))  # fmt: skip


def _free_port() -> str:
    """A free local port: fixed ports collide with other launches on a shared machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(args) -> None:
    rows, meta = [], {}
    for pp in args.pp:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            raw = f.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp),
               "--master-addr", "127.0.0.1", "--master-port", _free_port(), __file__,
               "--worker", "--raw", raw, *sys.argv[1:]]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONWARNINGS="ignore")  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        with open(raw) as f:
            data = json.load(f)
        rows += data["rows"]
        meta = data["meta"]
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_md(base + ".md", meta, rows)
    plot(base + ".png", rows)
    with open(base + ".md") as f:
        print(f.read())


def _pred(r) -> str:
    p = r.get("predicted_tokens_per_s")
    return "-" if p is None else f"{p:.1f} ({p / r['tokens_per_s']:.2f}x)"


def write_md(path, meta, rows) -> None:
    lines = [
        f"# Early-exit inference ({meta.get('load')})",
        "",
        f"{meta.get('num_layers')} layers, exits {meta.get('exits')} (lossy early exit uses "
        f"{meta.get('early_exit_layers', meta.get('exits'))}), {meta.get('prompts')} "
        f"Shakespeare prompts, {meta.get('new_tokens')} new tokens each, greedy, CPU "
        f"({meta.get('threads')} threads/process). Speedup = tokens/s relative to the full "
        "model with the same PP and batch in the same launch. match = position-wise agreement "
        "with the full model's tokens; prefix = share of tokens before the first difference.",
        "",
        "predicted = tokens/s the measured cost model (inference/cost_model.py, PP=1, "
        "prefill not counted) gives for the run's exit layers / drafts.",
        "",
        "| PP | batch | method | threshold | tokens/s | predicted tokens/s | speedup "
        "| avg exit layer | match | prefix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] in ("full", "kv_recompute", "pipeline"):
            thr = "-" if r["threshold"] is None else f"{r['threshold']:.2f}"
            lines.append(
                f"| {r['pp']} | {r['batch']} | {r['method']} | {thr} | {r['tokens_per_s']:.1f} | "
                f"{_pred(r)} | {r['speedup']:.2f}x | {r['avg_exit_layer']:.2f} | "
                f"{r['match']:.3f} | {r['prefix']:.3f} |"
            )
    spec = [r for r in rows if r["method"] == "self_speculative"]
    if spec:
        lines += ["", "## Self-speculative (lossless), PP=1, batch 1", "",
                  "| draft exit | draft vocabulary | draft length | tokens/s | predicted tokens/s "
                  "| speedup | acceptance | lossless |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in spec:
            lines.append(
                f"| {r['draft_exit_layer']} | {r.get('draft_vocab_size') or 'full'} "
                f"| {r['draft_length']} | {r['tokens_per_s']:.1f} | {_pred(r)} | "
                f"{r['speedup']:.2f}x | {r['acceptance_rate']:.2f} | {r['lossless']} |"
            )
    hf = [r for r in rows if r["method"] == "transformers"]
    for r in hf:
        lines += ["", "## Full-model decoding vs transformers generate (same weights, batch 1)", "",
                  f"ours {r['ours_tokens_per_s']:.1f} tokens/s, transformers "
                  f"{r['tokens_per_s']:.1f} tokens/s (best of each, timed in alternation): "
                  f"ratio {r['ours_over_hf']:.2f}x (median of "
                  f"{', '.join(f'{x:.2f}' for x in r.get('ratios', []))}); "
                  f"token agreement {r['match']:.3f}"]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    curves = {(r["pp"], r["batch"], r["method"]) for r in rows}
    for pp, batch, method in sorted(c for c in curves if c[2] in ("kv_recompute", "pipeline")):
        sel = [r for r in rows if (r["pp"], r["batch"], r["method"]) == (pp, batch, method)]
        label = f"{method} PP={pp} b={batch}"
        axes[0].plot([r["threshold"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
        axes[1].plot([r["match"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
    axes[0].set(xlabel="threshold", ylabel="speedup vs full model", title="speed vs threshold")
    axes[1].set(xlabel="token agreement with full model", ylabel="speedup",
                title="speed vs quality")  # fmt: skip
    for ax in axes[:2]:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    spec = [r for r in rows if r["method"] == "self_speculative"]

    def key(r):
        return r["draft_exit_layer"], r.get("draft_vocab_size") or 0

    for k, nv in sorted({key(r) for r in spec}):
        sel = [r for r in spec if key(r) == (k, nv)]
        axes[2].plot([r["draft_length"] for r in sel], [r["speedup"] for r in sel], "o-",
                     label=f"draft exit {k}, vocab {nv or 'full'}")  # fmt: skip
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xlabel="draft length", ylabel="speedup (lossless)", title="self-speculative")
    if spec:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        from megatron.early_exit.cli import quiet_startup

        quiet_startup()
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
