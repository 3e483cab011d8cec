"""Process-level server lifecycle on every rank: load the engine, serve or follow, stop.

Threads: on every rank the main thread only waits for a stop signal, so SIGTERM/SIGINT
are handled promptly even while a rank is blocked inside a collective. Rank 0 runs the
HTTP server (uvicorn's event loop in a thread) and the single model worker; other ranks
run `Coordinator.follow` in a thread. Shutdown (SIGTERM): rank 0 stops accepting (new
requests and /ready get 503), answers the running and queued requests within
`--shutdown-grace` seconds (what is left then gets 503), closes HTTP, broadcasts SHUTDOWN;
followers leave their loop; everyone exits. A rank that is not released within GRACE_S
exits anyway, so a signal always ends the job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from megatron.early_exit.inference.api import GenerationRequest
from megatron.early_exit.server.coordinator import GENERATE, PING, STEP, Command, Coordinator

GRACE_S = 5.0


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve(run, args, platform, after_execute=None) -> int:
    """`args`: the validated server/config.py ServerConfig. `after_execute(rank, command)`:
    the coordinator's per-rank hook (tests inject faults through it; None in production)."""
    from megatron.early_exit.errors import CheckpointError
    from megatron.early_exit.inference.loading import build_engine

    logging.basicConfig(level=logging.INFO, format="[server] %(message)s")
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        engine = build_engine(run, platform)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # rank 0's streaming listener and cancel hook for the command being run (set by its
    # model worker; a callable cannot travel in the broadcast command, and followers never
    # stream). With several ranks every rank runs with cancel_sync: rank 0's hook is asked
    # once per decode step and its answer broadcast, so all ranks stop the same sequences.
    listener: list = [None, None]

    def execute(command: Command):
        if command.kind == STEP:  # continuous batching: rank 0's plan for this iteration
            return engine.step(command.payload[0], on_token=listener[0])
        if command.kind != GENERATE:
            return None
        reqs = [GenerationRequest.from_dict(d) for d in command.payload]
        return engine.generate(
            reqs,
            on_token=listener[0],
            cancelled=listener[1],
            cancel_sync=coordinator.world_size > 1,
        )

    coordinator = Coordinator(execute, timeout_s=args.dist_timeout, after_execute=after_execute)
    if coordinator.is_leader:
        code = _lead(engine, coordinator, args, run, stop, listener)
    else:
        code = _follow(coordinator, stop, args.shutdown_grace + GRACE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    # No process-group teardown: every rank is leaving, and destroying a gloo group while a
    # peer is already gone can block. Exiting the process releases everything.
    os._exit(code)


def _follow(coordinator: Coordinator, stop: threading.Event, grace_s: float) -> int:
    failed: list[BaseException] = []

    def loop():
        try:
            coordinator.follow()
        except BaseException as exc:  # rank 0 gone or a channel timeout
            failed.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=loop, name="follower", daemon=True)
    thread.start()
    stop.wait()  # a signal, or the loop ended (SHUTDOWN / failure)
    # On a signal (torchrun sends it to every rank at once) keep following while rank 0
    # answers its open requests: it broadcasts SHUTDOWN when done.
    thread.join(grace_s)
    return 1 if failed else 0


def _lead(
    engine, coordinator: Coordinator, args, run, stop: threading.Event, listener: list
) -> int:
    from megatron.early_exit.server.app import ServerContext, make_server, serve_in_thread
    from megatron.early_exit.server.metrics import ServerMetrics
    from megatron.early_exit.server.protocol import TextCodec
    from megatron.early_exit.server.service import ContinuousService, GenerationService

    def run_batch(requests, on_token=None, cancelled=None):
        listener[0] = on_token
        listener[1] = cancelled
        try:
            return coordinator.run(Command(GENERATE, [r.to_dict() for r in requests]))
        finally:
            listener[0] = listener[1] = None

    def run_step(plan: dict, on_token=None):
        listener[0] = on_token
        try:
            return coordinator.run(Command(STEP, [plan]))
        finally:
            listener[0] = None

    metrics = ServerMetrics()
    if args.scheduler == "continuous":
        from megatron.early_exit.inference.continuous import batch_key

        service_cls, extra = (
            ContinuousService,
            {
                "run_step": run_step,
                "key": lambda r: batch_key(r, engine.limits, engine.calibration),
            },
        )
    else:
        service_cls, extra = GenerationService, {}
    service = service_cls(
        run_batch,
        metrics=metrics,
        **extra,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        idle=lambda: coordinator.run(Command(PING)),
        idle_interval_s=max(1.0, min(30.0, args.dist_timeout / 4)),
        on_stop=coordinator.shutdown,
    )
    tok = engine.tokenizer
    codec = TextCodec(
        tokenize=engine.tokenize,
        detokenize=engine.detokenize,
        limits=engine.limits,
        bos=getattr(tok, "bos", None),
        eos=engine.eos,
        model_name=args.model_name or os.path.basename(os.path.normpath(run.checkpoint.load)),
    )
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.server.chat import ChatTemplate, load_chat_template

    def special(token_id):
        try:
            return None if token_id is None else engine.detokenize([token_id])
        except Exception:  # a tokenizer that cannot show it: the template gets ""
            return None

    try:
        source = load_chat_template(run.data.tokenizer_model, args.chat_template)
        template = source and ChatTemplate(source, special(getattr(tok, "bos", None)),
                                           special(engine.eos))  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        coordinator.shutdown()
        return 1
    ctx = ServerContext(
        service,
        codec,
        metrics,
        world_size=coordinator.world_size,
        request_timeout_s=args.request_timeout,
        api_key=args.api_key,
        allowed_hosts=args.hosts(),
        max_body_bytes=args.max_body_bytes,
        chat_template=template or None,
    )
    try:
        server = make_server(
            ctx,
            args.host,
            args.port,
            limit_concurrency=args.limit_concurrency,
            timeout_keep_alive=args.timeout_keep_alive,
            timeout_request_read=args.timeout_request_read,
        )
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        coordinator.shutdown()
        return 1
    service.start()
    serve_in_thread(server)
    host, port = server.server_address[:2]
    print(
        f"serving {codec.model_name} on http://{host}:{port} "
        f"(world size {coordinator.world_size}, exits {list(engine.limits.exit_layers)})",
        flush=True,
    )
    stop.wait()
    print(f"shutting down (answering open requests, {args.shutdown_grace} s at most)", flush=True)
    service.drain(args.shutdown_grace)  # every open request gets its answer or a 503
    server.shutdown(timeout_s=GRACE_S)  # uvicorn sends what is left and closes
    server.server_close()
    service.stop(timeout_s=GRACE_S)  # the worker's on_stop broadcasts SHUTDOWN
    return 0
