"""Workloads: what each request of a benchmark asks for (lengths, shared prefixes, client).

Owns :class:`WorkloadRequest`, the registry of generators (Mooncake-format traces, ShareGPT-format
JSON, Preble-like synthetic mixes, random, shared-prefix, multi-client fairness mixes) and
:func:`to_token_ids`, which turns a request into concrete prompt token ids for a live endpoint.
It does not own sending requests or measuring them.

A prompt is described by *block ids*, one per ``block_size`` tokens (the last block may be
partial), with Mooncake's meaning: two prompts share the prefix up to the first position where
their ids differ. Ids are chained into hashes (:meth:`WorkloadRequest.chained_hashes`) the way
the engine chains block hashes, so the simulator's prefix index sees the same sharing structure.

    prompt:  | shared system/tool/doc prefix (group ids) | unique suffix (fresh ids) |
             | b17 | b18 | b19 |                          | b9001 | b9002 (partial) |
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distserve.bench.arrivals import gamma_arrivals, rescale_to_rate

_MASK64 = (1 << 64) - 1


def chain_block_id(parent_hash: int, block_id: int) -> int:
    """Chained hash of one block id onto its parent's hash (deterministic across processes)."""
    return hash((parent_hash, block_id)) & _MASK64


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload; times in seconds from the start of the run."""

    request_id: str
    arrival_s: float
    client_id: str
    input_len: int  # prompt tokens
    output_len: int  # tokens to generate (including the first, produced by prefill)
    block_ids: tuple[int, ...]  # one content id per block_size prompt tokens; last may be partial
    block_size: int
    prefix_group: str | None = None  # name of the shared prefix this prompt starts with, if any
    token_ids: tuple[int, ...] | None = None  # real prompt tokens when the source had them

    def __post_init__(self) -> None:
        if self.input_len <= 0 or self.output_len <= 0:
            raise ValueError(f"{self.request_id}: input_len and output_len must be positive")
        expected = -(-self.input_len // self.block_size)
        if len(self.block_ids) != expected:
            raise ValueError(
                f"{self.request_id}: {len(self.block_ids)} block ids for {self.input_len} tokens "
                f"at block_size {self.block_size} (expected {expected})"
            )

    def chained_hashes(self) -> tuple[int, ...]:
        """Hashes of the prompt's *full* blocks, each covering its parent's (like the engine's)."""
        cached = self.__dict__.get("_chained_hashes")
        if cached is not None:
            return cached
        hashes: list[int] = []
        parent = 0
        for block_id in self.block_ids[: self.input_len // self.block_size]:
            parent = chain_block_id(parent, block_id)
            hashes.append(parent)
        self.__dict__["_chained_hashes"] = result = tuple(hashes)  # memo; frozen fields unchanged
        return result


def to_token_ids(req: WorkloadRequest, vocab_size: int, seed: int = 0) -> list[int]:
    """Deterministic prompt token ids in ``[0, vocab_size)``: equal block-id prefixes give equal
    token prefixes (also for a partial last block), different ids give different tokens."""
    if req.token_ids is not None:
        return list(req.token_ids)
    tokens: list[int] = []
    parent = 0
    for i, block_id in enumerate(req.block_ids):
        parent = chain_block_id(parent, block_id)
        block = np.random.default_rng([seed, parent]).integers(0, vocab_size, size=req.block_size)
        tokens.extend(block[: min(req.block_size, req.input_len - i * req.block_size)].tolist())
    return tokens


# ---------------------------------------------------------------- registry

Generator = Callable[..., list[WorkloadRequest]]
WORKLOADS: dict[str, Generator] = {}


def register_workload(name: str) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        WORKLOADS[name] = fn
        return fn

    return deco


def make_workload(name: str, **options: object) -> list[WorkloadRequest]:
    """Build workload ``name`` (see ``WORKLOADS``); unknown names or options raise ValueError."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; available: {sorted(WORKLOADS)}")
    fn = WORKLOADS[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"workload {name!r} has no option(s) {unknown}; options: {sorted(params)}")
    return fn(**options)


class _Ids:
    """Hands out fresh block ids; ids below ``start`` are left for shared prefixes."""

    def __init__(self, start: int) -> None:
        self.next_id = start

    def take(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


def _arrivals(n: int, rate_per_s: float, arrival_cv: float, seed: int) -> list[float]:
    return gamma_arrivals(n, rate_per_s, cv=arrival_cv, seed=seed + 7919)


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


# ---------------------------------------------------------------- traces


@register_workload("mooncake")
def mooncake(
    path: str | Path,
    num_requests: int | None = None,
    rate_per_s: float | None = None,
    block_size: int = 512,
    client_id: str = "c0",
) -> list[WorkloadRequest]:
    """Mooncake-format JSONL (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``
    per 512-token block). Replayed by timestamps, or rescaled to ``rate_per_s``."""
    out: list[WorkloadRequest] = []
    with open(path) as f:
        for line in f:
            if num_requests is not None and len(out) >= num_requests:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            ids = tuple(int(h) for h in row["hash_ids"])
            out.append(
                WorkloadRequest(
                    request_id=f"mc-{len(out)}",
                    arrival_s=float(row["timestamp"]) / 1000.0,
                    client_id=client_id,
                    input_len=int(row["input_length"]),
                    output_len=max(1, int(row["output_length"])),
                    block_ids=ids,
                    block_size=block_size,
                    prefix_group=str(ids[0]) if ids else None,
                )
            )
    return rescale_to_rate(out, rate_per_s) if rate_per_s is not None else out


@register_workload("sharegpt")
def sharegpt(
    path: str | Path,
    num_requests: int | None = None,
    rate_per_s: float = 1.0,
    tokenize: Callable[[str], list[int]] | None = None,
    block_size: int = 16,
    seed: int = 0,
    arrival_cv: float = 1.0,
) -> list[WorkloadRequest]:
    """ShareGPT-format JSON: prompt = first turn, output length = the reply's length.

    Lengths come from ``tokenize`` (then the real token ids are kept) or a chars/4 estimate.
    Conversations with fewer than two turns are skipped; prompts share no prefix.
    """
    data = json.loads(Path(path).read_text())
    ids = _Ids(0)
    rows: list[tuple[int, int, tuple[int, ...] | None]] = []
    for conv in data:
        turns = conv.get("conversations", [])
        if len(turns) < 2:
            continue
        prompt, reply = turns[0]["value"], turns[1]["value"]
        toks = tuple(tokenize(prompt)) if tokenize else None
        in_len = len(toks) if toks is not None else max(1, len(prompt) // 4)
        out_len = len(tokenize(reply)) if tokenize else max(1, len(reply) // 4)
        rows.append((max(1, in_len), max(1, out_len), toks if toks else None))
        if num_requests is not None and len(rows) >= num_requests:
            break
    times = _arrivals(len(rows), rate_per_s, arrival_cv, seed)
    return [
        WorkloadRequest(
            request_id=f"sg-{i}",
            arrival_s=t,
            client_id="c0",
            input_len=n_in,
            output_len=n_out,
            block_ids=tuple(ids.take(-(-n_in // block_size))),
            block_size=block_size,
            token_ids=toks,
        )
        for i, ((n_in, n_out, toks), t) in enumerate(zip(rows, times))
    ]


# ---------------------------------------------------------------- synthetic


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal samples with the given mean (sigma of the underlying normal)."""
    return mean * rng.lognormal(-sigma * sigma / 2, sigma, size=size)


def _grouped(
    tag: str,
    prefix_blocks: Sequence[int],
    group_of: Sequence[int],
    suffix_lens: Sequence[int],
    output_lens: Sequence[int],
    times: Sequence[float],
    block_size: int,
    client_of: Callable[[int, int], str],
) -> list[WorkloadRequest]:
    """Requests whose prompt is group ``group_of[i]``'s shared blocks plus a fresh suffix."""
    starts = np.cumsum([0, *prefix_blocks]).tolist()
    ids = _Ids(int(starts[-1]))
    out = []
    for i, (g, suffix, n_out, t) in enumerate(zip(group_of, suffix_lens, output_lens, times)):
        shared = list(range(int(starts[g]), int(starts[g + 1])))
        n_in = len(shared) * block_size + int(suffix)
        out.append(
            WorkloadRequest(
                request_id=f"{tag}-{i}",
                arrival_s=float(t),
                client_id=client_of(i, int(g)),
                input_len=n_in,
                output_len=max(1, int(n_out)),
                block_ids=(*shared, *ids.take(-(-n_in // block_size) - len(shared))),
                block_size=block_size,
                prefix_group=f"{tag}-g{g}",
            )
        )
    return out


PREBLE_LIKE_SPECS: dict[str, tuple[int, float, float, int]] = {
    # name: (mean prompt tokens [our assumption], prompt:output ratio, shared share of prompt
    #        tokens, default number of distinct prefixes) — ratios and shares from ALGORITHMS.md §3
    "tool_use": (1835, 43.0, 0.85, 100),
    "agent": (2860, 143.0, 0.97, 50),
    "programming": (2000, 20.0, 0.97, 20),
    "video_qa": (9860, 2466.0, 0.88, 40),
    "long_doc_qa": (23500, 1467.0, 0.91, 40),
}


def preble_like(
    kind: str,
    num_requests: int = 1000,
    rate_per_s: float = 1.0,
    num_prefixes: int | None = None,
    zipf_s: float = 1.1,
    num_clients: int = 4,
    block_size: int = 32,
    seed: int = 0,
    arrival_cv: float = 1.0,
) -> list[WorkloadRequest]:
    """Preble-like workload ``kind``: per prefix group a shared prefix of about ``share × mean``
    tokens, a lognormal unique suffix, outputs at the prompt:output ratio, Zipf group popularity;
    group ``g`` belongs to client ``g mod num_clients``."""
    if kind not in PREBLE_LIKE_SPECS:
        raise ValueError(
            f"unknown Preble-like kind {kind!r}; available: {sorted(PREBLE_LIKE_SPECS)}"
        )
    mean_in, ratio, share, default_groups = PREBLE_LIKE_SPECS[kind]
    n_groups = num_prefixes or default_groups
    rng = np.random.default_rng(seed)
    prefix_blocks = np.maximum(
        1, np.round(share * mean_in * rng.uniform(0.8, 1.2, n_groups) / block_size)
    )
    group_of = rng.choice(n_groups, size=num_requests, p=_zipf_weights(n_groups, zipf_s))
    suffix = np.maximum(1, np.round(_lognormal(rng, (1 - share) * mean_in, 0.5, num_requests)))
    outputs = np.maximum(1, np.round(_lognormal(rng, mean_in / ratio, 0.5, num_requests)))
    return _grouped(
        kind,
        prefix_blocks.astype(int).tolist(),
        group_of.tolist(),
        suffix.tolist(),
        outputs.tolist(),
        _arrivals(num_requests, rate_per_s, arrival_cv, seed),
        block_size,
        lambda _i, g: f"c{g % num_clients}",
    )


for _kind in PREBLE_LIKE_SPECS:
    WORKLOADS[_kind] = functools.partial(preble_like, _kind)


@register_workload("random")
def random_lengths(
    num_requests: int = 1000,
    rate_per_s: float = 1.0,
    input_len_range: tuple[int, int] = (128, 2048),
    output_len_range: tuple[int, int] = (16, 256),
    num_clients: int = 1,
    block_size: int = 32,
    seed: int = 0,
    arrival_cv: float = 1.0,
) -> list[WorkloadRequest]:
    """Uniform random lengths, no shared prefixes; clients take turns."""
    rng = np.random.default_rng(seed)
    ins = rng.integers(input_len_range[0], input_len_range[1] + 1, size=num_requests)
    outs = rng.integers(output_len_range[0], output_len_range[1] + 1, size=num_requests)
    return _grouped(
        "rand",
        [0],
        [0] * num_requests,
        ins.tolist(),
        outs.tolist(),
        _arrivals(num_requests, rate_per_s, arrival_cv, seed),
        block_size,
        lambda i, _g: f"c{i % num_clients}",
    )


@register_workload("shared_prefix")
def shared_prefix(
    num_requests: int = 1000,
    rate_per_s: float = 1.0,
    num_groups: int = 8,
    prefix_len: int = 1024,
    suffix_len: int = 128,
    output_len: int = 64,
    zipf_s: float = 0.0,
    num_clients: int = 1,
    block_size: int = 32,
    seed: int = 0,
    arrival_cv: float = 1.0,
) -> list[WorkloadRequest]:
    """``num_groups`` prefixes of ``prefix_len`` tokens (rounded down to blocks) with a fresh
    ``suffix_len`` suffix each; popularity Zipf(``zipf_s``), uniform at 0."""
    rng = np.random.default_rng(seed)
    group_of = rng.choice(num_groups, size=num_requests, p=_zipf_weights(num_groups, zipf_s))
    return _grouped(
        "sp",
        [max(1, prefix_len // block_size)] * num_groups,
        group_of.tolist(),
        [suffix_len] * num_requests,
        [output_len] * num_requests,
        _arrivals(num_requests, rate_per_s, arrival_cv, seed),
        block_size,
        lambda _i, g: f"c{g % num_clients}",
    )


@register_workload("fairness_mix")
def fairness_mix(
    num_requests: int = 1000,
    rate_per_s: float = 10.0,
    num_light_clients: int = 3,
    heavy_input_len: int = 2048,
    light_prefix_len: int = 1536,
    light_suffix_len: int = 64,
    output_len: int = 32,
    heavy_request_share: float | None = None,
    block_size: int = 32,
    seed: int = 0,
    arrival_cv: float = 1.0,
) -> list[WorkloadRequest]:
    """One ``heavy`` client with long uncached prompts against ``light-k`` clients whose short
    suffixes follow a cached per-client prefix. The heavy client sends ``heavy_request_share``
    of the requests (default: an equal share), the light clients split the rest evenly."""
    n_clients = num_light_clients + 1
    heavy = 1.0 / n_clients if heavy_request_share is None else heavy_request_share
    if not 0.0 <= heavy <= 1.0:
        raise ValueError(f"heavy_request_share must be in [0, 1], got {heavy_request_share}")
    rng = np.random.default_rng(seed)
    p = [heavy] + [(1.0 - heavy) / num_light_clients] * num_light_clients
    client_of = rng.choice(n_clients, size=num_requests, p=p)  # 0 = heavy, k = light-k
    prefix_blocks = [0] + [max(1, light_prefix_len // block_size)] * num_light_clients
    suffix = [heavy_input_len if c == 0 else light_suffix_len for c in client_of.tolist()]
    return _grouped(
        "fair",
        prefix_blocks,
        client_of.tolist(),
        suffix,
        [output_len] * num_requests,
        _arrivals(num_requests, rate_per_s, arrival_cv, seed),
        block_size,
        lambda _i, g: "heavy" if g == 0 else f"light-{g}",
    )
