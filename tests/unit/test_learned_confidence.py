"""Learned exit confidence (--exit-confidence-head, metric "learned"), one process.

* the vocabulary projection runs only for the rows whose estimator fires (counted), and the
  tokens equal a reference that projects every row and then applies the same rule;
* thresholds 0 (always the first exit) and 1 (the full model);
* self-speculative drafting with the estimator (adaptive draft length) stays lossless;
* "learned" on a checkpoint without confidence heads is refused naming the field;
* training: the confidence loss reaches only the confidence heads (every other gradient
  is the same with its weight 0), its target is the exit/final top-1 agreement.
TP=2 == TP=1: tests/distributed/test_inference.py.
"""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, MAXLEN, SEQ = 96, 48, 16
PROMPTS = [[5, 17, 42, 7, 9, 3], [1, 2, 3], [60, 61, 12, 13, 40, 41, 42, 8, 9, 90]]


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _run(**exit_kwargs):
    from megatron.early_exit.config import ExitConfig, RunConfig

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length = MAXLEN
    run.exits = ExitConfig(**exit_kwargs)
    return run.validate()


def _engine(confidence_head: bool = True):
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.data.tokenizers import NullTokenizer
    from megatron.early_exit.inference.engine import InferenceEngine
    from megatron.early_exit.model import build_model

    run = _run(exit_layer_nums=[1, 2, 3], use_exit_norm=True, exit_confidence_head=confidence_head)
    torch.manual_seed(0)
    model = build_model(build_transformer_config(run), VOCAB, MAXLEN, True, "learned_absolute")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # confidence weights included: estimates spread over (0, 1)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return InferenceEngine(model.eval(), VOCAB, MAXLEN, tokenizer=NullTokenizer(VOCAB))


@pytest.fixture(scope="module")
def engine(dist_world):
    return _engine()


def _req(prompt, n=10, **ee):
    from megatron.early_exit.inference.api import EarlyExitParams, GenerationRequest, SamplingParams

    return GenerationRequest(
        list(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), EarlyExitParams(**ee)
    )


def _reference_decisions(self, layer, chunk, last_rows, rows, metric, threshold):
    """Project every row, then keep the rows whose estimate reaches the threshold."""
    h = self.exit_features(layer, chunk, last_rows)
    logits = self.exit_project(layer, h)
    conf = self.exit_confidence(layer, h).tolist()
    fired = [r for r in rows if conf[r] >= threshold]
    return fired, (logits[fired] if fired else None)


def _learned(engine, threshold, n=12):
    return engine.generate(
        [_req(p, n, mode="early_exit", metric="learned", threshold=threshold) for p in PROMPTS]
    )


def test_projection_only_where_the_estimator_fires(engine, monkeypatch):
    from megatron.early_exit.inference.stage import StageState

    rows = []
    real_project = StageState.exit_project

    def spy(self, layer, h, draft=False):
        rows.append(h.shape[1])
        return real_project(self, layer, h, draft)

    monkeypatch.setattr(StageState, "exit_project", spy)
    run0, skip0 = engine.exit_projections_run, engine.exit_projections_skipped
    got = _learned(engine, 0.5)
    run, skipped = engine.exit_projections_run - run0, engine.exit_projections_skipped - skip0
    assert sum(rows) == run  # every projected row is counted, nothing else was projected
    assert run > 0 and skipped > 0  # both outcomes happen at this threshold
    exits = [e for r in got for e in r.exit_layers]
    assert sum(e < 4 for e in exits) > 0 and sum(e == 4 for e in exits) > 0
    monkeypatch.setattr(StageState, "exit_project", real_project)
    monkeypatch.setattr(StageState, "exit_decisions", _reference_decisions)
    ref = _learned(engine, 0.5)
    for a, b in zip(got, ref):
        assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers


def test_thresholds_zero_and_one(engine):
    full = engine.generate([_req(p, 12) for p in PROMPTS])
    skip0 = engine.exit_projections_skipped
    never = _learned(engine, 1.0)
    assert engine.exit_projections_skipped == skip0  # 1.0 is the full model: no heads run
    first = _learned(engine, 0.0)
    by_max_prob = engine.generate(
        [_req(p, 12, mode="early_exit", metric="max_prob", threshold=0.0) for p in PROMPTS]
    )
    for f, nv, fi, mp in zip(full, never, first, by_max_prob):
        assert nv.token_ids == f.token_ids and nv.exit_layers == [4] * 12
        assert fi.exit_layers == [1] * 12 and fi.token_ids == mp.token_ids


