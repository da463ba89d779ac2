"""Per-request timelines: where a request's latency goes between processes.

Set ``DISTSERVE_TIMELINE=DIR`` and every distserve process that reaches :func:`mark` (the SDK
client, the router, each instance's servicer and engine thread) appends one line per event to
``DIR/<pid>.tsv``: the time (``time.monotonic()``), the request id and the event's name. On
Linux that clock is ``CLOCK_MONOTONIC``, one clock for every process of the machine, so the
files merge into one timeline per request (:func:`read` reads a folder back;
``benchmarks/request_timeline.py`` prints how long each hop took). Unset (the default), :func:`mark` costs one check.

Events, in a disaggregated request's order (a colocated one skips the ``prefill`` hops):

    client.send         the SDK hands the request to its stream        (client)
    router.recv         the router's core starts the request            (router)
    router.prefill_sent the prefill entry is queued on the Session     (router)
    instance.recv       the instance's Session pump starts the entry    (instance)
    engine.admitted     the engine thread adds the request              (instance)
    engine.scheduled    the first step that computes its prompt starts  (instance)
    engine.first_token  that step sampled its first token               (instance)
    instance.answered   the answer is queued on the Session             (instance)
    router.prefill_done the router has the prefill's answer            (router)
    router.first_out    the router yields the first chunk to its client (router)
    client.first        the first chunk reached the client              (client)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from distserve.envs import timeline_dir

_DIR = timeline_dir()
_lock = threading.Lock()
_file = None


def enabled() -> bool:
    return _DIR is not None


def mark(request_id: str, event: str, t: float | None = None) -> None:
    """Record that ``event`` happened to ``request_id`` (now, or at monotonic time ``t``)."""
    if _DIR is None:
        return
    _write(f"{time.monotonic() if t is None else t:.6f}\t{request_id}\t{event}\n")


def step(start_s: float, new_tokens: list[int], computed: list[int]) -> None:
    """Record one model step that began at ``start_s`` and ends now: per request, the tokens
    it computed and those already in its cache (what a latency model's terms are made of)."""
    if _DIR is None:
        return
    end = time.monotonic()
    _write(f"{end:.6f}\t-\tstep {start_s:.6f} {new_tokens} {computed}\n")


def _write(line: str) -> None:
    global _file
    with _lock:
        if _file is None:
            assert _DIR is not None
            os.makedirs(_DIR, exist_ok=True)
            _file = open(os.path.join(_DIR, f"{os.getpid()}.tsv"), "a", buffering=1)  # noqa: SIM115
        _file.write(line)


# ---- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One engine step: when it ran and, per request, tokens computed and already cached."""

    start_s: float
    end_s: float
    new_tokens: list[int]
    computed: list[int]


@dataclass
class ProcessTimeline:
    """What one process wrote: its request events (time, request id, event) and its steps."""

    events: list[tuple[float, str, str]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def read(folder: str | os.PathLike[str]) -> dict[int, ProcessTimeline]:
    """Every process's timeline in ``folder``, by process id."""
    out = {}
    for path in Path(folder).glob("*.tsv"):
        proc = out[int(path.stem)] = ProcessTimeline()
        for line in path.read_text().splitlines():
            t, rid, event = line.split("\t")
            if rid != "-":
                proc.events.append((float(t), rid, event))
                continue
            _, start, lists = event.split(" ", 2)
            new, computed = lists.split("] [")
            proc.steps.append(
                Step(float(start), float(t), json.loads(new + "]"), json.loads("[" + computed))
            )
    return out
