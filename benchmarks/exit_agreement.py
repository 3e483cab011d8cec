"""How good are a checkpoint's exits for early exit and self-speculative decoding?

    python benchmarks/exit_agreement.py --load CKPT [--out DIR | --write-results] [--name NAME]
        [--prompts-file FILE.jsonl --prompt-field prompt]

One process. The full model greedily continues real text prompts (Shakespeare, or the
JSONL --prompts-file from tools/make_prompts.py: one corpus per run, results per corpus;
--write-results refuses to replace a committed NAME.json unless --overwrite); then one
teacher-forced pass over prompt + continuation gives, at every generated position, each
exit's top-1 token and confidence next to the full model's token (which is the token the
full model generated there). From these:

- per exit: top-1 agreement with the full model (= greedy draft acceptance probability of
  self-speculative decoding with that exit, one token at a time);
- per exit set, metric and threshold: coverage (share of tokens an exit fires for) and
  precision (share of those that match the full model), i.e. the token agreement of lossy
  early exit; metric max_prob, and `learned` when the exits have confidence heads (an exit
  that declines then costs only its estimator, not its vocabulary projection);
- the decode-cost model calibrated on this machine (inference/cost_model.py: measured
  per-call times of a layer and of the LM head at 1..8 rows, of each exit head, and the
  per-step overhead) turned into the best speedup each method could reach with these exits,
  ignoring KV catch-up. The calibration's predicted full decode step is printed next to the
  measured one; benchmarks/inference_early_exit.py compares predictions per configuration.

Writes NAME.{json,md,png} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron.early_exit.cli import add_results_args

HERE = os.path.dirname(os.path.abspath(__file__))

THRESHOLDS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint with exits (ee_args.json)")
    add_results_args(p, HERE)
    p.add_argument("--name", default="exit_agreement")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--target-agreement", type=float, default=0.95)
    p.add_argument("--draft-vocab-size", type=int, default=2048,
                   help="also: acceptance needed with a draft vocabulary this small")  # fmt: skip
    sys.path.insert(0, HERE)
    from inference_early_exit import add_prompt_args

    add_prompt_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="with --write-results: replace an existing committed result")  # fmt: skip
    return p


def _setup_single_process() -> None:
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def collect(args) -> dict:
    """Per generated position: full-model token, and each exit's top-1 and max probability."""
    import torch
    from inference_early_exit import load_prompts

    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams
    from megatron.early_exit.inference.cost_model import calibrate
    from megatron.early_exit.inference.loading import engine_from_args
    from megatron.early_exit.progress import progress

    _setup_single_process()
    engine = engine_from_args(["--load", args.load])
    model = engine.model
    exits = list(engine.limits.exit_layers)
    if not exits:
        raise SystemExit(f"error: {args.load} has no exits")
    prompts = load_prompts(engine, args)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    reqs = [GenerationRequest(p, sp, EarlyExitParams(mode="none")) for p in prompts]
    learned = bool(model.config.early_exit.exit_confidence_head)
    rows = {"full": [], **{str(e): [] for e in exits}, **{f"conf{e}": [] for e in exits}}
    if learned:
        rows.update({f"learned{e}": [] for e in exits})
    print(f"generating {len(reqs)} x {args.new_tokens} tokens with the full model",
          file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    t_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engine.generate([GenerationRequest(p, one, EarlyExitParams(mode="none")) for p in prompts])
    step_ms = (t_all - (time.perf_counter() - t0)) / max(1, args.new_tokens - 1) * 1e3
    with torch.no_grad():
        for prompt, res in progress(list(zip(prompts, results)), desc="teacher forcing",
                                    unit="prompt"):  # fmt: skip
            seq = prompt + res.token_ids
            tokens = torch.tensor([seq[:-1]])
            positions = torch.arange(tokens.shape[1]).unsqueeze(0)
            out = model(tokens, positions, None)
            gen = slice(len(prompt) - 1, len(seq) - 1)  # positions predicting generated tokens
            final = out.output[0, gen].float()  # [n, V]
            assert final.argmax(-1).tolist() == res.token_ids, "teacher forcing != generation"
            rows["full"] += res.token_ids
            for e in exits:
                logits = model.exit_logits(e, out.exit_states[e])[gen, 0].float()
                probs = torch.softmax(logits[:, : engine.limits.vocab_size], dim=-1)
                conf, top = probs.max(dim=-1)
                rows[str(e)] += top.tolist()
                rows[f"conf{e}"] += conf.tolist()
                if learned:
                    p = model.exit_confidence(e, out.exit_states[e])[gen, 0]
                    rows[f"learned{e}"] += p.tolist()
    print("calibrating the cost model", file=sys.stderr, flush=True)
    cm = calibrate(engine)
    check = {
        "batch": len(prompts),
        "measured_step_ms": step_ms,  # the batched generation above, prefill subtracted
        "predicted_step_ms": cm.full_step(len(prompts)),
    }
    return {"exits": exits, "rows": rows, "cost_model": cm.to_dict(), "L": model.config.num_layers,
            "step_check": check}  # fmt: skip


def analyse(data: dict, target: float, draft_vocab: int = 2048) -> dict:
    from megatron.early_exit.inference.cost_model import CostModel

    exits, rows = data["exits"], data["rows"]
    cm = CostModel.from_dict(data["cost_model"])
    full = rows["full"]
    n = len(full)
    unit = cm.layer(1)  # costs in layer steps (1 row)
    over = cm.step_overhead_ms / unit  # every decode step, whatever exit it leaves at
    head = {e: cm.exit_head(e) / unit for e in exits}
    final = cm.full_step(1) / unit
    match = {e: [a == b for a, b in zip(rows[str(e)], full)] for e in exits}
    agreement = {e: sum(m) / n for e, m in match.items()}

    early = []
    subsets = [[e] for e in exits] + ([exits] if len(exits) > 1 else [])
    metrics = {"max_prob": "conf"} | (
        {"learned": "learned"} if f"learned{exits[0]}" in rows else {}
    )
    for metric, key in metrics.items():
        learned = metric == "learned"  # a declining exit costs its estimator, not its head
        for subset in subsets:
            # a token's cost by where it leaves (the cost model's formula): every exit up
            # to that one is evaluated; leaving at L evaluates them all
            leave = {e: cm.early_exit_token(e, subset[: j + 1], learned) / unit
                     for j, e in enumerate(subset)}  # fmt: skip
            stay = cm.early_exit_token(cm.num_layers, subset, learned) / unit
            for thr in THRESHOLDS:
                cost = same = fired = 0.0
                for i in range(n):
                    for e in subset:
                        if rows[f"{key}{e}"][i] >= thr:
                            cost += leave[e]
                            same += match[e][i]
                            fired += 1
                            break
                    else:
                        cost += stay
                        same += 1
                early.append(
                    {
                        "metric": metric,
                        "exits": subset,
                        "threshold": thr,
                        "coverage": fired / n,
                        "agreement": same / n,
                        "speedup_ceiling": final * n / cost,
                    }
                )
    ok = [r for r in early if r["agreement"] >= target]
    best_early = max(ok, key=lambda r: r["speedup_ceiling"]) if ok else None

    # Self-speculative round with k drafts (speculative.py; CostModel.speculative_round): k
    # draft passes (layers 1..e and the exit head) and one verification pass, which feeds
    # the last draft through 1..e (plus an exit block's cache fill) and the k+1 pending
    # positions through e+1..L and the LM head, priced at k+1 rows by the measured curves.
    # Tokens per round with acceptance a: 1 + a + ... + a^k.
    def spec_cost(e: int, k: int, draft_vocab: int | None = None) -> float:
        return cm.speculative_round(e, k, draft_vocab) / unit

    spec = []
    for e in exits:
        a = agreement[e]
        for k in DRAFT_LENGTHS:
            tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
            spec.append(
                {
                    "exit": e,
                    "draft_length": k,
                    "acceptance": a,
                    "tokens_per_round": tokens,
                    "speedup_ceiling": tokens * final / spec_cost(e, k),
                }
            )
    best_spec = max(spec, key=lambda r: r["speedup_ceiling"])
    need: dict = {None: {}, draft_vocab: {}}
    for nv in need:  # acceptance each exit would need for 1.5x at its best draft length
        for e in exits:
            for a100 in range(1, 100):
                a = a100 / 100
                best = max(
                    (1 - a ** (k + 1)) / (1 - a) * final / spec_cost(e, k, nv)
                    for k in DRAFT_LENGTHS
                )
                if best >= 1.5:
                    need[nv][e] = a
                    break
    return {
        "step_check": data.get("step_check"),
        "tokens": n,
        "cost_units": {
            "layer": 1.0,
            "final_step": final,
            "exit_head": head,
            "exit_estimator": {e: v / unit for e, v in cm.exit_estimator_ms.items()},
            "step_overhead": over,
            "layer_ms": unit,
        },  # fmt: skip
        "cost_model": cm.to_dict(),
        "agreement": agreement,
        "early_exit": early,
        "best_early_exit_at_target": best_early,
        "self_speculative": spec,
        "best_self_speculative": best_spec,
        "acceptance_needed_for_1_5x": need[None],
        "draft_vocab_size": draft_vocab,
        "acceptance_needed_for_1_5x_draft_vocab": need[draft_vocab],
    }


def write_md(path: str, meta: dict, res: dict) -> None:
    u = res["cost_units"]
    lines = [
        f"# Exit agreement ({meta['load']})",
        "",
        f"{res['tokens']} greedy full-model tokens from {meta['num_prompts']} prompts of "
        f"corpus **{meta.get('corpus', 'shakespeare')}** (split: {meta.get('split', 'tune')}; "
        f"{meta.get('prompts_file') or 'Shakespeare, built-in'}); teacher-forced exit "
        "predictions at every generated position. Cost model "
        f"(measured on this machine, inference/cost_model.py), in units of one layer step "
        f"({u['layer_ms']:.3f} ms): an exit head = "
        + ", ".join(f"{v:.2f} (exit {e})" for e, v in u["exit_head"].items())
        + (
            "; a declining exit with metric learned = "
            + ", ".join(f"{v:.2f} (exit {e})" for e, v in u["exit_estimator"].items())
            if u.get("exit_estimator")
            else ""
        )
        + f"; a full step = {u['final_step']:.1f} (layers + LM head + step overhead "
        f"{u['step_overhead']:.1f}).",
        "",
        *_cost_lines(res),
        "",
        "| exit | agreement with full model | acceptance needed for 1.5x (self-speculative) "
        f"| the same with a {res['draft_vocab_size']}-token draft vocabulary |",
        "|---|---|---|---|",
    ]
    for e, a in res["agreement"].items():
        need = [
            res[key].get(e)
            for key in ("acceptance_needed_for_1_5x", "acceptance_needed_for_1_5x_draft_vocab")
        ]
        need = [x if x is not None else "> 0.99" for x in need]
        lines.append(f"| {e} | {a:.3f} | {need[0]} | {need[1]} |")
    lines += [
        "",
        "## Lossy early exit (kv_recompute, batch 1): agreement and speedup ceiling",
        "",
        "| metric | exits | threshold | coverage | agreement | speedup ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["early_exit"]:
        lines.append(
            f"| {r.get('metric', 'max_prob')} | {','.join(map(str, r['exits']))} "
            f"| {r['threshold']:.2f} | {r['coverage']:.3f} "
            f"| {r['agreement']:.3f} | {r['speedup_ceiling']:.2f}x |"
        )
    b = res["best_early_exit_at_target"]
    lines += [
        "",
        f"Best ceiling at >= {meta['target']:.0%} agreement: "
        + (
            f"{b['speedup_ceiling']:.2f}x (metric {b.get('metric', 'max_prob')}, exits "
            f"{b['exits']}, threshold {b['threshold']})"
            if b
            else "none reaches it"
        ),
        "",
        "## Self-speculative (lossless, batch 1): speedup ceiling",
        "",
        "| draft exit | draft length | acceptance | tokens/round | speedup ceiling |",
        "|---|---|---|---|---|",
    ]
    for r in res["self_speculative"]:
        lines.append(
            f"| {r['exit']} | {r['draft_length']} | {r['acceptance']:.3f} "
            f"| {r['tokens_per_round']:.2f} | {r['speedup_ceiling']:.2f}x |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _cost_lines(res: dict) -> list[str]:
    """The calibrated row curves, and the predicted vs measured batched decode step."""
    cm = res["cost_model"]
    lines = ["| rows | layer ms | its weight products ms | LM head ms |", "|---|---|---|---|"]
    for i, k in enumerate(cm["rows"]):
        lines.append(f"| {k} | {cm['layer_ms'][i]:.3f} | {cm['weights_ms'][i]:.3f} "
                     f"| {cm['head_ms'][i]:.2f} |")  # fmt: skip
    chk = res.get("step_check")
    if chk:
        lines += ["", f"Full decode step at batch {chk['batch']}: predicted "
                  f"{chk['predicted_step_ms']:.1f} ms, measured {chk['measured_step_ms']:.1f} ms "
                  f"({chk['predicted_step_ms'] / chk['measured_step_ms']:.2f}x)."]  # fmt: skip
    return lines


def plot(path: str, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by_set: dict[str, list] = {}
    for r in res["early_exit"]:
        name = ",".join(map(str, r["exits"]))
        if r.get("metric", "max_prob") != "max_prob":
            name += f" ({r['metric']})"
        by_set.setdefault(name, []).append(r)
    for name, rs in by_set.items():
        a.plot([r["coverage"] for r in rs], [r["agreement"] for r in rs], "o-", label=name)
    a.axhline(0.95, color="grey", ls=":")
    a.set_xlabel("share of tokens exiting early")
    a.set_ylabel("agreement with full model")
    a.set_title("lossy early exit (thresholds)")
    a.legend(title="exits")
    for e in res["agreement"]:
        rs = [r for r in res["self_speculative"] if str(r["exit"]) == str(e)]
        b.plot([r["draft_length"] for r in rs], [r["speedup_ceiling"] for r in rs], "o-",
               label=f"exit {e} (acc {res['agreement'][e]:.2f})")  # fmt: skip
    b.axhline(1.0, color="grey", ls=":")
    b.set_xlabel("draft length")
    b.set_ylabel("speedup ceiling (cost model)")
    b.set_title("self-speculative")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    sys.path.insert(0, HERE)
    from inference_early_exit import prompts_info, refuse_overwrite

    args = build_parser().parse_args()
    refuse_overwrite(args, HERE)
    if args.prompts_file:
        from megatron.early_exit.data.text_prompts import read_prompts_file
        from megatron.early_exit.errors import ConfigError

        try:
            read_prompts_file(args.prompts_file, args.prompt_field)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    data = collect(args)
    res = analyse(data, args.target_agreement, args.draft_vocab_size)
    for key in (
        "agreement",
        "acceptance_needed_for_1_5x",
        "acceptance_needed_for_1_5x_draft_vocab",
    ):
        res[key] = {str(k): v for k, v in res[key].items()}
    meta = {"load": args.load, "num_prompts": args.num_prompts, "target": args.target_agreement,
            "new_tokens": args.new_tokens, **prompts_info(args)}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, **res}, f, indent=1)
    write_md(base + ".md", meta, res)
    plot(base + ".png", res)
    with open(base + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
