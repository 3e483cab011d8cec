"""Early-exit inference engine in one process (TP1PP1, gloo world of one).

Random tiny models with large-std weights so that tokens and exit confidences vary.
"""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, MAXLEN = 96, 48


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _engine(llama: bool):
    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.data.tokenizers import NullTokenizer
    from megatron.early_exit.inference.engine import InferenceEngine
    from megatron.early_exit.model import build_model

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length = MAXLEN
    pos = "learned_absolute"
    if llama:  # RoPE, GQA, RMSNorm, SwiGLU, full exit heads with an exit block
        m = run.model
        m.normalization, m.swiglu, m.disable_bias_linear = "RMSNorm", True, True
        m.group_query_attention, m.num_query_groups = True, 2
        m.position_embedding_type = pos = "rope"
        run.exits = ExitConfig(
            exit_layer_nums=[1, 2, 3], use_exit_block=True, use_exit_mlp=True, use_exit_norm=True
        )
    else:
        run.exits = ExitConfig(exit_layer_nums=[1, 2, 3])
    run.validate()
    torch.manual_seed(0)
    model = build_model(build_transformer_config(run), VOCAB, MAXLEN, True, pos).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return InferenceEngine(model, VOCAB, MAXLEN, tokenizer=NullTokenizer(VOCAB))


@pytest.fixture(scope="module", params=[False, True], ids=["gpt", "llama"])
def engine(dist_world, request):
    return _engine(request.param)


def _req(prompt, n=10, **ee):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    return GenerationRequest(
        list(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), EarlyExitParams(**ee)
    )


PROMPTS = [[5, 17, 42, 7, 9, 3], [1, 2, 3], [60, 61, 12, 13, 40, 41, 42, 8, 9, 90]]


def _plain_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None).output
            ids.append(int(out[0, -1, :VOCAB].argmax()))
    return ids[len(prompt) :]


def test_full_model_matches_plain_loop(engine):
    ref = [_plain_greedy(engine.model, p, 10) for p in PROMPTS]
    none = engine.generate([_req(p) for p in PROMPTS])
    thr1 = engine.generate([_req(p, mode="early_exit", threshold=1.0) for p in PROMPTS])
    for r, a, b in zip(ref, none, thr1):
        assert a.token_ids == r and b.token_ids == r
        assert a.exit_layers == [4] * 10 and b.exit_layers == [4] * 10


def _mixed_threshold(engine):
    """A threshold at which exits at several layers fire, including the full model."""
    for thr in (0.5, 0.6, 0.95, 0.4, 0.97, 0.9, 0.99, 0.3):
        res = engine.generate([_req(PROMPTS[0], 16, mode="early_exit", threshold=thr)])[0]
        if len(set(res.exit_layers)) >= 2 and 4 in res.exit_layers and min(res.exit_layers) < 4:
            return thr
    pytest.fail("no threshold gives mixed exits")


@pytest.mark.parametrize("llama", [False, True], ids=["gpt", "llama"])
def test_kv_after_recompute_equals_full_forward(dist_world, llama):
    # float64, so that <= 1e-5 measures the algorithm, not float32 summation order
    engine = _engine(llama)
    engine.model.double()
    thr = _mixed_threshold(engine)
    res = engine.generate([_req(PROMPTS[0], 16, mode="early_exit", threshold=thr)])[0]
    st = engine.last_state
    lens = [int(n) for n in res.exit_layers]
    assert min(lens) < 4
    caches = [(c.k.clone(), c.v.clone()) for c in st.caches]
    ex = {n: (c.k.clone(), c.v.clone()) for n, c in st.exit_caches.items()}
    # full forward (prefill) over the same tokens, with every exit block evaluated
    seq = PROMPTS[0] + res.token_ids[:-1]
    full = _full_prefill(engine, seq)
    # positions with KV in every layer after early-exit decoding: recomputed ones included
    n_pos = len(seq)
    exited_positions = [len(PROMPTS[0]) + j for j, e in enumerate(lens[:-1]) if e < 4]
    assert exited_positions, "test needs tokens that exited early"
    for layer, (k, v) in enumerate(caches):
        # a token that exited is in the deep cache once a later token went deeper
        upto = n_pos if layer == 0 else None
        fk, fv = full.caches[layer].k, full.caches[layer].v
        m = upto or _filled(k)
        assert m >= min(exited_positions) + 1 or layer == 0
        torch.testing.assert_close(k[0, :m], fk[0, :m], atol=1e-5, rtol=0)
        torch.testing.assert_close(v[0, :m], fv[0, :m], atol=1e-5, rtol=0)
    for n, (k, _v) in ex.items():
        m = _filled(k)
        torch.testing.assert_close(k[0, :m], full.exit_caches[n].k[0, :m], atol=1e-5, rtol=0)


