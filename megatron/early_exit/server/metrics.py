"""Prometheus text-format metrics (no client library needed: a few counters and a histogram)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); callers hold the lock."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), -1)
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {round(self.sum, 6)}")
        out.append(f"{name}_count {self.count}")
        return out


class ServerMetrics:
    """Thread-safe counters updated by the HTTP threads and the model worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status)
        self.errors = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.generation_seconds = 0.0  # model time, summed over batches
        self.exit_layer_sum = 0
        self.exit_layer_tokens: dict[int, int] = defaultdict(int)
        self.batches = 0
        self.batched_requests = 0
        self.last_tokens_per_s = 0.0
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self.queue_depth = 0
        self.running_batch_size = 0
        self.cancelled = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.ttft = Histogram(TOKEN_BUCKETS)  # submit -> first token, per request
        self.itl = Histogram(TOKEN_BUCKETS)  # between consecutive tokens of a request

    def observe_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if itl_s is not None:
                self.itl.observe(itl_s)

    def observe_drafts(self, drafted: int, accepted: int) -> None:
        with self._lock:
            self.drafted_tokens += drafted
            self.accepted_tokens += accepted

    def observe_request(self, endpoint: str, status: int, latency_s: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if status >= 400:
                self.errors += 1
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if latency_s <= b), -1)
            self._bucket_counts[i] += 1
            self._latency_sum += latency_s
            self._latency_count += 1

    def observe_batch(
        self, n_requests: int, prompt_tokens: int, exit_layers: list[int], seconds: float
    ) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += n_requests
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += len(exit_layers)
            self.generation_seconds += seconds
            self.exit_layer_sum += sum(exit_layers)
            for layer in exit_layers:
                self.exit_layer_tokens[layer] += 1
            if seconds > 0:
                self.last_tokens_per_s = len(exit_layers) / seconds

    def render(self) -> str:
        with self._lock:
            out = []

            def metric(name, kind, help_text, samples):
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")
                for labels, value in samples:
                    out.append(f"{name}{labels} {value}")

            metric(
                "ee_requests_total",
                "counter",
                "HTTP requests by endpoint and status code.",
                [
                    (f'{{endpoint="{e}",code="{c}"}}', n)
                    for (e, c), n in sorted(self.requests.items())
                ]
                or [("", 0)],
            )
            metric(
                "ee_request_errors_total",
                "counter",
                "Requests answered >= 400.",
                [("", self.errors)],
            )
            metric(
                "ee_generated_tokens_total",
                "counter",
                "Generated tokens.",
                [("", self.generated_tokens)],
            )
            metric(
                "ee_prompt_tokens_total", "counter", "Prompt tokens.", [("", self.prompt_tokens)]
            )
            metric(
                "ee_generation_seconds_total",
                "counter",
                "Time spent inside the model.",
                [("", round(self.generation_seconds, 6))],
            )
            overall = (
                self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0
            )
            metric(
                "ee_tokens_per_second",
                "gauge",
                "Generated tokens per second of model time (all batches so far).",
                [("", round(overall, 3))],
            )
            metric(
                "ee_last_batch_tokens_per_second",
                "gauge",
                "Generated tokens per second of the last batch.",
                [("", round(self.last_tokens_per_s, 3))],
            )
            mean_exit = (
                self.exit_layer_sum / self.generated_tokens if self.generated_tokens else 0.0
            )
            metric(
                "ee_mean_exit_layer",
                "gauge",
                "Mean layer at which generated tokens exited (num_layers = full model).",
                [("", round(mean_exit, 4))],
            )
            metric(
                "ee_exit_layer_tokens_total",
                "counter",
                "Generated tokens by exit layer.",
                [(f'{{layer="{k}"}}', v) for k, v in sorted(self.exit_layer_tokens.items())]
                or [("", 0)],
            )
            metric("ee_batches_total", "counter", "Model calls.", [("", self.batches)])
            metric(
                "ee_batched_requests_total",
                "counter",
                "Requests served by model calls (/ batches = mean batch size).",
                [("", self.batched_requests)],
            )
            metric(
                "ee_queue_depth",
                "gauge",
                "Requests waiting for the model.",
                [("", self.queue_depth)],
            )
            metric(
                "ee_running_batch_size",
                "gauge",
                "Sequences in the batch the model is running now.",
                [("", self.running_batch_size)],
            )
            metric(
                "ee_cancelled_requests_total",
                "counter",
                "Requests cancelled (client gone or timed out).",
                [("", self.cancelled)],
            )
            metric(
                "ee_draft_tokens_total",
                "counter",
                "self_speculative: drafted and accepted tokens.",
                [('{kind="drafted"}', self.drafted_tokens),
                 ('{kind="accepted"}', self.accepted_tokens)],
            )  # fmt: skip
            rate = self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0
            metric(
                "ee_draft_acceptance_ratio",
                "gauge",
                "self_speculative: accepted / drafted tokens (all batches so far).",
                [("", round(rate, 4))],
            )
            out.extend(
                self.ttft.render(
                    "ee_time_to_first_token_seconds", "Request submitted to its first token."
                )
            )
            out.extend(
                self.itl.render(
                    "ee_inter_token_latency_seconds", "Time between consecutive tokens."
                )
            )
            out.append("# HELP ee_request_latency_seconds End-to-end request latency.")
            out.append("# TYPE ee_request_latency_seconds histogram")
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, self._bucket_counts):
                cumulative += n
                out.append(f'ee_request_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
            out.append(f'ee_request_latency_seconds_bucket{{le="+Inf"}} {self._latency_count}')
            out.append(f"ee_request_latency_seconds_sum {round(self._latency_sum, 6)}")
            out.append(f"ee_request_latency_seconds_count {self._latency_count}")
            return "\n".join(out) + "\n"
