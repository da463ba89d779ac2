"""Raw SSE framing of the HTTP API, and aborting the core's stream when the client leaves."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from distserve.router.http_api import build_http_app
from tests.client.fake_router import FakeFrontend, serve_app


@pytest.fixture(scope="module")
def served():
    frontend = FakeFrontend(tokens_per_chunk=3)  # the core sends several tokens per chunk
    with serve_app(build_http_app(frontend)) as url:
        yield url, frontend


def sse_payloads(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[len("data: ") :] for e in events]


def test_one_token_per_event_done_last_and_usage_chunk(served):
    url, _ = served
    body = {
        "prompt": "abcd",
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(resp.text)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    token_events, usage_event = events[:7], events[7]
    assert len(events) == 8  # 7 tokens (sent by the core as 3+3+1), then usage
    # chunk text rides on the first token of each core chunk
    assert [e["choices"][0]["text"] for e in token_events] == [
        "w0 w1 w2 ", "", "", "w3 w4 w5 ", "", "", "w6 ",
    ]  # fmt: skip
    assert [e["choices"][0]["finish_reason"] for e in token_events] == [None] * 6 + ["length"]
    assert all(e["object"] == "text_completion" and e["model"] == "fake-model" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 7,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_no_usage_chunk_unless_asked(served):
    url, _ = served
    resp = httpx.post(
        f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}
    )
    payloads = sse_payloads(resp.text)
    assert len(payloads) == 3 and payloads[-1] == "[DONE]"
    assert all(json.loads(p)["choices"] for p in payloads[:-1])


def test_chat_stream_framing(served):
    url, _ = served
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = sse_payloads(httpx.post(f"{url}/v1/chat/completions", json=body).text)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_events = events[1:-1]
    assert len(token_events) == 4
    assert [e["choices"][0]["finish_reason"] for e in token_events] == [None, None, None, "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_disconnect_mid_stream_closes_the_core_stream(served):
    url, frontend = served
    body = {"prompt": "endless", "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[6:])["id"].removeprefix("cmpl-")
        next(line for line in lines if line.startswith("data: "))  # a second token arrives
    assert frontend.wait_for_outcome(rid) == "aborted"


def test_disconnect_while_waiting_for_a_whole_answer_aborts(served):
    url, frontend = served
    before = set(frontend.outcomes)
    num_requests = len(frontend.requests)
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({"prompt": "endless"}).encode()
    with socket.create_connection((host, int(port))) as sock:  # non-streaming, then hang up
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        deadline = time.monotonic() + 5
        while len(frontend.requests) == num_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # a few tokens into the answer
    deadline = time.monotonic() + 5
    while set(frontend.outcomes) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(set(frontend.outcomes) - before) and all(
        frontend.outcomes[rid] == "aborted" for rid in set(frontend.outcomes) - before
    )


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_the_first_token_aborts(served, stream):
    url, frontend = served
    num_requests = len(frontend.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/completions", json={"prompt": "stalled", "stream": stream}, timeout=0.5
        )
    assert len(frontend.requests) == num_requests + 1
    assert frontend.wait_for_outcome(frontend.last_request_id) == "aborted"
