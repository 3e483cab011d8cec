"""Early-exit inference: speed and agreement vs the full model, both methods, batch 1 and 8.

    python benchmarks/inference_early_exit.py --load CKPT [--hf-dir HF] [--out DIR]
        [--write-results] [--prompts-file FILE.jsonl --prompt-field prompt] [--rounds N]

Two launches of this file under torchrun (`--worker`): PP=1 (full model, kv_recompute,
self-speculative, and `transformers` generate on the same weights if --hf-dir is given)
and PP=2 (full model, kv_recompute, pipeline). Prompts: `--num-prompts` real text snippets
(Shakespeare by default; `--prompts-file` takes a JSONL file from tools/make_prompts.py,
one corpus per run: results per corpus), greedy, `--new-tokens` tokens each (EOS ignored,
so every configuration generates the same number of tokens).

Timing (honest on a shared machine): `--rounds` rounds; in each, every variant runs right
after a run of the full model (F V1 F V2 ... Vn F), and its ratio for the round is the mean
of the two neighbouring full-model times over its own time. A variant's speedup is the
median of its per-round ratios, with a distribution-free confidence interval for the
median (order statistics, its exact coverage stated). A "full (control)" row times the full
model against itself the same way: its spread is the noise floor of the run.

Writes NAME.{json,md,png} to --out (default outputs/benchmarks; --write-results: the
committed benchmarks/results/, refused when NAME.json exists there unless --overwrite).
The PNG plots speedup against token agreement for every method and threshold, Pareto front
marked.
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
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds (each variant alternates with the full model)")  # fmt: skip
    p.add_argument("--repeats", dest="rounds", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 and --num-prompts)")  # fmt: skip
    p.add_argument("--target-agreements", type=float, nargs="+", default=[],
                   help="also run lossy early exit with the checkpoint's calibrated thresholds "
                   "for these targets (tools/calibrate_exits.py)")  # fmt: skip
    p.add_argument("--metric", default="max_prob", help="exit confidence metric")
    add_prompt_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="with --write-results: replace an existing committed result")  # fmt: skip
    p.add_argument("--transformers-only", action="store_true",
                   help="only full-model decoding vs transformers (--hf-dir)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)
    return p


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts-file", default=None,
                   help="JSONL prompts (tools/make_prompts.py); default: Shakespeare")  # fmt: skip
    p.add_argument("--prompt-field", default="prompt", help="the JSONL field with the text")


def prompts_info(args) -> dict:
    """Which texts the prompts came from (for the results' meta)."""
    if not args.prompts_file:
        return {"prompts_file": None, "corpus": "shakespeare", "split": "tune"}
    import json as _json

    corpora, splits = set(), set()
    with open(args.prompts_file) as f:
        for line in f:
            if line.strip():
                row = _json.loads(line)
                corpora.add(str(row.get("corpus", "?")))
                splits.add(str(row.get("split", "?")))
    return {"prompts_file": args.prompts_file, "prompt_field": args.prompt_field,
            "corpus": ",".join(sorted(corpora)), "split": ",".join(sorted(splits))}  # fmt: skip


def load_prompts(engine, args) -> list[list[int]]:
    """`--num-prompts` token prompts of at most `--prompt-tokens`: from --prompts-file's
    --prompt-field, else Shakespeare."""
    if not args.prompts_file:
        return shakespeare_prompts(engine, args.num_prompts, args.prompt_tokens)
    from megatron.early_exit.data.text_prompts import read_prompts_file

    texts = read_prompts_file(args.prompts_file, args.prompt_field)[: args.num_prompts]
    return [engine.tokenize(t)[: args.prompt_tokens] for t in texts]


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


def _run(engine, reqs, batch: int):
    t0 = time.perf_counter()
    res = []
    for k in range(0, len(reqs), batch):
        res += engine.generate(reqs[k : k + batch])
    return res, time.perf_counter() - t0


def median_ci(xs: list[float], level: float = 0.95) -> dict:
    """Median and a distribution-free confidence interval for it: order statistics
    x_(k), x_(n+1-k) with the largest k whose coverage 1 - 2 P(Bin(n, 1/2) < k) >= level
    (k = 1, min..max, when n is too small for `level`; its coverage is reported)."""
    import statistics
    from math import comb

    xs = sorted(xs)
    n = len(xs)
    med = statistics.median(xs)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return {"median": med, "lo": xs[k - 1], "hi": xs[n - k], "coverage": coverage(k), "n": n}


def timed_in_alternation(run_full, variants: list, rounds: int, on_step=None) -> list[dict]:
    """variants: (key, run) pairs; run() -> (results, seconds). Per round: F V1 F V2 ... Vn F;
    ratio of Vi = mean(F before, F after) / Vi. Returns per variant the results of its first
    round, its per-round ratios and seconds."""
    out = [{"key": key, "ratios": [], "seconds": [], "results": None} for key, _ in variants]
    for _ in range(rounds):
        _, t_prev = run_full()
        for slot, (_, run) in zip(out, variants):
            res, t = run()
            _, t_next = run_full()
            slot["ratios"].append((t_prev + t_next) / 2 / t)
            slot["seconds"].append(t)
            if slot["results"] is None:
                slot["results"] = res
            t_prev = t_next
            if on_step:
                on_step()
    return out


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


def _predict_early_exit(cm, got, exits: list[int], L: int, learned: bool = False) -> float | None:
    """tokens/s the cost model predicts for batch-1 lossy early exit with these exit layers:
    each token runs layers 1..e and the exit heads up to e (all of them when it reaches
    the LM head; with metric `learned` a declining exit costs only its estimator); the
    token after an early exit catches up: its predecessor's skipped layers up to e run on
    2 rows (kv_recompute.py). Prefill is not counted."""
    if cm is None:
        return None
    ms = n = 0
    for r in got:
        prev = L
        for e in r.exit_layers:
            heads = [x for x in exits if x <= e and x < L]
            ms += cm.early_exit_token(e, heads, learned)
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

    pp = int(os.environ.get("WORLD_SIZE", "1"))
    engine = engine_from_args(["--load", args.load, "--pipeline-model-parallel-size", str(pp)])
    L = engine.limits.num_layers
    ctx = engine.limits.max_sequence_length
    if args.prompt_tokens + args.new_tokens > ctx:  # small models (e.g. the demo: 64)
        args.new_tokens = min(args.new_tokens, ctx - 16)
        args.prompt_tokens = ctx - args.new_tokens
    prompts = load_prompts(engine, args)
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
        args.thresholds, args.draft_exits, args.target_agreements = [], [], []
        batches = [1]
    else:
        batches = args.batches or sorted({1, len(prompts)})
    draft_layers = args.draft_exits
    if draft_layers is None:
        draft_layers = engine.limits.exit_layers
    drafts = [(k, nv, dl) for k in draft_layers
              for nv in args.draft_vocab_sizes for dl in args.draft_lengths]  # fmt: skip
    full_ee = EarlyExitParams()
    for batch in batches:
        # (row fields, params): the control first, then lossy early exit, then drafts
        variants = [({"method": "full (control)", "threshold": None}, full_ee)]
        for method in methods:
            for thr in args.thresholds:
                variants.append(({"method": method, "threshold": thr, "metric": args.metric},
                                 EarlyExitParams(mode="early_exit", method=method,
                                                 metric=args.metric, threshold=thr,
                                                 exit_layers=args.exit_layers)))  # fmt: skip
            for target in args.target_agreements:
                variants.append(({"method": method, "threshold": None, "metric": args.metric,
                                  "target_agreement": target},
                                 EarlyExitParams(mode="early_exit", method=method,
                                                 metric=args.metric,
                                                 target_agreement=target)))  # fmt: skip
        if pp == 1 and batch == 1:
            for k, nv, dl in drafts:
                variants.append(({"method": "self_speculative", "threshold": None,
                                  "draft_exit_layer": k, "draft_length": dl,
                                  "draft_vocab_size": nv or None},
                                 EarlyExitParams(mode="self_speculative", draft_exit_layer=k,
                                                 draft_length=dl,
                                                 draft_vocab_size=nv or None)))  # fmt: skip
        bar = progress(total=args.rounds * len(variants), unit="run", enabled=dist.get_rank() == 0,
                       desc=f"inference benchmark PP={pp} batch={batch}")  # fmt: skip
        full, t_full = _run(engine, reqs(full_ee), batch)
        n_tok = sum(len(r.token_ids) for r in full)
        timed = timed_in_alternation(
            lambda b=batch: _run(engine, reqs(full_ee), b),
            [(i, lambda ee=ee, b=batch: _run(engine, reqs(ee), b))
             for i, (_, ee) in enumerate(variants)],
            args.rounds,
            on_step=bar.update,
        )  # fmt: skip
        bar.close()
        for (fields, _), t in zip(variants, timed):
            got = t["results"]
            n = sum(len(r.token_ids) for r in got)
            exits = [e for r in got for e in r.exit_layers]
            match, prefix = _agreement(full, got)
            ci = median_ci(t["ratios"])
            row = dict(pp=pp, batch=batch, **fields, tokens_per_s=n / min(t["seconds"]),
                       speedup=ci["median"], speedup_lo=ci["lo"], speedup_hi=ci["hi"],
                       ci_coverage=ci["coverage"], ratios=t["ratios"],
                       full_tokens_per_s=n_tok / t_full,
                       avg_exit_layer=sum(exits) / len(exits), match=match,
                       prefix=prefix)  # fmt: skip
            method = fields["method"]
            if method == "full (control)":
                row["predicted_tokens_per_s"] = (
                    None if cm is None else batch / cm.full_step(batch) * 1e3
                )
            elif method == "kv_recompute" and batch == 1:
                row["predicted_tokens_per_s"] = _predict_early_exit(
                    cm, got, ee_exits, L, learned=fields.get("metric") == "learned"
                )
            elif method == "self_speculative":
                row["predicted_tokens_per_s"] = _predict_speculative(
                    cm, got, fields["draft_exit_layer"], fields["draft_vocab_size"]
                )
            if fields["method"] == "self_speculative":
                acc = sum(r.stats.accepted_tokens for r in got)
                dr = sum(r.stats.drafted_tokens for r in got)
                row["acceptance_rate"] = acc / dr if dr else 0.0
                row["lossless"] = all(a.token_ids == b.token_ids for a, b in zip(full, got))
            rows.append(row)
        if pp == 1 and batch == 1 and args.hf_dir and dist.get_rank() == 0:

            def time_ours():
                return _run(engine, reqs(full_ee), 1)[1]

            rows.append(_hf_compare(args, prompts, full, time_ours))
    if dist.get_rank() == 0:
        meta = dict(num_layers=L, exits=list(engine.limits.exit_layers), load=args.load,
                    early_exit_layers=args.exit_layers or list(engine.limits.exit_layers),
                    new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                    prompts=len(prompts), rounds=args.rounds, metric=args.metric,
                    calibration=_calibration_meta(args.load),
                    threads=torch.get_num_threads(), **prompts_info(args))  # fmt: skip
        with open(args.raw, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f)


def _calibration_meta(load: str) -> dict | None:
    """The checkpoint's exit_calibration.json (tools/calibrate_exits.py), without thresholds."""
    from megatron.early_exit.inference.calibration import find_calibration

    cal = find_calibration(load)
    if cal is None:
        return None
    out = {k: v for k, v in cal.items() if k != "entries"}
    out["targets"] = [
        {"metric": e["metric"], "target": e["target"],
         "thresholds": {str(k): (None if t > 1 else t) for k, t in e["thresholds"].items()},
         "test_agreement": e.get("test", {}).get("agreement")}
        for e in cal.get("entries", [])
    ]  # fmt: skip
    return out


def _hf_compare(args, prompts, full, time_ours) -> dict:
    """transformers generate (greedy, KV cache, batch 1) on the same weights, same process,
    timed in alternation with our full-model decoding (`time_ours()` -> seconds) so that
    both see the same machine load; the ratio is the median over the pairs."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    pairs = []
    for _ in range(max(args.rounds, 3)):
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


def refuse_overwrite(args, benchmarks_dir: str) -> None:
    """--write-results never replaces a committed result unless --overwrite says so."""
    committed = os.path.join(benchmarks_dir, "results")
    target = os.path.join(args.out, args.name + ".json")
    if (os.path.abspath(args.out) == os.path.abspath(committed) and os.path.exists(target)
            and not getattr(args, "overwrite", False)):  # fmt: skip
        raise SystemExit(
            f"error: {target} is a committed result; pick a new --name or pass --overwrite"
        )


def launch(args) -> None:
    refuse_overwrite(args, HERE)
    if args.prompts_file:  # fail here, in one line, not in every worker
        from megatron.early_exit.data.text_prompts import read_prompts_file
        from megatron.early_exit.errors import ConfigError

        try:
            read_prompts_file(args.prompts_file, args.prompt_field)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
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
    meta["load_average"] = os.getloadavg()
    meta["cpus"] = os.cpu_count()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_md(base + ".md", meta, rows)
    plot(base + ".png", rows, meta)
    with open(base + ".md") as f:
        print(f.read())


def _pred(r) -> str:
    p = r.get("predicted_tokens_per_s")
    return "-" if p is None else f"{p:.1f} ({p / r['tokens_per_s']:.2f}x)"


def _label(r: dict) -> str:
    if r["method"] == "self_speculative":
        nv = r.get("draft_vocab_size") or "full"
        return f"spec exit {r['draft_exit_layer']} k={r['draft_length']} vocab {nv}"
    if r.get("target_agreement") is not None:
        return f"{r['method']} target {r['target_agreement']:.2f}"
    if r["threshold"] is None:
        return r["method"]
    return f"{r['method']} thr {r['threshold']:.2f}"


def texts_line(meta: dict) -> str:
    """Which texts were used for what (the issue asks every results file to say so)."""
    cal = meta.get("calibration")
    if cal:
        texts = cal.get("texts") or {}
        targets = ", ".join(
            f"{t['metric']} {t['target']:g} -> thresholds {t['thresholds']} (held-out "
            f"agreement {t['test_agreement']:.3f})" if t.get("test_agreement") is not None
            else f"{t['metric']} {t['target']:g}" for t in cal.get("targets", [])
        )  # fmt: skip
        cal_txt = f"calibrated on {texts.get('corpora', texts)}: {targets}"
    else:
        cal_txt = "calibration: none in the checkpoint"
    src = meta.get("prompts_file") or "Shakespeare (built-in)"
    return (
        f"Texts: measured on corpus **{meta.get('corpus')}** (split: {meta.get('split')}; "
        f"{src}); {cal_txt}. The exits' tuning texts are the checkpoint's (see its "
        "tuning log); the text split is in megatron/early_exit/data/text_prompts.py."
    )


def write_md(path, meta, rows) -> None:
    load = meta.get("load_average")
    lines = [
        f"# Early-exit inference ({meta.get('load')})",
        "",
        f"{meta.get('num_layers')} layers, exits {meta.get('exits')} (lossy early exit uses "
        f"{meta.get('early_exit_layers', meta.get('exits'))}), {meta.get('prompts')} "
        f"prompts of <= {meta.get('prompt_tokens')} tokens, {meta.get('new_tokens')} new "
        f"tokens each, greedy, CPU ({meta.get('threads')} threads/process"
        + (f"; load average {load[0]:.1f} on {meta.get('cpus')} CPUs at the end" if load else "")
        + ").",
        "",
        texts_line(meta),
        "",
        f"Speedup: median over {meta.get('rounds')} rounds of (mean time of the two full-model "
        "runs around the variant) / (the variant's time), same PP and batch, same process; "
        "[lo, hi]: distribution-free confidence interval of the median (coverage in the "
        "last column). The `full (control)` row is the full model timed against itself: "
        "its spread is this run's noise. match = position-wise agreement with the full "
        "model's tokens; prefix = share of tokens before the first difference.",
        "",
        "predicted = tokens/s the measured cost model (inference/cost_model.py, PP=1, "
        "prefill not counted) gives for the run's exit layers / drafts (ratio to measured).",
        "",
        "| PP | batch | method | threshold / target | tokens/s | predicted tokens/s | speedup "
        "| CI | coverage | avg exit layer | match | prefix |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] in ("full (control)", "kv_recompute", "pipeline"):
            if r.get("target_agreement") is not None:
                thr = f"target {r['target_agreement']:.2f}"
            else:
                thr = "-" if r["threshold"] is None else f"{r['threshold']:.2f}"
            lines.append(
                f"| {r['pp']} | {r['batch']} | {r['method']} | {thr} | {r['tokens_per_s']:.1f} | "
                f"{_pred(r)} | {r['speedup']:.2f}x | "
                f"[{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}] | "
                f"{r['ci_coverage']:.2f} | {r['avg_exit_layer']:.2f} | {r['match']:.3f} | "
                f"{r['prefix']:.3f} |"
            )
    spec = [r for r in rows if r["method"] == "self_speculative"]
    if spec:
        lines += ["", "## Self-speculative (lossless), PP=1, batch 1", "",
                  "| draft exit | draft vocabulary | draft length | tokens/s | predicted tokens/s "
                  "| speedup | CI | acceptance | lossless |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in spec:
            lines.append(
                f"| {r['draft_exit_layer']} | {r.get('draft_vocab_size') or 'full'} "
                f"| {r['draft_length']} | {r['tokens_per_s']:.1f} | {_pred(r)} "
                f"| {r['speedup']:.2f}x "
                f"| [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}] "
                f"| {r['acceptance_rate']:.2f} | {r['lossless']} |"
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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both agreement (x) and speedup (y),
    sorted by agreement."""
    front = [
        i for i, (x, y) in enumerate(points)
        if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]  # fmt: skip
    return sorted(front, key=lambda i: points[i])


def plot(path, rows, meta=None) -> None:
    """Speedup vs token agreement: every (PP, batch) panel, every method and threshold, the
    confidence interval as error bars, the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["method"] != "transformers"]
    panels = sorted({(r["pp"], r["batch"]) for r in timed})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5),
                             squeeze=False)  # fmt: skip
    markers = {"full (control)": "s", "kv_recompute": "o", "pipeline": "^",
               "self_speculative": "D"}  # fmt: skip
    for ax, (pp, batch) in zip(axes[0], panels):
        sel = [r for r in timed if (r["pp"], r["batch"]) == (pp, batch)]
        for method in sorted({r["method"] for r in sel}):
            rs = [r for r in sel if r["method"] == method]
            ax.errorbar([r["match"] for r in rs], [r["speedup"] for r in rs],
                        yerr=[[r["speedup"] - r["speedup_lo"] for r in rs],
                              [r["speedup_hi"] - r["speedup"] for r in rs]],
                        fmt=markers.get(method, "o"), capsize=3, label=method)  # fmt: skip
            for r in rs:
                ax.annotate(_label(r).split(" ", 1)[-1], (r["match"], r["speedup"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        pts = [(r["match"], r["speedup"]) for r in sel]
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1,
                label="Pareto front")  # fmt: skip
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axvline(0.95, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="token agreement with the full model", ylabel="speedup (median, CI)",
               title=f"PP={pp}, batch {batch}")  # fmt: skip
        ax.legend(fontsize=7)
    if meta:
        fig.suptitle(f"corpus {meta.get('corpus')} ({meta.get('split')})", fontsize=9)
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
