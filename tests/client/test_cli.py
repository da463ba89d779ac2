"""``distserve generate`` (``run_generate``) against the loopback fake router."""

from __future__ import annotations

import argparse
import json

import pytest

from distserve.client.cli import add_generate_arguments, run_generate
from tests.client.fake_grpc import free_port, serve_fake_generation


@pytest.fixture(scope="module")
def address():
    with serve_fake_generation() as (addr, _):
        yield addr


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distserve generate")
    add_generate_arguments(parser)
    return parser.parse_args(list(argv))


def test_plain_output_is_the_text_then_a_summary_on_stderr(address, capsys):
    assert run_generate(parse("hello", "--endpoint", address, "--max-tokens", "3")) == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 t2 \n"
    assert "finish=length" in err and "tokens=3" in err and "ttft=" in err


def test_stream_prints_text_as_it_arrives(address, capsys):
    args = parse("hello", "--endpoint", address, "--max-tokens", "2", "--stream", "--seed", "1")
    assert run_generate(args) == 0
    out, _ = capsys.readouterr()
    assert out == "t0 t1 \n"


def test_json_output_carries_usage_and_timings(address, capsys):
    args = parse("a b", "--endpoint", address, "--max-tokens", "2", "--json", "--stop", "x")
    assert run_generate(args) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["token_ids"] == [100, 101]
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "cached_tokens": 1}
    assert done["ttft_s"] > 0 and done["finish_reason"] == "length"


def test_stream_json_prints_one_object_per_chunk(address, capsys):
    args = parse("a", "--endpoint", address, "--max-tokens", "3", "--stream", "--json")
    assert run_generate(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["token_ids"] for line in lines] == [[100], [101], [102]]


@pytest.mark.parametrize(
    ("prompt", "code", "needle"),
    [("invalid", 2, "top_p must be"), ("busy", 3, "unavailable"), ("slow", 4, "within")],
)
def test_errors_print_one_line_and_exit_non_zero(address, capsys, prompt, code, needle):
    args = parse(prompt, "--endpoint", address, "--timeout", "0.3")
    assert run_generate(args) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_unreachable_router_exits_3_naming_the_endpoint(capsys):
    endpoint = f"127.0.0.1:{free_port()}"
    assert run_generate(parse("hi", "--endpoint", endpoint)) == 3
    assert endpoint in capsys.readouterr().err


def test_http_endpoint_is_refused_clearly(capsys):
    assert run_generate(parse("hi", "--endpoint", "http://127.0.0.1:8000")) == 2
    assert "grpc://host:port" in capsys.readouterr().err


def test_through_the_distserve_command(address, capsys):
    from distserve.cli import main

    assert main(["generate", "hi", "--endpoint", address, "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out == "t0 t1 \n"
