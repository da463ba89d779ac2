"""The profiler's measurement loop and fit (on a fake engine with known step times), and the
profile formats: ours round-trips, DistServe's is recognised, unknown files are clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from placement.latency_model import DEFAULT_PROFILE_PATH, LatencyModel
from placement.profile_format import (
    ConfigProfile,
    HardwareProfile,
    ModelProfile,
    load_profile,
    save_profile,
)
from placement.profiler import EngineBench, ProfileOptions, fit_config, measure

TRUE = LatencyModel(
    prefill=(12.0, 0.05, 2e-5), decode_small=(8.0, 4e-4, 0.06), decode_large=(5.0, 3e-4, 0.11)
)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class FakeEngine:
    """Like the colocated scheduler: a step decodes every running request and admits whole
    waiting prompts while the token budget lasts; the clock advances by ``TRUE``'s time."""

    def __init__(self, clock: FakeClock, budget: int = 1 << 30) -> None:
        self.clock = clock
        self.budget = budget
        self.model_config = SimpleNamespace(vocab_size=1000)
        self.waiting: dict[str, tuple[int, int]] = {}
        self.running: dict[str, list[int]] = {}  # id -> [prompt_len, generated, max_tokens]

    def add_request(self, rid: str, ids: list[int], params: Any) -> None:
        self.waiting[rid] = (len(ids), params.max_tokens)

    def step(self) -> list[SimpleNamespace]:
        stepped = list(self.running)
        if stepped:  # Σ(context + 1) = Σ(prompt + generated): the last sampled token joins
            total = sum(n + g for n, g, _ in self.running.values())
            self.clock.now_s += TRUE.decode_ms(len(stepped), total) / 1e3
        left, admitted = self.budget - len(stepped), []
        for rid, (n, max_tokens) in list(self.waiting.items()):
            if n > left:
                break
            left -= n
            admitted.append(n)
            self.running[rid] = [n, 0, max_tokens]
            del self.waiting[rid]
            stepped.append(rid)
        if admitted:
            self.clock.now_s += TRUE.prefill_ms(admitted) / 1e3
        outs = []
        for rid in stepped:
            state = self.running[rid]
            state[1] += 1
            outs.append(SimpleNamespace(request_id=rid))
            if state[1] >= state[2]:
                del self.running[rid]
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> None:
        self.running.pop(rid, None)


def test_the_fit_recovers_known_coefficients_from_the_measurement_loop() -> None:
    opts = ProfileOptions("unused", "fake", repeats=1, max_prompt_len=1024)
    clock = FakeClock()
    samples = measure(EngineBench(FakeEngine(clock), clock=clock), opts, 8192, 10**7, 2048)
    prefill, decode = samples
    assert any(b > 95 for b, _, _ in decode) and any(b <= 95 for b, _, _ in decode)
    cfg = fit_config(1, samples, capacity=10**7)
    assert cfg.prefill == pytest.approx(TRUE.prefill, rel=1e-6)
    assert cfg.decode_small == pytest.approx(TRUE.decode_small, rel=1e-6)
    assert cfg.decode_large == pytest.approx(TRUE.decode_large, rel=1e-6)
    assert cfg.fit["prefill"]["max_rel_error"] < 1e-9
    assert cfg.kv_capacity_tokens == 10**7 and len(cfg.samples["prefill"]) == len(prefill)


def test_decode_samples_account_for_prompts_prefilled_in_separate_steps() -> None:
    """Budget 600 admits two 256-token prompts a step: the first pair has decoded three tokens
    more than the last when timing starts, and Σ(context + 1) says so."""
    clock = FakeClock()
    bench = EngineBench(FakeEngine(clock, budget=600), clock=clock)
    samples = bench.decode_ms(batch=8, prompt_len=256, steps=3, budget=600)
    head_start = 2 * (4 + 3 + 2 + 1)
    assert [s[1] for s in samples] == [8 * 256 + head_start + 8 * k for k in range(3)]
    expected = [TRUE.decode_ms(8, s[1]) for s in samples]
    assert [s[2] for s in samples] == pytest.approx(expected, rel=1e-9)


def test_profile_options_reject_more_ranks_than_cores_and_missing_models(tmp_path: Path) -> None:
    from placement.profiler import _validate

    (tmp_path / "config.json").write_text("{}")
    _validate(ProfileOptions(str(tmp_path), "x", pps=(2,), device="cpu"), [0, 1])
    with pytest.raises(ValueError, match="--tp 2 x --pp 2 needs 4 cores"):
        _validate(ProfileOptions(str(tmp_path), "x", tps=(1, 2), pps=(1, 2), device="cpu"), [0, 1])
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        _validate(ProfileOptions(str(tmp_path / "nope"), "x"), [0, 1])


