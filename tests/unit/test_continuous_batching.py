"""Continuous batching (inference/continuous.py, server/service.py): requests join and leave
the running batch at decode-step granularity and each gets exactly what it gets alone.

One process, a tiny random model (tests/unit/test_inference.py's); the multi-rank protocol
is tested in tests/distributed/test_continuous.py.
"""

from __future__ import annotations

import pytest

from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams
from tests.single_process import tp1pp1_world
from tests.unit.test_inference import _engine

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine():
    gen = tp1pp1_world(seed=7)
    next(gen)
    yield _engine(llama=True)  # RoPE, GQA, exit blocks: every cache kind
    next(gen, None)


def _req(prompt, n, temperature=0.0, seed=0, stop=None, stop_ids=None, **ee):
    sp = SamplingParams(
        max_new_tokens=n,
        temperature=temperature,
        seed=seed,
        ignore_eos=True,
        logprobs=True,
        stop_sequences=stop or [],
        stop_token_ids=stop_ids or [],
    )
    return GenerationRequest(list(prompt), sp, EarlyExitParams(**ee))


def _alone(engine, req):
    return engine.generate([req])[0]


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.exit_layers == b.exit_layers
    assert a.finish_reason == b.finish_reason
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)  # float32: padded rows


@pytest.mark.parametrize("ee", [{}, {"mode": "early_exit", "threshold": 0.6}], ids=["none", "ee"])
def test_join_leave_cancel_matches_alone(engine, ee, monkeypatch):
    from megatron.early_exit.inference import continuous
    from megatron.early_exit.inference.continuous import StepPlan

    if ee:  # joining prompts prefilled in a pass of their own (short ones share the step's)
        monkeypatch.setattr(continuous, "MERGE_PREFILL_TOKENS", 0)

    base = _req([5, 17, 42, 7, 9, 3], 12, **ee)
    ref = _alone(engine, base)
    stop = engine.detokenize(ref.token_ids[3:5])  # a stop string hit mid-generation
    reqs = {
        "long": base,
        "short": _req([1, 2, 3], 4, **ee),
        "sampled": _req([60, 61, 12, 13, 40, 41, 42, 8, 9, 90], 9, temperature=0.9, seed=5, **ee),
        "stop": _req([5, 17, 42, 7, 9, 3], 12, stop=[stop], **ee),
        "cancel": _req([8, 8, 1], 12, **ee),
        "empty": _req([4], 0, **ee),
    }
    alone = {k: _alone(engine, r) for k, r in reqs.items()}
    assert alone["stop"].finish_reason == "stop"
    # step -> requests that join then; "cancel" leaves at step 6; "empty" reuses a freed slot
    schedule = {0: ["long"], 2: ["short", "sampled"], 3: ["cancel"], 4: ["stop"], 7: ["empty"]}
    slots, got, events, step = {}, {}, {}, 0
    free = [0, 1, 2, 3, 4]
    while step == 0 or slots:
        joins = []
        for name in schedule.get(step, []):
            slot = free.pop(0)
            slots[slot] = name
            joins.append((slot, reqs[name].to_dict()))
        leaves = [s for s, n in slots.items() if n == "cancel" and step == 6]
        plan = StepPlan(slots=5, joins=joins, leaves=leaves).to_dict()  # as broadcast

        def on_token(ev):
            events.setdefault(slots[ev.index], []).append(ev.token_id)

        for fin in engine.step(plan, on_token):
            assert fin.error is None
            got[slots.pop(fin.slot)] = fin.result
            free.append(fin.slot)
        step += 1
        assert step < 40
    assert set(got) == set(reqs)
    assert engine._continuous.st.hbuf.shape[1] == 36  # the caches grew as longer prompts joined
    for name in reqs:
        if name != "cancel":
            _same(got[name], alone[name])
            assert events.get(name, []) == alone[name].token_ids
    if ee:  # the batch really exits early, at several layers
        layers = {x for r in got.values() for x in r.exit_layers}
        assert min(layers) < 4 and 4 in layers
    c = got["cancel"]
    assert c.finish_reason == "cancelled" and len(c.token_ids) == 6 - 3
    assert c.token_ids == alone["cancel"].token_ids[:3]


def test_bad_join_is_answered_alone(engine):
    from megatron.early_exit.inference.continuous import StepPlan

    good = _req([1, 2, 3], 3)
    bad = _req([1, 2, 3], 3)
    bad.sampling.top_p = 0.0
    other = _req([1, 2, 3], 3, mode="early_exit", threshold=0.5)  # a different batch key
    plan = StepPlan(4, joins=[(0, good.to_dict()), (1, bad.to_dict()), (2, other.to_dict())])
    out = {f.slot: f for f in engine.step(plan.to_dict())}
    assert "top_p must be in (0, 1]" in out[1].error
    assert "differ from the running batch" in out[2].error
    while 0 not in out:
        out.update({f.slot: f for f in engine.step(StepPlan(4).to_dict())})
    _same(out[0].result, _alone(engine, good))


def test_service_joins_mid_generation(engine):
    """The server's scheduler: jobs submitted while others run join at the next step, a
    two-prompt job takes slots as they free up, a cancelled job leaves mid-batch, a
    self_speculative job falls back to queue batching; all results equal alone."""
    from megatron.early_exit.inference.continuous import batch_key
    from megatron.early_exit.server.service import Cancelled, ContinuousService

    a = _req([5, 17, 42, 7, 9, 3], 10)
    stop = engine.detokenize(_alone(engine, _req([3, 3], 6)).token_ids[2:4])
    reqs = {
        "a": [a],
        "b": [_req([1, 2, 3], 3, temperature=0.8, seed=11)],
        "pair": [_req([9, 8, 7], 5), _req([3, 3], 6, stop=[stop])],
        "cancel": [_req([8, 8, 1], 12)],
        "spec": [_req([1, 2, 3], 5, mode="self_speculative")],
    }
    alone = {k: [_alone(engine, r) for r in rs] for k, rs in reqs.items()}
    futures, sizes, streamed = {}, [], {}
    svc = None

    def submit(name):
        def on_token(ev, name=name):
            streamed.setdefault((name, ev.index), []).append(ev.token_id)

        futures[name] = svc.submit_async(reqs[name], on_token)

    def run_step(plan, on_token=None):
        step = len(sizes)
        sizes.append(sum(1 for _ in plan["joins"]))
        out = engine.step(plan, on_token)
        if step == 1:  # while "a" is mid-generation
            submit("b")
            submit("pair")
            submit("cancel")
            submit("spec")
        if step == 4:
            svc.cancel(futures["cancel"])
        return out

    svc = ContinuousService(
        engine.generate, run_step, lambda r: batch_key(r, engine.limits), max_batch_size=3
    ).start()
    try:
        submit("a")
        futures["a"].result(timeout=120)  # the others were submitted at its second step
        got = {k: f.result(timeout=120) for k, f in list(futures.items()) if k != "cancel"}
        with pytest.raises(Cancelled):
            futures["cancel"].result(timeout=60)
    finally:
        svc.stop()
    for name, results in got.items():
        for i, (r, ref) in enumerate(zip(results, alone[name])):
            _same(r, ref)
            assert streamed[(name, i)] == ref.token_ids
    assert got["pair"][1].finish_reason == "stop"
    assert sizes[0] == 1 and sizes[2] == 2  # "a" alone, then "b" and the pair's first prompt
    assert svc.running_size == 0 and svc.queue_depth == 0
