"""HTTP front end: Starlette on uvicorn (h11), rank 0 only.

Every body is validated against the pydantic schemas (strict types, unknown fields
refused) before anything reaches the model: malformed JSON, wrong types and out-of-range
values answer 400 with an OpenAI-style JSON error `{"error": {"message", "type", "param"}}`;
semantic errors the engine detects (prompt longer than the context, an exit layer the
model does not have) also answer 400. Every other status is a JSON error too: 401 (API
key), 404, 405, 408 (request not read in time), 413, 414, 415 (not JSON), 421 (Host not
allowed), 431, 500 (a rank failed: the message names it; bugs say only "internal error",
the log keeps the traceback), 503 (queue full, too many connections, shutting down), 504.

Work per request is bounded: the prompt's length in characters is checked before it is
tokenized (protocol.TextCodec), bodies larger than `max_body_bytes` are refused while
being read, a client that disconnects or a request that times out cancels its generation
(service.GenerationService.cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http import h11_impl

from megatron.early_exit.inference.api import InferenceError, TokenEvent
from megatron.early_exit.server import chat, protocol
from megatron.early_exit.server.coordinator import CommandError
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.openapi import openapi_spec
from megatron.early_exit.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    MegatronRequest,
)
from megatron.early_exit.server.service import (
    Cancelled,
    GenerationService,
    QueueFull,
    ServiceStopped,
)

MAX_BODY_BYTES = 8 << 20
MAX_TARGET_BYTES = 8 << 10  # request line target (path + query): longer is 414
MAX_HEADER_BYTES = 16 << 10  # all header lines together: more is 431 (also h11's buffer cap)
log = logging.getLogger("ee.server")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        if self.status in (413, 414, 431):  # a request not read to its end: drop the connection
            headers = {**(headers or {}), "Connection": "close"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _error_bytes(status: int, message: str, kind: str) -> bytes:
    return json.dumps(HTTPError(status, message, kind).body()).encode()


@dataclass
class ServerContext:
    service: GenerationService
    codec: protocol.TextCodec
    metrics: ServerMetrics
    world_size: int = 1
    request_timeout_s: float = 600.0
    api_key: str | None = None
    allowed_hosts: list[str] | None = None  # None: any Host header
    max_body_bytes: int = MAX_BODY_BYTES
    chat_template: chat.ChatTemplate | None = None  # None: /v1/chat/completions answers 400


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
    """The HTTP answer for a generation failure (None: not one of ours)."""
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
    if isinstance(exc, (ServiceStopped, Cancelled)):
        return HTTPError(503, str(exc) or "server is shutting down", "unavailable")
    if isinstance(exc, TimeoutError):
        return HTTPError(504, str(exc), "timeout")
    return None


def _as_http_error(exc: BaseException) -> HTTPError:
    err = _http_error(exc)
    if err is None:  # a bug: the log keeps the traceback, the client gets no internals
        log.error("generation failed", exc_info=exc)
        return HTTPError(500, "internal error (see the server log)", "server_error")
    return err


def _prepare(fn, req, codec):
    try:
        return fn(req, codec)
    except InferenceError as exc:
        raise HTTPError(400, str(exc), "invalid_request_error") from None


# ---------------------------------------------------------------------------- guards
def _guard(request: Request, ctx: ServerContext) -> None:
    """Sizes, Host allow-list, API key, Content-Type: before any body is read. (h11 caps
    what it buffers of an incomplete head; a head that arrived whole is measured here.)"""
    scope = request.scope
    if len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > MAX_TARGET_BYTES:
        raise HTTPError(414, "request line too long", "invalid_request_error")
    if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
        raise HTTPError(431, "request headers too large", "invalid_request_error")
    if ctx.allowed_hosts is not None:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in ctx.allowed_hosts:
            raise HTTPError(421, f"Host {host[:100]!r} is not allowed", "invalid_request_error")
    if ctx.api_key is not None and request.url.path not in ("/health", "/ready"):
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), ctx.api_key.encode()
        )
        if not ok:
            raise HTTPError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                            "authentication_error")  # fmt: skip
    if request.method in ("PUT", "POST"):
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            shown = ctype[:60] or "none"
            raise HTTPError(415, f"Content-Type must be application/json (got {shown})",
                            "invalid_request_error")  # fmt: skip


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body larger than {limit} bytes", "invalid_request_error")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies too, bounded as they arrive
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"body larger than {limit} bytes", "invalid_request_error")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _generate(request: Request, ctx: ServerContext, gen) -> list:
    """Run `gen` on the model; a disconnect or the timeout cancels it."""
    try:
        future = ctx.service.submit_async(gen)
    except Exception as exc:
        raise _as_http_error(exc) from None
    waiter = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {waiter, gone}, timeout=ctx.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
    if waiter not in done:
        ctx.service.cancel(future)
        waiter.cancel()
        if gone in done:
            raise ClientDisconnect()
        t = ctx.request_timeout_s
        raise HTTPError(504, f"generation did not finish within {t} s", "timeout")
    try:
        return waiter.result()
    except Exception as exc:
        raise _as_http_error(exc) from None


# ---------------------------------------------------------------------------- endpoints
def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


async def health(request: Request) -> Response:
    """Liveness: the model worker runs and the last collective (or PING) succeeded."""
    ctx = _ctx(request)
    svc = ctx.service
    ok = svc.alive and svc.healthy
    body = {
        "status": "ok" if ok else "degraded",
        "world_size": ctx.world_size,
        "queue_depth": svc.queue_depth,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


async def ready(request: Request) -> Response:
    """Readiness: live, and accepting work (not shutting down)."""
    ctx = _ctx(request)
    svc = ctx.service
    ok = svc.alive and svc.healthy and svc.accepting
    status = "ok" if ok else ("stopping" if not svc.accepting else "degraded")
    body = {"status": status, "world_size": ctx.world_size, "queue_depth": svc.queue_depth}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    text = _ctx(request).metrics.render()
    return Response(text, media_type="text/plain; version=0.0.4")


async def openapi(_request: Request) -> Response:
    return JSONResponse(openapi_spec())


async def models(request: Request) -> Response:
    ctx = _ctx(request)
    card = {
        "id": ctx.codec.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "ee-megatron",
        "max_model_len": ctx.codec.limits.max_sequence_length,
        "exit_layers": list(ctx.codec.limits.exit_layers),
    }
    return JSONResponse({"object": "list", "data": [card]})


async def megatron_api(request: Request) -> Response:
    ctx = _ctx(request)
    req = _parse(MegatronRequest, await _read_body(request, ctx.max_body_bytes))
    gen = _prepare(protocol.megatron_requests, req, ctx.codec)
    results = await _generate(request, ctx, gen)
    return JSONResponse(protocol.megatron_response(req, gen, results, ctx.codec))


async def completions(request: Request) -> Response:
    ctx = _ctx(request)
    req = _parse(CompletionRequest, await _read_body(request, ctx.max_body_bytes))
    gen = _prepare(protocol.completion_requests, req, ctx.codec)
    if req.stream:
        return await _stream_completions(ctx, req, gen)
    results = await _generate(request, ctx, gen)
    return JSONResponse(protocol.completion_response(req, gen, results, ctx.codec))


async def chat_completions(request: Request) -> Response:
    ctx = _ctx(request)
    req = _parse(ChatCompletionRequest, await _read_body(request, ctx.max_body_bytes))
    if ctx.chat_template is None:
        raise HTTPError(400, "this model has no chat template (the tokenizer's "
                        "tokenizer_config.json has none; start the server with --chat-template "
                        "FILE) - use /v1/completions", "invalid_request_error")  # fmt: skip
    creq = _prepare(chat.completion_request, req, ctx.chat_template)
    gen = _prepare(protocol.completion_requests, creq, ctx.codec)
    if creq.stream:
        return await _stream_completions(ctx, creq, gen, chat.ChatChunks().convert)
    results = await _generate(request, ctx, gen)
    return JSONResponse(
        chat.chat_response(protocol.completion_response(creq, gen, results, ctx.codec))
    )


async def _stream_completions(ctx: ServerContext, req, gen, convert=None) -> Response:
    """SSE written while the model worker generates: it pushes each token into this
    request's asyncio queue. The status line goes out with the first token, so failures
    before it are plain JSON errors; later ones become a final `data: {"error": ...}` event.
    A disconnect ends the generator (Starlette cancels it), which cancels the generation."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
        future = ctx.service.submit_async(
            gen, on_token=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        )
    except Exception as exc:
        raise _as_http_error(exc) from None
    future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, None))
    streamer = protocol.CompletionStreamer(req, gen, ctx.codec)
    deadline = loop.time() + ctx.request_timeout_s

    async def next_event():
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            ctx.service.cancel(future)
            t = ctx.request_timeout_s
            return HTTPError(504, f"generation did not finish within {t} s", "timeout")

    def outcome() -> list[bytes] | HTTPError:
        try:
            return streamer.finish(future.result())
        except Exception as exc:
            return _as_http_error(exc)

    first = await next_event()
    if isinstance(first, HTTPError):
        raise first
    if first is None:
        done = outcome()
        if isinstance(done, HTTPError):
            raise done

    async def events_out():
        async for chunk in body():
            yield convert(chunk) if convert is not None else chunk

    async def body():
        completed = False
        try:
            for chunk in streamer.start():
                yield chunk
            ev = first
            while True:
                if isinstance(ev, TokenEvent):
                    for chunk in streamer.token(ev.index, ev.token_id, ev.exit_layer, ev.logprob):
                        yield chunk
                elif isinstance(ev, HTTPError):
                    yield streamer.error(ev.body())
                    break
                else:
                    done = outcome()
                    if isinstance(done, HTTPError):
                        yield streamer.error(done.body())
                    else:
                        for chunk in done:
                            yield chunk
                    break
                ev = await next_event()
            completed = True
        finally:
            if not completed:  # the client went away: stop generating for it
                ctx.service.cancel(future)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events_out(), media_type="text/event-stream", headers=headers)


