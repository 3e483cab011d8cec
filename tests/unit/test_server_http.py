"""HTTP layer of the generation server against a fake engine (single process, no torch).

The fake implements the engine API (`generate(list[GenerationRequest])`) with a byte-level
tokenizer, so schema validation, error codes, streaming, batching and metrics are tested
without a model. The real model is exercised in tests/distributed/test_server.py.
"""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron.early_exit.inference.api import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    ModelLimits,
    TokenEvent,
    validate_batch,
)
from megatron.early_exit.server import protocol
from megatron.early_exit.server.app import ServerContext, make_server, serve_in_thread
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.openapi import openapi_json
from megatron.early_exit.server.service import GenerationService

pytestmark = pytest.mark.unit

LIMITS = ModelLimits(num_layers=4, exit_layers=(1, 2), max_sequence_length=256, vocab_size=256)
EOS = 4
UTF8_E = [0xC3, 0xA9]  # "é": two byte tokens, the stream must never split it


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def detokenize(ids: list[int]) -> str:
    return bytes(ids).decode(errors="replace")


class FakeEngine:
    """Deterministic per sequence (independent of batching), like the real engine."""

    limits = LIMITS

    def __init__(self) -> None:
        self.calls: list[int] = []  # batch sizes
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.gate: threading.Event | None = None  # set: on_token blocks after the 1st token
        self.paused = threading.Event()

    def _next(self, ids: list[int], seed: int, greedy: bool) -> list[int]:
        h = (sum(ids) * 31 + len(ids) * 7 + (0 if greedy else seed)) % 97
        if h == 0:
            return [EOS]
        if h < 6:
            return list(UTF8_E)
        return [97 + h % 26]

    def generate(
        self, requests: list[GenerationRequest], on_token=None, cancelled=None
    ) -> list[GenerationResult]:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            validate_batch(requests, self.limits)
            self.calls.append(len(requests))
            results = [self._one(r) for r in requests]
            for i, r in enumerate(results):  # streamed in order, like the engine's on_token
                lps = r.logprobs or [0.0] * len(r.token_ids)
                for k, t in enumerate(r.token_ids):
                    if on_token is not None:
                        on_token(TokenEvent(i, t, r.exit_layers[k], lps[k]))
                    if self.gate is not None and k == 0:
                        self.paused.set()
                        assert self.gate.wait(30), "test never released the engine"
            return results
        finally:
            with self.lock:
                self.active -= 1

    def _one(self, r: GenerationRequest) -> GenerationResult:
        s, e = r.sampling, r.early_exit
        ids, out, reason = list(r.prompt_token_ids), [], "length"
        while len(out) < s.max_new_tokens:
            for t in self._next(ids, s.seed, s.greedy)[: s.max_new_tokens - len(out)]:
                ids.append(t)
                out.append(t)
            if out[-1] == EOS:
                reason = "eos"
                break
            text = detokenize(out)
            if any(stop in text for stop in s.stop_sequences):
                reason = "stop"
                break
        allowed = e.exit_layers if e.exit_layers is not None else [1, 2]
        layers = [allowed[t % len(allowed)] if e.mode != "none" and t % 3 else 4 for t in out]
        return GenerationResult(
            token_ids=out,
            exit_layers=layers,
            finish_reason=reason,
            logprobs=[-0.5 - (t % 5) / 10 for t in out] if s.logprobs else None,
            stats=GenerationStats(num_generated_tokens=len(out)),
        )


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    metrics = ServerMetrics()
    service = GenerationService(engine.generate, metrics, max_batch_size=8).start()
    codec = protocol.TextCodec(tokenize, detokenize, LIMITS, bos=1, model_name="fake", eos=EOS)
    srv = make_server(ServerContext(service, codec, metrics), "127.0.0.1", 0)
    serve_in_thread(srv)
    yield srv.server_address[1], engine
    srv.shutdown()
    service.stop()


def call(port, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype else payload.decode())


