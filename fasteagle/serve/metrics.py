"""GET /metrics: Prometheus counters and histograms (prometheus_client), one registry per app."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
TAU_BUCKETS = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fasteagle_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("fasteagle_generations", "Generations ended, by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("fasteagle_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("fasteagle_completion_tokens", "Tokens generated", registry=r)
        self.queued = Gauge("fasteagle_queue_depth", "Requests waiting for the engine", registry=r)
        self.first_token = Histogram("fasteagle_time_to_first_token_seconds",
                                     "Time from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.inter_token = Histogram("fasteagle_inter_token_latency_seconds",
                                     "Per request: mean time per generated token after the first",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.tau = Histogram("fasteagle_accepted_tokens_per_round",
                             "Per request: tokens per speculative round (tau)", buckets=TAU_BUCKETS, registry=r)

    def generation(self, done):
        self.finished.labels(done.finish_reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        if done.first_token_s is not None:
            self.first_token.observe(done.first_token_s)
        if done.inter_token_s is not None:
            self.inter_token.observe(done.inter_token_s)
        if done.tau is not None:
            self.tau.observe(done.tau)

    def render(self) -> bytes:
        return generate_latest(self.registry)
