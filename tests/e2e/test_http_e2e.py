"""The router's OpenAI HTTP API against a real cluster, with the official ``openai`` client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from distserve.client import Client
from tests.e2e.conftest import instance_stats, list_instances

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_completions_equal_grpc_greedy(cluster, client, model):
    prompt = list(range(40, 72))
    done = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    with Client(cluster.grpc_address) as grpc_client:
        ref = grpc_client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert done.choices[0].text == ref.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == 32 and done.usage.completion_tokens == 8


def test_stream_is_one_token_per_event_with_usage_and_done(cluster, model):
    body = {
        "model": model,
        "prompt": list(range(50, 70)),
        "max_tokens": 9,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = httpx.post(f"{cluster.http_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200
    payloads = [e.removeprefix("data: ") for e in resp.text.strip().split("\n\n")]
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 9 + 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 9
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_cached_prompt_tokens_are_reported(client, model):
    prompt = list(range(200, 264))  # 8 full blocks of 8 tokens
    first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = []
    for _ in range(3):  # seen once under load: the blocks were not yet in the cache at once
        again = client.completions.create(model=model, prompt=[*prompt, 7], max_tokens=1)
        cached.append(again.usage.prompt_tokens_details.cached_tokens)
        if cached[-1] == 64:
            break
        time.sleep(0.5)
    assert cached[-1] == 64, f"cached tokens of the repeats: {cached}"


def test_chat_uses_the_models_chat_template(cluster, client, model):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    tokenizer = AutoTokenizer.from_pretrained(cluster.model_path)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_len = len(tokenizer.encode(text, add_special_tokens=False))
    done = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert isinstance(done.choices[0].message.content, str)
    assert done.usage.prompt_tokens == expected_len and done.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)
    assert streamed == done.choices[0].message.content


def test_refusals(client, model):
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.completions.create(model=model, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-" + model, prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[5] * 5000)  # longer than the context


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or s.labels == labels):
                return s.value
    return 0.0


def test_metrics_parse_and_http_requests_are_counted(cluster, client, model):
    served = {"endpoint": "/v1/completions", "status": "200"}
    before = metric(cluster.http_url, "distserve_http_requests_total", served)
    client.completions.create(model=model, prompt="metrics", max_tokens=2, temperature=0)
    assert metric(cluster.http_url, "distserve_http_requests_total", served) == before + 1


def test_router_core_records_request_latency(cluster, client, model):
    """The core calls ``RouterMetrics.observe_request`` once per finished request."""
    name = "distserve_router_time_to_first_token_seconds_count"
    before = metric(cluster.http_url, name)
    client.completions.create(model=model, prompt="metrics", max_tokens=2, temperature=0)
    assert metric(cluster.http_url, name) == before + 1


def test_disconnect_mid_stream_frees_every_block(cluster, model):
    body = {
        "model": model,
        "prompt": list(range(10, 40)),
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{cluster.http_url}/v1/completions", json=body, timeout=60) as resp:
        events = (line for line in resp.iter_lines() if line.startswith("data: "))
        next(events), next(events), next(events)
    deadline = time.monotonic() + 30
    while True:
        stats = [instance_stats(i.descriptor.address) for i in list_instances(cluster.grpc_address)]
        if (
            all(s.num_free_blocks == s.num_total_blocks for s in stats)
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.2)
    assert all(s.num_free_blocks == s.num_total_blocks for s in stats)
