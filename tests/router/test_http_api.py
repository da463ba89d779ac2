"""The OpenAI HTTP API through a real uvicorn server, driven by the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distserve.router.http_api import build_http_app
from distserve.router.metrics import RouterMetrics
from tests.client.fake_router import FakeFrontend, serve_app


@pytest.fixture(scope="module")
def server():
    frontend = FakeFrontend()
    metrics = RouterMetrics(frontend.model_name)
    with serve_app(build_http_app(frontend, metrics_registry=metrics)) as url:
        yield url, frontend, metrics


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_completion_text_finish_and_usage_with_cached_tokens(client, server):
    _, frontend, _ = server
    done = client.completions.create(
        model="fake-model", prompt="abcd", max_tokens=3, temperature=0, seed=3, user="alice"
    )
    assert done.choices[0].text == "w0 w1 w2 "
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 3
    assert done.usage.total_tokens == 7
    assert done.usage.prompt_tokens_details.cached_tokens == 2
    assert done.id.startswith("cmpl-") and done.model == "fake-model"
    sent = frontend.requests[-1]
    assert sent.prompt_text == "abcd" and sent.client_id == "alice"
    assert sent.sampling_params.temperature == 0 and sent.sampling_params.seed == 3


def test_completion_prompt_forms_and_bench_client_extras(client, server):
    _, frontend, _ = server
    extras = {"ignore_eos": True, "repetition_penalty": 1.0, "top_k": 5, "some_future_field": 1}
    client.completions.create(
        model="fake-model",
        prompt=[5, 6, 7],
        max_tokens=2,
        n=1,
        best_of=1,
        echo=False,
        logprobs=None,
        frequency_penalty=0,
        presence_penalty=0.0,
        stop="zz",
        extra_body=extras,
    )
    sent = frontend.requests[-1]
    assert list(sent.prompt_token_ids) == [5, 6, 7] and sent.prompt_text is None
    assert sent.sampling_params.ignore_eos and sent.sampling_params.top_k == 5
    assert sent.sampling_params.stop == ("zz",)
    client.completions.create(model="fake-model", prompt=["one"], max_tokens=1)
    assert frontend.requests[-1].prompt_text == "one"
    client.completions.create(model="fake-model", prompt=[[9, 9]], max_tokens=1)
    assert list(frontend.requests[-1].prompt_token_ids) == [9, 9]
    client.completions.create(
        model="fake-model", prompt="x", max_tokens=50, extra_body={"max_completion_tokens": 2}
    )
    assert frontend.requests[-1].sampling_params.max_tokens == 2
    client.completions.create(model="fake-model", prompt="x")
    assert frontend.requests[-1].sampling_params.max_tokens == 16  # OpenAI's default


def test_streamed_completion_with_usage(client):
    stream = client.completions.create(
        model="fake-model",
        prompt="abcdef",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(stream)
    token_events, usage_event = events[:-1], events[-1]
    assert "".join(e.choices[0].text for e in token_events) == "w0 w1 w2 w3 "
    assert [e.choices[0].finish_reason for e in token_events] == [None, None, None, "length"]
    assert usage_event.choices == []
    assert usage_event.usage.completion_tokens == 4 and usage_event.usage.prompt_tokens == 6
    assert usage_event.usage.prompt_tokens_details.cached_tokens == 3


def test_chat_uses_the_chat_template_and_text_parts(client, server):
    _, frontend, _ = server
    done = client.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}],
            },
        ],
        max_completion_tokens=2,
    )
    assert done.choices[0].message.content == "w0 w1 "
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason == "length"
    expected = "<system>be brief\n<user>hi you\n<assistant>"
    assert list(frontend.requests[-1].prompt_token_ids) == [ord(c) for c in expected]
    assert done.usage.prompt_tokens == len(expected)
    assert done.usage.prompt_tokens_details.cached_tokens == len(expected) // 2


def test_chat_default_max_tokens_fills_the_context(client, server):
    _, frontend, _ = server
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=False,
        extra_body={"ignore_eos": True}, max_tokens=None,
    )  # fmt: skip
    prompt_len = len("<user>hi\n<assistant>")
    assert frontend.requests[-1].sampling_params.max_tokens == 256 - prompt_len


def test_streamed_chat(client):
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == "w0 w1 w2 "
    assert events[-2].choices[0].finish_reason == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 3


def test_models_health_and_metrics_move(client, server):
    url, _, _ = server
    assert [m.id for m in client.models.list()] == ["fake-model"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}

    def completions_served() -> float:
        text = httpx.get(f"{url}/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "distserve_http_requests_total" and s.labels == {
                    "endpoint": "/v1/completions",
                    "status": "200",
                }:
                    return s.value
        return 0.0

    before = completions_served()
    client.completions.create(model="fake-model", prompt="x", max_tokens=1)
    client.completions.create(model="fake-model", prompt="x", max_tokens=1, stream=True).close()
    assert completions_served() == before + 2


def test_chat_with_a_real_hugging_face_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from distserve.model.tiny_tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer(), tmp_path, 512)
    frontend = FakeFrontend()
    frontend.tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with serve_app(build_http_app(frontend)) as url:
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]}]
        resp = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}
        )
    assert resp.status_code == 200, resp.text
    expected = "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"
    ids = frontend.tokenizer.encode(expected, add_special_tokens=False)
    assert list(frontend.requests[-1].prompt_token_ids) == ids
    assert ids[0] == frontend.tokenizer.convert_tokens_to_ids("<|im_start|>")  # one special token
    assert resp.json()["usage"]["prompt_tokens"] == len(ids)
