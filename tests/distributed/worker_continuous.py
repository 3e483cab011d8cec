"""torchrun worker for test_continuous.py (no tests here): the server's continuous-batching
scheduler over the real rank protocol (Coordinator STEP commands, as server/launch.py runs
it) on a random tiny model.

    torchrun ... tests/distributed/worker_continuous.py OUT_PREFIX [model/layout flags...]

Rank 0 runs a ContinuousService: one request starts; at its second step three more are
submitted (one with two prompts, so it waits for a free slot; one with a stop sequence);
one of them is cancelled at step 5. Then every request runs alone (a GENERATE command).
Each rank writes OUT_PREFIX<rank>.json: per setting the finished slots its own steps
returned (every rank must return the same), and on rank 0 the served and alone results.
"""

import json
import sys

SETTINGS = {
    "none": {},
    "early_exit_kv": {"mode": "early_exit", "method": "kv_recompute", "threshold": 0.8},
}


def _req(prompt, n, ee, temperature=0.0, seed=0, stop=None):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    sp = SamplingParams(max_new_tokens=n, temperature=temperature, seed=seed, ignore_eos=True,
                        stop_sequences=stop or [])  # fmt: skip
    return GenerationRequest(list(prompt), sp, EarlyExitParams(**ee))


def _row(r):
    return [r.token_ids, r.exit_layers, r.finish_reason]


def _serve(engine, coord, listener, ee) -> dict:
    from megatron.early_exit.inference.continuous import batch_key
    from megatron.early_exit.server.coordinator import GENERATE, STEP, Command
    from megatron.early_exit.server.service import Cancelled, ContinuousService

    def run_batch(reqs, on_token=None, cancelled=None):
        return coord.run(Command(GENERATE, [r.to_dict() for r in reqs]))

    ref = run_batch([_req([3, 3], 6, ee)])[0].token_ids
    stop = engine.tokenizer.detokenize(ref[2:4])  # hit mid-generation
    jobs = {
        "a": [_req([5, 17, 42, 7, 99, 3], 10, ee)],
        "b": [_req([1, 2, 3, 4], 4, ee, temperature=0.8, seed=5)],
        "pair": [_req([9, 8, 7], 5, ee), _req([3, 3], 6, ee, stop=[stop])],
        "cancel": [_req([60, 61, 12], 12, ee)],
    }
    futures, steps = {}, []

    def run_step(plan, on_token=None):
        listener[0] = on_token
        try:
            out = coord.run(Command(STEP, [plan]))
        finally:
            listener[0] = None
        steps.append(len(plan["joins"]))
        if len(steps) == 2:
            for k in ("b", "pair", "cancel"):
                futures[k] = svc.submit_async(jobs[k])
        if len(steps) == 5:
            svc.cancel(futures["cancel"])
        return out

    svc = ContinuousService(run_batch, run_step, lambda r: batch_key(r, engine.limits),
                            max_batch_size=3).start()  # fmt: skip
    futures["a"] = svc.submit_async(jobs["a"])
    futures["a"].result(timeout=120)
    served = {k: [_row(r) for r in f.result(timeout=120)]
              for k, f in list(futures.items()) if k != "cancel"}  # fmt: skip
    try:
        futures["cancel"].result(timeout=120)
        cancelled = False
    except Cancelled:
        cancelled = True
    svc.stop()
    return {
        "served": served,
        "alone": {k: [_row(run_batch([r])[0]) for r in rs] for k, rs in jobs.items()},
        "cancelled": cancelled,
        "joins_per_step": steps,
    }


def main(out_prefix: str, argv: list[str]) -> None:
    import torch.distributed as dist

    from megatron.early_exit.inference.api import GenerationRequest
    from megatron.early_exit.inference.loading import engine_from_args
    from megatron.early_exit.server.coordinator import GENERATE, STEP, Coordinator

    engine = engine_from_args(argv)
    rank = dist.get_rank()
    listener: list = [None]
    finished: list = []  # this rank's step outputs

    def execute(command):
        if command.kind == STEP:
            out = engine.step(command.payload[0], on_token=listener[0])
            finished.extend([f.slot, f.error, f.result and _row(f.result)] for f in out)
            return out
        if command.kind == GENERATE:
            return engine.generate([GenerationRequest.from_dict(d) for d in command.payload])
        return None

    coord = Coordinator(execute, timeout_s=120)
    report = {"finished": finished}
    if rank != 0:
        coord.follow()
    else:
        for name, ee in SETTINGS.items():
            report[name] = _serve(engine, coord, listener, ee)
        coord.shutdown()
    with open(f"{out_prefix}{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
