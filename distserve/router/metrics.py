"""Prometheus metrics of the router and of each instance (``prometheus-client``).

Owns the metric objects, their names and buckets, and the two ways to expose them: ``render()``
(the router's FastAPI ``/metrics`` returns it) and ``start_http_server()`` (a plain thread, for
instance drivers that have no web app). It does not decide *when* to record: the router core,
the front ends and the instance drivers call the methods below.

    RouterMetrics (router process)                 InstanceMetrics (one per instance driver)
    ├─ request latency: TTFT, TPOT, ITL, E2E       ├─ request latency: same histograms
    ├─ requests by finish reason, errors           ├─ requests by finish reason
    ├─ per-instance load gauges (as last reported) ├─ own load gauges
    ├─ routing decisions by policy and instance    ├─ KV transfer bytes / seconds (send, recv)
    ├─ KV transfer bytes / seconds                 └─ vllm:* names of its own load
    ├─ HTTP requests by endpoint and status
    └─ vllm:* names, labelled by instance_id

``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc``
(a fraction in [0, 1], as in vLLM) are the names other routers and autoscalers read.
Each object has its own ``CollectorRegistry``, so several can live in one process (tests).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# fmt: off
TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                  0.75, 1.0, 1.5, 2.0, 2.5, 4.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                  0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
                 600.0, 1200.0)
# fmt: on


class _Registry:
    """A ``CollectorRegistry`` with short factories, and the two ways of serving it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in the registry."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(
        self, port: int, addr: str = "127.0.0.1"
    ) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` from a daemon thread; stop it with ``server.shutdown()``."""
        return prometheus_client.start_http_server(port, addr=addr, registry=self.registry)


class _RequestLatency:
    """TTFT, TPOT, inter-token latency and E2E histograms, finished requests by reason, tokens."""

    def __init__(self, reg: _Registry, prefix: str) -> None:
        self.ttft = reg.histogram(
            f"{prefix}_time_to_first_token_seconds", "Request sent to first token.", TTFT_BUCKETS_S
        )
        self.tpot = reg.histogram(
            f"{prefix}_time_per_output_token_seconds",
            "(last token - first token) / (output tokens - 1).",
            TPOT_BUCKETS_S,
        )
        self.itl = reg.histogram(
            f"{prefix}_inter_token_latency_seconds", "Gap between output tokens.", TPOT_BUCKETS_S
        )
        self.e2e = reg.histogram(
            f"{prefix}_e2e_request_latency_seconds", "Request sent to last token.", E2E_BUCKETS_S
        )
        self.finished = reg.counter(
            f"{prefix}_requests", "Finished requests by finish reason.", ["finish_reason"]
        )
        self.prompt_tokens = reg.counter(f"{prefix}_prompt_tokens", "Prompt tokens.")
        self.cached_tokens = reg.counter(
            f"{prefix}_cached_prompt_tokens", "Prompt tokens served from a prefix cache."
        )
        self.generation_tokens = reg.counter(f"{prefix}_generation_tokens", "Output tokens.")
        self._finished_by_reason: dict[str, Counter] = {}  # labelled children, made once each

    def observe(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        itl_s_list: Sequence[float],
        finish_reason: str,
        tokens: tuple[int, int, int],  # prompt, completion, cached
    ) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        for gap_s in itl_s_list:
            self.itl.observe(gap_s)
        self.e2e.observe(e2e_s)
        finished = self._finished_by_reason.get(finish_reason)
        if finished is None:
            finished = self._finished_by_reason[finish_reason] = self.finished.labels(
                finish_reason=finish_reason
            )
        finished.inc()
        num_prompt, num_completion, num_cached = tokens
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_completion)
        self.cached_tokens.inc(num_cached)


class RouterMetrics(_Registry):
    """Metrics of the router process (see the module docstring for the map)."""

    def __init__(self, model_name: str = "") -> None:
        super().__init__()
        self.model_name = model_name
        self.latency = _RequestLatency(self, "distserve_router")
        self.errors = self.counter(
            "distserve_router_request_errors", "Failed requests, by kind.", ["kind"]
        )
        self.num_waiting = self.gauge("distserve_router_num_requests_waiting", "Queued in router.")
        self.num_running = self.gauge("distserve_router_num_requests_running", "In flight.")
        inst = ["instance_id"]
        self.inst_waiting = self.gauge(
            "distserve_router_instance_num_requests_waiting", "Queued requests per instance.", inst
        )
        self.inst_running = self.gauge(
            "distserve_router_instance_num_requests_running", "Running requests per instance.", inst
        )
        self.inst_kv_usage = self.gauge(
            "distserve_router_instance_kv_cache_usage_ratio", "Used share of KV blocks.", inst
        )
        self.inst_hit_rate = self.gauge(
            "distserve_router_instance_prefix_cache_hit_rate", "Prefix-cache hit rate.", inst
        )
        vllm = ["model_name", "instance_id"]
        self.vllm_waiting = self.gauge("vllm:num_requests_waiting", "Waiting requests.", vllm)
        self.vllm_running = self.gauge("vllm:num_requests_running", "Running requests.", vllm)
        self.vllm_kv_usage = self.gauge("vllm:kv_cache_usage_perc", "KV usage (1 = 100%).", vllm)
        self.routes = self.counter(
            "distserve_router_routing_decisions",
            "Routing decisions by policy and chosen instance.",
            ["policy", "instance_id"],
        )
        self._routes: dict[tuple[str, str], Counter] = {}  # labelled children, made once each
        self.transfer_bytes = self.counter("distserve_kv_transfer_bytes", "KV bytes moved.")
        self.transfer_seconds = self.counter("distserve_kv_transfer_seconds", "Time moving KV.")
        self.http_requests = self.counter(
            "distserve_http_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
        )

    def observe_request(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        itl_s_list: Sequence[float] = (),
        finish_reason: str = "stop",
        *,
        num_prompt_tokens: int = 0,
        num_completion_tokens: int = 0,
        num_cached_tokens: int = 0,
    ) -> None:
        """Record one finished request (None for a TTFT or TPOT that does not exist)."""
        tokens = (num_prompt_tokens, num_completion_tokens, num_cached_tokens)
        self.latency.observe(ttft_s, tpot_s, e2e_s, itl_s_list, finish_reason, tokens)

    def count_error(self, kind: str) -> None:
        """A failed request (``kind`` e.g. "invalid", "unavailable", "transfer")."""
        self.errors.labels(kind=kind).inc()

    def set_router_load(self, num_waiting: int, num_running: int) -> None:
        self.num_waiting.set(num_waiting)
        self.num_running.set(num_running)

    def set_instance_load(
        self, instance_id: str, waiting: int, running: int, kv_usage: float, hit_rate: float
    ) -> None:
        """The load an instance last reported (``kv_usage`` and ``hit_rate`` in [0, 1])."""
        self.inst_waiting.labels(instance_id).set(waiting)
        self.inst_running.labels(instance_id).set(running)
        self.inst_kv_usage.labels(instance_id).set(kv_usage)
        self.inst_hit_rate.labels(instance_id).set(hit_rate)
        self.vllm_waiting.labels(self.model_name, instance_id).set(waiting)
        self.vllm_running.labels(self.model_name, instance_id).set(running)
        self.vllm_kv_usage.labels(self.model_name, instance_id).set(kv_usage)

    def remove_instance(self, instance_id: str) -> None:
        """Drop the gauges of an instance that left the cluster."""
        for gauge in (self.inst_waiting, self.inst_running, self.inst_kv_usage, self.inst_hit_rate):
            _remove(gauge, instance_id)
        for gauge in (self.vllm_waiting, self.vllm_running, self.vllm_kv_usage):
            _remove(gauge, self.model_name, instance_id)

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        self.transfer_bytes.inc(num_bytes)
        self.transfer_seconds.inc(seconds)

    def count_route(self, policy: str, instance: str) -> None:
        route = self._routes.get((policy, instance))
        if route is None:
            route = self._routes[policy, instance] = self.routes.labels(
                policy=policy, instance_id=instance
            )
        route.inc()

    def count_http_request(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint=endpoint, status=str(status)).inc()


class InstanceMetrics(_Registry):
    """Metrics of one instance driver (``role``: "prefill", "decode" or "colocated")."""

    def __init__(self, instance_id: str, role: str, model_name: str = "") -> None:
        super().__init__()
        self.instance_id = instance_id
        self.model_name = model_name
        info = self.gauge(
            "distserve_instance_info",
            "1, labelled by what it is.",
            ["instance_id", "role", "model"],
        )
        info.labels(instance_id, role, model_name).set(1)
        self.latency = _RequestLatency(self, "distserve_instance")
        self.waiting = self.gauge("distserve_instance_num_requests_waiting", "Queued requests.")
        self.running = self.gauge("distserve_instance_num_requests_running", "Running requests.")
        self.kv_usage = self.gauge("distserve_instance_kv_cache_usage_ratio", "Used KV share.")
        self.hit_rate = self.gauge("distserve_instance_prefix_cache_hit_rate", "Hit rate.")
        vllm = ["model_name"]
        self.vllm_waiting = self.gauge("vllm:num_requests_waiting", "Waiting requests.", vllm)
        self.vllm_running = self.gauge("vllm:num_requests_running", "Running requests.", vllm)
        self.vllm_kv_usage = self.gauge("vllm:kv_cache_usage_perc", "KV usage (1 = 100%).", vllm)
        direction = ["direction"]
        self.transfer_bytes = self.counter("distserve_kv_transfer_bytes", "KV bytes.", direction)
        self.transfer_seconds = self.counter(
            "distserve_kv_transfer_seconds", "Time moving KV.", direction
        )

    def observe_request(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        itl_s_list: Sequence[float] = (),
        finish_reason: str = "stop",
        *,
        num_prompt_tokens: int = 0,
        num_completion_tokens: int = 0,
        num_cached_tokens: int = 0,
    ) -> None:
        """Record one request this instance finished, timed from its arrival here."""
        tokens = (num_prompt_tokens, num_completion_tokens, num_cached_tokens)
        self.latency.observe(ttft_s, tpot_s, e2e_s, itl_s_list, finish_reason, tokens)

    def set_load(self, waiting: int, running: int, kv_usage: float, hit_rate: float) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_usage.set(kv_usage)
        self.hit_rate.set(hit_rate)
        self.vllm_waiting.labels(self.model_name).set(waiting)
        self.vllm_running.labels(self.model_name).set(running)
        self.vllm_kv_usage.labels(self.model_name).set(kv_usage)

    def observe_transfer(self, num_bytes: int, seconds: float, direction: str = "send") -> None:
        """One finished KV transfer (``direction``: "send" on prefill, "recv" on decode)."""
        self.transfer_bytes.labels(direction=direction).inc(num_bytes)
        self.transfer_seconds.labels(direction=direction).inc(seconds)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set for this instance
        gauge.remove(*labels)
