from __future__ import annotations

import pytest
import torch

from distserve.engine.request import Request
from distserve.engine.sampler import sample
from distserve.engine.sampling_params import SamplingParams


def _req(**params) -> Request:
    return Request("r", [1], SamplingParams(**params), frozenset(), 100)


def test_greedy_and_top_k_1_take_argmax():
    logits = torch.randn(3, 50)
    tokens, _ = sample(
        logits, [_req(temperature=0.0), _req(temperature=1.0, top_k=1), _req(temperature=0.0)]
    )
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    a = sample(logits, [_req(seed=5, temperature=1.0) for _ in range(4)])[0]
    b = sample(logits, [_req(seed=5, temperature=1.0) for _ in range(4)])[0]
    assert a == b
    # The same seeded request alone gives the same first token as in the batch.
    alone = sample(logits[2:3], [_req(seed=5, temperature=1.0)])[0]
    assert alone == [a[2]]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]]).repeat(400, 1)
    reqs = [_req(seed=i, temperature=1.0, top_k=2) for i in range(400)]
    tokens, _ = sample(logits, reqs)
    assert set(tokens) == {0, 1}
    # p(0)=0.665, p(1)=0.245: top_p=0.7 keeps tokens 0 and 1 only.
    reqs = [_req(seed=i, temperature=1.0, top_p=0.7) for i in range(400)]
    tokens, _ = sample(logits, reqs)
    assert set(tokens) == {0, 1}


def test_sampling_distribution_matches_softmax():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().unsqueeze(0).repeat(4000, 1)
    tokens, _ = sample(logits, [_req(seed=i, temperature=1.0) for i in range(4000)])
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_logprobs_returned():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tokens, lps = sample(logits, [_req(temperature=0.0, logprobs=2)])
    lp = lps[0]
    assert tokens == [0] and lp is not None
    expected = torch.log_softmax(logits[0], -1)
    assert lp.logprob == pytest.approx(float(expected[0]))
    assert set(lp.top) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 1.5}, "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_inputs():
    p = SamplingParams(stop="x", top_k=-1, stop_token_ids=[3])
    assert p.stop == ("x",) and p.top_k == 0 and p.stop_token_ids == (3,)
