"""REST generation server for an early-exit GPT checkpoint. Launch with torchrun, e.g.

    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --load CKPT --port 5000

`--load` alone restores the architecture, the parallel-agnostic weights and the tokenizer
(ee_args.json); give the parallel layout with --tensor/--pipeline-model-parallel-size.
Rank 0 serves HTTP (default 127.0.0.1); every other rank follows rank 0's broadcast
commands (megatron/early_exit/server/coordinator.py). SIGTERM/SIGINT stop every rank.
Endpoints: PUT /api, POST /v1/completions, GET /v1/models, GET /health, GET /ready,
GET /metrics, GET /openapi.json (docs/server.md). Server flags: server/config.py.
"""

from __future__ import annotations

import sys


def add_server_arguments(parser) -> None:
    from megatron.early_exit.flags import add_flags
    from megatron.early_exit.server.config import ServerConfig

    add_flags(parser, ServerConfig)


def check_server_args(args):
    """The validated ServerConfig of parsed flags (ConfigError, a ValueError, naming the flag)."""
    from megatron.early_exit.flags import from_args
    from megatron.early_exit.server.config import ServerConfig

    return from_args(ServerConfig, args).validate()


def main(argv=None, after_execute=None) -> int:
    """`after_execute(rank, command)`: a hook every rank runs after each command (tests inject
    rank faults through it, tests/distributed/worker_server_fault.py)."""
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
        server_config = check_server_args(args)
        run = inference_run_config(None, platform.is_cuda, args=args)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron.early_exit.server.launch import serve

    return serve(run, server_config, platform, after_execute=after_execute)


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    sys.exit(main())