def test_megatron_api_greedy(server):
    port, _ = server
    status, out = call(
        port,
        "PUT",
        "/api",
        {
            "prompts": ["Hello", "ab"],
            "tokens_to_generate": 12,
            "temperature": 0.0,
            "logprobs": True,
        },
    )
    assert status == 200, out
    for prompt, text, toks, lps in zip(
        ["Hello", "ab"], out["text"], out["tokens"], out["logprobs"]
    ):
        ref = FakeEngine()._one(
            protocol.megatron_requests(
                protocol.MegatronRequest(prompts=[prompt], tokens_to_generate=12, temperature=0.0),
                protocol.TextCodec(tokenize, detokenize, LIMITS),
            )[0]
        )
        assert toks == ref.token_ids
        assert text == prompt + detokenize(ref.token_ids)
        assert len(lps) == len(toks)
    assert "".join(out["segments"][0]).startswith("Hello")


def test_print_max_prob_returns_exit_layers(server):
    port, _ = server
    body = {"prompts": ["xy"], "tokens_to_generate": 6, "top_k": 1, "use_early_exit": True,
            "early_exit_thres": 0.5, "exit_layers": [2], "print_max_prob": True}  # fmt: skip
    status, out = call(port, "PUT", "/api", body)
    assert status == 200, out
    assert len(out["exit_layers"][0]) == len(out["tokens"][0])
    assert set(out["exit_layers"][0]) <= {2, 4}
    assert out["early_exit_stats"][0]["drafted_tokens"] == 0  # extension: per-prompt stats


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["a"] * 129}, "prompts"),
        ({"prompts": "a"}, "prompts"),
        ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
        ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
        ({"prompts": ["a"], "temperature": -0.1}, "temperature"),
        ({"prompts": ["a"], "top_p": 1.5}, "top_p"),
        ({"prompts": ["a"], "top_k": 2, "top_p": 0.5}, "top_k and top_p"),
        ({"prompts": ["a"], "early_exit_thres": 40}, "early_exit_thres"),
        ({"prompts": ["a"], "use_early_exit": True, "exit_layers": [3]}, "exit layer 3"),
        ({"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
        ({"prompts": ["a"], "bogus": 1}, "bogus"),
        ({"prompts": ["a" * 300], "tokens_to_generate": 1}, "context"),
        ({"prompts": [""]}, "prompts"),
        ({"prompts": ["a"], "early_exit_metric": "fast"}, "early_exit_metric"),
        # no confidence heads in this model
        (
            {"prompts": ["a"], "use_early_exit": True, "early_exit_metric": "learned"},
            "early_exit.metric 'learned'",
        ),
        (
            {"prompts": ["a"], "use_early_exit": True, "target_agreement": 0.95},
            "target_agreement 0.95: the checkpoint has no calibration",
        ),
        ({"prompts": ["a"], "use_early_exit": True, "target_agreement": 1.5}, "target_agreement"),
        ({"prompts": ["a"], "use_early_exit": True, "target_agreement": 0}, "target_agreement"),
        ({"prompts": ["a"], "use_early_exit": True, "target_agreement": "x"}, "target_agreement"),
        ({"prompts": ["a"], "target_agreement": 0.95}, "target_agreement needs mode"),
    ],
)
def test_megatron_api_rejects(server, body, fragment):
    port, _ = server
    status, out = call(port, "PUT", "/api", body)
    assert status == 400, out
    assert fragment in out["error"]["message"], out


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"not json",
        b"[1, 2]",
        b"null",
        b'{"prompts": ["a"], "temperature": NaN}',
        b"",
        b"\xff\xfe",
    ],
)
def test_malformed_bodies(server, raw):
    port, _ = server
    for method, path in (("PUT", "/api"), ("POST", "/v1/completions")):
        status, out = call(port, method, path, raw=raw)
        assert status == 400, (raw, out)
        assert out["error"]["type"] == "invalid_request_error"
    assert call(port, "GET", "/health")[0] == 200


def test_routes_and_methods(server):
    port, _ = server
    assert call(port, "GET", "/nope")[0] == 404
    assert call(port, "GET", "/api")[0] == 405
    assert call(port, "POST", "/api", {"prompts": ["a"]})[0] == 405
    status, spec = call(port, "GET", "/openapi.json")
    assert status == 200 and "/v1/completions" in spec["paths"]


