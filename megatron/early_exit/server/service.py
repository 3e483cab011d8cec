"""Rank 0's request queue and its single model worker.

HTTP threads `submit` jobs (one job = the prompts of one HTTP request) and wait for them.
Exactly one thread (the worker) calls the model, so model calls (and therefore the
collectives every rank runs) never interleave. While one batch runs, new jobs queue; the
worker then takes the oldest job plus any later queued jobs with the same early-exit
settings (up to `max_batch_size` prompts) and decodes them as one batch (batched early
exit: each sequence exits independently). Per-request sampling params, including seeds,
stay per sequence, so a batched request gets the result it would get alone.

Streaming: a job may carry `on_token`; the worker then passes the engine a listener that
routes each `TokenEvent` to its job (index renumbered within the job) while the batch runs.
If a failed batch is retried job by job, tokens a job already got are not sent again (the
retry is deterministic: every request carries its seed).

Cancellation (`cancel(future)`: the client went away or timed out): a queued job is dropped
before it runs; in a running batch its sequences stop at the next decode step when the
engine takes a `cancelled(index)` hook (run_batch(..., cancelled=...); with several ranks
they agree on it per decode step, see launch.py), the other sequences go on.

Health: `healthy` turns False when a batch or an idle PING fails other than by a rank's
reported exception (a collective timed out or broke: some rank is unreachable), and True
again on the next command that succeeds. `drain` (SIGTERM) stops accepting, waits for the
queued and running jobs, and answers what is left after the grace period with 503.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field

from megatron.early_exit.inference.api import (
    GenerationRequest,
    GenerationResult,
    InferenceError,
    OnToken,
    TokenEvent,
)
from megatron.early_exit.server.coordinator import CommandError
from megatron.early_exit.server.metrics import ServerMetrics

# run_batch(requests, on_token=listener, cancelled=hook): the listener times tokens and
# feeds streaming jobs; hook(index) is True once that request was cancelled
RunBatch = Callable[..., list[GenerationResult]]


class QueueFull(RuntimeError):
    pass


class ServiceStopped(RuntimeError):
    pass


class Cancelled(RuntimeError):
    """The job was cancelled before it ran (its client is gone)."""


@dataclass
class _Job:
    requests: list[GenerationRequest]
    future: Future = field(default_factory=Future)
    on_token: OnToken | None = None  # TokenEvent.index is the request's index in this job
    delivered: list[int] = field(default_factory=list)  # tokens sent per request
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: int = 0  # ContinuousService: prompts that got a slot
    results: list = field(default_factory=list)  # ContinuousService: results so far

    def __post_init__(self) -> None:
        self.delivered = [0] * len(self.requests)
        self.future.ee_job = self  # type: ignore[attr-defined]  (GenerationService.cancel)

    def key(self) -> tuple:
        return tuple(sorted(asdict(self.requests[0].early_exit).items(), key=str))


class GenerationService:
    def __init__(
        self,
        run_batch: RunBatch,
        metrics: ServerMetrics | None = None,
        max_batch_size: int = 8,
        max_queue: int = 256,
        idle: Callable[[], None] | None = None,
        idle_interval_s: float = 30.0,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.metrics = metrics or ServerMetrics()
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max_queue
        self.idle = idle  # e.g. a PING to followers so their waits stay bounded
        self.idle_interval_s = idle_interval_s
        self.on_stop = on_stop  # e.g. broadcast SHUTDOWN
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self.healthy = True
        self._running: list[_Job] = []
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)

    def start(self) -> GenerationService:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_size(self) -> int:
        return sum(len(j.requests) for j in self._running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return not (self._stopping or self._draining)

    def cancel(self, future: Future) -> None:
        """Stop the job behind `future` (a no-op once it is done)."""
        job = getattr(future, "ee_job", None)
        if job is None or future.done():
            return
        job.cancelled.set()
        with self._cv:
            self.metrics.cancelled += 1
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth = len(self._queue)
                _fail(job, Cancelled("request cancelled"))

    def drain(self, grace_s: float) -> None:
        """Stop accepting; wait up to `grace_s` for queued and running jobs; answer the
        rest with 503 (ServiceStopped) and cancel them. The worker then stops."""
        deadline = time.monotonic() + grace_s
        with self._cv:
            self._draining = True
            while (self._queue or self._running) and time.monotonic() < deadline:
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = list(self._queue) + list(self._running)
            self._queue.clear()
            self._stopping = True
            self._cv.notify_all()
        for job in left:
            job.cancelled.set()
            _fail(job, ServiceStopped("server is shutting down"))

    def submit(
        self,
        requests: list[GenerationRequest],
        timeout_s: float | None = None,
        on_token: OnToken | None = None,
    ) -> list[GenerationResult]:
        future = self.submit_async(requests, on_token)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"generation did not finish within {timeout_s} s") from None

    def submit_async(
        self, requests: list[GenerationRequest], on_token: OnToken | None = None
    ) -> Future:
        """Queue a job; `on_token` is called from the worker thread (keep it quick)."""
        job = _Job(requests, on_token=on_token)
        with self._cv:
            if self._stopping or self._draining:
                raise ServiceStopped("server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
            self._queue.append(job)
            self.metrics.queue_depth = len(self._queue)
            self._cv.notify_all()
        return job.future

    # ---- worker ----
    def _take_batch(self) -> list[_Job] | None:
        with self._cv:
            deadline = time.monotonic() + self.idle_interval_s
            while not self._queue and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cv.wait(left)
            if self._stopping and not self._queue:
                return None
            first = self._queue.popleft()
            jobs, size = [first], len(first.requests)
            self._running = jobs
            for job in list(self._queue):
                if size + len(job.requests) > self.max_batch_size:
                    continue
                if job.key() == first.key():
                    self._queue.remove(job)
                    jobs.append(job)
                    size += len(job.requests)
            self.metrics.queue_depth = len(self._queue)
            return jobs

    def _loop(self) -> None:
        try:
            while True:
                jobs = self._take_batch()
                if jobs is None:
                    break
                if not jobs:
                    if self.idle is not None:
                        self._guard(self.idle)
                    continue
                try:
                    self._serve(jobs)
                finally:
                    with self._cv:
                        self._running = []
                        self._cv.notify_all()
        finally:
            with self._cv:
                self._stopping = True
                left = list(self._queue)
                self._queue.clear()
            for job in left:
                _fail(job, ServiceStopped("server is shutting down"))
            if self.on_stop is not None:
                self._guard(self.on_stop)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
            self.healthy = True
        except Exception:
            self.healthy = False

    def _listener(self, jobs: list[_Job]) -> OnToken:
        """Route engine events (index into the whole batch) to the jobs that stream, and
        time every token (TTFT, inter-token latency)."""
        owner = [(job, k) for job in jobs for k in range(len(job.requests))]
        seen = [0] * len(owner)  # this attempt's tokens per request
        last: list[float | None] = [None] * len(owner)
        metrics = self.metrics

        def on_token(ev: TokenEvent) -> None:
            job, k = owner[ev.index]
            now = time.perf_counter()
            prev, last[ev.index] = last[ev.index], now
            if prev is None:
                metrics.observe_token(now - job.submitted, None)
            else:
                metrics.observe_token(None, now - prev)
            seen[ev.index] += 1
            if job.on_token is None or seen[ev.index] <= job.delivered[k]:
                return  # a retry re-generating tokens the client already has
            job.delivered[k] += 1
            job.on_token(ev._replace(index=k))

        return on_token

    def _run(
        self,
        requests: list[GenerationRequest],
        on_token: OnToken | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        for off in range(0, len(requests), self.max_batch_size):
            chunk = requests[off : off + self.max_batch_size]
            kwargs: dict = {}
            if on_token is not None:

                def shifted(ev: TokenEvent, off: int = off) -> None:
                    on_token(ev._replace(index=ev.index + off))

                kwargs["on_token"] = shifted
            if cancelled is not None:
                kwargs["cancelled"] = lambda k, off=off: cancelled(k + off)
            t0 = time.perf_counter()
            self.metrics.running_batch_size = len(chunk)
            try:
                results = self.run_batch(chunk, **kwargs)
            finally:
                self.metrics.running_batch_size = 0
            elapsed = time.perf_counter() - t0
            layers = [layer for r in results for layer in r.exit_layers]
            prompt = sum(len(r.prompt_token_ids) for r in chunk)
            self.metrics.observe_batch(len(chunk), prompt, layers, elapsed)
            self.metrics.observe_drafts(
                sum(r.stats.drafted_tokens for r in results),
                sum(r.stats.accepted_tokens for r in results),
            )
            out.extend(results)
        return out

    @staticmethod
    def _cancel_hook(jobs: list[_Job]) -> Callable[[int], bool]:
        flags = [job.cancelled for job in jobs for _ in job.requests]
        return lambda index: flags[index].is_set()

    def _serve(self, jobs: list[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            results = self._run(requests, self._listener(jobs), self._cancel_hook(jobs))
            self.healthy = True
        except CommandError as exc:  # the ranks answered: they are reachable
            self.healthy = True
            if len(jobs) > 1 and exc.client_error:
                for job in jobs:  # find the offending job; the others still get answers
                    self._serve([job])
                return
            for job in jobs:
                _fail(job, exc)
            return
        except InferenceError as exc:  # single-process engines raise directly
            if len(jobs) > 1:
                for job in jobs:
                    self._serve([job])
                return
            _fail(jobs[0], exc)
            return
        except Exception as exc:  # a collective failed or timed out: some rank is unreachable
            self.healthy = False
            for job in jobs:
                _fail(job, exc)
            return
        pos = 0
        for job in jobs:
            n = len(job.requests)
            with contextlib.suppress(InvalidStateError):  # drain may have answered it already
                job.future.set_result(results[pos : pos + n])
            pos += n


def _fail(job: _Job, exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # drain or cancel may have answered it already
        job.future.set_exception(exc)


# run_step(plan_dict, on_token=listener) -> list[continuous.Finished]: one decode iteration
# on every rank (InferenceEngine.step, broadcast by the coordinator with several ranks)
RunStep = Callable[..., list]


class ContinuousService(GenerationService):
    """Iteration-level scheduling (continuous batching; inference/continuous.py).

    The worker keeps `max_batch_size` slots. Before every decode step it decides, under the
    lock: which slots leave (their job was cancelled), which queued requests join free slots
    (in arrival order, the oldest job first, one request of a multi-prompt job per slot), and
    sends that `StepPlan` with the step. Sequences that finish in a step leave it at once and
    their job is answered as soon as all its prompts are done.

    Covered by the slots: requests whose `key(request)` is not None (continuous.batch_key:
    mode none, early_exit with kv_recompute); all slots share one key. A queued job with
    another key waits at the head of the queue (nothing newer overtakes it) until the slots
    drain, then the slots take the new key. A job the slots do not cover (pipeline decoding,
    self_speculative, or prompts with mixed settings) is run with queue batching
    (`GenerationService._serve`) once the slots are empty.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        run_step: RunStep,
        key: Callable[[GenerationRequest], str | None],
        metrics: ServerMetrics | None = None,
        **kwargs,
    ) -> None:
        super().__init__(run_batch, metrics, **kwargs)
        self.run_step = run_step
        self.key = key
        self._slots: list[tuple[_Job, int] | None] = [None] * self.max_batch_size
        self._slot_key: str | None = None
        self._last: dict[int, float] = {}  # slot -> time of its last token (inter-token latency)
        self._reset = False

    @property
    def running_size(self) -> int:
        return sum(o is not None for o in self._slots) or super().running_size

    def _job_key(self, job: _Job) -> str | None:
        keys = {self.key(r) for r in job.requests}
        return keys.pop() if len(keys) == 1 else None

    def _slot_jobs(self) -> list[_Job]:
        jobs: list[_Job] = []
        for o in self._slots:
            if o is not None and o[0] not in jobs:
                jobs.append(o[0])
        return jobs

    def _plan(self) -> tuple[list, list, list[_Job]] | None:
        """Under the lock: (joins, leaves, queue-batched jobs), or None to stop. Waits while
        there is nothing to do ([] jobs and no joins: idle, ping)."""
        deadline = time.monotonic() + self.idle_interval_s
        busy = any(o is not None for o in self._slots)
        while not self._queue and not busy and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return [], [], []
            self._cv.wait(left)
        if self._stopping:
            return None
        leaves = [i for i, o in enumerate(self._slots) if o is not None and o[0].cancelled.is_set()]
        free = [i for i, o in enumerate(self._slots) if o is None]
        if not busy and self._queue and self._job_key(self._queue[0]) is None:
            first = self._queue.popleft()  # not for the slots: one queue-batched run
            jobs, size = [first], len(first.requests)
            for job in list(self._queue):
                if size + len(job.requests) > self.max_batch_size:
                    continue
                if self._job_key(job) is None and job.key() == first.key():
                    self._queue.remove(job)
                    jobs.append(job)
                    size += len(job.requests)
            self.metrics.queue_depth = len(self._queue)
            return [], [], jobs
        joins = []
        while self._queue and free:
            job = self._queue[0]
            k = self._job_key(job)
            if k is None or (busy and k != self._slot_key):
                break  # it waits for the slots to drain; nothing overtakes it
            self._slot_key, busy = k, True
            if not job.results:
                job.results = [None] * len(job.requests)
            while job.admitted < len(job.requests) and free:
                slot = free.pop(0)
                self._slots[slot] = (job, job.admitted)
                joins.append((slot, job.requests[job.admitted].to_dict()))
                job.admitted += 1
            if job.admitted == len(job.requests):
                self._queue.popleft()
        self.metrics.queue_depth = len(self._queue)
        self._running = self._slot_jobs()
        return joins, leaves, []

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    plan = self._plan()
                if plan is None:
                    break
                joins, leaves, jobs = plan
                if jobs:
                    try:
                        self._serve(jobs)
                    finally:
                        with self._cv:
                            self._running = []
                            self._cv.notify_all()
                    continue
                if not joins and not any(o is not None for o in self._slots):
                    if self.idle is not None:
                        self._guard(self.idle)
                    continue
                self._step(joins, leaves)
        finally:
            with self._cv:
                self._stopping = True
                left = list(self._queue) + self._slot_jobs()
                self._queue.clear()
            for job in left:
                _fail(job, ServiceStopped("server is shutting down"))
            if self.on_stop is not None:
                self._guard(self.on_stop)

    def _step(self, joins: list, leaves: list[int]) -> None:
        from megatron.early_exit.inference.continuous import StepPlan

        plan = StepPlan(self.max_batch_size, joins, leaves, self._reset)
        slots, metrics = self._slots, self.metrics
        layers: list[int] = []

        def on_token(ev: TokenEvent) -> None:
            owner = slots[ev.index]
            if owner is None:
                return
            job, k = owner
            now = time.perf_counter()
            prev, self._last[ev.index] = self._last.get(ev.index), now
            if prev is None:
                metrics.observe_token(now - job.submitted, None)
            else:
                metrics.observe_token(None, now - prev)
            layers.append(ev.exit_layer)
            if job.on_token is not None:
                job.on_token(ev._replace(index=k))

        for slot, _ in joins:
            self._last.pop(slot, None)
        metrics.running_batch_size = sum(o is not None for o in slots)
        t0 = time.perf_counter()
        try:
            finished = self.run_step(plan.to_dict(), on_token=on_token)
            self.healthy, self._reset = True, False
        except Exception as exc:  # the step failed somewhere: every job in the slots fails
            self.healthy = isinstance(exc, CommandError)  # the ranks answered: reachable
            self._reset = True  # every rank forgets its slots on the next step
            with self._cv:
                jobs = self._slot_jobs()
                self._slots[:] = [None] * len(self._slots)
                self._running = []
                self._cv.notify_all()
            for job in jobs:
                job.cancelled.set()
                _fail(job, exc)
            return
        finally:
            metrics.running_batch_size = sum(o is not None for o in slots)
        prompt = sum(len(d["prompt_token_ids"]) for _, d in joins)
        metrics.observe_batch(len(joins), prompt, layers, time.perf_counter() - t0)
        with self._cv:
            done: list[_Job] = []
            for fin in finished:
                owner = slots[fin.slot]
                slots[fin.slot] = None
                self._last.pop(fin.slot, None)
                if owner is None:
                    continue
                job, k = owner
                if fin.error is not None:  # a rejected prompt fails its job (400)
                    job.cancelled.set()  # its other prompts leave their slots
                    _fail(job, InferenceError(fin.error))
                    continue
                job.results[k] = fin.result
                if all(r is not None for r in job.results):
                    done.append(job)
            for job in done:  # answered right away: the HTTP response goes out now
                with contextlib.suppress(InvalidStateError):
                    job.future.set_result(list(job.results))
            self._running = self._slot_jobs()
            metrics.running_batch_size = sum(o is not None for o in slots)
            self._cv.notify_all()
