"""`make demo`'s own steps (examples/demo.sh), after the shared fetch/preprocess/pretrain ones.

    python tools/demo.py tokenizer --input 'TEXTS/*.txt' --vocab-size 2048 --output DIR
    torchrun --nproc-per-node 1 tools/demo.py generate --load CKPT --output-json PATH \
        --prompt "ROMEO:" --thresholds 0.9 0.5
    python tools/demo.py report --generation PATH --metrics metrics.jsonl --plots-dir DIR

`tokenizer`: a small byte-level BPE trained on the corpus. GPT-2's 50k-way softmax would
take most of a 2-core CPU's time (the LM head and each exit head pay it per token), leaving
too little for the layers to learn anything an early exit could differ from.

`generate`: loads the checkpoint once and decodes every prompt with the full model, early
exit at each threshold, and self-speculative decoding; writes tools/generate.py's
--output-json format (a list of results with `prompt_token_ids`), each entry with these
keys added: `run` (a label), `prompt` (text), `early_exit` (the request's parameters),
`num_layers`, and `token_texts` (the text each generated token adds).

`report`: prints each run's text with every token marked by the layer it left at (ANSI
colour on a terminal, `word[2]` otherwise), a table (tokens/s, average layers, agreement
with the full model, self-speculative acceptance) and writes the loss and exit-layer PNGs.
It needs neither torch nor the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

FULL = "full model"
SPEC = "self-speculative"
# Colours of exits by order (first exit, second, ...); tokens of the last layer stay plain.
_COLOURS = ("\033[1;32m", "\033[1;33m", "\033[1;35m", "\033[1;36m", "\033[1;34m")
_RESET = "\033[0m"


# ---- report (pure: a fabricated generation.json is enough to test it) ----------------------
def run_label(mode: str, threshold: float | None = None) -> str:
    if mode == "early_exit":
        return f"early exit @ {threshold:g}"
    return SPEC if mode == "self_speculative" else FULL


def mark_tokens(entry: dict, colour: bool) -> str:
    """The generated text with each token marked by its exit layer. Plain: `piece[k]` for a
    token that left at layer k < L; colour: the piece in its exit's colour."""
    last = entry["num_layers"]
    exits = sorted({k for k in entry["exit_layers"] if k < last})
    out = []
    for piece, layer in zip(entry["token_texts"], entry["exit_layers"]):
        body = piece.rstrip("\n")  # a mark goes before the line break, not on the next line
        brk = piece[len(body) :]
        if layer >= last:
            out.append(piece)
        elif colour:
            shown = body if body.strip() else body + "\u21b5"  # make a bare line break visible
            out.append(f"{_COLOURS[exits.index(layer) % len(_COLOURS)]}{shown}{_RESET}{brk}")
        else:
            out.append(f"{body}[{layer}]{brk}")
    return "".join(out)


def legend(exit_layers: list[int], num_layers: int, colour: bool) -> str:
    if not colour:
        return f"[k]: the token left at the exit after layer k; unmarked: all {num_layers} layers"
    parts = [
        f"{_COLOURS[i % len(_COLOURS)]}exit after layer {k}{_RESET}"
        for i, k in enumerate(sorted(exit_layers))
    ]
    return ", ".join(parts) + f", plain: all {num_layers} layers"


def summarize(entries: list[dict]) -> list[dict]:
    """One row per run, in first-seen order, over all prompts: tokens/s, average layers
    used, agreement (share of positions where the run's token equals the full model's for
    the same prompt) and acceptance (accepted / drafted, self-speculative only)."""
    full = {tuple(e["prompt_token_ids"]): e["token_ids"] for e in entries if e["run"] == FULL}
    rows: dict[str, dict] = {}
    for e in entries:
        r = rows.setdefault(
            e["run"],
            dict(run=e["run"], tokens=0, elapsed=0.0, layers=0, same=0, compared=0,
                 drafted=0, accepted=0, spec=e["early_exit"]["mode"] == "self_speculative"),
        )  # fmt: skip
        st = e["stats"]
        r["tokens"] += len(e["token_ids"])
        r["elapsed"] += st["elapsed_s"]
        r["layers"] += sum(e["exit_layers"])
        ref = full.get(tuple(e["prompt_token_ids"]))
        if ref is not None:
            r["compared"] += len(e["token_ids"])
            r["same"] += sum(a == b for a, b in zip(e["token_ids"], ref))
        r["drafted"] += st.get("drafted_tokens", 0)
        r["accepted"] += st.get("accepted_tokens", 0)
    out = []
    for r in rows.values():
        n = r["tokens"]
        out.append(
            dict(
                run=r["run"],
                tokens=n,
                tokens_per_s=n / r["elapsed"] if r["elapsed"] > 0 else 0.0,
                avg_layers=r["layers"] / n if n else 0.0,
                agreement=r["same"] / r["compared"] if r["compared"] else None,
                acceptance=r["accepted"] / r["drafted"] if r["spec"] and r["drafted"] else None,
            )
        )
    return out