def test_completions_and_stream(server):
    port, _ = server
    ee = {"mode": "early_exit", "threshold": 0.7}
    base = {"prompt": ["The cat", "é"], "max_tokens": 20, "temperature": 0, "logprobs": 1,
            "echo": True, "stop": ["zz"], "early_exit": ee}  # fmt: skip
    status, out = call(port, "POST", "/v1/completions", base)
    assert status == 200, out
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    assert (
        out["usage"]["total_tokens"]
        == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    )
    status, stream = call(port, "POST", "/v1/completions", {**base, "stream": True})
    assert status == 200
    events = [line[6:] for line in stream.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts, layers = ["", ""], [[], []]
    for ev in events[:-1]:
        for c in json.loads(ev)["choices"]:
            texts[c["index"]] += c["text"]
            layers[c["index"]] += c.get("exit_layers") or []
    assert texts == [c["text"] for c in out["choices"]]
    assert layers == [c["exit_layers"] for c in out["choices"]]
    assert "\ufffd" not in "".join(texts)


def test_stream_is_sent_while_generating(server):
    """The first chunk reaches the client while the engine is still blocked after its first
    token; the rest follows once it goes on, and the stream equals the non-streamed text."""
    port, engine = server
    body = {"prompt": "é!", "max_tokens": 16, "temperature": 0, "stop": ["pqz"]}
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 200, out
    ref = out["choices"][0]
    assert len(ref["token_ids"]) > 2 and ref["finish_reason"] == "length"
    engine.gate, engine.paused = threading.Event(), threading.Event()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline().decode()  # (chunked transfer: through the decoder)
        # The engine blocks right after handing over its first token, which may reach the
        # client a moment before it pauses: wait for the pause; the gate stays shut, so the
        # rest of the generation has not run.
        assert engine.paused.wait(10) and not engine.gate.is_set()
        assert first.startswith("data: ")
        chunk = json.loads(first[6:])["choices"][0]
        assert chunk["text"] and ref["text"].startswith(chunk["text"])
        assert chunk["exit_layers"] == ref["exit_layers"][:1]
        engine.gate.set()
        rest = resp.read().decode()
        conn.close()
    finally:
        engine.gate.set()
        engine.gate = None
    events = [line[6:] for line in (first + rest).split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [c for ev in events[:-1] for c in json.loads(ev)["choices"]]
    assert "".join(c["text"] for c in chunks) == ref["text"]
    assert [x for c in chunks for x in c.get("exit_layers") or []] == ref["exit_layers"]


def _stream(port, body):
    status, raw = call(port, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200, raw
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(c["text"] for ev in events[:-1] for c in json.loads(ev)["choices"])


def test_batched_streams_each_get_their_own(server):
    """Streaming requests queued behind a blocked batch are decoded together, and each
    stream carries exactly its own request's text."""
    port, engine = server
    bodies = [{"prompt": f"s{i}é", "max_tokens": 10, "temperature": 0} for i in range(3)]
    refs = [call(port, "POST", "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies]
    engine.gate, engine.paused = threading.Event(), threading.Event()
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(_stream, port, bodies[0])
            assert engine.paused.wait(10)
            engine.calls.clear()
            rest = [pool.submit(_stream, port, b) for b in bodies[1:]]
            while engine_queue_depth(port) < 2:
                threading.Event().wait(0.01)
            engine.gate.set()
            texts = [first.result(), *(f.result() for f in rest)]
    finally:
        engine.gate.set()
        engine.gate = None
    assert texts == refs
    assert engine.calls == [2]  # the two waiting streams ran as one batch


def engine_queue_depth(port) -> int:
    return call(port, "GET", "/health")[1]["queue_depth"]


def test_streamer_holds_back_partial_characters_stops_and_eos():
    """Live deltas never need taking back: split UTF-8, a possible stop prefix and EOS wait."""
    codec = protocol.TextCodec(tokenize, detokenize, LIMITS, eos=EOS)
    req = protocol.CompletionRequest(prompt="x", max_tokens=9, stop=["bc"])
    st = protocol.CompletionStreamer(req, [], codec)

    def text(chunks):
        return "".join(c["text"] for b in chunks for c in json.loads(b.decode()[6:])["choices"])

    assert text(st.token(0, UTF8_E[0], 4, 0.0)) == ""  # half of "é"
    assert text(st.token(0, UTF8_E[1], 4, 0.0)) == "é"
    assert text(st.token(0, ord("b"), 4, 0.0)) == ""  # may start the stop "bc"
    assert text(st.token(0, ord("a"), 4, 0.0)) == "ba"
    assert text(st.token(0, EOS, 4, 0.0)) == ""
    ids = [*UTF8_E, ord("b"), ord("a"), EOS]
    res = GenerationResult(ids, [4] * 5, "eos")
    tail = st.finish([res])
    assert text(tail[:1]) == "" and tail[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "n": 2},
        {"prompt": "a", "max_tokens": 1.5},
        {"prompt": "a", "temperature": 3},
        {"prompt": "a", "top_p": 0},
        {"prompt": [], "max_tokens": 1},
        {"prompt": 5},
        {"prompt": "a", "early_exit": {"mode": "fast"}},
        {"prompt": "a", "early_exit": {"threshold": 1.5}},
        {"prompt": "a", "early_exit": {"exit_layers": [9]}},
        {"prompt": "a", "logprobs": 21},
        {"prompt": "a", "stop": ""},
        {"prompt": "a", "presence_penalty": 0.5},
    ],
)
def test_completions_reject(server, body):
    port, _ = server
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 400, out
    assert out["error"]["message"]


@pytest.mark.parametrize(
    "early_exit, field",
    [
        ({"metric": "learned"}, "early_exit.metric 'learned'"),  # no confidence heads here
        ({"metric": "guess"}, "metric"),
        ({"mode": "self_speculative", "draft_threshold": 1.5}, "draft_threshold"),
        ({"mode": "self_speculative", "draft_threshold": -0.1}, "draft_threshold"),
    ],
)
def test_completions_early_exit_fields_are_named(server, early_exit, field):
    port, _ = server
    status, out = call(port, "POST", "/v1/completions", {"prompt": "a", "early_exit": early_exit})
    assert status == 400, out
    assert field in out["error"]["message"]


def test_completions_report_early_exit_stats(server):
    port, _ = server
    body = {"prompt": "ab", "max_tokens": 3, "early_exit": {"mode": "early_exit"}}
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 200, out
    assert set(out["choices"][0]["early_exit_stats"]) >= {"drafted_tokens", "acceptance_rate"}


@pytest.mark.parametrize(
    "ee, fragment",
    [
        ({"target_agreement": 0.95}, "target_agreement 0.95: the checkpoint has no calibration"),
        ({"target_agreement": 1.01}, "target_agreement"),
        ({"target_agreement": -1}, "target_agreement"),
        ({"target_agreement": None, "threshold": 2}, "threshold"),
        ({"target_agreement": [0.9]}, "target_agreement"),
        ({"mode": "self_speculative", "target_agreement": 0.9}, "target_agreement needs mode"),
    ],
)
def test_completions_reject_bad_target_agreement(server, ee, fragment):
    port, _ = server
    body = {"prompt": "a", "max_tokens": 2, "early_exit": {"mode": "early_exit", **ee}}
    status, out = call(port, "POST", "/v1/completions", body)
    assert status == 400, out
    assert fragment in out["error"]["message"], out


def test_concurrent_requests_are_serialised_and_equal(server):
    port, engine = server
    bodies = [
        {"prompt": f"req {i}", "max_tokens": 8, "temperature": 0.8, "seed": i} for i in range(24)
    ]
    alone = [call(port, "POST", "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies[:6]]
    engine.calls.clear()
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda b: call(port, "POST", "/v1/completions", b), bodies))
    assert all(s == 200 for s, _ in outs)
    assert [o["choices"][0]["text"] for _, o in outs[:6]] == alone
    assert engine.max_active == 1  # never two model calls at once
    assert sum(engine.calls) == len(bodies)


def test_metrics(server):
    port, _ = server
    call(port, "PUT", "/api", {"prompts": ["m"], "tokens_to_generate": 3, "temperature": 0.0})
    status, text = call(port, "GET", "/metrics")
    assert status == 200
    names = ("ee_requests_total", "ee_request_errors_total", "ee_generated_tokens_total",
             "ee_tokens_per_second", "ee_mean_exit_layer",
             "ee_request_latency_seconds_bucket")  # fmt: skip
    for name in names:
        assert name in text
    assert call(port, "GET", "/health")[1]["status"] == "ok"


def test_committed_openapi_matches():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    assert doc.read_text() == openapi_json(), (
        "docs/openapi.json is stale: "
        "python -m megatron.early_exit.server.openapi > docs/openapi.json"
    )
