"""What the model runner tells the attention layers about one step's batch.

A step runs a flat batch of ``T`` new tokens belonging to ``B`` sequences, concatenated in
sequence order. Sequence ``i`` contributes ``query_lens[i]`` new tokens (its prompt chunk during
prefill, one token during decode) whose positions end at ``seq_lens[i] - 1``:

    sequence i:  | cached context (seq_lens[i] - query_lens[i]) | new tokens (query_lens[i]) |
                 0                                                              seq_lens[i]

Every layer first writes the new tokens' keys and values into the paged cache at
``slot_mapping`` and then attends each new token to all earlier tokens of its own sequence
(causally), reading them through ``block_tables``. The host-side lists are kept so that backends
can plan without a device→host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: (
        torch.Tensor
    )  # int32 [B + 1]: offsets of each sequence's new tokens in the flat batch
    seq_lens: torch.Tensor  # int32 [B]: context length of each sequence after this step
    block_tables: torch.Tensor  # int32 [B, max_num_blocks]: block ids per sequence, padded with 0
    slot_mapping: (
        torch.Tensor
    )  # int64 [T]: cache slot (block_id * block_size + offset) of each new token
    query_lens_cpu: list[int]  # host copy of the per-sequence number of new tokens
    seq_lens_cpu: list[int]  # host copy of seq_lens
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence adds exactly one token (a pure decode step)."""
        return self.max_query_len == 1
