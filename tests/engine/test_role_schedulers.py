from __future__ import annotations

from distserve.engine.kv_manager import KVCacheManager
from distserve.engine.request import RequestStatus
from distserve.engine.role_schedulers import DecodeScheduler, PrefillScheduler
from distserve.engine.scheduler import SchedulerConfig
from tests.engine.conftest import make_request


def _step(sched, token=7):
    batch = sched.schedule()
    sampled = [token if batch.samples(i) else None for i in range(len(batch.requests))]
    return batch, sched.update(batch, sampled)


def test_prefill_leases_blocks_after_first_token_until_finished():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = PrefillScheduler(SchedulerConfig(), kv)
    a = make_request("a", list(range(1, 11)))  # 10 tokens: 3 blocks
    sched.add(a)
    _step(sched)
    assert a.status is RequestStatus.PREFILLED and a.output_token_ids == [7]
    assert sched.leased == {"a": a} and not sched.running and sched.num_leased_blocks == 3
    assert kv.num_free_blocks == 13
    assert sched.schedule().is_empty  # nothing decodes on a prefill instance
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    assert kv.num_free_blocks == 16 and not sched.leased
    kv.check_consistency()


def test_prefill_request_ending_at_first_token_is_not_leased():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = PrefillScheduler(SchedulerConfig(), kv)
    a = make_request("a", [1, 2, 3], max_tokens=1)
    sched.add(a)
    _, finished = _step(sched)
    assert finished == [a] and a.status is RequestStatus.FINISHED_LENGTH and not sched.leased
    assert kv.num_free_blocks == 16


def _prefilled(rid: str, prompt: list[int], first: int = 9):
    req = make_request(rid, prompt, max_tokens=4)
    req.output_token_ids.append(first)
    return req


def test_decode_admits_when_room_then_runs_from_the_prompt_end():
    kv = KVCacheManager(num_blocks=7, block_size=4)
    sched = DecodeScheduler(SchedulerConfig(), kv)
    a, b = _prefilled("a", list(range(1, 17))), _prefilled("b", list(range(1, 17)))
    sched.add_awaiting_kv(a)
    sched.add_awaiting_kv(b)
    assert sched.admit_for_transfer() == [a]  # 16 tokens = 4 blocks each; 3 left for b
    assert a.status is RequestStatus.TRANSFERRING and len(kv.block_ids("a")) == 4
    assert b.status is RequestStatus.AWAITING_KV
    assert sched.schedule().is_empty  # nothing runs before the KV arrived
    sched.transfer_done("a", ok=True)
    assert a.status is RequestStatus.RUNNING and a.num_computed_tokens == 16
    batch, _ = _step(sched)
    assert batch.requests == [a] and batch.num_new_tokens == [1]  # the first token's KV
    assert a.output_token_ids == [9, 7] and len(kv.block_ids("a")) == 5
    # b needs 4 blocks plus one block of headroom for the running a: only 2 are free.
    assert sched.admit_for_transfer() == [] and b.status is RequestStatus.AWAITING_KV
    while not a.is_finished:
        _step(sched)
    assert sched.admit_for_transfer() == [b]


def test_abort_during_transfer_frees_blocks_only_when_the_pull_ends():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = DecodeScheduler(SchedulerConfig(), kv)
    a = _prefilled("a", list(range(1, 9)))
    sched.add_awaiting_kv(a)
    sched.admit_for_transfer()
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 6  # the ranks may still be writing into these blocks
    assert sched.transfer_done("a", ok=False) is a
    assert kv.num_free_blocks == 8 and not sched.has_work()
    kv.check_consistency()


def test_failed_transfer_frees_blocks_and_aborts():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = DecodeScheduler(SchedulerConfig(), kv)
    a = _prefilled("a", list(range(1, 9)))
    sched.add_awaiting_kv(a)
    sched.admit_for_transfer()
    req = sched.transfer_done("a", ok=False)
    assert req is a and a.status is RequestStatus.FINISHED_ABORTED and kv.num_free_blocks == 8
