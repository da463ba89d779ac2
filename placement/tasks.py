"""The search's independent rate searches, as picklable tasks run in worker processes.

Owns the four kinds of goodput search the planner runs many of (one prefill instance, one
decode instance, a whole unit, one colocated instance) and ``run_tasks``, which runs a list of
them in ``jobs`` processes (``fork`` where the platform has it: the planner holds no threads or
GPU state, and scripts need no ``__main__`` guard; ``spawn`` elsewhere) or inline when ``jobs``
is 1. Each task returns its result and how many
simulations it ran.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from placement.evaluate import Evaluator, PhaseConfig, Placement
from placement.goodput import GoodputResult


@dataclass(frozen=True)
class Task:
    """One rate search. ``kind``: prefill | decode | unit | colocated."""

    kind: str
    label: str
    cfg: PhaseConfig | None = None
    placement: Placement | None = None
    bytes_per_s: float = 0.0  # decode: the KV link
    hint_rate: float = 1.0
    criterion: str = "joint"  # unit / colocated: joint or separate attainment
    token_budget: int = 0  # colocated: chunked-prefill budget


@dataclass(frozen=True)
class TaskResult:
    task: Task
    goodput: GoodputResult
    num_simulations: int


def run_task(ev: Evaluator, task: Task) -> TaskResult:
    ev = replace(ev, num_simulations=0)
    cfg = task.cfg
    if task.kind == "prefill":
        assert cfg is not None
        pcfg: PhaseConfig = cfg
        result = ev.goodput(lambda r: ev.prefill_attainment(pcfg, r), task.hint_rate, rel_tol=0.05)
    elif task.kind == "decode":
        assert cfg is not None
        dcfg: PhaseConfig = cfg
        result = ev.goodput(
            lambda r: ev.decode_attainment(dcfg, r, task.bytes_per_s), task.hint_rate, rel_tol=0.05
        )
    elif task.kind in ("unit", "colocated"):
        p = task.placement
        assert p is not None
        if task.kind == "colocated":
            ev = replace(
                ev, settings=replace(ev.settings, colocated_token_budget=task.token_budget)
            )
        result = ev.goodput(
            lambda r: ev.attainment(p, r).value(task.criterion), task.hint_rate, rel_tol=0.04
        )
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    return TaskResult(task, result, ev.num_simulations)


def _run_one(args: tuple[Evaluator, Task]) -> TaskResult:
    return run_task(*args)


def run_tasks(
    ev: Evaluator,
    tasks: Sequence[Task],
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[TaskResult]:
    """Run every task (in order of results = order of tasks); adds their simulations to ``ev``."""
    note = progress or (lambda _msg: None)
    results: list[TaskResult] = []
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            note(t.label)
            results.append(run_task(ev, t))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx: Any = mp.get_context(method)
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
            for r in pool.map(_run_one, [(ev, t) for t in tasks]):
                note(r.task.label)
                results.append(r)
    ev.num_simulations += sum(r.num_simulations for r in results)
    return results
