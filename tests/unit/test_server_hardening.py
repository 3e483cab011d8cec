"""The HTTP stack under bad clients: JSON for every error status, guards (API key, Host,
Content-Type), read/keep-alive timeouts, bounded connections, cancellation, truthful health,
graceful drain, metrics. Single process, a fake engine that decodes step by step."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from megatron.early_exit.inference.api import (
    GenerationResult,
    GenerationStats,
    TokenEvent,
    validate_batch,
)
from megatron.early_exit.server import protocol
from megatron.early_exit.server.app import ServerContext, make_server, serve_in_thread
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.service import GenerationService
from tests.unit.test_server_http import EOS, LIMITS, detokenize

pytestmark = pytest.mark.unit
JSON = {"Content-Type": "application/json"}


class StepEngine:
    """One token per decode step ('a' + step); records the steps each request ran after
    its `cancelled` turned True. `pace` (s) slows steps down so a client can act
    mid-generation; `fail` makes the next call raise like a broken collective."""

    def __init__(self, pace: float = 0.0) -> None:
        self.pace = pace
        self.steps_after_cancel: list[int] = []
        self.finished: list[str] = []
        self.fail = False
        self.tokenized = 0
        self.calls = 0

    def tokenize(self, text: str) -> list[int]:
        self.tokenized += 1
        return list(text.encode())

    def generate(self, requests, on_token=None, cancelled=None):
        self.calls += 1
        if self.fail:
            self.fail = False
            raise RuntimeError("collective timed out (rank 1 unreachable)")
        validate_batch(requests, LIMITS)
        gen = [[] for _ in requests]
        finish = [None] * len(requests)
        after = [0] * len(requests)
        while any(f is None for f in finish):
            for i, r in enumerate(requests):
                if finish[i] is not None:
                    continue
                # One look per step, as the engine does: a flag that flips mid-step counts
                # from the next step.
                stop = cancelled is not None and cancelled(i)
                after[i] += stop
                gen[i].append(97 + len(gen[i]) % 26)
                if on_token is not None:
                    on_token(TokenEvent(i, gen[i][-1], LIMITS.num_layers, 0.0))
                if stop:
                    finish[i] = "cancelled"
                elif len(gen[i]) >= r.sampling.max_new_tokens:
                    finish[i] = "length"
            if self.pace:
                time.sleep(self.pace)
        self.steps_after_cancel += after
        self.finished += finish
        return [
            GenerationResult(g, [LIMITS.num_layers] * len(g), f, stats=GenerationStats())
            for g, f in zip(gen, finish)
        ]


def _start(engine=None, *, service_kw=None, server_kw=None, **ctx_kw):
    engine = engine or StepEngine()
    metrics = ServerMetrics()
    service = GenerationService(engine.generate, metrics, **(service_kw or {})).start()
    codec = protocol.TextCodec(engine.tokenize, detokenize, LIMITS, model_name="fake", eos=EOS)
    srv = make_server(ServerContext(service, codec, metrics, **ctx_kw), "127.0.0.1", 0,
                      **(server_kw or {}))  # fmt: skip
    serve_in_thread(srv)
    return srv, service, engine


def _stop(srv, service):
    service.drain(1.0)
    srv.shutdown()
    srv.server_close()
    service.stop()


@pytest.fixture
def served(request):
    kw = getattr(request, "param", {})
    srv, service, engine = _start(**kw)
    yield srv.server_address[1], service, engine
    _stop(srv, service)


def call(port, method, path, body=None, headers=None, raw=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={**JSON, **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype else payload.decode()), resp


def raw_exchange(port, data: bytes, timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _status_and_json(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


# ---------------------------------------------------------------------------- errors
def test_every_error_status_is_json(served):
    port, _, _ = served
    for method, path, status in (("GET", "/nope", 404), ("GET", "/api", 405),
                                 ("POST", "/api", 405)):  # fmt: skip
        got, out, _ = call(port, method, path, body={} if method == "POST" else None)
        assert got == status and out["error"]["message"], out
    huge = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            b"application/json\r\nContent-Length: 999999999\r\n\r\n{")  # fmt: skip
    status, out = _status_and_json(raw_exchange(port, huge))
    assert status == 413 and "larger than" in out["error"]["message"]
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    chunk = b"x" * (1 << 20)
    chunked += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 9 + b"0\r\n\r\n"
    status, out = _status_and_json(raw_exchange(port, chunked))
    assert status == 413
    got, out, _ = call(port, "POST", "/v1/completions", body={"prompt": "a"},
                       headers={"Content-Type": "text/plain"})  # fmt: skip
    assert got == 415 and "application/json" in out["error"]["message"]
    got, out, _ = call(port, "POST", "/v1/completions", raw=b'{"prompt": "a"}',
                       headers={"Content-Type": ""})  # fmt: skip
    assert got == 415
    for n, status in ((10000, 414), (20000, 414)):  # whole head, or beyond h11's buffer
        long_url = b"GET /" + b"a" * n + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        assert _status_and_json(raw_exchange(port, long_url))[0] == status
    for n in (17000, 40000):
        big = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: " + b"a" * n + b"\r\n\r\n"
        assert _status_and_json(raw_exchange(port, big))[0] == 431
    doubled = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/json\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\n{}")  # fmt: skip
    status, out = _status_and_json(raw_exchange(port, doubled))
    assert status == 400 and "malformed HTTP request" in out["error"]["message"]


def test_no_version_in_server_header_and_no_internals(served):
    port, _, _ = served
    _, _, resp = call(port, "GET", "/health")
    assert resp.getheader("Server") is None


def test_a_bug_answers_500_without_internals(served, caplog):
    port, service, _ = served

    def broken(*_a, **_k):
        raise KeyError("/secret/path/internal.py")

    service.submit_async, orig = broken, service.submit_async
    try:
        status, out, _ = call(port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
    finally:
        service.submit_async = orig
    assert status == 500 and out["error"]["message"] == "internal error (see the server log)"
    assert "/secret/path" in caplog.text  # the log keeps it


def test_long_prompt_refused_before_tokenizing(served):
    port, _, engine = served
    before = engine.tokenized
    word = "a" * (LIMITS.max_sequence_length * protocol.CHARS_PER_TOKEN_BOUND + 1)
    status, out, _ = call(port, "POST", "/v1/completions", {"prompt": word, "max_tokens": 1})
    assert status == 400 and "characters" in out["error"]["message"]
    status, out, _ = call(port, "PUT", "/api", {"prompts": ["b", word], "tokens_to_generate": 1})
    assert status == 400 and "context" in out["error"]["message"]
    assert engine.tokenized - before <= 1  # only "b" reached the tokenizer


# ---------------------------------------------------------------------------- security
@pytest.mark.parametrize("served", [{"api_key": "s3cret"}], indirect=True)
def test_api_key(served):
    port, _, _ = served
    body = {"prompt": "a", "max_tokens": 2}
    assert call(port, "POST", "/v1/completions", body)[0] == 401
    bad = {"Authorization": "Bearer nope"}
    status, out, _ = call(port, "POST", "/v1/completions", body, headers=bad)
    assert status == 401 and out["error"]["type"] == "authentication_error"
    good = {"Authorization": "Bearer s3cret"}
    assert call(port, "POST", "/v1/completions", body, headers=good)[0] == 200
    assert call(port, "GET", "/v1/models", headers=good)[0] == 200
    assert call(port, "GET", "/metrics")[0] == 401
    assert call(port, "GET", "/health")[0] == 200  # probes need no key


@pytest.mark.parametrize("served", [{"allowed_hosts": ["127.0.0.1", "localhost"]}],
                         indirect=True)  # fmt: skip
def test_host_allow_list(served):
    port, _, _ = served
    assert call(port, "GET", "/health")[0] == 200  # Host: 127.0.0.1:port
    status, out, _ = call(port, "GET", "/health", headers={"Host": "evil.example:80"})
    assert status == 421 and "evil.example" in out["error"]["message"]


def test_server_config_hosts_default_to_local_names_on_loopback(monkeypatch):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.server.config import ServerConfig

    assert "localhost" in ServerConfig().validate().hosts()
    assert ServerConfig(host="0.0.0.0").validate().hosts() is None
    assert ServerConfig(allowed_hosts=["*"]).validate().hosts() is None
    monkeypatch.setenv("EE_API_KEY", "k")
    assert ServerConfig().validate().api_key == "k"
    with pytest.raises(ConfigError, match="--timeout-keep-alive"):
        ServerConfig(timeout_keep_alive=0).validate()


# ---------------------------------------------------------------------------- connections
@pytest.mark.parametrize("served", [{"server_kw": {"timeout_request_read": 0.3,
                                                   "timeout_keep_alive": 0.3}}],
                         indirect=True)  # fmt: skip
def test_stalled_and_idle_connections_are_closed(served):
    port, _, _ = served
    reply = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: loc")  # never finishes
    status, out = _status_and_json(reply)
    assert status == 408 and "in time" in out["error"]["message"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # sends nothing
        assert b" 408 " in s.recv(4096)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # keep-alive idle
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):  # ends: the server closes the idle connection
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("served", [{"server_kw": {"limit_concurrency": 2}}], indirect=True)
def test_connections_are_bounded(served):
    port, _, _ = served
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.1)  # let the server register them
        status, out = _status_and_json(
            raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        )
        assert status == 503 and "connections" in out["error"]["message"]
    finally:
        for s in held:
            s.close()


# ---------------------------------------------------------------------------- cancellation
def _wait(cond, what, limit=20.0):
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.mark.parametrize("served", [{"engine": StepEngine(pace=0.05)}], indirect=True)
@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_generation(served, stream):
    """A client that goes away stops its generation at the next step (the engine runs at
    most one step for it after the cancel), and a short request then runs alone."""
    port, _, engine = served
    engine.steps_after_cancel.clear()
    engine.finished.clear()
    calls = engine.calls
    body = json.dumps({"prompt": "long", "max_tokens": 200, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    if stream:
        got = b""
        while b"data: " not in got:  # it is generating
            got += s.recv(4096)
    else:
        _wait(lambda: engine.calls > calls, "never started")
    s.close()
    _wait(lambda: engine.finished, "generation was not cancelled")
    assert engine.finished == ["cancelled"]
    assert engine.steps_after_cancel == [1]
    status, out, _ = call(port, "POST", "/v1/completions", {"prompt": "s", "max_tokens": 3})
    assert status == 200 and len(out["choices"][0]["token_ids"]) == 3
    assert engine.finished == ["cancelled", "length"]


@pytest.mark.parametrize("served", [{"engine": StepEngine(pace=0.05),
                                     "request_timeout_s": 0.2}], indirect=True)  # fmt: skip
def test_timeout_cancels_generation(served):
    port, _, engine = served
    status, out, _ = call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 255})
    assert status == 504 and out["error"]["type"] == "timeout"
    _wait(lambda: engine.finished, "generation was not cancelled")
    assert engine.finished == ["cancelled"] and engine.steps_after_cancel == [1]


def test_cancelled_queued_job_never_runs():
    gate = threading.Event()
    ran = []

    def run_batch(reqs, **_kw):
        gate.wait(10)
        ran.append(len(reqs))
        return [GenerationResult([97], [4], "length") for _ in reqs]

    from megatron.early_exit.server.service import Cancelled

    service = GenerationService(run_batch, max_batch_size=1).start()
    try:
        first = service.submit_async([_gen("a")])
        second = service.submit_async([_gen("b")])
        service.cancel(second)
        gate.set()
        assert first.result(10)[0].token_ids == [97]
        with pytest.raises(Cancelled):
            second.result(10)
        assert ran == [1] and service.metrics.cancelled == 1
    finally:
        service.stop()


def _gen(prompt, n=2):
    from megatron.early_exit.inference.api import GenerationRequest, SamplingParams

    return GenerationRequest(list(prompt.encode()), SamplingParams(max_new_tokens=n))


# ---------------------------------------------------------------------------- health, drain
def test_health_is_503_after_a_failed_collective_until_it_recovers(served):
    port, _, engine = served
    assert call(port, "GET", "/health")[0] == 200 and call(port, "GET", "/ready")[0] == 200
    engine.fail = True
    status, out, _ = call(port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 500 and "internal error" in out["error"]["message"]
    assert call(port, "GET", "/health")[0] == 503 and call(port, "GET", "/ready")[0] == 503
    assert call(port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    assert call(port, "GET", "/health")[0] == 200


def test_drain_answers_running_and_queued_requests_then_refuses():
    engine = StepEngine(pace=0.05)  # 2 s a request: the queue fills long before the first ends
    srv, service, _ = _start(engine, service_kw={"max_batch_size": 1})
    port = srv.server_address[1]
    results = {}

    def client(i):
        results[i] = call(port, "POST", "/v1/completions", {"prompt": f"p{i}", "max_tokens": 40})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    _wait(lambda: engine.calls == 1 and service.queue_depth == 2, "requests never queued")
    drainer = threading.Thread(target=service.drain, args=(30.0,))
    drainer.start()
    _wait(lambda: not service.accepting, "drain did not start")
    assert call(port, "GET", "/ready")[0] == 503
    assert call(port, "POST", "/v1/completions", {"prompt": "late", "max_tokens": 1})[0] == 503
    drainer.join(30)
    for t in threads:
        t.join(30)
    assert sorted(s for s, _, _ in results.values()) == [200, 200, 200]
    _stop(srv, service)


def test_drain_past_the_grace_period_answers_503():
    engine = StepEngine(pace=0.01)
    srv, service, _ = _start(engine, service_kw={"max_batch_size": 1})
    port = srv.server_address[1]
    results = []
    t = threading.Thread(target=lambda: results.append(
        call(port, "POST", "/v1/completions", {"prompt": "p", "max_tokens": 250})))  # fmt: skip
    t.start()
    _wait(lambda: engine.calls >= 1, "never started")
    service.drain(0.05)
    t.join(30)
    assert results[0][0] == 503 and "shutting down" in results[0][1]["error"]["message"]
    _stop(srv, service)


# ---------------------------------------------------------------------------- models, metrics
def test_models_and_metrics(served):
    port, _, _ = served
    status, out, _ = call(port, "GET", "/v1/models")
    assert status == 200 and out["data"][0]["id"] == "fake"
    assert out["data"][0]["max_model_len"] == LIMITS.max_sequence_length
    call(port, "POST", "/v1/completions", {"prompt": "m", "max_tokens": 4})
    _, text, _ = call(port, "GET", "/metrics")
    for name in ("ee_exit_layer_tokens_total", "ee_draft_acceptance_ratio", "ee_queue_depth",
                 "ee_running_batch_size", "ee_cancelled_requests_total",
                 "ee_time_to_first_token_seconds_bucket",
                 "ee_inter_token_latency_seconds_bucket"):  # fmt: skip
        assert name in text, name
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#"))
    assert int(lines["ee_time_to_first_token_seconds_count"]) >= 1
    assert int(lines["ee_inter_token_latency_seconds_count"]) >= 3
