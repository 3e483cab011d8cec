"""Rank coordination: rank 0 broadcasts typed commands, every rank executes them together.

Protocol (one command at a time, issued only by rank 0's single model-worker thread, so
collectives can never interleave):

1. rank 0 broadcasts a `Command` (broadcast_object_list on a dedicated gloo group);
2. every rank runs it (the engine's `generate` is itself a collective) inside try/except;
3. every rank all-gathers its outcome (None or a `RankError`), so all ranks agree on success
   and an exception on any rank reaches rank 0, which answers the client with it; the
   server keeps serving because no rank left the loop.

Bounded waits: the command group has a timeout (`--dist-timeout`); rank 0 sends PING
commands while idle so followers never sit in a receive longer than that, and a rank that
dies makes the next collective fail with a timeout instead of hanging forever (torchrun
also tears the job down when any worker exits). Inputs are validated on rank 0 before they
are broadcast and the engine validates again on every rank before communicating, so bad
input fails identically everywhere and never strands a rank inside the model.

`after_execute(rank, command)`, when given, runs on every rank right after its own execute
and before the ranks agree; an exception it raises is that rank's failure. Tests inject rank
faults through it (tests/distributed/worker_server_fault.py); it runs after the collective
execute so a raising rank never strands its peers inside the model.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megatron.early_exit.inference.api import InferenceError

log = logging.getLogger("ee.server")

GENERATE = "generate"
STEP = "step"  # one continuous-batching decode iteration: payload [StepPlan dict]
PING = "ping"
SHUTDOWN = "shutdown"


@dataclass
class Command:
    kind: str
    payload: list[dict] = field(default_factory=list)


@dataclass
class RankError:
    rank: int
    type: str
    message: str
    client_error: bool  # an InferenceError: bad input, answered 400

    def describe(self) -> str:
        return f"rank {self.rank}: {self.type}: {self.message}"


class CommandError(RuntimeError):
    def __init__(self, errors: list[RankError]) -> None:
        self.errors = errors
        self.client_error = all(e.client_error for e in errors)
        first = errors[0]
        msg = first.message if self.client_error else "; ".join(e.describe() for e in errors)
        super().__init__(msg)


class Coordinator:
    """Runs `execute(command) -> result` on every rank in lock step."""

    def __init__(
        self,
        execute: Callable[[Command], Any],
        timeout_s: float = 600.0,
        group: Any = None,
        after_execute: Callable[[int, Command], None] | None = None,
    ) -> None:
        self.execute = execute
        self.after_execute = after_execute
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.distributed and group is None and self.world_size > 1:
            # A gloo group of its own: object collectives need CPU tensors even on NCCL runs,
            # and its timeout bounds every command-channel wait.
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.group = group
        self.timeout_s = timeout_s

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ---- rank 0 ----
    def run(self, command: Command) -> Any:
        """Broadcast, execute everywhere, agree. Raises CommandError if any rank failed."""
        assert self.is_leader, "only rank 0 issues commands"
        if self.world_size > 1:
            dist.broadcast_object_list([command], src=0, group=self.group)
        return self._execute_and_agree(command)

    def shutdown(self) -> None:
        """Release the followers (they leave `follow`); rank 0 then exits too."""
        assert self.is_leader
        if self.world_size > 1:
            dist.broadcast_object_list([Command(SHUTDOWN)], src=0, group=self.group)

    # ---- ranks > 0 ----
    def follow(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Receive and execute commands until SHUTDOWN."""
        assert not self.is_leader
        while not should_stop():
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            command = box[0]
            if not isinstance(command, Command) or command.kind == SHUTDOWN:
                return
            with contextlib.suppress(CommandError):  # rank 0 reports it; we keep following
                self._execute_and_agree(command)

    def _execute_and_agree(self, command: Command) -> Any:
        result, error = None, None
        if command.kind != PING:
            try:
                result = self.execute(command)
                if self.after_execute is not None:
                    self.after_execute(self.rank, command)
            except Exception as exc:  # every failure is reported, none kills the server
                if not isinstance(exc, InferenceError):
                    log.error("rank %d: command %s failed", self.rank, command.kind, exc_info=exc)
                error = RankError(
                    rank=self.rank,
                    type=type(exc).__name__,
                    message=str(exc) or "(no message)",  # never a traceback: it reaches clients
                    client_error=isinstance(exc, InferenceError),
                )
        outcomes: list[Any] = [error]
        if self.world_size > 1:
            outcomes = [None] * self.world_size
            dist.all_gather_object(outcomes, error, group=self.group)
        errors = [e for e in outcomes if e is not None]
        if errors:
            raise CommandError(errors)
        return result
