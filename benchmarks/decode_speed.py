"""Full-model decode speed: our engine vs `transformers` generate, batch 1, greedy.

    python benchmarks/decode_speed.py [--load CKPT] [--hf-dir HF] [--threads 1 2]
        [--compile] [--rounds 7] [--out DIR | --write-results]

Same weights (SmolLM2-135M by default: our checkpoint and its HF folder), prompts from
botchan.txt (sentencepiece's test text, not the Shakespeare used for tuning), 64 new
tokens, EOS ignored. For each thread count the variants (ours eager; at more than one
thread also ours eager with the decode layers on every thread instead of
--inference-decode-threads 1; ours eager with --no-inference-rows-kernel, which shows what
the C kernel for 1-8-row products buys; ours compiled with --compile; transformers, and
transformers again as a control) are timed in alternation,
round by round, in a rotating order, so that a load change on the shared machine hits
every variant; a ratio is taken per round and we report the median with a bootstrap 90%
interval. The control row (transformers / transformers) shows the noise floor. A layer
micro-benchmark times one decode step of one layer against its four weight products alone.
Writes decode_speed.{json,md,png}; the results note `uptime` load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.cli import add_results_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--load", default="/work/cache/smollm2/ours", help="our checkpoint")
    p.add_argument("--hf-dir", default="/work/cache/smollm2/hf", help="the same weights (HF)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt")
    p.add_argument("--num-prompts", type=int, default=2, help="prompts per round")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per thread count")
    p.add_argument("--compile", action="store_true", help="also time --inference-compile inductor")
    add_results_args(p, HERE)
    return p


# Our eager step with the layers of decode steps on every torch thread instead of
# --inference-decode-threads (default 1): what that setting buys at 2 threads.
ALL_THREADS = "ours eager, layers on all threads"
TORCH_KERNELS = "ours eager, torch kernels only"  # --no-inference-rows-kernel


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def botchan_prompts(engine, n: int, length: int) -> list[list[int]]:
    from megatron.early_exit import assets

    path = os.path.join(assets.fetch("sentencepiece-models"), "botchan.txt")
    with open(path, encoding="utf-8", errors="ignore") as f:
        text = f.read()
    out = []
    for k in range(n):  # from different parts of the book (past the Gutenberg header)
        start = len(text) * (k + 1) // (n + 1)
        piece = text[start : start + 6 * length * 4]
        out.append(engine.tokenize(piece[piece.index("\n") + 1 :])[:length])
    return out


def median_ci(ratios: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median and a bootstrap 90% interval of the median."""
    rng = random.Random(seed)
    meds = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(reps)
    )  # fmt: skip
    return statistics.median(ratios), meds[int(0.05 * reps)], meds[int(0.95 * reps) - 1]


