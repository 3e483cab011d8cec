"""`ServerConfig`: the flags of tools/run_text_generation_server.py, declared once (flags.flag).

The model and parallelism flags are the training ones (arguments.py); these say how the HTTP
front end on rank 0 listens, bounds its work and authenticates. `validate` rejects bad values
before any process group or model exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

from megatron.early_exit.errors import ConfigError
from megatron.early_exit.flags import flag

API_KEY_ENV = "EE_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServerConfig:
    FLAG_GROUP: ClassVar[str] = "server"

    host: str = flag("127.0.0.1", help="bind address (0.0.0.0 exposes it)")
    port: int = flag(5000, help="0 picks a free port")
    max_batch_size: int = flag(8, help="prompts decoded together at most (continuous: slots)")
    scheduler: str = flag(
        "continuous",
        choices=["continuous", "queue"],
        help="continuous: requests join and leave the running batch at every decode step "
        "(mode none, early_exit with kv_recompute; others use queue); queue: a batch of "
        "queued requests runs to its end before the next starts",
    )
    max_queue: int = flag(256, help="waiting requests before 503")
    request_timeout: float = flag(600.0, help="seconds before 504 (the generation is cancelled)")
    dist_timeout: float = flag(
        300.0, help="seconds any rank waits on the command channel before failing"
    )
    model_name: str | None = flag(None, help="`model` in OpenAI responses")
    chat_template: str | None = flag(
        None, help="jinja2 chat template file (default: the tokenizer config's chat_template)"
    )
    api_key: str | None = flag(
        None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV} if set)"
    )
    allowed_hosts: list[str] | None = flag(
        None,
        help="Host header values accepted (default: local names when bound to loopback, "
        "any otherwise; '*' accepts any)",
    )
    limit_concurrency: int = flag(256, help="open connections before new ones get 503")
    timeout_keep_alive: float = flag(5.0, help="seconds an idle keep-alive connection stays")
    timeout_request_read: float = flag(
        30.0, help="seconds a client has to send its headers and body"
    )
    max_body_bytes: int = flag(8 << 20, help="request bodies larger than this get 413")
    shutdown_grace: float = flag(
        20.0,
        help="seconds SIGTERM waits for running and queued requests before 503 (torchrun "
        "kills workers 30 s after its SIGTERM)",
    )

    def validate(self) -> ServerConfig:
        """ConfigError naming the flag; fills api_key from the environment."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        for name, value in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-queue", self.max_queue),
            ("--limit-concurrency", self.limit_concurrency),
            ("--max-body-bytes", self.max_body_bytes),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name, value in (
            ("--request-timeout", self.request_timeout),
            ("--dist-timeout", self.dist_timeout),
            ("--timeout-keep-alive", self.timeout_keep_alive),
            ("--timeout-request-read", self.timeout_request_read),
            ("--shutdown-grace", self.shutdown_grace),
        ):
            if not value > 0 or math.isinf(value):  # also NaN
                raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value}")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        return self

    def hosts(self) -> list[str] | None:
        """The Host allow-list (None: any)."""
        if self.allowed_hosts is not None:
            return None if "*" in self.allowed_hosts else list(self.allowed_hosts)
        if self.host in LOOPBACK_HOSTS:
            return list(LOOPBACK_HOSTS)
        return None