ROUTES = {
    "/health": ("GET", health),
    "/ready": ("GET", ready),
    "/metrics": ("GET", metrics),
    "/openapi.json": ("GET", openapi),
    "/v1/models": ("GET", models),
    "/api": ("PUT", megatron_api),
    "/v1/completions": ("POST", completions),
    "/v1/chat/completions": ("POST", chat_completions),
}


class _Guarded:
    """Pure ASGI wrapper: guards, request metrics, JSON for every error (no internals)."""

    def __init__(self, app, ctx: ServerContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"].rstrip("/") or "/"
        scope["path"] = path
        status = [499]  # no response sent: the client went away

        async def send_tracked(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            _guard(Request(scope, receive), self.ctx)
            await self.app(scope, receive, send_tracked)
        except HTTPError as exc:
            await _send_quietly(exc.response(), scope, receive, send_tracked)
        except (ClientDisconnect, OSError):
            pass  # the client went away (a broken pipe is not worth a traceback)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if status[0] == 499:
                err = HTTPError(500, "internal error (see the server log)", "server_error")
                await _send_quietly(err.response(), scope, receive, send_tracked)
        finally:
            endpoint = path if path in ROUTES else "other"
            self.ctx.metrics.observe_request(endpoint, status[0], time.perf_counter() - t0)


async def _send_quietly(response: Response, scope, receive, send) -> None:
    with contextlib.suppress(OSError, RuntimeError):  # a vanished client: nothing to log
        await response(scope, receive, send)


async def _starlette_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    path, code = request.url.path[:200], exc.status_code
    if code == 404:
        err = HTTPError(404, f"no endpoint {path!r}", "not_found")
    elif code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        err = HTTPError(405, f"{request.method} not allowed on {path}; use {allow}",
                        "invalid_request_error")  # fmt: skip
    else:
        err = HTTPError(code, str(exc.detail), "invalid_request_error")
    return err.response(headers=exc.headers)


async def _our_error(_request: Request, exc: HTTPError) -> Response:
    return exc.response()


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises after answering: the wrapper above logs the traceback
    return HTTPError(500, "internal error (see the server log)", "server_error").response()


def build_app(ctx: ServerContext) -> Any:
    routes = [Route(path, fn, methods=[method]) for path, (method, fn) in ROUTES.items()]
    app = Starlette(
        routes=routes,
        exception_handlers={
            StarletteHTTPException: _starlette_http_error,
            HTTPError: _our_error,
            Exception: _internal_error,
        },
    )
    app.state.ctx = ctx
    return _Guarded(app, ctx)


# ---------------------------------------------------------------------------- uvicorn
async def _json_503(scope, receive, send) -> None:
    """uvicorn's answer past `limit_concurrency`, as JSON."""
    body = _error_bytes(503, "too many open connections; retry later", "overloaded")
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


h11_impl.service_unavailable = _json_503  # used by H11Protocol past limit_concurrency


class _ConnProxy:
    """The h11 connection, remembering the last parse error (its status hint)."""

    def __init__(self, conn: h11.Connection) -> None:
        self._conn = conn
        self.last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _Protocol(h11_impl.H11Protocol):
    """uvicorn's h11 protocol with JSON parse errors (400/414/431) and a read deadline:
    a client must send a whole request (headers and body) within `timeout_request_read`
    seconds of its first byte (or of connecting), else 408 and the connection closes."""

    read_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.conn = _ConnProxy(self.conn)
        self._read_timer = None
        self._arm()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is not h11.DONE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.ERROR, h11.CLOSED, h11.MUST_CLOSE):
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self.conn.their_state is h11.DONE:
            return
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.cycle is None:
            self._send_error(408, "request not received in time", "timeout")
        else:  # a body that never completes: the app sees a disconnect
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        err = self.conn.last_error
        status = getattr(err, "error_status_hint", 400) or 400
        if status == 431 and b"\r\n" not in self.conn.trailing_data[0]:
            status = 414  # the request line alone is too long
        text = {414: "request line too long", 431: "request headers too large"}.get(
            status, f"malformed HTTP request: {err}" if err else "malformed HTTP request"
        )
        self._send_error(status, text, "invalid_request_error")

    def _send_error(self, status: int, message: str, kind: str) -> None:
        body = _error_bytes(status, message, kind)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        try:
            for event in (
                h11.Response(status_code=status, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response already started: just close
            pass
        self.transport.close()


class HTTPServer:
    """uvicorn in a thread of its own, on a socket bound at construction (errors surface
    here, and port 0 is resolved at once)."""

    def __init__(
        self,
        ctx: ServerContext,
        host: str = "127.0.0.1",
        port: int = 5000,
        limit_concurrency: int = 256,
        timeout_keep_alive: float = 5.0,
        timeout_request_read: float = 30.0,
    ) -> None:
        self.ctx = ctx
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host.strip("[]"), port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        protocol_cls = type("Protocol", (_Protocol,), {"read_timeout_s": timeout_request_read})
        config = uvicorn.Config(
            build_app(ctx),
            http=protocol_cls,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            limit_concurrency=limit_concurrency,
            timeout_keep_alive=timeout_keep_alive,
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True, name="http"
        )
        self.thread.start()
        return self.thread

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let uvicorn finish open responses, and return."""
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)

    def server_close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()


def make_server(ctx: ServerContext, host: str = "127.0.0.1", port: int = 5000, **kw):
    return HTTPServer(ctx, host, port, **kw)


def serve_in_thread(server: HTTPServer) -> threading.Thread:
    thread = server.start()
    deadline = time.monotonic() + 10
    while not server.uvicorn.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread
