"""``distserve bench`` end to end against fake-backed servers (HTTP via uvicorn, and gRPC)."""

from __future__ import annotations

import argparse
import json

import pytest

from distserve.bench.cli import add_bench_arguments, run_bench
from distserve.router.http_api import build_http_app
from tests.client.fake_grpc import serve_fake_generation
from tests.client.fake_router import FakeFrontend, serve_app


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distserve bench")
    add_bench_arguments(parser)
    return parser.parse_args([*argv, "--disable-tqdm"])


@pytest.fixture(scope="module")
def http_server():
    frontend = FakeFrontend(delay_s=0.002)
    with serve_app(build_http_app(frontend)) as url:
        yield url, frontend


def check_consistent(result: dict, num_prompts: int, output_len: int) -> None:
    assert result["num_requests"] == num_prompts
    assert result["num_completed"] + result["num_errors"] == num_prompts
    assert result["total_output_tokens"] == result["num_completed"] * output_len
    assert 0.0 <= result["slo_attainment"] <= 1.0
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = result[name]
        assert 0 < s["median"] <= s["p90"] <= s["p99"], name
    assert result["ttft_s"]["median"] <= result["e2e_s"]["median"]
    assert result["output_throughput"] == pytest.approx(
        result["total_output_tokens"] / result["duration_s"]
    )


def test_http_sweep_writes_consistent_json_and_a_plot(http_server, tmp_path, capsys):
    url, frontend = http_server
    out, plot = tmp_path / "bench.json", tmp_path / "att.png"
    num_before = len(frontend.requests)
    args = parse(
        "--endpoint", url, "--dataset", "random", "--num-prompts", "6", "--input-len", "8",
        "--output-len", "4", "--rates", "40,400", "--ttft-slo", "1.0", "--tpot-slo", "0.5",
        "--max-concurrency", "4", "--out", str(out), "--plot", str(plot), "--save-requests",
    )  # fmt: skip
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    assert report["config"]["rates"] == [40.0, 400.0] and report["config"]["dataset"] == "random"
    assert [r["rate_per_s"] for r in report["results"]] == [40.0, 400.0]
    for result in report["results"]:
        check_consistent(result, num_prompts=6, output_len=4)
        assert result["num_errors"] == 0 and result["total_input_tokens"] == 6 * 8
        assert len(result["requests"]) == 6
        assert 0 < result["client_cpu_s"] < 60  # the bench's own CPU for the rate
    assert report["goodput"]["rate_per_s"] == 400.0 and report["goodput"]["is_lower_bound"]
    assert plot.stat().st_size > 0
    sent = frontend.requests[num_before:]
    assert len(sent) == 12
    assert all(len(r.prompt_token_ids) == 8 and r.prompt_text is None for r in sent)
    assert all(r.sampling_params.ignore_eos and r.sampling_params.max_tokens == 4 for r in sent)
    table = capsys.readouterr().out
    assert "TTFT p50" in table and "goodput at 0.9" in table


def test_each_rate_and_the_warmup_send_fresh_prompts_of_the_same_lengths(http_server, tmp_path):
    # Otherwise every rate after the first is served from the prefix cache the first one filled.
    url, frontend = http_server
    num_before = len(frontend.requests)
    args = parse(
        "--endpoint", url, "--dataset", "random", "--num-prompts", "5", "--input-len", "16",
        "--range-ratio", "0.5", "--output-len", "2", "--rates", "500,1000",
        "--warmup-requests", "3", "--out", str(tmp_path / "b.json"),
    )  # fmt: skip
    assert run_bench(args) == 0
    sent = [tuple(r.prompt_token_ids) for r in frontend.requests[num_before:]]
    warmup, first, second = sent[:3], sent[3:8], sent[8:]
    assert len(second) == 5
    assert not (set(warmup) & set(first)) and not (set(first) & set(second))
    assert not {p[:8] for p in first} & {p[:8] for p in second}  # no shared prefix either
    assert sorted(map(len, first)) == sorted(map(len, second))


def test_http_errors_are_counted_and_reported(http_server, tmp_path, capsys):
    url, _ = http_server
    out = tmp_path / "bad.json"
    args = parse(
        "--endpoint", url, "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
        "--rate", "100", "--ttft-slo", "1", "--extra-body", '{"n": 2}', "--out", str(out),
    )  # fmt: skip
    assert run_bench(args) == 1  # every request failed
    result = json.loads(out.read_text())["results"][0]
    assert result["num_errors"] == 3 and result["num_completed"] == 0
    assert result["slo_attainment"] == 0.0
    [(message, count)] = result["errors"].items()
    assert count == 3 and message.startswith("HTTP 400") and "n = 1" in message
    assert "3 failed: HTTP 400" in capsys.readouterr().err


def test_grpc_backend_with_token_ids(tmp_path):
    out = tmp_path / "grpc.json"
    with serve_fake_generation() as (address, servicer):
        args = parse(
            "--endpoint", f"grpc://{address}", "--num-prompts", "4", "--input-len", "5",
            "--output-len", "3", "--rate", "200", "--ttft-slo", "1", "--tpot-slo", "1",
            "--out", str(out),
        )  # fmt: skip
        assert run_bench(args) == 0
    result = json.loads(out.read_text())["results"][0]
    check_consistent(result, num_prompts=4, output_len=3)
    assert result["total_input_tokens"] == 4 * 5
    assert len(servicer.requests) == 4
    for req in servicer.requests:
        assert len(req.token_ids.ids) == 5 and all(t < 300 for t in req.token_ids.ids)
        assert req.sampling.ignore_eos and req.sampling.max_tokens == 3
    # the SDK's default: the requests went on a multiplexed GenerateStream, not Generate calls
    assert servicer.num_stream_calls >= 1 and servicer.num_generate_calls == 0
    # per-chunk arrival times: the fake sends its 3 chunks 2 ms apart, so 2 gaps per request
    assert result["itl_s"]["median"] > 0.001


def test_bad_arguments_exit_2(http_server, capsys):
    url, _ = http_server
    assert run_bench(parse("--endpoint", url, "--rates", "1,-2")) == 2
    assert run_bench(parse("--endpoint", url, "--prompt-as-text", "--num-prompts", "1")) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert run_bench(parse("--endpoint", "grpc://127.0.0.1:1", "--num-prompts", "1")) == 2
    assert "unavailable" in capsys.readouterr().err


def test_through_the_distserve_command(http_server, tmp_path):
    from distserve.cli import main

    url, _ = http_server
    out = tmp_path / "cli.json"
    argv = ["bench", "--endpoint", url, "--num-prompts", "2", "--input-len", "4",
            "--output-len", "2", "--rate", "100", "--out", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["num_completed"] == 2
    assert report["config"]["endpoint"] == url and "_runners" not in report["config"]
