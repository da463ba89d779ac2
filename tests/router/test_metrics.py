"""RouterMetrics / InstanceMetrics: names, values, exposition format, the plain-thread server."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from distserve.router.metrics import InstanceMetrics, RouterMetrics
from tests.client.fake_grpc import free_port


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_router_request_histograms_and_finish_reasons():
    m = RouterMetrics("tiny")
    m.observe_request(0.12, 0.02, 0.5, [0.01, 0.03], "length", num_prompt_tokens=7)
    m.observe_request(None, None, 0.05, [], "abort")
    s = samples(m.render())
    assert s[("distserve_router_time_to_first_token_seconds_count", ())] == 1
    assert s[("distserve_router_time_to_first_token_seconds_sum", ())] == 0.12
    assert s[("distserve_router_time_to_first_token_seconds_bucket", (("le", "0.15"),))] == 1
    assert s[("distserve_router_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("distserve_router_time_per_output_token_seconds_count", ())] == 1
    assert s[("distserve_router_inter_token_latency_seconds_count", ())] == 2
    assert s[("distserve_router_e2e_request_latency_seconds_count", ())] == 2
    assert s[("distserve_router_requests_total", (("finish_reason", "length"),))] == 1
    assert s[("distserve_router_requests_total", (("finish_reason", "abort"),))] == 1
    assert s[("distserve_router_prompt_tokens_total", ())] == 7


def test_router_load_routes_transfers_and_vllm_names():
    m = RouterMetrics("tiny")
    m.set_instance_load("prefill-0", waiting=3, running=2, kv_usage=0.25, hit_rate=0.5)
    m.count_route("cache_aware", "prefill-0")
    m.count_route("cache_aware", "prefill-0")
    m.observe_transfer(4096, 0.5)
    m.observe_transfer(1024, 0.25)
    m.count_http_request("/v1/completions", 400)
    m.set_router_load(num_waiting=4, num_running=9)
    s = samples(m.render())
    inst = (("instance_id", "prefill-0"),)
    vllm = (("instance_id", "prefill-0"), ("model_name", "tiny"))
    assert s[("distserve_router_instance_num_requests_waiting", inst)] == 3
    assert s[("distserve_router_instance_kv_cache_usage_ratio", inst)] == 0.25
    assert s[("distserve_router_instance_prefix_cache_hit_rate", inst)] == 0.5
    assert s[("vllm:num_requests_waiting", vllm)] == 3
    assert s[("vllm:num_requests_running", vllm)] == 2
    assert s[("vllm:kv_cache_usage_perc", vllm)] == 0.25
    routed = (("instance_id", "prefill-0"), ("policy", "cache_aware"))
    assert s[("distserve_router_routing_decisions_total", routed)] == 2
    assert s[("distserve_kv_transfer_bytes_total", ())] == 5120
    assert s[("distserve_kv_transfer_seconds_total", ())] == 0.75
    assert s[
        ("distserve_http_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    ]
    assert s[("distserve_router_num_requests_running", ())] == 9
    m.remove_instance("prefill-0")
    m.remove_instance("never-seen")  # harmless
    after = samples(m.render())
    assert ("vllm:num_requests_waiting", vllm) not in after
    assert ("distserve_router_instance_num_requests_waiting", inst) not in after


def test_instance_metrics_and_plain_thread_server():
    m = InstanceMetrics("decode-0", role="decode", model_name="tiny")
    m.set_load(waiting=1, running=5, kv_usage=0.75, hit_rate=0.0)
    m.observe_transfer(2048, 0.125, direction="recv")
    m.observe_request(0.3, 0.01, 1.0, [0.01], "stop", num_completion_tokens=2)
    server, _thread = m.start_http_server(free_port())
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            s = samples(resp.read())
    finally:
        server.shutdown()
        server.server_close()
    assert s[("vllm:num_requests_running", (("model_name", "tiny"),))] == 5
    assert s[("vllm:kv_cache_usage_perc", (("model_name", "tiny"),))] == 0.75
    assert s[("distserve_instance_num_requests_waiting", ())] == 1
    assert s[("distserve_kv_transfer_bytes_total", (("direction", "recv"),))] == 2048
    assert s[("distserve_instance_generation_tokens_total", ())] == 2
    info = (("instance_id", "decode-0"), ("model", "tiny"), ("role", "decode"))
    assert s[("distserve_instance_info", info)] == 1


def test_each_object_has_its_own_registry():
    a, b = RouterMetrics("x"), RouterMetrics("x")
    a.count_route("rr", "p0")
    assert (
        "distserve_router_routing_decisions_total",
        (("instance_id", "p0"), ("policy", "rr")),
    ) not in samples(b.render())
