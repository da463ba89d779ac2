"""``DISTSERVE_TIMELINE``: per-request events written by a real engine, in a fresh process
(the variable is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from distserve import timeline

SCRIPT = textwrap.dedent(
    """
    import sys
    from distserve import LLM, SamplingParams
    llm = LLM(sys.argv[1], device="cpu", kv_cache_memory_gib=0.01)
    llm.generate([[1, 2, 3, 4, 5], [6, 7, 8]], SamplingParams(max_tokens=3, ignore_eos=True))
    """
)


def run(tiny_llama: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama)], check=True, env={**os.environ, **env},
        timeout=120,
    )  # fmt: skip


def test_engine_writes_each_requests_events_in_order(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "timeline"
    run(tiny_llama, {"DISTSERVE_TIMELINE": str(folder)})
    files = list(folder.glob("*.tsv"))
    assert len(files) == 1  # one file per process
    events: dict[str, dict[str, float]] = {}
    steps = []
    for line in files[0].read_text().splitlines():
        t, rid, event = line.split("\t")
        if rid == "-":
            steps.append(event)
        else:
            events.setdefault(rid, {}).setdefault(event, float(t))
    assert len(events) == 2
    for rid, ev in events.items():
        assert list(ev) == ["engine.admitted", "engine.scheduled", "engine.first_token"], rid
        assert ev["engine.admitted"] <= ev["engine.scheduled"] < ev["engine.first_token"]
    # the first step prefills both prompts; the next two decode one token each
    assert steps[0].split(" ", 2)[2] == "[5, 3] [0, 0]"
    assert [s.split(" ", 2)[2] for s in steps[1:]] == ["[1, 1] [5, 3]", "[1, 1] [6, 4]"]
    # and distserve.timeline.read gives the same back
    [proc] = timeline.read(folder).values()
    assert [(s.new_tokens, s.computed) for s in proc.steps] == [
        ([5, 3], [0, 0]), ([1, 1], [5, 3]), ([1, 1], [6, 4])
    ]  # fmt: skip
    assert all(s.start_s < s.end_s for s in proc.steps)
    assert {(rid, ev) for _, rid, ev in proc.events} == {
        (rid, ev) for rid, evs in events.items() for ev in evs
    }


def test_nothing_is_written_when_unset(tiny_llama: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISTSERVE_TIMELINE"}
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama)], check=True, env=env, cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert not list(tmp_path.rglob("*.tsv"))
