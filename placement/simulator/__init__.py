"""Cluster simulator: discrete events, the live router's policy objects, DistServe latency model.

    from placement.simulator import ClusterSpec, InstanceSpec, simulate
    cluster = ClusterSpec.disaggregated(num_prefill=2, num_decode=1)
    result = simulate(cluster, requests, "preble")       # requests: list[WorkloadRequest]
    result.slo_attainment(ttft_slo_s=0.25, tpot_slo_s=0.1); result.summary()

Modules: ``spec`` (what the cluster is), ``kv_pool`` (blocks + prefix cache), ``instance`` (what
a step runs), ``core`` (event loop and router glue), ``result`` (records and metrics).
"""

from __future__ import annotations

from placement.simulator.core import route_request, simulate
from placement.simulator.request import RequestRecord
from placement.simulator.result import Fairness, SimResult
from placement.simulator.spec import ClusterSpec, InstanceSpec

__all__ = [
    "ClusterSpec",
    "Fairness",
    "InstanceSpec",
    "RequestRecord",
    "SimResult",
    "route_request",
    "simulate",
]
