"""``distserve bench`` against a real cluster, over gRPC and over the OpenAI HTTP API."""

from __future__ import annotations

import argparse
import json

import pytest

from distserve.bench.cli import add_bench_arguments, run_bench

pytestmark = pytest.mark.slow

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 6, 24, 6


def bench(tmp_path, *argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [*argv, "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN),
         "--output-len", str(OUTPUT_LEN), "--rates", "4,16", "--ttft-slo", "10",
         "--tpot-slo", "2", "--out", str(out), "--disable-tqdm"]
    )  # fmt: skip
    assert run_bench(args) == 0
    return json.loads(out.read_text())


def check(report: dict, exact_input: bool = True) -> None:
    assert [r["rate_per_s"] for r in report["results"]] == [4.0, 16.0]
    for r in report["results"]:
        assert (r["num_completed"], r["num_errors"]) == (NUM_PROMPTS, 0), r["errors"]
        assert r["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        if exact_input:
            assert r["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
        else:
            assert abs(r["total_input_tokens"] - NUM_PROMPTS * INPUT_LEN) <= NUM_PROMPTS
        for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            s = r[name]
            assert 0 < s["median"] <= s["p90"] <= s["p99"], name
        assert 0.0 <= r["slo_attainment"] <= 1.0
    assert report["goodput"]["note"]


def test_bench_over_grpc(cluster, tmp_path):
    check(bench(tmp_path, "--endpoint", f"grpc://{cluster.grpc_address}"))


def test_bench_over_http_with_token_ids(cluster, tmp_path):
    check(bench(tmp_path, "--endpoint", cluster.http_url, "--dataset", "shared-prefix",
                "--prefix-len", "16", "--num-prefix-groups", "2"))  # fmt: skip


def test_bench_over_http_with_text_prompts(cluster, tmp_path):
    report = bench(
        tmp_path, "--endpoint", cluster.http_url, "--prompt-as-text", "--tokenizer",
        str(cluster.model_path),
    )  # fmt: skip
    check(report, exact_input=False)
