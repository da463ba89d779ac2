"""The tensors of one model step, built once on the driver and shared with every TP rank.

``StepInputs`` is what crosses the driver → worker boundary each step: plain tensors and lists,
no live objects. Building it is the only per-token Python work of a step, done with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distserve.engine.scheduler import ScheduledBatch
from distserve.model.attention_metadata import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T]: the new tokens of every scheduled request, concatenated
    positions: torch.Tensor  # int64 [T]: their positions in their own sequences
    attn: AttentionMetadata
    logits_indices: (
        torch.Tensor
    )  # int64 [S]: rows of T whose logits are sampled (one per sampling request)

    def to(self, device: torch.device | str) -> StepInputs:
        attn = self.attn
        return StepInputs(
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            attn=AttentionMetadata(
                query_start_loc=attn.query_start_loc.to(device, non_blocking=True),
                seq_lens=attn.seq_lens.to(device, non_blocking=True),
                block_tables=attn.block_tables.to(device, non_blocking=True),
                slot_mapping=attn.slot_mapping.to(device, non_blocking=True),
                query_lens_cpu=attn.query_lens_cpu,
                seq_lens_cpu=attn.seq_lens_cpu,
                block_size=attn.block_size,
            ),
            logits_indices=self.logits_indices.to(device, non_blocking=True),
        )


def build_step_inputs(
    batch: ScheduledBatch, block_tables: Sequence[Sequence[int]], block_size: int
) -> tuple[StepInputs, list[int]]:
    """Lay out ``batch`` as flat tensors (on CPU); also returns the indices of sampling requests."""
    input_ids: list[int] = []
    positions: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling: list[int] = []
    num_tokens = 0
    for i, (req, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
        start = req.num_computed_tokens
        end = start + num_new
        input_ids.extend(req.token_slice(start, end))
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(block_tables[i], dtype=np.int64)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        query_lens.append(num_new)
        seq_lens.append(end)
        num_tokens += num_new
        if end == req.num_tokens:
            logits_indices.append(num_tokens - 1)
            sampling.append(i)

    max_blocks = max(len(t) for t in block_tables)
    tables = np.zeros((len(block_tables), max_blocks), dtype=np.int32)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = t
    query_start = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start[1:])
    attn = AttentionMetadata(
        query_start_loc=torch.from_numpy(query_start),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.from_numpy(tables),
        slot_mapping=torch.from_numpy(np.concatenate(slots)),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    inputs = StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.from_numpy(np.concatenate(positions)),
        attn=attn,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
    )
    return inputs, sampling
