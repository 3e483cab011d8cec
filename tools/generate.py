"""Generate text with early exit from a checkpoint, at any TP/PP. Launch with torchrun:

    torchrun --nproc-per-node 2 tools/generate.py --load CKPT \
        --pipeline-model-parallel-size 2 --prompt "ROMEO:" --max-new-tokens 64 \
        --mode early_exit --threshold 0.8

`--load` restores architecture and tokenizer from the checkpoint's ee_args.json; model
and parallelism flags are the training ones (pretrain_early_exit_gpt.py). Generation flags
are `inference.generate_config.GenerateConfig` (`--help-generate`). Rank 0 prints the
results and writes `--output-json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def generation_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.flags import add_flags
    from megatron.early_exit.inference.generate_config import GenerateConfig

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_flags(p, GenerateConfig)
    p.add_argument("--help-generate", action="help", help="show the generation flags and exit")
    return p


def parse_generate_config(argv) -> tuple:
    """(GenerateConfig, the remaining model/parallelism flags)."""
    from megatron.early_exit.flags import from_args
    from megatron.early_exit.inference.generate_config import GenerateConfig

    args, rest = generation_parser().parse_known_args(argv)
    return from_args(GenerateConfig, args), rest


def write_json_atomic(path: str, data) -> None:
    """Write to a temporary file next to `path`, then rename: never a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prompts(engine, texts: list[str], prompt_ids: list[list[int]], add_bos: bool):
    from megatron.early_exit.errors import ConfigError

    ids = [engine.tokenize(t) for t in texts] + prompt_ids
    if add_bos:
        bos = getattr(engine.tokenizer, "bos", None)
        if bos is None:
            raise ConfigError("--add-bos: the tokenizer defines no BOS token")
        ids = [[bos, *p] for p in ids]
    if not ids:
        raise ConfigError("no prompts: give --prompt, --prompt-ids or --prompts-file")
    return ids


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup, run_cli

    quiet_startup()
    from megatron.early_exit.arguments import build_parser, parse_args
    from megatron.early_exit.inference.loading import build_engine, inference_run_config
    from megatron.early_exit.platform import destroy_distributed, init_platform

    state = {}

    def check_inputs():  # every rank checks the same inputs: all exit together, before setup
        gen, rest = parse_generate_config(argv)
        gen.validate()
        state.update(gen=gen, rest=rest, texts=gen.prompt_texts(), ids=gen.prompt_token_ids())

    def load():
        platform = init_platform()
        margs = parse_args(state["rest"], build_parser())
        run = inference_run_config(None, platform.is_cuda, args=margs)
        state["engine"] = build_engine(run, platform)

    def generate():
        gen, engine = state["gen"], state["engine"]
        prompts = _prompts(engine, state["texts"], state["ids"], gen.add_bos)
        reqs = gen.requests(prompts)
        bs = gen.batch_size or len(reqs)
        results = []
        for k in range(0, len(reqs), bs):
            results += engine.generate(reqs[k : k + bs])
        state.update(prompts=prompts, results=results)

    try:
        for step in (check_inputs, load, generate):
            rc = run_cli(step)
            if rc:
                return rc
        _report(state)
    finally:
        destroy_distributed()
    return 0


def _report(state: dict) -> None:
    """Rank 0 prints every result and writes --output-json."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return
    out = []
    for p, r in zip(state["prompts"], state["results"]):
        d = r.to_dict()
        d["prompt_token_ids"] = p
        out.append(d)
        st = r.stats
        spec = ""
        if st.verify_passes:  # self_speculative
            spec = (
                f", drafted {st.drafted_tokens}, accepted {st.accepted_tokens} "
                f"(acceptance {st.acceptance_rate:.2f}, {st.verify_passes} verifications)"
            )
        print(
            f"--- prompt ({len(p)} tokens) -> {r.finish_reason}, {len(r.token_ids)} tokens, "
            f"avg layers {st.avg_layers_used:.2f}, {st.tokens_per_s:.1f} tok/s{spec}"
        )
        print(r.text if r.text is not None else r.token_ids)
    if state["gen"].output_json:
        write_json_atomic(state["gen"].output_json, out)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
