"""Placement planner: profiler, latency model, cluster simulator, placement search."""