@pytest.mark.parametrize("draft_threshold", [0.0, 0.5, 0.9])
def test_adaptive_drafting_with_the_estimator_is_lossless(engine, draft_threshold):
    full = engine.generate([_req(p, 14) for p in PROMPTS])
    skip0 = engine.exit_projections_skipped
    spec = engine.generate(
        [
            _req(p, 14, mode="self_speculative", metric="learned", draft_exit_layer=2,
                 draft_length=4, draft_threshold=draft_threshold)
            for p in PROMPTS
        ]
    )  # fmt: skip
    for a, b in zip(full, spec):
        assert b.token_ids == a.token_ids
        assert b.stats.drafted_tokens <= 4 * b.stats.verify_passes
        assert b.stats.accepted_tokens <= b.stats.drafted_tokens
    declined = engine.exit_projections_skipped - skip0
    assert (declined > 0) == (draft_threshold > 0)


def test_learned_needs_confidence_heads(dist_world):
    from megatron.early_exit.inference.api import InferenceError

    plain = _engine(confidence_head=False)
    with pytest.raises(InferenceError, match="early_exit.metric 'learned' needs exit confidence"):
        plain.generate([_req(PROMPTS[0], 4, mode="early_exit", metric="learned")])


# ---------------------------------------------------------------- training
def _train_model(**kw):
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import build_model

    run = _run(exit_layer_nums=[1, 2], use_exit_norm=True, exit_confidence_head=True, **kw)
    run.model.seq_length = SEQ
    torch.manual_seed(0)
    return build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")


def _batch():
    from megatron.early_exit.data import Batch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    mask = torch.ones(2, SEQ)
    mask[1, -5:] = 0.0
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    return Batch(tokens[:, :-1], tokens[:, 1:], mask, positions)


def _grads(weight: float):
    from megatron.early_exit.pipeline.losses import make_loss_func

    model = _train_model(exit_confidence_loss_weight=weight)
    with torch.no_grad():  # a trained-looking estimator: non-zero, so the loss has a slope
        for n in (1, 2):
            model.exit_heads.get(n).confidence.weight.normal_(0, 0.1)
    batch = _batch()
    out = model(batch.tokens, batch.position_ids, None, labels=None)
    loss, metrics = make_loss_func(batch, model, {1: 1.0, 2: 0.5}, False)(out)
    loss.backward()
    return model, {n: p.grad.clone() for n, p in model.named_parameters()}, metrics, batch


def test_confidence_loss_reaches_only_the_confidence_heads(dist_world):
    with_conf, g1, metrics, batch = _grads(1.0)
    _, g0, _, _ = _grads(0.0)
    conf = [n for n in g1 if ".confidence." in n]
    assert len(conf) == 4  # weight + bias per exit
    for n in g1:
        if n in conf:
            assert g1[n].abs().sum() > 0 and g0[n].abs().sum() == 0, n
        else:
            torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)
    # the target: the exit's top-1 equals the final layer's, on unmasked tokens
    model = with_conf
    with torch.no_grad():
        out = model(batch.tokens, batch.position_ids, None, labels=None)
        final = out.output.argmax(-1)  # [b, s]
        for n in (1, 2):
            exit_top1 = model.exit_logits(n, out.exit_states[n]).argmax(-1).transpose(0, 1)
            agree = ((exit_top1 == final).float() * batch.loss_mask).sum() / batch.loss_mask.sum()
            assert float(metrics[f"exit_agree_{n}"]) == pytest.approx(float(agree), abs=1e-6)


def test_confidence_heads_are_checkpointed(dist_world):
    keys = _train_model().sharded_state_dict().keys()
    assert {"exit_heads.1.confidence.weight", "exit_heads.2.confidence.bias"} <= set(keys)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"exit_confidence_loss_weight": -1.0}, "--exit-confidence-loss-weight must be >= 0"),
    ],
)
def test_bad_flags(kw, message):
    from megatron.early_exit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _run(exit_layer_nums=[1], exit_confidence_head=True, **kw)


def test_pipeline_parallel_training_is_refused():
    from megatron.early_exit.config import ExitConfig, RunConfig
    from megatron.early_exit.errors import ConfigError

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.parallel.pipeline_model_parallel_size = run.parallel.world_size = 2
    run.exits = ExitConfig(exit_layer_nums=[1], exit_confidence_head=True)
    with pytest.raises(ConfigError, match="--exit-confidence-head trains on the final layer"):
        run.validate()
    run.validate(needs_data=False)  # inference runs the heads at any PP


def test_ee_tuning_trains_the_estimators_next_to_the_exits(dist_world):
    from megatron.early_exit.tuning.session import freeze_backbone, make_exit_tuning_loss_func

    model = _train_model()  # norm exits, tied projection (the frozen embedding)
    trainable = {id(p) for p in freeze_backbone(model)}
    batch = _batch()
    with torch.no_grad():  # EE-Tuning runs the backbone without autograd
        out = model(batch.tokens, batch.position_ids, None, labels=None)
    loss_func = make_exit_tuning_loss_func(batch, model, {1: 1.0, 2: 1.0}, False, True)
    loss, metrics = loss_func(out)
    loss.backward()
    assert {"exit_conf_1", "exit_agree_2", "lm_loss"} <= set(metrics)
    for name, p in model.named_parameters():
        has = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has == (id(p) in trainable), name  # exit norms and estimators, nothing else


