"""Offline engine throughput and batch-1 decode vs Hugging Face, same prompts, same run (CPU, fp32).

On the ~76M-parameter ``small-100m`` preset (a random Llama written by ``make_tiny_model``):

1. **Throughput.** The same prompts (mixed lengths) each generate the same number of new tokens,
   greedy, three ways, one repetition of each in turn, several repetitions:

   - ``engine``: ``LLM.generate`` with every prompt at once (continuous batching, chunked prefill);
   - ``hf_batched``: ``AutoModelForCausalLM.generate`` on all prompts, left-padded, one batch;
   - ``hf_serial``: ``AutoModelForCausalLM.generate`` one prompt at a time.

   HF runs with ``min_new_tokens = max_new_tokens`` and no EOS id, the engine with
   ``ignore_eos=True`` (HF's ``min_new_tokens`` alone would mask EOS logits, a different argmax
   than ignoring EOS). Output tokens/s = prompts × new tokens / wall time, prefill included; the
   greedy outputs are compared sequence by sequence (left-padded HF may differ numerically).

2. **Batch-1 decode vs the memory floor.** The engine's whole decode step (schedule, inputs,
   model, sample, update) and its model call alone, at batch 1, against the floor = bytes of the
   weights a decode step reads / memory bandwidth, the bandwidth measured here, between the
   decode measurements: the best of a sum, a copy and a matrix-vector product over buffers far
   larger than the caches (the fastest of the three gives the lowest, i.e. strictest, floor).
   HF's own model forward at batch 1 (with its KV cache) is timed the same way for reference.

The machine is shared, so everything is repeated, the three systems take turns, and medians are
reported, with the load average (``os.getloadavg``) recorded around each phase. Besides wall
time, each run's process CPU time (all threads) is recorded: other processes stretch the wall
time of a multi-threaded run far more than the work it does. Prints a table and writes JSON.

    python benchmarks/engine_offline.py [--quick] [--threads 2] [--out results/engine_offline.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distserve import LLM, SamplingParams
from distserve.engine.executor import Executor
from distserve.engine.worker import RankCommand

BANDWIDTH_BUFFER_BYTES = 512 * 2**20  # far past the last-level cache
FULL = {"num_prompts": 32, "min_len": 32, "max_len": 512, "new_tokens": 128, "reps": 3}
QUICK = {"num_prompts": 8, "min_len": 32, "max_len": 256, "new_tokens": 32, "reps": 3}


class _TimedExecutor(Executor):
    """Wraps the engine's executor to time its model calls (the rest of a step is overhead)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.worker = inner.worker
        self.run_s: list[float] = []

    def run(self, cmd: RankCommand) -> tuple[torch.Tensor | None, list[list]]:
        start_s = time.perf_counter()
        out = self.inner.run(cmd)
        self.run_s.append(time.perf_counter() - start_s)
        return out

    def shutdown(self) -> None:
        self.inner.shutdown()


def _load() -> float:
    return os.getloadavg()[0]


def _make_prompts(num: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    """``num`` prompts, lengths spread evenly over [min_len, max_len], shuffled; no special ids."""
    rng = random.Random(seed)
    step = (max_len - min_len) / max(1, num - 1)
    lengths = [round(min_len + i * step) for i in range(num)]
    rng.shuffle(lengths)
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lengths]


# ---- throughput ------------------------------------------------------------------------------
def _run_engine(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


def _hf_generation_config(hf: Any, new_tokens: int) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=hf.generation_config.pad_token_id,
    )


