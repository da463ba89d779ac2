"""``distserve plan`` end to end on DistServe's A100 profile (OPT-13B and OPT-66B entries copied
from ``../shared/data`` so the test needs no files outside the project), and its errors: one
line on stderr, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distserve.cli import main
from distserve.launch.cluster_config import load_cluster_config

# DistServe's fitted A100 coefficients (ms) and KV capacities, from distserve_a100_profile.json
# and distserve_a100_max_num_tokens.csv (Apache-2.0).
A100 = {
    "facebook/opt-13b": {
        "1": {
            "decoding_large_small_bs_threshold": 95,
            "prefill": [18.10254647486372, 0.1019122572698738, 7.122264314252114e-06],
            "decoding_smallbs": [19.934702624895458, 0.0006269356524350583, 0.03850697740828398],
            "decoding_largebs": [7.1661889468253595, 0.0005798000403396046, 0.15831096191764046],
        },
        "2": {
            "decoding_large_small_bs_threshold": 95,
            "prefill": [14.742973695171262, 0.06857720739764, 2.4495727400243586e-06],
            "decoding_smallbs": [13.294796350285385, 0.00034109219700723494, 0.06296393225243659],
            "decoding_largebs": [10.638741913126715, 0.00031183369638295723, 0.08562913604102729],
        },
    },
    "facebook/opt-66b": {
        "2": {
            "decoding_large_small_bs_threshold": 95,
            "prefill": [43.05881348288936, 0.2742292870458432, 2.2478042467169447e-05],
            "decoding_smallbs": [48.288015489286245, 0.0009424343535737985, 0.12755020094383188],
            "decoding_largebs": [28.727693993711597, 0.00047448475459061987, 0.29617792360743994],
        }
    },
}
CAPACITY = """model,tp,pp,max_num_tokens
facebook/opt-13b,1,1,66144
facebook/opt-13b,2,1,163008
facebook/opt-66b,2,1,11600
"""


@pytest.fixture()
def a100(tmp_path: Path) -> Path:
    (tmp_path / "profile.json").write_text(json.dumps(A100))
    (tmp_path / "distserve_a100_max_num_tokens.csv").write_text(CAPACITY)
    return tmp_path / "profile.json"


def plan_args(profile: Path, out: Path, *extra: str) -> list[str]:
    return [
        "plan", "--profile", str(profile), "--model-name", "facebook/opt-13b",
        "--workload", "sharegpt-like", "--num-requests", "150", "--ttft-slo", "0.2",
        "--tpot-slo", "0.1", "--gpus-per-node", "3", "--nodes", "1", "--out", str(out),
        "--disable-tqdm", *extra,
    ]  # fmt: skip


def test_plan_runs_end_to_end_on_the_distserve_profile(
    a100: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "cluster.yaml"
    assert main(plan_args(a100, out, "--quick", "--colocated-out", str(tmp_path / "co.yaml"))) == 0
    config = load_cluster_config(out)
    assert config.prefill.instances >= 1 and config.decode.instances >= 1
    assert config.world_size <= 3 and config.model == "facebook/opt-13b"
    assert config.transfer.backend == "nccl" and config.prefill.cpu_cores is None
    assert load_cluster_config(tmp_path / "co.yaml").colocated.instances >= 1
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["chosen"]["num_gpus"] == config.world_size
    assert report["unit"]["goodput_per_s"] > 0 and report["candidates"]
    assert out.with_suffix(".png").exists()
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "colocated:" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--ttft-slo", "0"], "ttft SLO must be > 0 seconds, got 0.0"),
        (["--tpot-slo", "-0.1"], "tpot SLO must be > 0 seconds"),
        (["--model-name", "facebook/opt-175b"], "model 'facebook/opt-175b' is not in the profile"),
        (["--workload", "chatbot"], "unknown workload 'chatbot'"),
        (
            ["--model-name", "facebook/opt-66b", "--gpus-per-node", "1"],
            "facebook/opt-66b fits no configuration on 1 node(s) × 1 GPUs",
        ),
    ],
)
def test_invalid_inputs_print_one_line_and_exit_2(
    a100: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    message: str,
) -> None:
    assert main([*plan_args(a100, tmp_path / "c.yaml"), *change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distserve plan: error: ") and message in err
    assert "\n" not in err
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="on CUDA a rank is a GPU, not a core"
)
def test_profile_refuses_more_tp_x_pp_ranks_than_cores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    args = ["profile", "--model", str(tmp_path), "--pp", "2", "--cores", "1",
            "--out", str(tmp_path / "p.json")]  # fmt: skip
    assert main(args) == 2
    assert "--tp 1 x --pp 2 needs 2 cores" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_runs_the_real_engine_and_plan_reads_its_output(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profile.json"
    args = ["profile", "--model", str(tiny_llama), "--model-name", "tiny", "--tp", "1", "--quick",
            "--max-prompt-len", "128", "--max-batch-size", "8", "--kv-cache-gib", "0.05",
            "--out", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(args) == 0
    assert "mean |rel err|" in capsys.readouterr().out
    profile = json.loads(out.read_text())
    (cfg,) = profile["models"]["tiny"]["configs"]
    assert cfg["tp"] == 1 and cfg["kv_capacity_tokens"] > 0 and len(cfg["samples"]["prefill"]) > 3
    assert profile["bandwidth"]["intra_node_bytes_per_s"] > 0 and profile["device"] == "cpu"
    plan = [
        "plan", "--profile", str(out), "--model-name", "tiny", "--workload",
        "synthetic:in=uniform:32:96,out=8", "--num-requests", "100", "--ttft-slo", "1.0",
        "--tpot-slo", "0.5", "--gpus-per-node", "2", "--out", str(tmp_path / "c.yaml"),
        "--quick", "--disable-tqdm",
    ]  # fmt: skip
    assert main(plan) == 0
    config = load_cluster_config(tmp_path / "c.yaml")
    assert config.model == str(tiny_llama.resolve()) and config.device == "cpu"
    assert config.prefill.cpu_cores == [[0]] and config.decode.cpu_cores == [[1]]