def test_cost_model_prices_a_declining_learned_exit_at_its_estimator(engine):
    """calibrate() times each exit's estimator (features + confidence head, no projection);
    `learned` prices a declining exit at that, max_prob at the whole head."""
    from megatron.early_exit.inference.cost_model import calibrate

    cm = calibrate(engine, rows=(1, 2), rounds=2, tokens=4)
    exits = list(engine.limits.exit_layers)
    assert set(cm.exit_estimator_ms) == set(exits) and all(
        t > 0 for t in cm.exit_estimator_ms.values()
    )
    e, L = exits[0], engine.limits.num_layers
    base = cm.step_overhead_ms + L * cm.layer(1) + cm.head(1)
    assert cm.early_exit_token(L, exits) == pytest.approx(
        base + sum(cm.exit_head(x) for x in exits)
    )
    assert cm.early_exit_token(L, exits, learned=True) == pytest.approx(
        base + sum(cm.exit_estimator_ms[x] for x in exits)
    )
    # the exit that fires pays its whole head either way
    assert cm.early_exit_token(e, [e], learned=True) == pytest.approx(
        cm.step_overhead_ms + e * cm.layer(1) + cm.exit_head(e)
    )


def test_calibration_sees_the_confidences_the_engine_decides_on(engine, monkeypatch):
    """tools/calibrate_exits.py's "learned" confidences (one teacher-forced pass) equal the
    estimates the engine computes token by token while decoding the same text."""
    import importlib.util
    import os

    from megatron.early_exit.inference.stage import StageState

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "calibrate_exits.py")
    spec = importlib.util.spec_from_file_location("calibrate_exits_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    seen: list[float] = []
    real = StageState.exit_confidence

    def spy(self, layer, h):
        out = real(self, layer, h)
        if layer == 1:  # the first exit is evaluated at every decode step
            seen.extend(out.tolist())
        return out

    monkeypatch.setattr(StageState, "exit_confidence", spy)
    prompt, n = PROMPTS[0], 10
    got = engine.generate(
        [_req(prompt, n, mode="early_exit", metric="learned", threshold=1.0 - 1e-9)]
    )
    monkeypatch.undo()
    assert got[0].exit_layers == [4] * n  # nothing fired: the full model's tokens
    sample = tool.collect(engine, [prompt], n, "learned")[0]
    conf, match = sample[1]
    assert len(conf) == n and len(seen) >= n - 1 and 0 < min(conf) < max(conf) < 1
    # the engine evaluates exits on decode steps; the tool also sees the prefill position
    torch.testing.assert_close(torch.tensor(seen[-(n - 1):]), torch.tensor(conf[1:]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("distill", [False, True])
def test_confidence_loss_reuses_the_exit_losss_forward(dist_world, monkeypatch, distill):
    """The confidence BCE takes the features and top-1 the exit's own loss computed: the
    same BCE, targets and gradients as recomputing them, with one projection per exit."""
    from megatron.early_exit.model.exit_head import ExitHead
    from megatron.early_exit.pipeline.losses import make_loss_func

    model = _train_model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():  # exits that sometimes agree with the final layer
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = _batch()
    calls = []
    real_project, real_conf = ExitHead.project, model.exit_confidence_loss

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real_project(self, *args, **kwargs)

    def run(reuse: bool):
        with monkeypatch.context() as m:
            m.setattr(ExitHead, "project", spy)
            if not reuse:  # ignore what the exit loss captured: recompute features and top-1
                m.setattr(
                    model,
                    "exit_confidence_loss",
                    lambda layer, state, top1, captured=None: real_conf(layer, state, top1),
                )
            model.zero_grad(set_to_none=True)
            calls.clear()
            out = model(batch.tokens, batch.position_ids, None)
            loss, metrics = make_loss_func(batch, model, {1: 1.0, 2: 1.0}, False, distill)(out)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return len(calls), metrics, grads

    n_reuse, m_reuse, g_reuse = run(True)
    n_again, m_again, g_again = run(False)
    assert n_reuse == 2 and n_again == 4  # two exits: one projection each, or two
    assert 0 < float(m_reuse["exit_agree_1"]) < 1 or 0 < float(m_reuse["exit_agree_2"]) < 1
    for k in m_again:
        torch.testing.assert_close(m_reuse[k], m_again[k], rtol=0, atol=0)
    assert g_reuse.keys() == g_again.keys()
    for n in g_again:
        torch.testing.assert_close(g_reuse[n], g_again[n], rtol=0, atol=0)