@torch.inference_mode()
def _run_hf_serial(hf: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    config = _hf_generation_config(hf, new_tokens)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@torch.inference_mode()
def _run_hf_batched(hf: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    config = _hf_generation_config(hf, new_tokens)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, prompt in enumerate(prompts):  # left padding
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    out = hf.generate(ids, attention_mask=mask, generation_config=config)
    return out[:, width:].tolist()


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Share of identical sequences, and where the others first differ."""
    firsts = [
        next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
        for sa, sb in zip(a, b)
        if sa != sb
    ]
    return {
        "identical_fraction": 1 - len(firsts) / len(a),
        "num_different": len(firsts),
        "first_difference_at": firsts,
    }


def _throughput(
    llm: LLM, hf: Any, prompts: list[list[int]], new_tokens: int, reps: int
) -> dict[str, Any]:
    runners: dict[str, Callable[[], list[list[int]]]] = {
        "engine": lambda: _run_engine(llm, prompts, new_tokens),
        "hf_batched": lambda: _run_hf_batched(hf, prompts, new_tokens),
        "hf_serial": lambda: _run_hf_serial(hf, prompts, new_tokens),
    }
    warm = [p[:16] for p in prompts[:2]]
    _run_engine(llm, warm, 4)
    _run_hf_batched(hf, warm, 4)
    _run_hf_serial(hf, warm[:1], 4)
    timed: _TimedExecutor = llm.engine.executor  # type: ignore[assignment]
    elapsed: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}  # process CPU s, all threads
    loads: list[float] = []
    engine_model_s: list[float] = []
    engine_steps: list[int] = []
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(reps):
        for name, run in runners.items():
            loads.append(_load())
            timed.run_s.clear()
            start_s, start_cpu_s = time.perf_counter(), time.process_time()
            outputs[name] = run()
            elapsed[name].append(time.perf_counter() - start_s)
            cpu[name].append(time.process_time() - start_cpu_s)
            if name == "engine":
                engine_model_s.append(sum(timed.run_s))
                engine_steps.append(len(timed.run_s))
            print(
                f"  rep {rep + 1}/{reps} {name:>10}: {elapsed[name][-1]:7.2f} s, "
                f"{cpu[name][-1]:7.2f} CPU s, load {loads[-1]:.1f}",
                flush=True,
            )
        loads.append(_load())
    num_out = len(prompts) * new_tokens
    for name, outs in outputs.items():
        assert all(len(o) == new_tokens for o in outs), f"{name} did not force the length"
    per_rep_ratios = {
        f"engine_over_{name}": [h / e for h, e in zip(elapsed[name], elapsed["engine"])]
        for name in ("hf_serial", "hf_batched")
    }
    median_s = {name: statistics.median(ts) for name, ts in elapsed.items()}
    median_cpu_s = {name: statistics.median(ts) for name, ts in cpu.items()}
    return {
        "num_output_tokens": num_out,
        "num_prompt_tokens": sum(len(p) for p in prompts),
        "elapsed_s": elapsed,
        "median_s": median_s,
        "tokens_per_s": {name: num_out / s for name, s in median_s.items()},
        "speedup": {
            "engine_over_hf_serial": median_s["hf_serial"] / median_s["engine"],
            "engine_over_hf_batched": median_s["hf_batched"] / median_s["engine"],
        },
        "cpu_s": cpu,
        "median_cpu_s": median_cpu_s,
        "speedup_cpu": {
            "engine_over_hf_serial": median_cpu_s["hf_serial"] / median_cpu_s["engine"],
            "engine_over_hf_batched": median_cpu_s["hf_batched"] / median_cpu_s["engine"],
        },
        "speedup_median_of_per_rep_ratios": {
            key: statistics.median(v) for key, v in per_rep_ratios.items()
        },
        "per_rep_ratios": per_rep_ratios,
        "engine_steps": engine_steps,
        "engine_model_s": engine_model_s,  # executor.run time; the rest is per-step overhead
        "engine_overhead_s": [e - m for e, m in zip(elapsed["engine"], engine_model_s)],
        "agreement": {
            "engine_vs_hf_serial": _agreement(outputs["engine"], outputs["hf_serial"]),
            "engine_vs_hf_batched": _agreement(outputs["engine"], outputs["hf_batched"]),
            "hf_serial_vs_hf_batched": _agreement(outputs["hf_serial"], outputs["hf_batched"]),
        },
        "loadavg_1min": loads,
    }


# ---- batch-1 decode vs the floor ---------------------------------------------------------------
def _best_s(fn: Callable[[], object], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        start_s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start_s)
    return min(times)


def _bandwidths(n: int) -> dict[str, float]:
    """Bytes/s, best of ``n``, of three memory-bound kernels over buffers far larger than L3."""
    numel = BANDWIDTH_BUFFER_BYTES // 4
    src = torch.ones(numel)
    dst = torch.empty(numel)
    matrix = src.view(-1, 4096)
    vector = torch.ones(1, 4096)
    nbytes = numel * 4
    return {
        "sum": nbytes / _best_s(src.sum, n),
        "copy": 2 * nbytes / _best_s(lambda: dst.copy_(src), n),  # read + write
        "matvec": nbytes / _best_s(lambda: F.linear(vector, matrix), n),
    }


def _decode_read_bytes(llm: LLM) -> int:
    """Weight bytes one decode step reads: every parameter but the (gathered) embedding table."""
    model = llm.engine.executor.worker.model
    embed = model.embed_tokens.weight
    params = {id(p): p for p in model.parameters()}
    if model.lm_head.weight is not embed:
        params.pop(id(embed))
    return sum(p.numel() * p.element_size() for p in params.values())


def _engine_decode_steps(
    llm: LLM, prompt: list[int], num_steps: int
) -> tuple[list[float], list[float], list[float]]:
    """(whole step, model call, step CPU) seconds of ``num_steps`` decode steps of one request."""
    engine = llm.engine
    timed: _TimedExecutor = engine.executor  # type: ignore[assignment]
    params = SamplingParams(max_tokens=num_steps + 1, temperature=0.0, ignore_eos=True)
    engine.add_request(f"decode-{time.monotonic_ns()}", prompt, params)
    engine.step()  # the prompt, in one chunk
    timed.run_s.clear()
    step_s, cpu_s = [], []
    while engine.has_unfinished_requests():
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        engine.step()
        step_s.append(time.perf_counter() - start_s)
        cpu_s.append(time.process_time() - start_cpu_s)
    assert len(step_s) == num_steps
    return step_s, list(timed.run_s), cpu_s


@torch.inference_mode()
def _hf_decode_steps(hf: Any, prompt: list[int], num_steps: int) -> list[float]:
    """Seconds of ``num_steps`` HF forwards of one new token with its KV cache (no generate)."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    step_s = []
    for _ in range(num_steps):
        start_s = time.perf_counter()
        out = hf(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        step_s.append(time.perf_counter() - start_s)
    return step_s


def _decode_floor(
    llm: LLM, hf: Any, prompt: list[int], num_steps: int, reps: int
) -> dict[str, Any]:
    bandwidth: dict[str, list[float]] = {"sum": [], "copy": [], "matvec": []}
    step_s: list[float] = []
    model_s: list[float] = []
    cpu_s: list[float] = []
    hf_step_s: list[float] = []
    loads = []
    _engine_decode_steps(llm, prompt, 4)  # warm-up
    for _ in range(reps):
        loads.append(_load())
        for name, value in _bandwidths(5).items():
            bandwidth[name].append(value)
        steps, models, cpus = _engine_decode_steps(llm, prompt, num_steps)
        step_s += steps
        model_s += models
        cpu_s += cpus
        hf_step_s += _hf_decode_steps(hf, prompt, num_steps)
    loads.append(_load())
    best_bandwidth = {name: max(values) for name, values in bandwidth.items()}
    read_bytes = _decode_read_bytes(llm)
    floor_s = read_bytes / max(best_bandwidth.values())
    step_median_s = statistics.median(step_s)
    return {
        "prompt_len": len(prompt),
        "num_steps_per_rep": num_steps,
        "weight_bytes_read_per_step": read_bytes,
        "bandwidth_bytes_per_s_best": best_bandwidth,
        "bandwidth_bytes_per_s_all": bandwidth,
        "floor_s": floor_s,
        "engine_step_median_s": step_median_s,
        "engine_step_min_s": min(step_s),
        "engine_model_median_s": statistics.median(model_s),
        "engine_overhead_median_s": statistics.median(s - m for s, m in zip(step_s, model_s)),
        "engine_step_cpu_median_s": statistics.median(cpu_s),  # all threads' CPU time
        "engine_step_over_floor": step_median_s / floor_s,
        "engine_step_min_over_floor": min(step_s) / floor_s,
        "hf_forward_median_s": statistics.median(hf_step_s),
        "hf_forward_min_s": min(hf_step_s),
        "hf_forward_over_floor": statistics.median(hf_step_s) / floor_s,
        "loadavg_1min": loads,
    }


# ---- report ----------------------------------------------------------------------------------
def _print_report(result: dict[str, Any]) -> None:
    tp, dec, cfg = result["throughput"], result["decode_batch1"], result["config"]
    machine = result["machine"]
    loads = machine["loadavg_1min_all"]
    print(
        f"\nengine_offline: small-100m, float32, CPU, {cfg['threads']} threads, "
        f"{machine['cpus']} CPUs on {machine['node']}, load {min(loads):.1f}-{max(loads):.1f} "
        f"(median {machine['loadavg_1min_median']:.1f}), {result['date']}"
    )
    print(
        f"throughput: {cfg['num_prompts']} prompts of {cfg['min_len']}-{cfg['max_len']} tokens, "
        f"{cfg['new_tokens']} new tokens each, greedy, median of {cfg['reps']} reps "
        f"(wall clock, and CPU seconds of the process)"
    )
    print(
        f"{'system':<12} {'wall s':>8} {'out tok/s':>10} {'engine x':>9} {'CPU s':>8} "
        f"{'engine x':>9} {'same as engine':>15}"
    )
    agree = tp["agreement"]
    same = {
        "engine": "-",
        "hf_batched": f"{agree['engine_vs_hf_batched']['identical_fraction']:.0%}",
        "hf_serial": f"{agree['engine_vs_hf_serial']['identical_fraction']:.0%}",
    }
    wall, cpu = tp["median_s"], tp["median_cpu_s"]
    for name in ("engine", "hf_batched", "hf_serial"):
        print(
            f"{name:<12} {wall[name]:8.2f} {tp['tokens_per_s'][name]:10.1f} "
            f"{wall[name] / wall['engine']:9.2f} {cpu[name]:8.2f} {cpu[name] / cpu['engine']:9.2f} "
            f"{same[name]:>15}"
        )
    per_rep, ratios = tp["per_rep_ratios"], tp["speedup_median_of_per_rep_ratios"]
    print(
        f"engine x per rep (wall): vs hf_batched {_fmt(per_rep['engine_over_hf_batched'])}, "
        f"vs hf_serial {_fmt(per_rep['engine_over_hf_serial'])} "
        f"(medians {ratios['engine_over_hf_batched']:.2f}, {ratios['engine_over_hf_serial']:.2f})"
    )
    overhead = statistics.median(tp["engine_overhead_s"])
    print(
        f"engine: {statistics.median(tp['engine_steps']):.0f} steps, {overhead:.2f} s outside the "
        f"model call (schedule, inputs, sample, update, detokenize)"
    )
    bw = dec["bandwidth_bytes_per_s_best"]
    print(
        f"\nbatch-1 decode after a {dec['prompt_len']}-token prompt: "
        f"{dec['weight_bytes_read_per_step'] / 1e6:.0f} MB of weights per step; bandwidth "
        f"sum {bw['sum'] / 1e9:.1f}, copy {bw['copy'] / 1e9:.1f}, "
        f"matvec {bw['matvec'] / 1e9:.1f} GB/s (best of each; floor uses the fastest)"
    )
    print(f"{'':<26} {'ms':>8} {'x floor':>8}")
    floor = dec["floor_s"]
    for label, key in (
        ("floor", "floor_s"),
        ("engine step (median)", "engine_step_median_s"),
        ("engine step (best)", "engine_step_min_s"),
        ("engine model call (median)", "engine_model_median_s"),
        ("engine step overhead", "engine_overhead_median_s"),
        ("HF forward (median)", "hf_forward_median_s"),
        ("HF forward (best)", "hf_forward_min_s"),
    ):
        print(f"{label:<26} {dec[key] * 1e3:8.2f} {dec[key] / floor:8.2f}")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/engine_offline.json", help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="8 short prompts, 32 new tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--model", default=None, help="checkpoint (default: make small-100m)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    args = parser.parse_args(argv)
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    cfg["reps"] = args.reps or cfg["reps"]
    cfg["threads"] = args.threads
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from distserve.model.tiny_model import make_tiny_model

    load_start = _load()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or str(
            make_tiny_model(Path(tmp) / "small-100m", preset="small-100m")
        )
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        # Without this, min_new_tokens masks the EOS logits, and HF's greedy token differs from
        # the engine's (ignore_eos) wherever EOS is the argmax.
        hf.generation_config.eos_token_id = None
        vocab = hf.config.vocab_size
        prompts = _make_prompts(
            cfg["num_prompts"], cfg["min_len"], cfg["max_len"], vocab, args.seed
        )
        block_size = 16
        num_blocks = sum(-(-(len(p) + cfg["new_tokens"]) // block_size) for p in prompts) + 64
        llm = LLM(
            model_path,
            dtype="float32",
            device="cpu",
            num_threads=args.threads,
            block_size=block_size,
            num_kv_blocks=num_blocks,
            enable_prefix_caching=False,  # every rep recomputes its prompts
        )
        llm.engine.executor = _TimedExecutor(llm.engine.executor)
        print(f"throughput ({cfg['reps']} reps):", flush=True)
        throughput = _throughput(llm, hf, prompts, cfg["new_tokens"], cfg["reps"])
        print("batch-1 decode:", flush=True)
        decode_prompt = _make_prompts(1, 256, 256, vocab, args.seed + 1)[0]
        decode = _decode_floor(llm, hf, decode_prompt, cfg["new_tokens"] // 2, 2 * cfg["reps"])
        llm.shutdown()
    loads = [load_start, *throughput["loadavg_1min"], *decode["loadavg_1min"]]
    import transformers

    result = {
        "benchmark": "engine_offline",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1min_all": loads,
            "loadavg_1min_median": statistics.median(loads),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": {**cfg, "prompt_lens": [len(p) for p in prompts], "dtype": "float32"},
        "throughput": throughput,
        "decode_batch1": decode,
    }
    _print_report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
