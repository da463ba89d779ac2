"""The cluster simulator: exact timings on tiny cases, prefix cache, KV limits, events, SLOs."""

from __future__ import annotations

import pytest

from distserve.bench.workloads import WorkloadRequest, make_workload
from distserve.router.policies import make_policy
from placement.latency_model import opt13b_a100
from placement.simulator import ClusterSpec, InstanceSpec, simulate

BS = 16
LAT = opt13b_a100()
BW = 1e12
BYTES = 800_000


def wreq(
    rid: str, t: float, n_in: int, n_out: int, ids: list[int], client: str = "c"
) -> WorkloadRequest:
    blocks = -(-n_in // BS)
    return WorkloadRequest(rid, t, client, n_in, n_out, tuple(ids[:blocks]), BS)


def cluster(num_prefill: int = 1, num_decode: int = 1, **prefill_options: object) -> ClusterSpec:
    return ClusterSpec.disaggregated(
        num_prefill,
        num_decode,
        prefill=InstanceSpec("prefill", **prefill_options),  # type: ignore[arg-type]
        kv_bytes_per_token=BYTES,
        transfer_bandwidth_bytes_per_s=BW,
    )


def test_one_request_through_prefill_transfer_and_decode() -> None:
    (rec,) = simulate(cluster(), [wreq("r", 0.0, 512, 3, list(range(32)))], "round_robin").records
    ttft = LAT.prefill_ms([512]) / 1e3
    transfer = 512 * BYTES / BW
    finish = ttft + transfer + (LAT.decode_ms(1, 513) + LAT.decode_ms(1, 514)) / 1e3
    assert rec.ttft_s == pytest.approx(ttft)
    assert rec.finish_s == pytest.approx(finish)
    assert rec.tpot_s == pytest.approx((finish - ttft) / 2)
    assert (rec.prefill_instance, rec.decode_instance) == ("prefill-0", "decode-0")


def test_a_cached_prefix_skips_its_prefill_compute() -> None:
    shared = list(range(16))
    reqs = [
        wreq("r1", 0.0, 512, 2, [*shared, *range(100, 116)]),
        wreq("r2", 10.0, 512, 2, [*shared, *range(200, 216)]),
    ]
    r1, r2 = sorted(simulate(cluster(), reqs, "round_robin").records, key=lambda r: r.arrival_s)
    assert (r1.num_cached_tokens, r2.num_cached_tokens) == (0, 256)
    assert r2.ttft_s == pytest.approx((LAT.prefill[0] + LAT.extend_work_ms(256, 256)) / 1e3)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    reqs = [wreq("r1", 0.0, 64, 1, [1, 2, 3, 4]), wreq("r2", 5.0, 64, 1, [1, 2, 3, 4])]
    r2 = max(simulate(cluster(), reqs, "round_robin").records, key=lambda r: r.arrival_s)
    assert r2.num_cached_tokens == 63 and r2.ttft_s == pytest.approx(
        (LAT.prefill[0] + LAT.extend_work_ms(1, 63)) / 1e3
    )


def test_lru_eviction_events_keep_the_router_index_in_step() -> None:
    policy = make_policy("cache_aware")
    reqs = [wreq(f"r{i}", 10.0 * i, 512, 1, list(range(100 * i, 100 * i + 32))) for i in range(3)]
    simulate(cluster(kv_capacity_tokens=64 * BS), reqs, policy)
    index = policy.index  # type: ignore[attr-defined]
    assert index.match(reqs[0].chained_hashes()) == {}  # evicted (LRU) when r2 needed room
    assert index.match(reqs[1].chained_hashes()) == {"prefill-0": 32}
    assert index.match(reqs[2].chained_hashes()) == {"prefill-0": 32}
    policy.check_consistency()


def test_decode_batch_is_bounded_by_kv_capacity() -> None:
    decode = InstanceSpec("decode", kv_capacity_tokens=40 * BS)  # room for one 512 + 100 request
    spec = ClusterSpec(
        (InstanceSpec("prefill"), decode),
        kv_bytes_per_token=BYTES,
        transfer_bandwidth_bytes_per_s=BW,
    )
    reqs = [
        wreq("a", 0.0, 512, 100, list(range(32))),
        wreq("b", 0.0, 512, 100, list(range(50, 82))),
    ]
    a, b = sorted(simulate(spec, reqs, "round_robin").records, key=lambda r: r.first_token_s)
    assert (
        b.finish_s > a.finish_s + 99 * LAT.decode_ms(1, 513) / 1e3
    )  # b decodes only after a is gone


def test_colocated_chunked_prefill_budget() -> None:
    spec = ClusterSpec.colocated(1, InstanceSpec("colocated", max_prefill_tokens=256))
    (rec,) = simulate(spec, [wreq("r", 0.0, 512, 1, list(range(32)))], "round_robin").records
    expected = 2 * LAT.prefill[0] + LAT.extend_work_ms(256, 0) + LAT.extend_work_ms(256, 256)
    assert rec.ttft_s == pytest.approx(expected / 1e3)  # two chunks, two steps


def test_pipeline_parallel_prefill_overlaps_batches() -> None:
    pp2 = opt13b_a100(pp=2)
    reqs = [wreq(f"r{i}", 0.0, 2048, 1, list(range(200 * i, 200 * i + 128))) for i in range(2)]
    one, two = (
        sorted(
            simulate(cluster(latency=lat, max_prefill_tokens=2048), reqs, "round_robin").records,
            key=lambda r: r.ttft_s,
        )
        for lat in (LAT, pp2)
    )
    assert two[0].ttft_s == pytest.approx(one[0].ttft_s)  # a batch still takes the whole model
    assert two[1].ttft_s == pytest.approx(1.5 * one[0].ttft_s)  # the second enters after 1 stage


def test_requests_that_never_fit_are_rejected_and_count_against_attainment() -> None:
    reqs = [wreq("big", 0.0, 2048, 1, list(range(128))), wreq("ok", 0.0, 64, 1, [1, 2, 3, 4])]
    result = simulate(cluster(kv_capacity_tokens=64 * BS), reqs, "round_robin")
    assert result.rejected == ("big",) and [r.request_id for r in result.records] == ["ok"]
    assert result.slo_attainment(ttft_slo_s=10.0, tpot_slo_s=10.0) == 0.5


def test_slo_attainment_needs_both_slos() -> None:
    reqs = [wreq(f"r{i}", 0.0, 512, 3, list(range(100 * i, 100 * i + 32))) for i in range(4)]
    result = simulate(cluster(max_prefill_tokens=512), reqs, "round_robin")  # one prompt a step
    ttft, tpot = sorted(result.ttft_s), result.tpot_s
    assert result.slo_attainment(ttft[1] + 1e-9, 1.0) == 0.5
    assert result.slo_attainment(10.0, float(tpot.min()) - 1e-9) == 0.0


def test_runs_are_deterministic_and_complete() -> None:
    reqs = make_workload("tool_use", num_requests=150, rate_per_s=20.0, seed=2)
    a = simulate(ClusterSpec.disaggregated(2, 2), reqs, "preble")
    b = simulate(ClusterSpec.disaggregated(2, 2), reqs, "preble")
    assert a.records == b.records and len(a.records) == 150
    assert a.prefix_hit_rate > 0.5
    summary = a.summary(ttft_slo_s=0.25, tpot_slo_s=0.1)
    assert set(summary) >= {
        "avg_ttft_s",
        "p99_e2e_s",
        "prefix_hit_rate",
        "slo_attainment",
        "load_imbalance",
    }


def test_mixed_block_sizes_are_an_error() -> None:
    a = wreq("a", 0.0, 16, 1, [1])
    b = WorkloadRequest("b", 0.0, "c", 32, 1, (1,), 32)
    with pytest.raises(ValueError, match="one block size"):
        simulate(cluster(), [a, b], "round_robin")


@pytest.mark.parametrize("role", ["prefill", "colocated"])
def test_prefix_caching_off_runs_and_caches_nothing(role: str) -> None:
    shared = list(range(16))
    reqs = [
        wreq("r1", 0.0, 512, 3, [*shared, *range(100, 116)]),
        wreq("r2", 10.0, 512, 3, [*shared, *range(200, 216)]),
    ]
    spec = (
        ClusterSpec.colocated(1, InstanceSpec("colocated", prefix_caching=False))
        if role == "colocated"
        else cluster(prefix_caching=False)
    )
    result = simulate(spec, reqs, "round_robin")  # used to raise KeyError in KVPool.release
    assert [r.num_cached_tokens for r in result.records] == [0, 0]
    assert result.records[0].ttft_s == pytest.approx(result.records[1].ttft_s)


def test_skipping_the_cache_when_no_block_is_shared_changes_nothing() -> None:
    """Without shared blocks the simulator turns prefix caching off (see ``_shares_blocks``);
    a trace forces it on: both runs must agree on every record."""
    from placement.workload import parse_workload

    reqs = parse_workload("sharegpt-like", 300, 0, 1.0, 2048).at_rate(6.0)
    spec = ClusterSpec.disaggregated(2, 2, prefill=InstanceSpec("prefill", kv_capacity_tokens=8192))
    fast = simulate(spec, reqs, "least_load")
    cached = simulate(spec, reqs, "least_load", trace=[])
    assert fast.records == cached.records and fast.end_s == cached.end_s
    assert fast.busy_s == cached.busy_s and fast.rejected == cached.rejected


def test_the_decode_fast_path_gives_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``continue_decoding`` (a decode step with no finish and no join, applied in place) must
    leave every record, busy time and the end time exactly as the general step path does."""
    from placement.simulator.instance import SimInstance
    from placement.workload import parse_workload

    reqs = parse_workload("sharegpt-like", 300, 0, 1.0, 2048).at_rate(8.0)
    spec = ClusterSpec.disaggregated(2, 3, decode=InstanceSpec("decode", kv_capacity_tokens=20000))
    fast = simulate(spec, reqs, "least_load")
    monkeypatch.setattr(SimInstance, "continue_decoding", lambda self, plan: False)
    slow = simulate(spec, reqs, "least_load")
    assert fast.records == slow.records and fast.end_s == slow.end_s
    assert fast.busy_s == slow.busy_s


def test_an_instance_snapshot_is_a_complete_instance_load() -> None:
    """``SimInstance.snapshot`` fills InstanceLoad's fields without its __init__: every field
    must be there and compare equal to one built the ordinary way."""
    from dataclasses import fields

    from distserve.router.policies import InstanceLoad
    from placement.simulator.instance import SimInstance

    inst = SimInstance(cluster().instances[0], BS)
    snap = inst.snapshot()
    assert set(vars(snap)) == {f.name for f in fields(InstanceLoad)}
    assert snap == InstanceLoad(
        "prefill-0", "prefill", total_kv_blocks=inst.pool.capacity_blocks,
        free_kv_blocks=inst.pool.num_free,
    )  # fmt: skip


def _between_steps(rtt_s: float) -> ClusterSpec:
    return ClusterSpec.disaggregated(
        1,
        1,
        kv_bytes_per_token=BYTES,
        transfer_bandwidth_bytes_per_s=BW,
        pulls_between_steps=True,
        pull_rtt_s=rtt_s,
    )


def test_our_engine_serves_a_pull_only_between_prefill_steps() -> None:
    """r1's pull reaches the prefill instance while it computes r2's prompt: the transfer
    starts when that step ends, not when the decode instance had room (DistServe's model)."""
    rtt = 0.001
    # a budget of one prompt per step: r1's step, then r2's (r2 needs no decode)
    reqs = [
        wreq("r1", 0.0, 512, 3, list(range(32))),
        wreq("r2", 0.0, 512, 1, list(range(100, 132))),
    ]
    step1 = step2 = LAT.prefill_ms([512]) / 1e3
    transfer = 512 * BYTES / BW
    base = {
        r.request_id: r
        for r in simulate(cluster(max_prefill_tokens=512), reqs, "round_robin").records
    }
    ours = {
        r.request_id: r
        for r in simulate(
            ClusterSpec.disaggregated(
                1,
                1,
                prefill=InstanceSpec("prefill", max_prefill_tokens=512),
                kv_bytes_per_token=BYTES,
                transfer_bandwidth_bytes_per_s=BW,
                pulls_between_steps=True,
                pull_rtt_s=rtt,
            ),
            reqs,
            "round_robin",
        ).records
    }
    assert base["r1"].ttft_s == ours["r1"].ttft_s == pytest.approx(step1)
    assert ours["r2"].ttft_s == pytest.approx(step1 + step2)
    decode_steps = (LAT.decode_ms(1, 513) + LAT.decode_ms(1, 514)) / 1e3
    # DistServe's model: r1's KV moves right after its prefill
    assert base["r1"].finish_s == pytest.approx(step1 + transfer + decode_steps)
    # ours: the pull arrives rtt later, mid r2's step, and waits for that step to end
    assert ours["r1"].finish_s == pytest.approx(step1 + step2 + transfer + decode_steps)


def test_our_engine_admits_a_decode_request_at_the_end_of_its_step() -> None:
    """r2's prompt is done while the decode instance runs r1's step: its pull starts only when
    that decode step ends (plus the RPC time), and it joins the next step after its KV."""
    rtt = 0.002
    reqs = [
        wreq("r1", 0.0, 512, 50, list(range(32))),
        wreq("r2", 0.2, 512, 3, list(range(100, 132))),
    ]
    result = simulate(_between_steps(rtt), reqs, "round_robin")
    r2 = {r.request_id: r for r in result.records}["r2"]
    base = {r.request_id: r for r in simulate(cluster(), reqs, "round_robin").records}["r2"]
    assert r2.ttft_s == pytest.approx(base.ttft_s)
    # later than DistServe's model by at least the RPC time and at most one decode step more
    one_step = LAT.decode_ms(2, 2 * 600) / 1e3
    delay = (r2.finish_s - r2.ttft_s) - (base.finish_s - base.ttft_s)
    assert rtt <= delay <= rtt + 2 * one_step + 1e-9


def test_pull_rtt_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="pull_rtt_s"):
        _between_steps(-1.0)
