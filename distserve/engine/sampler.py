"""Turns one step's logits into next tokens: greedy, temperature, top-k, top-p, seeds, logprobs.

Rows are processed together where they share a rule (all greedy rows in one ``argmax``; all
random rows through one batched temperature/top-k/top-p transform), and the results come back
to the host in a single copy. Random rows draw with the *exponential race* (argmax of p / E with
E ~ Exp(1)), which is exact sampling from p and lets each seeded request draw its noise from its
own generator, so a seeded request gives the same tokens whatever batch it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distserve.engine.request import Request, TokenLogprobs


def sample(
    logits: torch.Tensor, requests: Sequence[Request]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample one token per row of ``logits`` (float32 [n, vocab]) for ``requests`` (same order)."""
    n = logits.shape[0]
    assert n == len(requests)
    if n == 0:
        return [], []
    params = [r.sampling_params for r in requests]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    tokens = logits.argmax(dim=-1)
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        probs = _probs(logits.index_select(0, rows), [params[i] for i in random_rows])
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            noise[j].exponential_(generator=requests[i].generator)
        tokens[rows] = (probs / noise).argmax(dim=-1)

    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    token_list = tokens.tolist()  # the step's one device->host sync (logprobs aside)
    out_logprobs: list[TokenLogprobs | None] = [None] * n
    if want_logprobs:
        logp = torch.log_softmax(logits[want_logprobs], dim=-1)
        for j, i in enumerate(want_logprobs):
            k = params[i].logprobs or 0
            top = torch.topk(logp[j], k) if k else None
            out_logprobs[i] = TokenLogprobs(
                token_id=token_list[i],
                logprob=float(logp[j, token_list[i]]),
                top=dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {},
            )
    return token_list, out_logprobs


def _probs(logits: torch.Tensor, params: Sequence) -> torch.Tensor:
    """Softmax after temperature, top-k and top-p, row by row parameters, batched."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    logits = logits / temperature.unsqueeze(1)

    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[1]
        k = torch.tensor([k if k > 0 else vocab for k in top_ks], device=device)
        k = k.clamp(max=vocab)
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))

    probs = torch.softmax(logits, dim=-1)
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        top_p = torch.tensor(top_ps, device=device, dtype=probs.dtype)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token when the mass strictly before it is below top_p (the first always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
