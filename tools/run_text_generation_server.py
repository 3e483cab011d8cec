"""REST generation server for an early-exit GPT checkpoint. Launch with torchrun, e.g.

    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT --port 5000

`--load` alone restores the architecture, the parallel-agnostic weights and the tokenizer
(ee_args.json); give the parallel layout with --tensor/--pipeline-model-parallel-size.
Rank 0 serves HTTP (default 127.0.0.1); every other rank follows rank 0's broadcast
commands (megatron/early_exit/server/coordinator.py). SIGTERM/SIGINT stop every rank.
Endpoints: PUT /api, POST /v1/completions, GET /health, GET /metrics, GET /openapi.json.
"""

from __future__ import annotations

import sys


def add_server_arguments(parser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    g.add_argument("--max-batch-size", type=int, default=8, help="prompts decoded together at most")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before 504")
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds any rank waits on the command channel before failing",
    )
    g.add_argument("--model-name", default=None, help="`model` in OpenAI responses")


def check_server_args(args) -> None:
    """Reject bad server flags before anything starts (ValueError naming the flag)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    for flag, value in (
        ("--request-timeout", args.request_timeout),
        ("--dist-timeout", args.dist_timeout),
    ):
        if not value > 0 or value == float("inf"):  # also NaN and inf
            raise ValueError(f"{flag} must be a finite number of seconds > 0, got {value}")


def main(argv=None) -> int:
    from megatron.early_exit.cli import quiet_startup

    quiet_startup()
    from megatron.early_exit.arguments import build_parser, parse_args
    from megatron.early_exit.errors import ConfigError, UserError
    from megatron.early_exit.inference.loading import inference_run_config
    from megatron.early_exit.platform import init_platform

    parser = build_parser()
    parser.prog = "run_text_generation_server.py"
    parser.description = "Serve an early-exit GPT checkpoint over HTTP (launch with torchrun)."
    add_server_arguments(parser)
    platform = init_platform()
    try:
        args = parse_args(argv, parser)
        if not args.load:
            raise ConfigError("--load CKPT is required: the server serves a trained checkpoint")
        check_server_args(args)
        run = inference_run_config(None, platform.is_cuda, args=args)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron.early_exit.server.launch import serve

    return serve(run, args, platform)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
