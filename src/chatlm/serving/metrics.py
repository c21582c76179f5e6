"""Server metrics, rendered in Prometheus' text format for ``GET /metrics``."""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0  # accepted by the engine
        self.rejected: dict[int, int] = {}  # HTTP errors by status
        self.prompt_tokens = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache held
        self.computed_tokens = 0  # prompt tokens prefilled (the rest)
        self.prefix_cache = None  # the engine's `PrefixCache`, or None when off
        self.generated_tokens = 0
        self.failed_sequences = 0  # choices that ended with an error (the batch went on)
        self.running = 0  # sequences in the batch
        self.waiting = 0  # requests queued
        self.batch_size = 0  # sequences in the last decoding step
        self.tokens_per_second = 0.0  # decoding throughput, smoothed over recent steps
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1

    def decode_step(self, tokens: int, seconds: float) -> None:
        self.batch_size = tokens
        rate = tokens / seconds if seconds > 0 else 0.0
        self.tokens_per_second = (
            rate if not self.tokens_per_second else 0.8 * self.tokens_per_second + 0.2 * rate
        )

    def reject(self, status: int) -> None:
        with self.lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def render(self) -> str:
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP chatlm_{name} {help_text}")
            lines.append(f"# TYPE chatlm_{name} {kind}")
            lines.extend(f"chatlm_{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            metric("requests_total", "counter", "Requests accepted for generation.", [("", self.requests)])
            metric(
                "request_errors_total",
                "counter",
                "Requests refused with an HTTP error, by status.",
                [(f'{{status="{s}"}}', n) for s, n in sorted(self.rejected.items())],
            )
            metric(
                "failed_sequences_total",
                "counter",
                "Choices that failed while generating (their request got an error; the batch went on).",
                [("", self.failed_sequences)],
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens of requests.", [("", self.prompt_tokens)])
            metric(
                "prompt_tokens_cached_total",
                "counter",
                "Prompt tokens reused from the prefix cache.",
                [("", self.cached_tokens)],
            )
            metric(
                "prompt_tokens_computed_total",
                "counter",
                "Prompt tokens prefilled (not found in the prefix cache).",
                [("", self.computed_tokens)],
            )
            cache = self.prefix_cache
            if cache is not None:
                stats = cache.stats
                metric("prefix_cache_lookups_total", "counter", "Prompts looked up.", [("", stats.lookups)])
                metric(
                    "prefix_cache_hits_total", "counter", "Prompts that reused a prefix.", [("", stats.hits)]
                )
                metric(
                    "prefix_cache_evicted_tokens_total",
                    "counter",
                    "Tokens evicted to stay within the budget.",
                    [("", stats.evicted_tokens)],
                )
                metric("prefix_cache_tokens", "gauge", "Tokens stored.", [("", cache.tokens)])
                metric(
                    "prefix_cache_bytes", "gauge", "Bytes of keys and values stored.", [("", cache.nbytes)]
                )
                metric("prefix_cache_max_bytes", "gauge", "The budget.", [("", cache.max_bytes)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            buckets = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(TTFT_BUCKETS, self.ttft_counts)]
            buckets += [
                ('_bucket{le="+Inf"}', self.ttft_count),
                ("_sum", self.ttft_sum),
                ("_count", self.ttft_count),
            ]
            lines.append(
                "# HELP chatlm_time_to_first_token_seconds From arrival to the first generated token."
            )
            lines.append("# TYPE chatlm_time_to_first_token_seconds histogram")
            lines.extend(f"chatlm_time_to_first_token_seconds{suffix} {value}" for suffix, value in buckets)
            metric("queue_depth", "gauge", "Requests waiting for a place in the batch.", [("", self.waiting)])
            metric("batch_size", "gauge", "Sequences in the last decoding step.", [("", self.batch_size)])
            metric("running_sequences", "gauge", "Sequences in the batch.", [("", self.running)])
            metric(
                "generation_tokens_per_second",
                "gauge",
                "Decoding throughput of the batch, smoothed over recent steps.",
                [("", round(self.tokens_per_second, 3))],
            )
        return "\n".join(lines) + "\n"