def layer_micro(
    engine, threads: int, context: int, all_layers: bool = False, reps: int = 30, inner: int = 20
) -> dict:
    """A layer's decode step (b = 1, one row, `context` cached keys) vs its four weight
    products alone (QKV, output, fc1, fc2 on one row), timed in alternation, in us per
    layer. One middle layer: its weights stay in cache between calls. `all_layers`: every
    layer in turn, as decoding runs them, so the weights stream from memory."""
    import torch

    from megatron.early_exit.inference.layers import lean_layer_forward, lean_plan, new_cache
    from megatron.early_exit.inference.projection import decode_threads, project
    from megatron.early_exit.inference.stage import StageState, make_chunk

    torch.set_num_threads(threads)
    model = engine.model
    st = StageState(model, 1, context + 8, engine.limits.vocab_size, [])
    layers = list(model.decoder.layers)
    if all_layers:
        inner = 2  # passes over every layer per timing
    else:
        layers = [layers[len(layers) // 2]]
    plans = [lean_plan(layer) for layer in layers]
    if any(p is None for p in plans):
        return {}
    caches = [new_cache(layer, 1, context + 8, st.dtype, st.device) for layer in layers]
    chunk = make_chunk([0], [context], [context], st.device)
    h = torch.randn(1, 1, model.config.hidden_size)

    def step():
        for plan, cache in zip(plans, caches):
            lean_layer_forward(plan, h, chunk, cache, st.freqs)

    def weights():  # through the kernels the step uses (projection.project)
        for plan in plans:
            w = plan.w
            project(h, w.qkv_w)
            project(h[..., : w.proj_w.shape[1]], w.proj_w)
            y = project(h, w.fc1_w)
            project(y[..., : w.fc2_w.shape[1]], w.fc2_w)

    res = {"step": [], "weights": []}
    with torch.no_grad(), decode_threads(1, st.device):  # as the engine runs a decode step
        step(), weights()
        for _ in range(reps):
            for name, fn in (("step", step), ("weights", weights)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                res[name].append((time.perf_counter() - t0) / inner / len(plans) * 1e6)
    ratios = [a / b for a, b in zip(res["step"], res["weights"])]
    med, lo, hi = median_ci(ratios)
    return dict(threads=threads, context=context, layers=len(plans),
                step_us=statistics.median(res["step"]),
                weights_us=statistics.median(res["weights"]), ratio=med, ratio_lo=lo,
                ratio_hi=hi)  # fmt: skip


def bandwidth_floor(engine, reqs, hf_ms_per_prompt: float, new_tokens: int) -> dict:
    """What batch-1 decoding cannot beat on this machine: every token reads the decoder's
    weights and the LM head once, so a token costs at least their bytes / memory bandwidth
    (timed as the median of 7 one-row products with a buffer of that size, the faster of
    torch's column-major read and projection.project, which takes the C rows kernel on one
    thread, at the current thread count). With our
    measured prefill (1 new token), the ceiling vs transformers is its time per prompt over
    prefill + new_tokens x floor."""
    import torch

    from megatron.early_exit.inference.projection import project

    model = engine.model
    params = list(model.decoder.parameters())
    head = (
        model.shared_embedding_or_output_weight()
        if model.share_embeddings_and_output_weights
        else model.output_layer.weight
    )
    nbytes = sum(p.numel() * p.element_size() for p in params) + head.numel() * head.element_size()
    hidden = model.config.hidden_size
    buf = torch.ones(nbytes // 4 // hidden, hidden)
    buf_t = buf.t().contiguous()  # column-major: torch's fastest 1-row read
    x = torch.ones(1, hidden)
    reads: dict[str, list[float]] = {"torch": [], "kernel": []}
    for _ in range(7):
        for name, read in (("torch", lambda: torch.matmul(x, buf_t)),
                           ("kernel", lambda: project(x, buf))):  # fmt: skip
            t0 = time.perf_counter()
            read()
            reads[name].append(time.perf_counter() - t0)
    floor_ms = 1000 * min(statistics.median(r) for r in reads.values())
    one = [_with_new_tokens(r, 1) for r in reqs]
    pre = []
    for _ in range(3):
        t0 = time.perf_counter()
        for r in one:
            engine.generate([r])
        pre.append((time.perf_counter() - t0) / len(one))
    prefill_ms = 1000 * statistics.median(pre)
    ceiling = hf_ms_per_prompt / (prefill_ms + new_tokens * floor_ms)
    gb_per_s = nbytes / 1e9 / (floor_ms / 1000)
    return dict(weight_mb=nbytes / 2**20, floor_ms=floor_ms, gb_per_s=gb_per_s,
                prefill_ms=prefill_ms, ceiling_vs_transformers=ceiling)  # fmt: skip


def _with_new_tokens(req, new_tokens: int):
    """A copy of `req` that generates `new_tokens` tokens."""
    import dataclasses

    sampling = dataclasses.replace(req.sampling, max_new_tokens=new_tokens)
    return dataclasses.replace(req, sampling=sampling)


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.early_exit.inference import layers, projection, rows_kernel
    from megatron.early_exit.inference.api import (
        EarlyExitParams,
        GenerationRequest,
        SamplingParams,
    )
    from megatron.early_exit.inference.loading import engine_from_args

    engine = engine_from_args(["--load", args.load])
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    prompts = botchan_prompts(engine, args.num_prompts, args.prompt_tokens)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    reqs = [GenerationRequest(p, sp, EarlyExitParams()) for p in prompts]
    n_tok = args.new_tokens * len(prompts)

    decode_threads = projection.get_decode_threads()

    def ours(mode, all_threads: bool = False, kernel: bool = True):
        def fn():
            layers.set_compile_mode(mode)
            projection.set_decode_threads(0 if all_threads else decode_threads)
            rows_kernel.set_rows_kernel(kernel)
            try:
                return [r.token_ids for p in reqs for r in engine.generate([p])]
            finally:
                layers.set_compile_mode("none")
                projection.set_decode_threads(decode_threads)
                rows_kernel.set_rows_kernel(True)

        return fn

    def transformers_generate():
        out = []
        with torch.no_grad():
            for p in prompts:
                ids = hf.generate(torch.tensor([p]), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
                out.append(ids[0, len(p) :].tolist())
        return out

    variants = {
        "ours eager": ours("none"),
        TORCH_KERNELS: ours("none", kernel=False),
        ALL_THREADS: ours("none", all_threads=True),
    }
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        ours("inductor")()  # the process's one compile (every later call reuses it)
        compile_s = time.perf_counter() - t0
        variants["ours compiled"] = ours("inductor")
    variants["transformers"] = transformers_generate
    variants["transformers (control)"] = transformers_generate
    meta = dict(load=args.load, hf_dir=args.hf_dir, new_tokens=args.new_tokens,
                prompt_tokens=args.prompt_tokens, num_prompts=len(prompts), rounds=args.rounds,
                compile_s=compile_s, uptime_before=uptime(), torch=torch.__version__,
                cpu_count=os.cpu_count())  # fmt: skip
    rows, micro, floors = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        names = [n for n in variants if threads > 1 or n != ALL_THREADS]  # same at 1 thread
        tokens = {name: variants[name]() for name in names}  # warm-up, and the tokens
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
        ref = tokens["transformers"]
        base = times["transformers"]
        for name in names:
            if name == "transformers":
                continue
            other = times["transformers (control)"] if name.startswith("ours") else base
            ratios = [b / a for a, b in zip(times[name], other)]  # speed of `name` over HF
            med, lo, hi = median_ci(ratios)
            same = sum(a == b for x, y in zip(tokens[name], ref) for a, b in zip(x, y))
            rows.append(dict(threads=threads, variant=name, ms_per_token=1000 * statistics.median(
                times[name]) / n_tok, speedup_vs_transformers=med, ci_lo=lo, ci_hi=hi,
                ratios=ratios, token_agreement=same / n_tok))  # fmt: skip
        rows.append(dict(threads=threads, variant="transformers",
                         ms_per_token=1000 * statistics.median(base) / n_tok))  # fmt: skip
        context = args.prompt_tokens + args.new_tokens // 2
        micro.append(layer_micro(engine, threads, context))
        micro.append(layer_micro(engine, threads, context, all_layers=True))
        hf_ms = 1000 * statistics.median(base) / len(prompts)
        floors.append(
            dict(threads=threads, **bandwidth_floor(engine, reqs, hf_ms, args.new_tokens))
        )
    meta["uptime_after"] = uptime()
    return dict(meta=meta, rows=rows, layer=micro, floor=floors)


def write_md(path: str, res: dict) -> None:
    m = res["meta"]
    lines = [
        "# Full-model decode speed vs transformers generate",
        "",
        f"`{m['load']}` vs `{m['hf_dir']}`, batch 1, greedy, {m['new_tokens']} new tokens, "
        f"{m['num_prompts']} botchan.txt prompts of {m['prompt_tokens']} tokens, "
        f"{m['rounds']} alternating rounds; torch {m['torch']}, {m['cpu_count']} CPUs.",
        f"Load: before `{m['uptime_before']}`; after `{m['uptime_after']}`.",
    ]
    if m.get("compile_s") is not None:
        lines.append(f"Compile (first decode of the process, once): {m['compile_s']:.0f} s.")
    lines += ["", "| threads | variant | ms/token | speed vs transformers (median, 90% CI) "
              "| token agreement |", "|---|---|---|---|---|"]  # fmt: skip
    for r in res["rows"]:
        if "speedup_vs_transformers" in r:
            sp = (f"{r['speedup_vs_transformers']:.2f}x "
                  f"[{r['ci_lo']:.2f}, {r['ci_hi']:.2f}]")  # fmt: skip
            agree = f"{r['token_agreement']:.3f}"
        else:
            sp, agree = "1 (reference)", "-"
        lines.append(f"| {r['threads']} | {r['variant']} | {r['ms_per_token']:.1f} | {sp} "
                     f"| {agree} |")  # fmt: skip
    lines += ["", "## A layer's decode step vs its weight products alone", "",
              "Per layer. One layer: a middle layer called repeatedly (its weights stay in "
              "cache). All layers: every layer in turn, as decoding runs them (weights stream "
              "from memory). Both on --inference-decode-threads threads, as the engine runs "
              "a decode step's layers (at 2 torch threads too).", "",
              "| threads | layers | context | step us | weight products us | ratio (median, "
              "90% CI) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for x in res["layer"]:
        if x:
            which = "all " + str(x["layers"]) if x.get("layers", 1) > 1 else "one"
            lines.append(f"| {x['threads']} | {which} | {x['context']} | {x['step_us']:.0f} | "
                         f"{x['weights_us']:.0f} | {x['ratio']:.2f} [{x['ratio_lo']:.2f}, "
                         f"{x['ratio_hi']:.2f}] |")  # fmt: skip
    if res.get("floor"):
        lines += ["", "## The memory-bandwidth ceiling", "",
                  "Each token reads the decoder's weights and the LM head once: one row "
                  "times a buffer of their size (median of 7, the faster of torch's "
                  "column-major read and the C rows kernel) is the floor per token. "
                  "Ceiling = transformers' time per prompt / (our prefill + new tokens x floor).",
                  "", "| threads | weights MB | floor ms/token | GB/s | our prefill ms | "
                  "ceiling vs transformers |", "|---|---|---|---|---|---|"]  # fmt: skip
        for x in res["floor"]:
            lines.append(f"| {x['threads']} | {x['weight_mb']:.0f} | {x['floor_ms']:.1f} | "
                         f"{x['gb_per_s']:.1f} | {x['prefill_ms']:.0f} | "
                         f"{x['ceiling_vs_transformers']:.2f}x |")  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "ratios" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['variant']}\n{r['threads']} thr" for r in rows]
    ax.boxplot([r["ratios"] for r in rows], tick_labels=labels)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1.5, color="green", lw=0.8, ls="--", label="target 1.5x")
    ax.set(ylabel="speed / transformers (per round)", title="decode speed, batch 1")
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = build_parser().parse_args()
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    res = run(args)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "decode_speed")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_md(base + ".md", res)
    plot(base + ".png", res)
    with open(base + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
