"""Test-side paged KV bookkeeping and Hugging Face reference logits for model tests.

``PagedSequences`` is a deliberately simple stand-in for the engine's block manager: it hands out
block ids in a shuffled order (so block tables are non-contiguous), and turns one step's
``{seq_id: new tokens}`` into ``input_ids``, ``positions`` and :class:`AttentionMetadata`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from distserve.model.attention_metadata import AttentionMetadata


class PagedSequences:
    def __init__(
        self,
        num_layers: int,
        num_local_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        self.block_size = block_size
        self.kv_cache = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim, dtype=dtype
        )
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.seq_lens: dict[int, int] = {}

    def step(
        self, new_tokens: dict[int, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Append ``new_tokens[seq_id]`` to each sequence (in dict order) and describe the step."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for seq_id, tokens in new_tokens.items():
            table = self.block_tables.setdefault(seq_id, [])
            start = self.seq_lens.get(seq_id, 0)
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            for pos in range(start, end):
                slots.append(
                    table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.seq_lens[seq_id] = end
        width = max(len(self.block_tables[s]) for s in new_tokens) + 1  # +1: padded with 0
        tables = [
            self.block_tables[s] + [0] * (width - len(self.block_tables[s])) for s in new_tokens
        ]
        query_start = [0]
        for n in query_lens:
            query_start.append(query_start[-1] + n)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )
        return (
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
            attn,
        )


def random_sequences(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def hf_logits(model_dir: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Hugging Face float32 logits ``[len, vocab]`` at every position of each sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].float() for seq in sequences]


def split_rows(rows: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(rows.split(lengths))
