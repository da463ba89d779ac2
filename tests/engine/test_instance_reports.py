"""What an instance reports to the router about its prefix cache, and when.

Only heartbeats carry prefix-cache events; a GetStats call (monitoring, benchmarks) must not take
them, and a heartbeat that fails must not lose them.
"""

from __future__ import annotations

from distserve import SamplingParams
from distserve.config import CacheConfig, EngineConfig
from distserve.engine.llm_engine import LLMEngine
from distserve.instance.server import InstanceOptions, InstanceRuntime


def _runtime(model) -> InstanceRuntime:
    config = EngineConfig(model=str(model), cache=CacheConfig(block_size=4, num_blocks=64))
    engine = LLMEngine(config)
    return InstanceRuntime(engine, InstanceOptions("c0", "colocated", (0,), router_address=None))


def _serve_one(rt: InstanceRuntime, prompt: list[int]) -> None:
    rt.engine.add_request("r", prompt, SamplingParams(max_tokens=1))
    while rt.engine.has_unfinished_requests():
        rt.engine.step()


def test_get_stats_leaves_events_for_the_heartbeat(tiny_llama):
    rt = _runtime(tiny_llama)
    _serve_one(rt, list(range(1, 17)))  # 16 tokens: 4 full blocks cached
    polled = rt._stats()
    assert list(polled.stored_block_hashes) == []
    report = rt._report_stats()
    assert len(report.stored_block_hashes) == 4
    assert report.report_seq == 1


def test_a_failed_heartbeat_loses_no_events(tiny_llama):
    rt = _runtime(tiny_llama)
    _serve_one(rt, list(range(1, 9)))
    first = rt._report_stats()  # pretend this Report never reached the router
    _serve_one(rt, list(range(100, 108)))
    second = rt._report_stats()
    assert set(first.stored_block_hashes) < set(second.stored_block_hashes)
    assert len(second.stored_block_hashes) == 4
