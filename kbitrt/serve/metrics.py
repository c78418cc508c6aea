"""The server's counters and gauges, and their Prometheus text (GET /metrics)."""

from __future__ import annotations

class Metrics:
    """Counters and gauges for GET /metrics, updated on the scheduler's thread."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # by finish reason, or "error"
        self.prompt_tokens = self.completion_tokens = 0
        self.queue_depth = self.batch_size = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def finished(self, reason: str, fin: Finish | None = None) -> None:
        self.requests[reason] = self.requests.get(reason, 0) + 1
        if fin is not None:
            self.prompt_tokens += fin.prompt_tokens
            self.completion_tokens += fin.completion_tokens

    def first_token(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(self.TTFT_BUCKETS) if seconds <= b), -1)
        self.ttft_counts[i] += 1
        self.ttft_sum += seconds

    def render(self) -> str:
        """Prometheus' text exposition format (version 0.0.4)."""
        out = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("kbit_requests_total", "counter", "Requests finished, by how they ended.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.requests.items())] or [("", 0)])
        metric("kbit_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [("", self.prompt_tokens)])
        metric("kbit_generation_tokens_total", "counter", "Tokens generated.",
               [("", self.completion_tokens)])
        metric("kbit_queue_depth", "gauge", "Requests waiting for a batch row.",
               [("", self.queue_depth)])
        metric("kbit_batch_size", "gauge", "Requests in the running batch.",
               [("", self.batch_size)])
        cum, buckets = 0, []
        for bound, n in zip((*self.TTFT_BUCKETS, float("inf")), self.ttft_counts):
            cum += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            buckets.append((f'_bucket{{le="{le}"}}', cum))
        metric("kbit_time_to_first_token_seconds", "histogram",
               "Seconds from a request's arrival to its first token.",
               buckets + [("_sum", self.ttft_sum), ("_count", cum)])
        return "\n".join(out) + "\n"
