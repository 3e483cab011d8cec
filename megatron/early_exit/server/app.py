"""HTTP front end (stdlib ThreadingHTTPServer; rank 0 only).

Every body is validated against the pydantic schemas (strict types, unknown fields
refused) before anything reaches the model: malformed JSON, wrong types and out-of-range
values answer 400 with an OpenAI-style JSON error `{"error": {"message", "type", "param"}}`;
semantic errors the engine detects (prompt longer than the context, an exit layer the
model does not have) also answer 400. 5xx means a server-side failure: 500 an exception
on some rank (the message names it), 503 queue full / shutting down, 504 timeout.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, ValidationError

from megatron.early_exit.inference.api import InferenceError, TokenEvent
from megatron.early_exit.server import protocol
from megatron.early_exit.server.coordinator import CommandError
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.openapi import openapi_spec
from megatron.early_exit.server.schemas import CompletionRequest, MegatronRequest
from megatron.early_exit.server.service import GenerationService, QueueFull, ServiceStopped

MAX_BODY_BYTES = 8 << 20
log = logging.getLogger("ee.server")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param}}


@dataclass
class ServerContext:
    service: GenerationService
    codec: protocol.TextCodec
    metrics: ServerMetrics
    world_size: int = 1
    request_timeout_s: float = 600.0


def _validation_error(exc: ValidationError) -> HTTPError:
    errs = exc.errors(include_url=False)
    first = errs[0] if errs else {"loc": (), "msg": str(exc), "type": "value_error"}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return HTTPError(400, f"malformed JSON body: {first['msg']}", "invalid_request_error")
    parts = []
    for e in errs[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
    return HTTPError(400, "; ".join(parts) + more, "invalid_request_error", loc or None)


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    if not raw.strip():
        raise HTTPError(400, "request body is empty: send a JSON object", "invalid_request_error")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"malformed JSON body: {exc}", "invalid_request_error") from None


def _http_error(exc: BaseException) -> HTTPError | None:
    """The HTTP answer for a generation failure (None: not one of ours, re-raise)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, InferenceError):
        return HTTPError(400, str(exc), "invalid_request_error")
    if isinstance(exc, CommandError):
        if exc.client_error:
            return HTTPError(400, str(exc), "invalid_request_error")
        return HTTPError(500, f"generation failed: {exc}", "server_error")
    if isinstance(exc, QueueFull):
        return HTTPError(503, str(exc), "overloaded")
    if isinstance(exc, ServiceStopped):
        return HTTPError(503, str(exc), "unavailable")
    if isinstance(exc, TimeoutError):
        return HTTPError(504, str(exc), "timeout")
    return None


def _generate(ctx: ServerContext, requests):
    try:
        return ctx.service.submit(requests, timeout_s=ctx.request_timeout_s)
    except Exception as exc:
        err = _http_error(exc)
        if err is None:
            raise
        raise err from None