def format_table(rows: list[dict], num_layers: int) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [f"{'run':22}{'tokens/s':>10}{'avg layers':>13}{'agreement':>11}{'acceptance':>12}"]
    for r in rows:
        lines.append(
            f"{r['run']:22}{r['tokens_per_s']:10.1f}{r['avg_layers']:8.2f} / {num_layers:<2}"
            f"{pct(r['agreement']):>11}{pct(r['acceptance']):>12}"
        )
    return "\n".join(lines)


def exit_histogram(entries: list[dict]) -> dict[str, dict[int, int]]:
    """run -> {exit layer: tokens} for the early-exit runs."""
    hist: dict[str, dict[int, int]] = {}
    for e in entries:
        if e["early_exit"]["mode"] == "early_exit":
            h = hist.setdefault(e["run"], {})
            for k in e["exit_layers"]:
                h[k] = h.get(k, 0) + 1
    return hist


def write_plots(entries: list[dict], metrics: list[dict], plots_dir: Path) -> list[Path]:
    """demo_losses.png (train and validation loss of the LM and every exit) and
    demo_exit_layers.png (tokens per exit layer at each threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=72)
    num_layers = entries[0]["num_layers"] if entries else None
    for split, style in (("train", "-"), ("valid", "o--")):
        recs = [m for m in metrics if m.get("split") == split]
        if not recs:
            continue
        its = [m["iteration"] for m in recs]
        ax.plot(its, [m["lm_loss"] for m in recs], style, color="C0", markersize=4,
                label=f"LM (layer {num_layers or 'L'}), {split}")  # fmt: skip
        for i, k in enumerate(sorted(recs[0].get("exit_losses", {}), key=int), 1):
            ys = [m["exit_losses"][k] for m in recs]
            label = f"exit after layer {k}, {split}"
            ax.plot(its, ys, style, color=f"C{i}", label=label, markersize=4)
            # the gap to the LM, on its own scale: the whole point of an exit's curve
            gap.plot(its, [y - m["lm_loss"] for y, m in zip(ys, recs)], style, color=f"C{i}",
                     label=label, markersize=4)  # fmt: skip
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Early-exit GPT on Shakespeare: loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    gap.axhline(0.0, color="C0", linewidth=1)
    gap.set_xlabel("iteration")
    gap.set_ylabel("exit loss - LM loss")
    gap.set_title("How much each exit trails the LM")
    gap.legend(fontsize=7)
    gap.grid(alpha=0.3)
    fig.tight_layout()
    written.append(plots_dir / "demo_losses.png")
    fig.savefig(written[-1])
    plt.close(fig)

    hist = exit_histogram(entries)
    if hist:
        layers = sorted({k for h in hist.values() for k in h})
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=72)
        width = 0.8 / len(hist)
        for i, (run, h) in enumerate(hist.items()):
            total = sum(h.values())
            xs = [j + (i - (len(hist) - 1) / 2) * width for j in range(len(layers))]
            ax.bar(xs, [h.get(k, 0) / total for k in layers], width, label=run, color=f"C{i}")
        names = [f"{k} (all)" if k == num_layers else str(k) for k in layers]
        ax.set_xticks(range(len(layers)), names)
        ax.set_xlabel("layer the token left at")
        ax.set_ylabel("share of generated tokens")
        ax.set_title("Where tokens exit, per confidence threshold")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(plots_dir / "demo_exit_layers.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def report(entries: list[dict], colour: bool, out=None) -> None:
    """Print the marked texts per prompt, then the table."""
    out = out or sys.stdout
    if not entries:
        print("no generations", file=out)
        return
    num_layers = entries[0]["num_layers"]
    exits = sorted({k for e in entries for k in e["exit_layers"] if k < num_layers})
    print(legend(exits, num_layers, colour), file=out)
    prompts: dict[tuple, list[dict]] = {}
    for e in entries:
        prompts.setdefault(tuple(e["prompt_token_ids"]), []).append(e)
    for n, group in enumerate(prompts.values(), 1):
        prompt = group[0]["prompt"]
        print(f"\n>>> prompt {n}: {prompt!r}", file=out)
        shown = f"\033[2m{prompt}{_RESET}" if colour else prompt  # the prompt dimmed
        for e in group:
            print(f"--- {e['run']}", file=out)
            print(shown + mark_tokens(e, colour), file=out)
    print("", file=out)
    print(format_table(summarize(entries), num_layers), file=out)


def _report_main(args) -> int:
    from megatron.early_exit.errors import UserError

    try:
        entries = json.loads(Path(args.generation).read_text())
        metrics = [json.loads(x) for x in Path(args.metrics).read_text().splitlines() if x]
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the demo's outputs: {exc}") from None
    colour = {"always": True, "never": False}.get(args.colour, sys.stdout.isatty())
    report(entries, colour)
    for path in write_plots(entries, metrics, Path(args.plots_dir)):
        print(f"wrote {path}")
    return 0


# ---- tokenizer ---------------------------------------------------------------------------
def _tokenizer_main(args) -> int:
    import glob

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron.early_exit.errors import UserError

    files = sorted(glob.glob(args.input))
    if not files:
        raise UserError(f"--input {args.input!r}: no files match")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<|endoftext|>"],  # the EOD HuggingFaceTokenizer looks for
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    print(f"tokenizer: {tok.get_vocab_size()}-token BPE from {len(files)} files in {out}")
    return 0


# ---- generate (one process; launched by torchrun) ------------------------------------------
def _token_texts(engine, ids: list[int]) -> list[str]:
    """The text each token adds (decoding prefixes keeps multi-byte characters whole)."""
    texts, prev = [], ""
    for n in range(1, len(ids) + 1):
        cur = engine.detokenize(ids[:n])
        texts.append(
            cur[len(prev) :] if cur.startswith(prev) else engine.detokenize(ids[n - 1 : n])
        )
        prev = cur
    return texts


def _generate_main(args, model_argv: list[str]) -> int:
    from megatron.early_exit.arguments import build_parser, parse_args
    from megatron.early_exit.cli import run_cli
    from megatron.early_exit.inference.api import (
        EarlyExitParams,
        GenerationRequest,
        SamplingParams,
    )
    from megatron.early_exit.inference.loading import build_engine, inference_run_config
    from megatron.early_exit.platform import destroy_distributed, init_platform

    state: dict = {}

    def load():
        platform = init_platform()
        margs = parse_args(["--load", args.load, *model_argv], build_parser())
        run = inference_run_config(None, platform.is_cuda, args=margs)
        state["engine"] = build_engine(run, platform)

    def generate():
        engine = state["engine"]
        exits = list(engine.limits.exit_layers)
        modes = [EarlyExitParams(mode="none")]
        modes += [EarlyExitParams(mode="early_exit", threshold=t) for t in args.thresholds]
        modes.append(
            EarlyExitParams(
                mode="self_speculative",
                draft_exit_layer=args.draft_exit_layer or exits[0],
                draft_length=args.draft_length,
            )
        )
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        out = []
        for text in args.prompt:
            ids = engine.tokenize(text)
            for ee in modes:  # one request per call: tokens/s is then this run's own
                (res,) = engine.generate([GenerationRequest(ids, sampling, ee)])
                res.text = engine.detokenize(res.token_ids)
                d = res.to_dict()
                d.update(
                    prompt_token_ids=ids,
                    run=run_label(ee.mode, ee.threshold),
                    prompt=text,
                    early_exit=asdict(ee),
                    num_layers=engine.num_layers,
                    token_texts=_token_texts(engine, res.token_ids),
                )
                out.append(d)
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)
        print(f"wrote {len(out)} generations to {path}")

    try:
        for step in (load, generate):
            rc = run_cli(step)
            if rc:
                return rc
    finally:
        destroy_distributed()
    return 0


def build_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenizer", help="train a small byte-level BPE on the corpus")
    t.add_argument("--input", required=True, help="glob of text files")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--output", required=True, help="directory for tokenizer.json")
    g = sub.add_parser("generate", help="every decoding mode on a few prompts (torchrun)")
    g.add_argument("--load", required=True, help="checkpoint directory")
    g.add_argument("--output-json", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeatable")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.5])
    g.add_argument("--draft-exit-layer", type=int, default=None, help="default: the first exit")
    g.add_argument("--draft-length", type=int, default=4)
    r = sub.add_parser("report", help="marked text, table and PNGs from `generate`'s JSON")
    r.add_argument("--generation", required=True, help="generate's --output-json")
    r.add_argument("--metrics", required=True, help="the training run's --metrics-file")
    r.add_argument("--plots-dir", required=True)
    r.add_argument("--colour", choices=("auto", "always", "never"), default="auto")
    return p


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()
    args, rest = build_argparser().parse_known_args(argv)
    if args.command == "generate":  # the rest are model flags (e.g. parallel sizes)
        return _generate_main(args, rest)
    if rest:
        print(f"error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    if args.command == "tokenizer":
        if args.vocab_size < 257:
            print("error: --vocab-size must be >= 257 (256 bytes + EOD)", file=sys.stderr)
            return 2
        return run_cli(lambda: _tokenizer_main(args))
    return run_cli(lambda: _report_main(args))


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
