"""HTTP API error bodies and status codes: every refused option, bad values, core errors."""

from __future__ import annotations

import httpx
import pytest

from distserve.router.http_api import build_http_app
from tests.client.fake_router import FakeFrontend, serve_app


@pytest.fixture(scope="module")
def url():
    with serve_app(build_http_app(FakeFrontend())) as base:
        yield base


def post(url: str, path: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None, needle: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert needle in err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("n", 2, "n = 1"),
        ("best_of", 3, "best_of"),
        ("logprobs", True, "logprobs"),
        ("logprobs", 1, "logprobs"),
        ("echo", True, "echo"),
        ("frequency_penalty", 0.5, "penalties"),
        ("presence_penalty", -1.0, "penalties"),
        ("repetition_penalty", 1.2, "penalties"),
        ("suffix", "tail", "suffix"),
        ("logit_bias", {"5": 1.0}, "logit_bias"),
    ],
)
def test_unsupported_completion_options_are_refused_with_400(url, field, value, needle):
    resp = post(url, "/v1/completions", model="fake-model", prompt="x", **{field: value})
    assert_openai_error(resp, 400, field, needle)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),
        ("n", 4, "n = 1"),
        ("top_logprobs", 2, "logprobs"),
        ("logprobs", True, "logprobs"),
    ],
)
def test_unsupported_chat_options_are_refused_with_400(url, field, value, needle):
    messages = [{"role": "user", "content": "hi"}]
    resp = post(
        url, "/v1/chat/completions", model="fake-model", messages=messages, **{field: value}
    )
    assert_openai_error(resp, 400, field, needle)


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be"),
        ({"prompt": "x", "max_completion_tokens": 0}, "max_completion_tokens", "max_tokens must"),
        ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be"),
        ({"prompt": "x", "top_k": -5}, "top_k", "top_k must be"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "max_tokens"),
        ({"prompt": "x", "stop": [""]}, "stop", "stop must be"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"prompt": {"text": "x"}}, "prompt", "prompt"),
        ({}, "prompt", "Field required"),
    ],
)
def test_bad_values_are_400_never_422(url, body, param, needle):
    resp = post(url, "/v1/completions", model="fake-model", **body)
    assert_openai_error(resp, 400, param, needle)


def test_bad_chat_content_and_invalid_json(url):
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    resp = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": image}])
    assert_openai_error(resp, 400, "messages[0].content", "only text content parts")
    resp = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400, None, "not valid JSON")


def test_unknown_model_is_404_model_not_found(url):
    resp = post(url, "/v1/completions", model="gpt-4", prompt="x")
    assert_openai_error(resp, 404, "model", "gpt-4")
    assert resp.json()["error"]["code"] == "model_not_found"
    resp = post(
        url, "/v1/chat/completions", model="nope", messages=[{"role": "user", "content": "x"}]
    )
    assert resp.status_code == 404


def test_core_errors_map_to_400_and_503(url):
    resp = post(url, "/v1/completions", prompt="invalid")
    assert_openai_error(resp, 400, None, "refused by the fake core")
    resp = post(url, "/v1/completions", prompt="unavailable", stream=True)
    assert_openai_error(resp, 503, None, "no prefill instance")
    assert resp.json()["error"]["code"] == "service_unavailable"


def test_core_failure_mid_answer(url):
    resp = post(url, "/v1/completions", prompt="fail-midway", max_tokens=5)
    assert_openai_error(resp, 503, None, "decode instance died")
    resp = post(url, "/v1/completions", prompt="fail-midway", max_tokens=5, stream=True)
    assert resp.status_code == 200  # the stream had started: the error is an event
    events = [line[6:] for line in resp.text.split("\n\n") if line]
    assert '"decode instance died"' in events[-2] and events[-1] == "[DONE]"


def test_unknown_path_is_openai_shaped_404(url):
    resp = httpx.get(f"{url}/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()
