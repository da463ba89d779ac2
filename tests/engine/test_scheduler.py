from __future__ import annotations

import pytest

from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import RequestStatus
from distserve.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.conftest import make_request


def _step(sched: Scheduler, token: int = 7):
    batch = sched.schedule()
    sampled = [token if batch.samples(i) else None for i in range(len(batch.requests))]
    finished = sched.update(batch, sampled)
    return batch, finished


def test_chunked_prefill_then_decode_within_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), kv)
    a = make_request("a", list(range(1, 21)))  # 20-token prompt: chunks of 8, 8, 4
    sched.add(a)
    sizes = []
    for _ in range(3):
        batch, _ = _step(sched)
        sizes.append(batch.num_new_tokens)
    assert sizes == [[8], [8], [4]]
    assert a.output_token_ids == [7]  # sampled only when the prompt was complete
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    sched.add(b)
    batch, _ = _step(sched)
    # Running decode first (1 token); b's first 8 tokens are a's cached blocks, 2 remain.
    assert [r.request_id for r in batch.requests] == ["a", "b"]
    assert batch.num_new_tokens == [1, 2]
    assert b.num_cached_tokens == 8
    c = make_request("c", [50 + i for i in range(12)])
    sched.add(c)
    batch, _ = _step(sched)
    assert [r.request_id for r in batch.requests] == ["a", "b", "c"]
    assert batch.num_new_tokens == [1, 1, 6]  # c is chunked by the remaining budget
    kv.check_consistency()


def test_max_num_seqs_caps_running():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2), kv)
    for i in range(3):
        sched.add(make_request(f"r{i}", [1, 2, 3]))
    batch, _ = _step(sched)
    assert [r.request_id for r in batch.requests] == ["r0", "r1"]
    assert sched.num_waiting == 1


def test_preemption_recomputes_latest_request_and_frees_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    b = make_request("b", [4, 5, 6], max_tokens=4)
    sched.add(a)
    sched.add(b)
    _step(sched)  # both prefill: 2 blocks each, pool full
    assert kv.num_free_blocks == 0
    batch, _ = _step(sched)  # both decode token 4 at position 3: still fits in block 2 of each
    batch, _ = _step(sched)  # position 4 needs a 3rd block each: b is preempted for a
    assert [r.request_id for r in batch.preempted] == ["b"]
    assert [r.request_id for r in batch.requests] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7] and b.num_preemptions == 1
    kv.check_consistency()
    # Run a to completion; b is then readmitted and recomputes prompt + its two tokens.
    while not a.is_finished:
        _step(sched)
    batch, _ = _step(sched)
    assert batch.requests == [b] and batch.num_new_tokens == [5]


def test_finish_frees_blocks_of_waiting_and_running():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(), kv)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [4, 5])
    sched.add(a)
    _step(sched)
    sched.add(b)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 8 and not sched.has_work()


def test_eos_and_length_finish():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(), kv)
    a = make_request("a", [1, 2], max_tokens=2)
    sched.add(a)
    _step(sched, token=5)
    _, finished = _step(sched, token=5)
    assert finished == [a] and a.status is RequestStatus.FINISHED_LENGTH
    b = make_request("b", [1, 2], max_tokens=5)
    sched.add(b)
    _, finished = _step(sched, token=0)  # 0 is EOS in make_request
    assert finished == [b] and b.status is RequestStatus.FINISHED_STOPPED
    assert kv.num_free_blocks == 8


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def test_lpm_admission_runs_the_longest_cached_prefix_first():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1, admission="lpm"), kv)
    warm = make_request("warm", list(range(1, 17)), max_tokens=1)
    sched.add(warm)
    _step(sched)  # 16 tokens computed and cached, finished (max_tokens=1)
    cold = make_request("cold", [90 + i for i in range(12)])
    hot = make_request("hot", [*range(1, 17), 77])
    sched.add(cold)
    sched.add(hot)  # arrives later, but 16 of its tokens are cached
    batch, _ = _step(sched)
    assert [r.request_id for r in batch.requests] == ["hot"]
    assert batch.num_new_tokens == [1] and hot.num_cached_tokens == 16
    fcfs = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1), kv)
    fcfs.add(make_request("cold2", [90 + i for i in range(12)]))
    fcfs.add(make_request("hot2", [*range(1, 17), 77]))
    batch, _ = _step(fcfs)
    assert [r.request_id for r in batch.requests] == ["cold2"]


def test_unknown_admission_order_is_a_clear_error():
    with pytest.raises(ValueError, match="admission"):
        SchedulerConfig(admission="nope")