def _ours() -> HardwareProfile:
    cfg = ConfigProfile(
        1, 1, TRUE.prefill, TRUE.decode_small, TRUE.decode_large, 5000, fit={"prefill": None}
    )
    model = ModelProfile("tiny", 512, {(1, 1): cfg}, path="/m", max_model_len=2048)
    return HardwareProfile({"tiny": model}, 1e9, 5e8, device="cpu", device_name="cpu (2 cores)")


def test_our_format_round_trips(tmp_path: Path) -> None:
    save_profile(_ours(), tmp_path / "p.json")
    again = load_profile(tmp_path / "p.json")
    m = again.model("tiny")
    assert m.configs == _ours().models["tiny"].configs
    assert (again.intra_node_bytes_per_s, again.inter_node_bytes_per_s) == (1e9, 5e8)
    assert m.kv_capacity(1, 1) == 5000 and m.kv_capacity(1, 2) == 10000  # scaled per device
    assert m.kv_capacity(2, 1) is None and m.latency(1, 2).pp == 2
    assert m.latency(1, 2).micro_batched  # a hand-made entry keeps the default


def test_micro_batching_flag_round_trips(tmp_path: Path) -> None:
    from dataclasses import replace

    profile = _ours()
    model = profile.models["tiny"]
    model.configs[1, 1] = replace(model.configs[1, 1], micro_batched=False)
    save_profile(profile, tmp_path / "p.json")
    assert not load_profile(tmp_path / "p.json").model("tiny").latency(1, 2).micro_batched


def test_our_engine_takes_pulls_between_steps_and_distserves_does_not(tmp_path: Path) -> None:
    from dataclasses import replace

    from placement.evaluate import SLO, Evaluator, PhaseConfig, Placement
    from placement.workload import from_lengths

    profile = _ours()
    save_profile(profile, tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    del raw["models"]["tiny"]["pulls_between_steps"]  # written before the flag existed
    (tmp_path / "old.json").write_text(json.dumps(raw))
    ours = load_profile(tmp_path / "old.json").model("tiny")
    assert ours.pulls_between_steps  # every profile in our format comes from our engine
    assert not replace(ours, pulls_between_steps=False).pulls_between_steps

    import numpy as np

    workload = from_lengths("w", np.array([64, 64]), np.array([4, 4]), seed=0)
    placement = Placement(PhaseConfig(1, 1), 1, PhaseConfig(1, 1), 1)
    cluster = Evaluator(ours, workload, SLO(1.0, 1.0)).cluster(placement)
    assert cluster.pulls_between_steps and cluster.pull_rtt_s > 0
    theirs = replace(ours, pulls_between_steps=False)
    cluster = Evaluator(theirs, workload, SLO(1.0, 1.0)).cluster(placement)
    assert not cluster.pulls_between_steps and cluster.pull_rtt_s == 0


def test_distserve_format_is_recognised(tmp_path: Path) -> None:
    entry = {
        "prefill": list(TRUE.prefill),
        "decoding_smallbs": list(TRUE.decode_small),
        "decoding_largebs": list(TRUE.decode_large),
        "decoding_large_small_bs_threshold": 95,
    }
    (tmp_path / "ds.json").write_text(json.dumps({"facebook/opt-13b": {"1": entry}}))
    (tmp_path / "distserve_a100_max_num_tokens.csv").write_text(
        "model,tp,pp,max_num_tokens\nfacebook/opt-13b,1,1,66144\nfacebook/opt-13b,1,2,163008\n"
    )
    p = load_profile(tmp_path / "ds.json")
    m = p.model("facebook/opt-13b")
    assert p.source_format == "distserve" and m.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert m.kv_capacity(1, 2) == 163008 and m.kv_capacity(1, 4) is None
    assert m.latency(1).prefill == TRUE.prefill
    assert not m.pulls_between_steps
    with pytest.raises(ValueError, match="model 'opt-7b' is not in the profile"):
        p.model("opt-7b")


@pytest.mark.skipif(not DEFAULT_PROFILE_PATH.exists(), reason="needs ../shared/data")
def test_the_shared_distserve_a100_profile_loads() -> None:
    p = load_profile(DEFAULT_PROFILE_PATH)
    assert sorted(p.models) == ["facebook/opt-13b", "facebook/opt-66b"]
    assert p.model("facebook/opt-66b").kv_capacity(2, 1) == 11600


def test_unknown_profile_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="neither our format"):
        load_profile(tmp_path / "x.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