def _full_prefill(engine, seq):
    """One full-model pass over `seq` that also runs every exit head (none fires)."""
    from megatron.early_exit.inference.api import EarlyExitParams
    from megatron.early_exit.inference.decode_state import SeqState
    from megatron.early_exit.inference.kv_recompute import KVRecompute
    from megatron.early_exit.inference.stage import StageState

    ee = EarlyExitParams(mode="early_exit", method="kv_recompute", threshold=2.0)
    st = StageState(engine.model, 1, MAXLEN, VOCAB, [1, 2, 3])
    with torch.no_grad():
        engine.decoder(KVRecompute)._kv_step(st, [SeqState(_req(seq, 1), list(seq), 4, None)], ee)
    return st


def _filled(k):
    nz = (k[0].abs().sum(dim=(1, 2)) != 0).nonzero()
    return int(nz.max()) + 1 if len(nz) else 0


def test_batched_equals_per_sequence(engine):
    thr = _mixed_threshold(engine)
    for ee in ({}, {"mode": "early_exit", "threshold": thr}):
        batched = engine.generate([_req(p, 12, **ee) for p in PROMPTS])
        for p, b in zip(PROMPTS, batched):
            single = engine.generate([_req(p, 12, **ee)])[0]
            assert b.token_ids == single.token_ids
            assert b.exit_layers == single.exit_layers


def test_sampling_is_seeded_and_batch_independent(engine):
    from megatron.early_exit.inference.api import GenerationRequest, SamplingParams

    def req(p, seed):
        sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=seed)
        return GenerationRequest(list(p), sp)

    a = engine.generate([req(PROMPTS[0], 1), req(PROMPTS[1], 2)])
    b = engine.generate([req(PROMPTS[0], 1)])[0]
    c = engine.generate([req(PROMPTS[0], 5)])[0]
    assert a[0].token_ids == b.token_ids
    assert a[0].token_ids != c.token_ids


def test_stops(engine):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    thr = _mixed_threshold(engine)
    for ee in (EarlyExitParams(), EarlyExitParams(mode="early_exit", threshold=thr)):
        free = engine.generate(
            [GenerationRequest(PROMPTS[0], SamplingParams(12, ignore_eos=True), ee)]
        )
        toks = free[0].token_ids
        eos = toks[4]
        r = engine.generate(
            [GenerationRequest(PROMPTS[0], SamplingParams(12, eos_token_id=eos), ee)]
        )[0]
        assert r.finish_reason == "eos" and r.token_ids == toks[: toks.index(eos) + 1]
        sp = SamplingParams(12, ignore_eos=True, stop_token_ids=[toks[2:4]])
        r = engine.generate([GenerationRequest(PROMPTS[0], sp, ee)])[0]
        assert r.finish_reason == "stop" and r.token_ids[-2:] == toks[2:4]
        stop = f"{toks[5]} {toks[6]}"
        sp = SamplingParams(12, ignore_eos=True, stop_sequences=[stop])
        r = engine.generate([GenerationRequest(PROMPTS[0], sp, ee)])[0]
        assert r.finish_reason == "stop" and stop in engine.detokenize(r.token_ids)
        assert len(r.token_ids) <= 7


