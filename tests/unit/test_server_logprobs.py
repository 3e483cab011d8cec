"""/v1/completions logprobs on the real tiny engine (in process): echo scores the prompt,
top_logprobs are the full model's k most likely tokens, equal to log_softmax of its logits."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_inference import PROMPTS, VOCAB, _engine
from tests.unit.test_server_http import call

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def served():
    from megatron.early_exit.server import protocol
    from megatron.early_exit.server.app import ServerContext, make_server, serve_in_thread
    from megatron.early_exit.server.metrics import ServerMetrics
    from megatron.early_exit.server.service import GenerationService
    from tests.single_process import tp1pp1_world

    world = tp1pp1_world(seed=7)
    next(world)
    engine = _engine(False)
    metrics = ServerMetrics()
    service = GenerationService(engine.generate, metrics, max_batch_size=4).start()
    codec = protocol.TextCodec(engine.tokenize, engine.detokenize, engine.limits, eos=engine.eos)
    srv = make_server(ServerContext(service, codec, metrics), "127.0.0.1", 0)
    serve_in_thread(srv)
    yield srv.server_address[1], engine
    srv.shutdown()
    service.stop()
    next(world, None)


def _ref(engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = engine.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None)
    return torch.log_softmax(out.output[0, :, :VOCAB].float(), dim=-1)


def _check_tops(tops, ref_rows, k):
    for top, row in zip(tops, ref_rows):
        vals, idx = row.topk(k)
        assert list(top) == [str(i) for i in idx.tolist()]
        assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_echo_scores_the_prompt(served, k):
    """What lm-eval's local-completions sends for loglikelihood: max_tokens 0, echo, logprobs."""
    port, engine = served
    prompts = [" ".join(map(str, p)) for p in PROMPTS[:2]]
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": k, "temperature": 0}
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 200, out
    for ids, choice in zip(PROMPTS, out["choices"]):
        lp, ref = choice["logprobs"], _ref(engine, ids)
        assert choice["text"] == " ".join(map(str, ids))
        assert lp["tokens"] == [str(t) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
        _check_tops(lp["top_logprobs"][1:], ref[:-1], k)
        assert lp["text_offset"][0] == 0 and len(lp["text_offset"]) == len(ids)


def test_top_logprobs_of_generated_tokens(served):
    port, engine = served
    ids = PROMPTS[2]
    body = {"prompt": " ".join(map(str, ids)), "max_tokens": 4, "logprobs": 3, "temperature": 0}
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 200, out
    c = out["choices"][0]
    gen = c["token_ids"]
    ref = _ref(engine, ids + gen)
    lp = c["logprobs"]
    assert lp["tokens"] == [str(t) for t in gen]
    want = [float(ref[len(ids) + j - 1, t]) for j, t in enumerate(gen)]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-5)  # greedy full model
    _check_tops(lp["top_logprobs"], ref[len(ids) - 1 : -1], 3)
    assert all(next(iter(top)) == str(t) for top, t in zip(lp["top_logprobs"], gen))


def test_token_id_prompts_like_lm_eval(served):
    """lm-eval's local-completions loglikelihood payload: token-id prompts, max_tokens 1, echo,
    logprobs 1; it sums token_logprobs over the continuation and drops the generated token."""
    port, engine = served
    body = {"prompt": PROMPTS[:2], "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}  # fmt: skip
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 200, out
    for ids, choice in zip(PROMPTS, out["choices"]):
        lp, ref = choice["logprobs"], _ref(engine, ids)
        assert choice["text"].startswith(" ".join(map(str, ids)))
        assert len(lp["tokens"]) == len(ids) + 1
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-5)
    one = {**body, "prompt": PROMPTS[0]}
    status, single = call(port, "POST", "/v1/completions", one)
    assert status == 200, single
    a, b = single["choices"][0]["logprobs"], out["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], abs=1e-5)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 2.5}, "logprobs"),
        ({"logprobs": "3"}, "logprobs"),
        ({"echo": "yes"}, "echo"),
        ({"prompt": [VOCAB]}, "not an id"),
        ({"prompt": [[1, 2], [VOCAB]]}, "not an id"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
    ],
)
def test_bad_logprobs_values(served, body, match):
    port, _ = served
    status, out = call(port, "POST", "/v1/completions", {"prompt": "5 6", "max_tokens": 0, **body})
    assert status == 400, out
    assert match in out["error"]["message"]
