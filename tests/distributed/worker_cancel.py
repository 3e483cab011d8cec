"""torchrun worker for test_cancel.py (no tests here): cancel one request of a batch mid-
generation on a multi-rank engine (random tiny model, no checkpoint).

    torchrun ... tests/distributed/worker_cancel.py OUT_PREFIX [model/layout flags...]

For each decode setting it runs three requests with request 1 cancelled (rank 0's hook turns
True once rank 0 streamed CANCEL_AFTER of its tokens; the other ranks pass no hook, as the
server's followers do), then requests 0 and 2 alone. Each rank writes OUT_PREFIX<rank>.json:
per setting the results and, for the cancelled request, the deepest position this rank fed
through its layers (every `StageState.chunk` call is recorded).
"""

import json
import sys

PROMPTS = [[5, 17, 42, 7, 99, 3], [1, 2, 3, 4], [60, 61, 12, 13, 40, 41, 42, 8]]
MAX_NEW, CANCEL_AFTER = 14, 3
SETTINGS = {
    "none": {},
    "early_exit_kv": {"mode": "early_exit", "method": "kv_recompute", "threshold": 0.8},
    "early_exit_pipeline": {"mode": "early_exit", "method": "pipeline", "threshold": 0.8},
    "self_speculative": {"mode": "self_speculative", "draft_length": 3},
}


def _requests(ee: dict, which: list[int]):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    out = []
    for k in which:  # request 2 samples with a seed: per-sequence sampling state stays put
        sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
        if k == 2:
            sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, temperature=0.8, seed=5)
        out.append(GenerationRequest(PROMPTS[k], sampling=sp, early_exit=EarlyExitParams(**ee)))
    return out


def _hook(seen: list):
    """Request 1 is cancelled once CANCEL_AFTER of its tokens were streamed."""
    return lambda i: i == 1 and sum(ev.index == 1 for ev in seen) >= CANCEL_AFTER


def main(out_prefix: str, argv: list[str]) -> None:
    import torch.distributed as dist

    from megatron.early_exit.inference import stage
    from megatron.early_exit.inference.loading import engine_from_args

    engine = engine_from_args(argv)
    rank = dist.get_rank()
    fed: list[int] = []  # positions of request 1 fed through this rank's layers
    chunk = stage.StageState.chunk

    def recording(self, seqs, starts, ends):
        fed.extend(e for s, e in zip(seqs, ends) if s == 1)
        return chunk(self, seqs, starts, ends)

    stage.StageState.chunk = recording
    report = {}
    for name, ee in SETTINGS.items():
        if ee.get("method") == "pipeline" and engine.limits.pipeline_parallel_size == 1:
            continue
        seen: list = []  # rank 0's token events
        fed.clear()
        got = engine.generate(
            _requests(ee, [0, 1, 2]),
            on_token=seen.append if rank == 0 else None,
            cancelled=_hook(seen) if rank == 0 else None,
            cancel_sync=True,
        )
        fed_max = max(fed, default=-1)
        alone = engine.generate(_requests(ee, [0, 2]))
        report[name] = {
            "batch": [[r.token_ids, r.exit_layers, r.finish_reason] for r in got],
            "alone": [[r.token_ids, r.exit_layers, r.finish_reason] for r in alone],
            "fed_max": fed_max,
            "prompt_len": len(PROMPTS[1]),
        }
    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    main(sys.argv[1], sys.argv[2:])