@pytest.mark.parametrize(
    "change, match",
    [
        ({"prompt_token_ids": []}, "prompt is empty"),
        ({"prompt_token_ids": list(range(MAXLEN))}, "exceeds the model's context"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"threshold": -0.1}, "threshold must be in"),
        ({"exit_layers": [4]}, "exit layer 4 does not exist"),
        ({"top_k": -2}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"method": "pipeline"}, "needs pipeline parallelism"),
        ({"prompt_token_ids": [VOCAB]}, "not an id"),
        ({"top_logprobs": 21}, "top_logprobs must be"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be"),
    ],
)
def test_bad_input(engine, change, match):
    from megatron.early_exit.inference.api import InferenceError

    req = _req(PROMPTS[0], 4, mode="early_exit", threshold=0.5)
    for k, v in change.items():
        for obj in (req, req.sampling, req.early_exit):
            if hasattr(obj, k):
                setattr(obj, k, v)
                break
    with pytest.raises(InferenceError, match=match):
        engine.generate([req])


def test_target_agreement_uses_the_calibrated_per_exit_thresholds(dist_world):
    """target_agreement looks the per-exit thresholds up in the checkpoint's calibration:
    exit 1 at 0.3 and the others never firing equals threshold 0.3 on exit 1 alone; a
    target with no calibration is refused naming the field."""
    from megatron.early_exit.inference.api import InferenceError
    from megatron.early_exit.inference.calibration import NEVER

    eng = _engine(False)
    eng.calibration = {"entries": [
        {"metric": "max_prob", "target": 0.9, "thresholds": {1: 0.3, 2: NEVER, 3: NEVER}},
        {"metric": "max_prob", "target": 0.99, "thresholds": {1: NEVER, 2: NEVER, 3: NEVER}},
    ]}  # fmt: skip
    assert eng.limits.calibrations == (("max_prob", 0.9), ("max_prob", 0.99))
    cal = eng.generate([_req(p, mode="early_exit", target_agreement=0.9) for p in PROMPTS])
    ref = eng.generate([_req(p, mode="early_exit", threshold=0.3, exit_layers=[1])
                        for p in PROMPTS])  # fmt: skip
    assert [r.token_ids for r in cal] == [r.token_ids for r in ref]
    assert [r.exit_layers for r in cal] == [r.exit_layers for r in ref]
    assert any(layer == 1 for r in cal for layer in r.exit_layers)
    never = eng.generate([_req(p, mode="early_exit", target_agreement=0.99) for p in PROMPTS])
    full = eng.generate([_req(p) for p in PROMPTS])
    assert [r.token_ids for r in never] == [r.token_ids for r in full]
    for ee, match in (
        ({"target_agreement": 0.95}, "early_exit.target_agreement 0.95: the checkpoint has no "
         "calibration for metric 'max_prob'"),
        ({"target_agreement": 0.9, "metric": "entropy"}, "no calibration for metric 'entropy'"),
        ({"target_agreement": 1.5}, "target_agreement must be a number in"),
        ({"target_agreement": True}, "target_agreement must be a number in"),
        ({"target_agreement": 0.9, "exit_layers": [1]}, "target_agreement picks its own exits"),
        ({"target_agreement": 0.9, "mode": "self_speculative"}, "target_agreement needs mode"),
    ):  # fmt: skip
        with pytest.raises(InferenceError, match=match):
            eng.generate([_req(PROMPTS[0], 2, **{"mode": "early_exit", **ee})])


