"""Workload generators: determinism, prefix structure, trace formats, token ids."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from distserve.bench.arrivals import gamma_arrivals, poisson_arrivals, rescale_to_rate
from distserve.bench.workloads import (
    PREBLE_LIKE_SPECS,
    WORKLOADS,
    make_workload,
    to_token_ids,
)

SYNTHETIC = [n for n in WORKLOADS if n not in ("mooncake", "sharegpt")]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_workloads_are_deterministic_with_a_seed(name: str) -> None:
    a = make_workload(name, num_requests=50, seed=3)
    b = make_workload(name, num_requests=50, seed=3)
    c = make_workload(name, num_requests=50, seed=4)
    assert a == b and a != c
    assert [r.chained_hashes() for r in a] == [r.chained_hashes() for r in b]
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(a))


def test_preble_like_ratios_and_shared_fractions() -> None:
    for kind, (_mean_in, ratio, share, _groups) in PREBLE_LIKE_SPECS.items():
        reqs = make_workload(kind, num_requests=600, seed=0, block_size=256)
        ins = np.array([r.input_len for r in reqs])
        outs = np.array([r.output_len for r in reqs])
        assert ins.mean() / outs.mean() == pytest.approx(ratio, rel=0.2), kind
        # shared prompt tokens: blocks before the first request-unique block
        counts: dict[int, int] = {}
        for r in reqs:
            for h in r.chained_hashes():
                counts[h] = counts.get(h, 0) + 1
        shared = sum(sum(r.block_size for h in r.chained_hashes() if counts[h] > 1) for r in reqs)
        assert shared / ins.sum() == pytest.approx(share, abs=0.06), kind


def test_shared_prefix_requests_share_exactly_their_group_blocks() -> None:
    reqs = make_workload(
        "shared_prefix", num_requests=20, num_groups=2, prefix_len=64, suffix_len=40, block_size=16
    )
    by_group: dict[str | None, list] = {}
    for r in reqs:
        by_group.setdefault(r.prefix_group, []).append(r)
    for group in by_group.values():
        heads = {r.chained_hashes()[:4] for r in group}
        assert len(heads) == 1
        assert len({r.chained_hashes()[4] for r in group}) == len(group)  # suffix blocks differ
    assert all(r.input_len == 104 for r in reqs)


def test_fairness_mix_has_a_heavy_uncached_client() -> None:
    reqs = make_workload("fairness_mix", num_requests=200, seed=0)
    heavy = [r for r in reqs if r.client_id == "heavy"]
    light = [r for r in reqs if r.client_id.startswith("light")]
    assert heavy and light
    assert len({r.chained_hashes()[0] for r in heavy}) == len(heavy)  # nothing shared
    assert len({r.chained_hashes()[0] for r in light if r.client_id == "light-1"}) == 1


def test_to_token_ids_equal_prefix_ids_give_equal_token_prefixes() -> None:
    reqs = make_workload(
        "shared_prefix", num_requests=10, num_groups=1, prefix_len=64, suffix_len=7, block_size=16
    )
    a, b = (to_token_ids(r, vocab_size=1000, seed=5) for r in reqs[:2])
    assert len(a) == reqs[0].input_len == 71
    assert a[:64] == b[:64] and a[64:] != b[64:]
    assert all(0 <= t < 1000 for t in a)
    assert to_token_ids(reqs[0], 1000, seed=5) == a
    assert to_token_ids(reqs[0], 1000, seed=6) != a


def test_mooncake_replay_and_rescale(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 500, "input_length": 700, "output_length": 3, "hash_ids": [0, 2]},
        {"timestamp": 2000, "input_length": 300, "output_length": 1, "hash_ids": [3]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    reqs = make_workload("mooncake", path=path)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.0]
    assert reqs[0].chained_hashes()[0] == reqs[1].chained_hashes()[0]
    assert len(reqs[1].chained_hashes()) == 1  # 700 tokens: one full 512-token block
    assert reqs[2].chained_hashes() == ()  # 300 tokens: no full block
    fast = make_workload("mooncake", path=path, rate_per_s=4.0)
    assert [r.arrival_s for r in fast] == pytest.approx([0.0, 0.125, 0.5])


def test_sharegpt_lengths_from_a_tokenizer_or_chars(tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": "a" * 40},
                {"from": "gpt", "value": "b" * 80},
            ]
        },
        {"conversations": [{"from": "human", "value": "only one turn"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    (r,) = make_workload("sharegpt", path=path)
    assert (r.input_len, r.output_len) == (10, 20)
    (t,) = make_workload("sharegpt", path=path, tokenize=lambda s: [ord(c) for c in s])
    assert (t.input_len, t.output_len) == (40, 80) and t.token_ids == tuple([97] * 40)


def test_arrivals_are_seeded_and_have_the_right_rate() -> None:
    assert poisson_arrivals(5, 2.0, seed=1) == poisson_arrivals(5, 2.0, seed=1)
    times = gamma_arrivals(20_000, rate_per_s=10.0, cv=2.0, seed=0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)
    reqs = make_workload("random", num_requests=11, rate_per_s=1.0)
    assert rescale_to_rate(reqs, 5.0)[-1].arrival_s == pytest.approx(2.0)


def test_unknown_workload_or_option() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['bogus'\]"):
        make_workload("agent", bogus=1)
