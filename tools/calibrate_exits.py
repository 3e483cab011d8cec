"""Per-exit thresholds from a quality target (token agreement with the full model).

    python tools/calibrate_exits.py --load CKPT --prompts-file outputs/prompts/fortunes-cal.jsonl \
        --targets 0.95 0.99 [--metric max_prob] [--num-prompts 16] [--new-tokens 32] \
        [--test-fraction 0.5] [--tolerance 0.02] [--margin 0] [--save-to DIR | --dry-run]

One process (TP = PP = 1). The full model greedily continues each prompt; one
teacher-forced pass then gives, at every generated position, each exit's confidence
(`--metric`) and whether its top-1 token equals the full model's. The prompts are split
(seeded, by prompt) into a calibration part, where thresholds are chosen, and a held-out
test part, where the agreement they reach is reported and checked against
target - tolerance. Method: megatron/early_exit/inference/calibration.py (CALM,
arXiv 2207.07061, is the anchor; this is its empirical version with the held-out check).

Writes exit_calibration.json into the checkpoint's latest iteration folder (next to
ee_args.json; --save-to another folder, --dry-run nowhere); entries for other
(metric, target) pairs stay. Requests then give `target_agreement` instead of
`threshold` (tools/generate.py --target-agreement, /api and /v1/completions).
Use prompts from the calibration split of the texts (tools/make_prompts.py --list).
Errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# metric -> confidence(model, layer, exit_state, positions) -> [n] at those positions, for
# metrics that are not a function of the exit's logits (sampling.confidence computes those).
CONFIDENCE: dict[str, Callable] = {
    "learned": lambda model, layer, state, positions: model.exit_confidence(layer, state)[
        positions, 0
    ],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint with exits (ee_args.json)")
    p.add_argument("--prompts-file", required=True, help="JSONL (tools/make_prompts.py)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.99])
    p.add_argument("--metric", default="max_prob")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="the test split must reach target - tolerance")  # fmt: skip
    p.add_argument("--margin", type=float, default=0.0,
                   help="calibrate for target + margin (safety)")  # fmt: skip
    p.add_argument("--min-coverage", type=float, default=0.05,
                   help="turn off exits firing for less than this share of tokens (their "
                   "head costs more than they save)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the calibration/test split")
    p.add_argument("--save-to", default=None, help="folder for exit_calibration.json")
    p.add_argument("--dry-run", action="store_true", help="report only, write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def check_args(args) -> None:
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference.api import METRICS

    for t in args.targets:
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"--targets: {t} is not in (0, 1]")
    if args.metric not in (*METRICS, *CONFIDENCE):
        raise ConfigError(f"--metric {args.metric!r}: known {sorted({*METRICS, *CONFIDENCE})}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    for name in ("num_prompts", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_prompts < 2:
        raise ConfigError("--num-prompts must be >= 2 (a calibration and a test part)")
    if not all(0.0 <= x < 1.0 for x in (args.tolerance, args.margin, args.min_coverage)):
        raise ConfigError("--tolerance, --margin and --min-coverage must be in [0, 1)")


def collect(engine, prompts: list[list[int]], new_tokens: int, metric: str) -> list[dict]:
    """Per prompt: {exit: (confidences, matches)} at its generated positions."""
    import torch

    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams
    from megatron.early_exit.inference.sampling import confidence

    model = engine.model
    exits = list(engine.limits.exit_layers)
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    results = engine.generate([GenerationRequest(p, sp, EarlyExitParams()) for p in prompts])
    conf_fn = CONFIDENCE.get(metric)
    V = engine.limits.vocab_size
    out = []
    with torch.no_grad():
        for prompt, res in zip(prompts, results):
            seq = prompt + res.token_ids
            tokens = torch.tensor([seq[:-1]])
            fwd = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
            gen = slice(len(prompt) - 1, len(seq) - 1)
            full = torch.tensor(res.token_ids)
            sample = {}
            for e in exits:
                state = fwd.exit_states[e]
                logits = model.exit_logits(e, state)[gen, 0].float()[:, :V]
                if conf_fn is not None:
                    conf = conf_fn(model, e, state, gen)
                else:
                    conf = confidence(logits, metric)
                match = logits.argmax(-1) == full
                sample[e] = (conf.float().tolist(), match.tolist())
            out.append(sample)
    return out


def run(args) -> dict:
    from megatron.early_exit.data.text_prompts import read_prompts_file
    from megatron.early_exit.inference.calibration import calibrate, calibration_path

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from exit_agreement import _setup_single_process

    texts = read_prompts_file(args.prompts_file, args.prompt_field)[: args.num_prompts]
    if len(texts) < 2:
        from megatron.early_exit.errors import ConfigError

        raise ConfigError(f"--prompts-file {args.prompts_file}: needs >= 2 prompts")
    target_file = None
    if not args.dry_run:
        folder = args.save_to or os.path.dirname(calibration_path(args.load) or "")
        if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            from megatron.early_exit.errors import ConfigError

            raise ConfigError(
                f"cannot write exit_calibration.json into {folder or args.load!r} (read-only "
                "or missing): copy the checkpoint, or pass --save-to DIR / --dry-run"
            )
        target_file = os.path.join(folder, "exit_calibration.json")
    _setup_single_process()
    from megatron.early_exit.inference.loading import engine_from_args

    engine = engine_from_args(["--load", args.load])
    if not engine.limits.exit_layers:
        from megatron.early_exit.errors import ConfigError

        raise ConfigError(f"--load {args.load}: the checkpoint has no exits")
    if args.metric == "learned" and not engine.model.config.early_exit.exit_confidence_head:
        from megatron.early_exit.errors import ConfigError

        raise ConfigError(
            f"--metric learned: the exits of {args.load} have no confidence heads (add them "
            "with tools/checkpoint/add_exits.py --exit-confidence-head and tune them)"
        )
    prompts = [engine.tokenize(t)[: args.prompt_tokens] for t in texts]
    samples = collect(engine, prompts, args.new_tokens, args.metric)
    entries, sizes = calibrate(
        samples,
        args.targets,
        args.test_fraction,
        args.seed,
        args.margin,
        args.tolerance,
        args.min_coverage,
    )
    rows_info = _corpus_info(args.prompts_file)
    for e in entries:
        e["metric"] = args.metric
        e["tolerance"] = args.tolerance
        e["margin"] = args.margin
        e["min_coverage"] = args.min_coverage
        e["split_sizes"] = {
            k: {**v, "tokens": e[k]["tokens"]} for k, v in sizes.items()
        }  # fmt: skip
    meta = {
        "method": "empirical per-exit thresholds, greedy deep-to-shallow on a calibration "
        "split, held-out test split (inference/calibration.py; CALM arXiv 2207.07061)",
        "texts": rows_info,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "test_fraction": args.test_fraction,
    }
    if target_file:
        from megatron.early_exit.inference.calibration import write_calibration

        write_calibration(target_file, meta, entries)
    return {"file": target_file, **meta, "entries": entries}


def _corpus_info(path: str) -> dict:
    corpora = set()
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                corpora.add(f"{row.get('corpus', '?')} ({row.get('split', '?')})")
    return {"prompts_file": os.path.abspath(path), "corpora": sorted(corpora)}


def report(res: dict) -> str:
    lines = [f"exit calibration ({res['entries'][0]['metric'] if res['entries'] else '-'}) on "
             f"{res['texts']['corpora']}: {res['prompts']} prompts"]  # fmt: skip
    for e in res["entries"]:
        th = ", ".join(
            f"exit {k}: {'never' if v > 1 else f'{v:.3f}'}" for k, v in e["thresholds"].items()
        )
        c, t = e["calibration"], e["test"]
        lines.append(
            f"target {e['target']:.3f}: {th} | calibration agreement {c['agreement']:.3f} "
            f"(coverage {c['coverage']:.3f}, {c['tokens']} tokens) | test agreement "
            f"{t['agreement']:.3f} (coverage {t['coverage']:.3f}, {t['tokens']} tokens) | "
            f"test >= target - {e['tolerance']}: {e['test_meets_target']}"
        )
    lines.append(f"written: {res['file']}" if res["file"] else "written: nothing (--dry-run)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron.early_exit.assets import AssetError
    from megatron.early_exit.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        from megatron.early_exit.cli import quiet_startup

        quiet_startup()
        res = run(args)
    except (UserError, AssetError) as e:
        print(f"calibrate_exits.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