def test_confidence_metrics_in_unit_interval():
    from megatron.early_exit.inference.sampling import confidence

    logits = torch.randn(5, 50) * 4
    logits[0] = 0.0  # uniform
    for metric in ("max_prob", "margin", "entropy"):
        c = confidence(logits, metric)
        assert ((c >= 0) & (c <= 1)).all()
    assert float(confidence(logits[:1], "entropy")[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(confidence(logits[:1], "margin")[0]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- self-speculative (issue 7)
@pytest.mark.parametrize("draft_layer", [1, 2, 3])
def test_self_speculative_greedy_is_lossless(engine, draft_layer):
    ref = engine.generate([_req(p, 14) for p in PROMPTS])
    for draft_length in (1, 3, 5):
        spec = engine.generate(
            [
                _req(p, 14, mode="self_speculative", draft_exit_layer=draft_layer,
                     draft_length=draft_length)
                for p in PROMPTS
            ]
        )  # fmt: skip
        for a, b in zip(ref, spec):
            assert b.token_ids == a.token_ids, (draft_layer, draft_length)
            assert b.stats.verify_passes >= 1
            assert 0.0 <= b.stats.acceptance_rate <= 1.0


def test_self_speculative_stops(engine):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    toks = engine.generate([_req(PROMPTS[0], 12)])[0].token_ids
    ee = EarlyExitParams(mode="self_speculative", draft_exit_layer=2, draft_length=4)
    r = engine.generate(
        [GenerationRequest(PROMPTS[0], SamplingParams(12, eos_token_id=toks[5]), ee)]
    )
    assert r[0].finish_reason == "eos" and r[0].token_ids == toks[: toks.index(toks[5]) + 1]
    sp = SamplingParams(12, ignore_eos=True, stop_sequences=[f"{toks[6]} {toks[7]}"])
    r = engine.generate([GenerationRequest(PROMPTS[0], sp, ee)])[0]
    assert r.finish_reason == "stop" and r.token_ids == toks[: len(r.token_ids)]
    assert len(r.token_ids) <= 8


def test_self_speculative_kv_after_rejection_equals_full(dist_world):
    engine = _engine(True)  # exit blocks too
    engine.model.double()
    res = engine.generate([_req(PROMPTS[0], 12, mode="self_speculative", draft_exit_layer=2,
                                draft_length=4)])[0]  # fmt: skip
    assert res.stats.accepted_tokens < res.stats.drafted_tokens, "needs a rejected draft"
    st = engine.last_state
    caches = [c.k.clone() for c in st.caches]
    seq = PROMPTS[0] + res.token_ids[:-1]
    full = _full_prefill(engine, seq)
    for layer, k in enumerate(caches):
        n = len(seq) - 1  # every verified position (the last token may be pending)
        torch.testing.assert_close(k[0, :n], full.caches[layer].k[0, :n], atol=1e-5, rtol=0)
    n = len(seq) - 1
    blk = st.exit_caches[2].k
    torch.testing.assert_close(blk[0, :n], full.exit_caches[2].k[0, :n], atol=1e-5, rtol=0)


def _two_token_samples(engine, ee, n: int = 400):
    """Counter of the first 2 sampled tokens (temperature 1, top-k 4) over n seeds."""
    from collections import Counter

    from megatron.early_exit.inference.api import GenerationRequest, SamplingParams

    reqs = [
        GenerationRequest(PROMPTS[1], SamplingParams(2, temperature=1.0, top_k=4, seed=s,
                                                     ignore_eos=True), ee)
        for s in range(n)
    ]  # fmt: skip
    return Counter(tuple(r.token_ids) for r in engine.generate(reqs))


def _assert_same_distribution(full, spec):
    """Two-sample chi-square over outcomes seen >= 10 times; the 99.9% quantile of
    chi2(dof) is below dof + 4.5*sqrt(2 dof) + 10."""
    keys = [k for k in set(full) | set(spec) if full[k] + spec[k] >= 10]
    chi2 = sum((full[k] - spec[k]) ** 2 / (full[k] + spec[k]) for k in keys)
    dof = max(len(keys) - 1, 1)
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5 + 10, (
        chi2,
        dof,
        full.most_common(5),
        spec.most_common(5),
    )


def test_self_speculative_sampling_matches_full_distribution(engine):
    """Chi-square test on the joint distribution of the first 2 sampled tokens."""
    from megatron.early_exit.inference.api import EarlyExitParams

    full = _two_token_samples(engine, EarlyExitParams())
    ee = EarlyExitParams(mode="self_speculative", draft_exit_layer=1, draft_length=2)
    _assert_same_distribution(full, _two_token_samples(engine, ee))


# ---------------------------------------------------------------- streaming (on_token)
def test_on_token_streams_exactly_the_result(engine):
    """Every method's events equal the results (tokens, exits, logprobs), per request index,
    also when one call mixes methods (grouped decoding) and sequences stop early."""
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    thr = _mixed_threshold(engine)
    free = engine.generate([_req(PROMPTS[0], 12)])[0].token_ids
    methods = [
        {},
        {"mode": "early_exit", "threshold": thr, "method": "kv_recompute"},
        {"mode": "self_speculative", "draft_exit_layer": 2, "draft_length": 3},
    ]
    reqs = []
    for ee in methods:
        for j, p in enumerate(PROMPTS):
            sp = SamplingParams(12, eos_token_id=free[5] if j == 0 else None, ignore_eos=j > 0)
            if j == 1:
                sp.temperature, sp.seed = 1.0, 3
            reqs.append(GenerationRequest(list(p), sp, EarlyExitParams(**ee)))
    events = []
    results = engine.generate(reqs, on_token=events.append)
    assert any(r.finish_reason == "eos" for r in results)
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == r.token_ids, i
        assert [e.exit_layer for e in mine] == r.exit_layers, i
    assert len(events) == sum(len(r.token_ids) for r in results)
    spec = [(k, e) for k, e in enumerate(events) if e.index == 2 * len(PROMPTS)]
    assert [k for k, _ in spec] == list(range(spec[0][0], spec[0][0] + len(spec)))

    def broken(_event):
        raise RuntimeError("listener gone")

    again = engine.generate(reqs, on_token=broken)  # a failing listener never breaks decoding
    assert [r.token_ids for r in again] == [r.token_ids for r in results]


@pytest.mark.parametrize("llama", [False, True], ids=["gpt", "llama"])
def test_lean_layer_path_equals_module_path(dist_world, llama, monkeypatch):
    """The lean decode path computes what megatron-core's submodules compute, KV included,
    on a masked multi-row chunk of two sequences at different lengths and decode rows (the
    last chunk: 2 rows, through the column-major weight copies, forced on these tiny
    weights)."""
    from megatron.early_exit.inference import projection
    from megatron.early_exit.inference.layers import (
        lean_layer_forward,
        lean_plan,
        module_layer_forward,
        new_cache,
    )
    from megatron.early_exit.inference.stage import StageState, make_chunk

    monkeypatch.setattr(projection, "MIN_COLUMN_NUMEL", 0)
    model = _engine(llama).model.double()
    st = StageState(model, 2, MAXLEN, VOCAB, [])
    g = torch.Generator().manual_seed(11)
    for layer in list(model.decoder.layers) + [model.exit_heads.get(1).block]:
        if layer is None:
            continue
        plan = lean_plan(layer)
        assert plan is not None, "tiny local-spec layers must take the lean path"
        caches = [new_cache(layer, 2, MAXLEN, torch.float64, st.device) for _ in range(2)]
        chunks = (([0, 1], [0, 0], [6, 3]), ([1, 0], [4, 7], [9, 7]), ([0, 1], [8, 10], [8, 10]))
        for seqs, starts, ends in chunks:
            chunk = make_chunk(seqs, starts, ends, st.device)
            n = chunk.pos.shape[1]
            h = torch.randn(n, 2, model.config.hidden_size, generator=g, dtype=torch.float64)
            want = module_layer_forward(layer, h, chunk, caches[0], st.freqs)
            got = lean_layer_forward(plan, h, chunk, caches[1], st.freqs)
            valid = chunk.valid.t()
            torch.testing.assert_close(got[valid], want[valid], atol=1e-12, rtol=1e-12)
        # the column-major product sums in another order: equal to rounding, not bitwise
        torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-12, rtol=1e-12)
        assert projection.column_major(plan.w.qkv_w) is not None


# ---------------------------------------------------------------- draft vocabulary (FR-Spec)
DRAFT_N = VOCAB // 3


def _counts_like(results) -> torch.Tensor:
    """Synthetic token counts: the reference's tokens first, so that some drafts match."""
    g = torch.Generator().manual_seed(11)
    counts = torch.randint(0, 50, (VOCAB,), generator=g)
    for r in results:
        for t in r.token_ids:
            counts[t] += 100
    return counts


@pytest.fixture
def counted(engine):
    """The module's engine with token counts, removed again afterwards."""
    yield engine
    engine.token_counts = None


@pytest.mark.parametrize("draft_layer", [1, 2, 3])
def test_draft_vocab_greedy_is_lossless(counted, draft_layer):
    ref = counted.generate([_req(p, 14) for p in PROMPTS])
    counted.token_counts = _counts_like(ref[:1])  # prompt 0's tokens only: others get misses
    ids = set(counted.draft_ids(DRAFT_N).tolist())
    assert not all(t in ids for r in ref for t in r.token_ids)
    for draft_length in (1, 3, 5):
        spec = counted.generate(
            [
                _req(p, 14, mode="self_speculative", draft_exit_layer=draft_layer,
                     draft_length=draft_length, draft_vocab_size=DRAFT_N)
                for p in PROMPTS
            ]
        )  # fmt: skip
        for a, b in zip(ref, spec):
            assert b.token_ids == a.token_ids, (draft_layer, draft_length)
            assert b.stats.verify_passes >= 1


def test_draft_vocab_sampling_matches_full_distribution(counted, monkeypatch):
    """Chi-square test as above with a restricted draft; every draft is in the subset."""
    from megatron.early_exit.inference import speculative
    from megatron.early_exit.inference.api import EarlyExitParams

    full = _two_token_samples(counted, EarlyExitParams())
    counted.token_counts = _counts_like([])  # random: the draft misses frequent target tokens
    subset = set(counted.draft_ids(DRAFT_N).tolist())
    drafted, qs = [], []
    real_draft = speculative._draft

    def spy(*args, **kw):
        tok, q, conf = real_draft(*args, **kw)
        drafted.append(tok)
        qs.append(q)
        return tok, q, conf

    monkeypatch.setattr(speculative, "_draft", spy)
    ee = EarlyExitParams(mode="self_speculative", draft_exit_layer=1, draft_length=2,
                         draft_vocab_size=DRAFT_N)  # fmt: skip
    spec = _two_token_samples(counted, ee)
    assert drafted and set(drafted) <= subset
    outside = torch.tensor(sorted(set(range(VOCAB)) - subset))
    for q in qs:  # q is a distribution over the subset, exactly 0 elsewhere
        assert torch.isinf(q[outside]).all() and abs(float(q.exp().sum()) - 1) < 1e-5
    assert any(t not in subset for k in spec for t in k)  # the target still reaches them
    _assert_same_distribution(full, spec)


@pytest.mark.parametrize("llama", [False, True], ids=["gpt", "llama"])
def test_draft_projection_equals_full_exit_columns(dist_world, llama):
    import torch.nn.functional as F

    engine = _engine(llama)
    engine.model.double()
    engine.token_counts = torch.arange(VOCAB) % 7  # many ties: lower ids win
    ids = engine.draft_ids(DRAFT_N)
    want = sorted(sorted(range(VOCAB), key=lambda t: (-(t % 7), t))[:DRAFT_N])
    assert ids.tolist() == want
    res = engine.generate([_req(PROMPTS[0], 6, mode="self_speculative", draft_exit_layer=2,
                                draft_vocab_size=DRAFT_N)])[0]  # fmt: skip
    st = engine.last_state
    assert st.draft_ids.tolist() == want
    # the gathered rows, float64: the subset logits are the full logits' columns
    head = engine.model.exit_heads.get(2)
    slots, w, bias = st._draft_projection(2, head)
    full_w = engine.model.tied_exit_output_weight() if head.tied else head.output_layer.weight
    h = torch.randn(3, full_w.shape[1], dtype=torch.float64)
    ref = F.linear(h, full_w, head.output_layer.bias)[:, ids]
    assert slots.tolist() == list(range(DRAFT_N))
    torch.testing.assert_close(F.linear(h, w, bias), ref, atol=1e-12, rtol=0)
    # end to end through the exit head (block, MLP, norm) at the newest position
    p = len(PROMPTS[0]) + len(res.token_ids) - 1
    chunk = st.chunk([0], [0], [p])  # the exit block recomputes its cache: idempotent
    last = chunk.valid.sum(dim=1) - 1
    full = st.exit_logits(2, chunk, last)
    sub = st.exit_logits(2, chunk, last, draft=True)
    assert sub.shape == (1, DRAFT_N)
    torch.testing.assert_close(sub, full[:, ids], atol=1e-6, rtol=0)  # both cast to float32


@pytest.mark.parametrize(
    "value, counts, match",
    [
        (0, True, r"draft_vocab_size must be an integer in \[1, 96\]"),
        (VOCAB + 1, True, "draft_vocab_size must be an integer"),
        ("8", True, "draft_vocab_size must be an integer"),
        (8, False, "tools/count_tokens.py"),
    ],
)
def test_draft_vocab_bad_values(counted, value, counts, match):
    from megatron.early_exit.inference.api import InferenceError

    counted.token_counts = torch.ones(VOCAB, dtype=torch.long) if counts else None
    req = _req(PROMPTS[0], 4, mode="self_speculative", draft_vocab_size=value)
    with pytest.raises(InferenceError, match=match):
        counted.generate([req])


def test_draft_vocab_full_size_and_counts_checks(counted):
    from megatron.early_exit.inference.draft_vocab import TokenCountError

    counted.token_counts = torch.arange(10)  # shorter: unseen ids count 0
    assert counted.token_counts.shape == (VOCAB,)
    ref = counted.generate([_req(PROMPTS[2], 8)])[0]
    spec = counted.generate([_req(PROMPTS[2], 8, mode="self_speculative",
                                  draft_vocab_size=VOCAB)])[0]  # fmt: skip
    assert spec.token_ids == ref.token_ids
    with pytest.raises(TokenCountError, match="another tokenizer"):
        counted.token_counts = torch.ones(VOCAB + 5, dtype=torch.long)


@pytest.mark.parametrize(
    "ee",
    [{}, {"mode": "early_exit", "threshold": 0.2}, {"mode": "self_speculative"}],
    ids=["none", "early_exit", "self_speculative"],
)
@pytest.mark.parametrize("sync", [False, True], ids=["local", "sync"])
def test_cancel_stops_a_request_at_the_next_step(engine, ee, sync):
    """`cancelled(i)` turning True stops request i right there; the batch's others go on
    and get exactly what they get alone. `cancel_sync` (the ranks' agreement, one rank
    here) answers alike."""
    seen = []
    out = engine.generate(
        [_req(PROMPTS[0], 12, **ee), _req(PROMPTS[1], 12, **ee)],
        on_token=lambda ev: seen.append(ev.index),
        cancelled=lambda i: i == 0 and seen.count(0) >= 3,
        cancel_sync=sync,
    )
    assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) == 3
    alone = engine.generate([_req(PROMPTS[1], 12, **ee)])[0]
    assert out[1].token_ids == alone.token_ids and out[1].finish_reason == "length"


@pytest.mark.parametrize("ee", [{}, {"mode": "early_exit", "threshold": 0.3}])
def test_scoring_equals_full_model_log_softmax(engine, ee):
    """Prompt and completion log-probs (and the k alternatives) are the full model's own
    log_softmax, whatever mode decoded the completion."""
    reqs = [_req(p, n, **ee) for p, n in ((PROMPTS[0], 5), (PROMPTS[1], 0), (PROMPTS[2], 3))]
    for r, k in zip(reqs, (3, 20, 0)):
        r.sampling.prompt_logprobs, r.sampling.top_logprobs = k, k
    results = engine.generate(reqs)
    for r, res in zip(reqs, results):
        ids = list(r.prompt_token_ids) + res.token_ids
        n, k = len(r.prompt_token_ids), r.sampling.top_logprobs
        with torch.no_grad():
            out = engine.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None)
        ref = torch.log_softmax(out.output[0, :, :VOCAB].float(), dim=-1)
        want = [None] + [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert res.prompt_logprobs[0] is None and res.prompt_top_logprobs[0] is None
        assert res.prompt_logprobs[1:] == pytest.approx(want[1:n], rel=1e-5, abs=1e-5)
        tops = res.prompt_top_logprobs[1:] + (res.top_logprobs or [])
        assert len(tops) == (len(ids) if k else n) - 1
        for t, top in enumerate(tops, start=1):
            vals, idx = ref[t - 1].topk(k) if k else (torch.empty(0), torch.empty(0))
            assert list(top) == idx.tolist()
            assert list(top.values()) == pytest.approx(vals.tolist(), rel=1e-5, abs=1e-5)
        if k == 0:
            assert res.top_logprobs is None
        if not ee:  # the full model decoded greedily: its chosen tokens are the top-1
            assert all(
                next(iter(d)) == tok for d, tok in zip(res.top_logprobs or [], res.token_ids)
            )


# ---------------------------------------------------------------- compiled decode step
def _all_modes(engine):
    """Requests of every decode mode: full, lossy exit (kv_recompute), self-speculative."""
    return [
        [_req(p) for p in PROMPTS],
        [_req(p, mode="early_exit", threshold=0.2) for p in PROMPTS],
        [_req(p, mode="self_speculative", draft_exit_layer=1) for p in PROMPTS],
    ]


def test_compile_failure_falls_back_to_eager_with_one_log_line(engine, monkeypatch, caplog):
    """A compiler that cannot run (here: torch.compile raising, as without a C++ compiler)
    leaves decoding on the eager step, same tokens, one warning for the whole process."""
    from megatron.early_exit.inference import layers

    want = [[r.token_ids for r in engine.generate(reqs)] for reqs in _all_modes(engine)]

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(layers._STEPS, "_compiled", None)  # compile anew, under `broken`
    layers.set_compile_mode("inductor")
    try:
        with caplog.at_level("WARNING", logger=layers.__name__):
            got = [[r.token_ids for r in engine.generate(reqs)] for reqs in _all_modes(engine)]
    finally:
        layers.set_compile_mode("none")
    assert got == want
    lines = [r for r in caplog.records if "compile failed" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0].getMessage()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_compiled_step_equals_eager_step(engine, dtype, monkeypatch):
    """The torch.compile'd step (inductor) computes the eager step's function: in float64
    the same tokens and logprobs to 1e-12 in every mode, batched with mixed prompt lengths;
    in float32 the same tokens. fp32 logprobs are not compared to a fixed tolerance: the
    fused kernels order the arithmetic differently (measured up to 2.6e-5 on the Llama-style
    model). In float32 the graphs call the C attention through its op. Slow: compiling
    takes a minute."""
    from megatron.early_exit.inference import layers, rows_kernel

    if dtype == torch.float64:
        engine.model.double()

    def modes():
        out = _all_modes(engine)
        for reqs in out:
            for r in reqs:
                r.sampling.logprobs = True
        return out

    try:
        want = [engine.generate(reqs) for reqs in modes()]
        computed = []  # by the C attention, called from the graphs' decode_attention op
        attention = rows_kernel.attention
        monkeypatch.setattr(
            rows_kernel, "attention", lambda *a: computed.append(attention(*a)) or computed[-1]
        )
        layers.set_compile_mode("inductor")
        try:
            got = [engine.generate(reqs) for reqs in modes()]
            assert layers._STEPS.failed is None
        finally:
            layers.set_compile_mode("none")
    finally:
        engine.model.float()
    assert any(c is not None for c in computed) == (dtype == torch.float32)
    for a, b in zip(want, got):
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        if dtype == torch.float64:
            for ra, rb in zip(a, b):
                torch.testing.assert_close(
                    torch.tensor(ra.logprobs), torch.tensor(rb.logprobs), atol=1e-12, rtol=0
                )


def test_layer_runs_end_where_an_exit_decides_or_the_chunk_changes():
    from megatron.early_exit.inference.stage import layer_runs

    assert layer_runs(range(1, 9), {3, 5}) == [(1, 3), (4, 5), (6, 8)]
    assert layer_runs(range(5, 9), {2, 8}) == [(5, 8)]  # layers of other stages are ignored
    assert layer_runs(range(4, 5), set()) == [(4, 4)]
    assert layer_runs(range(1, 1), {1}) == []