def _prepare(fn, req, codec):
    try:
        return fn(req, codec)
    except InferenceError as exc:
        raise HTTPError(400, str(exc), "invalid_request_error") from None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ee-megatron"
    ctx: ServerContext  # set on the subclass by make_server

    # -- plumbing --
    def log_message(self, fmt, *args):  # route through logging, quiet by default
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(
                411,
                "chunked bodies are not supported: send Content-Length",
                "invalid_request_error",
            )
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            return b""
        try:
            n = int(raw_len)
        except ValueError:
            raise HTTPError(400, "bad Content-Length header", "invalid_request_error") from None
        if n < 0:
            raise HTTPError(400, "bad Content-Length header", "invalid_request_error")
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(
                413, f"body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error"
            )
        return self.rfile.read(n)

    def _dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        status = 500
        try:
            body = self._read_body() if method in ("PUT", "POST") else b""
            route = ROUTES.get(path)
            if route is None:
                raise HTTPError(404, f"no endpoint {path!r}", "not_found")
            fn = route.get(method)
            if fn is None:
                allowed = ", ".join(sorted(route))
                raise HTTPError(
                    405, f"{method} not allowed on {path}; use {allowed}", "invalid_request_error"
                )
            status = fn(self, body) or 200
        except HTTPError as exc:
            status = exc.status
            self._json(status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            status = 499
            self.close_connection = True
        except Exception as exc:  # a server bug: still a JSON answer, and keep serving
            log.exception("unhandled error on %s %s", method, path)
            status = 500
            try:
                self._json(
                    500,
                    HTTPError(
                        500, f"internal error: {type(exc).__name__}: {exc}", "server_error"
                    ).body(),
                )
            except OSError:
                self.close_connection = True
        finally:
            if path in ROUTES:
                self.ctx.metrics.observe_request(path, status, time.perf_counter() - t0)
            else:
                self.ctx.metrics.observe_request("other", status, time.perf_counter() - t0)

    def do_GET(self):
        self._dispatch("GET")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    # -- endpoints --
    def health(self, _body: bytes) -> int:
        svc = self.ctx.service
        ok = svc.healthy
        self._json(
            200 if ok else 503,
            {
                "status": "ok" if ok else "degraded",
                "world_size": self.ctx.world_size,
                "queue_depth": svc.queue_depth,
            },
        )
        return 200 if ok else 503

    def metrics(self, _body: bytes) -> int:
        self._send(200, self.ctx.metrics.render().encode(), "text/plain; version=0.0.4")
        return 200

    def openapi(self, _body: bytes) -> int:
        self._json(200, openapi_spec())
        return 200

    def megatron_api(self, body: bytes) -> int:
        req = _parse(MegatronRequest, body)
        gen = _prepare(protocol.megatron_requests, req, self.ctx.codec)
        results = _generate(self.ctx, gen)
        self._json(200, protocol.megatron_response(req, gen, results, self.ctx.codec))
        return 200

    def completions(self, body: bytes) -> int:
        req = _parse(CompletionRequest, body)
        gen = _prepare(protocol.completion_requests, req, self.ctx.codec)
        if req.stream:
            return self._stream_completions(req, gen)
        results = _generate(self.ctx, gen)
        self._json(200, protocol.completion_response(req, gen, results, self.ctx.codec))
        return 200

    def _stream_completions(self, req, gen) -> int:
        """SSE written while the model worker generates: it pushes each token into this
        request's queue, this handler thread turns them into events. The status line goes
        out with the first token, so failures before it are plain JSON errors; later ones
        become a final `data: {"error": ...}` event."""
        events: queue.Queue = queue.Queue()
        try:
            future = self.ctx.service.submit_async(gen, on_token=events.put)
        except Exception as exc:
            err = _http_error(exc)
            if err is None:
                raise
            raise err from None
        future.add_done_callback(lambda _f: events.put(None))
        streamer = protocol.CompletionStreamer(req, gen, self.ctx.codec)
        deadline = time.monotonic() + self.ctx.request_timeout_s
        started = False

        def begin() -> None:
            nonlocal started
            if not started:
                started = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                write(streamer.start())

        def write(chunks: list[bytes]) -> None:
            for chunk in chunks:
                self.wfile.write(chunk)
            self.wfile.flush()

        def fail(err: HTTPError) -> int:
            if not started:
                raise err
            self.wfile.write(streamer.error(err.body()))
            self.wfile.flush()
            return 200

        while True:
            try:
                ev = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                t = self.ctx.request_timeout_s
                return fail(HTTPError(504, f"generation did not finish within {t} s", "timeout"))
            if isinstance(ev, TokenEvent):
                begin()
                write(streamer.token(ev.index, ev.token_id, ev.exit_layer, ev.logprob))
                continue
            try:
                results = future.result()
            except Exception as exc:
                err = _http_error(exc)
                if err is None:
                    raise
                return fail(err)
            begin()
            write(streamer.finish(results))
            return 200


ROUTES = {
    "/health": {"GET": Handler.health},
    "/metrics": {"GET": Handler.metrics},
    "/openapi.json": {"GET": Handler.openapi},
    "/api": {"PUT": Handler.megatron_api},
    "/v1/completions": {"POST": Handler.completions},
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(ctx: ServerContext, host: str = "127.0.0.1", port: int = 5000) -> _Server:
    handler = type("BoundHandler", (Handler,), {"ctx": ctx})
    return _Server((host, port), handler)


def serve_in_thread(server: _Server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    t.start()
    return t
