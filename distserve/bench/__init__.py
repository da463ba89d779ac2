"""Benchmark inputs: workloads (what each request asks for) and arrival processes (when it is sent).

``workloads`` holds :class:`~distserve.bench.workloads.WorkloadRequest` and the generator registry
(Mooncake-format traces, ShareGPT-format JSON, Preble-like synthetic mixes, random, shared-prefix,
multi-client fairness mixes); ``arrivals`` the seeded Poisson/Gamma processes. Both are pure Python
and feed the cluster simulator (``placement.simulator``) and the ``distserve bench`` load generator.
"""
