"""Vocab-parallel token embedding and LM head.

The vocabulary is cut into ``tp.size`` equal ranges of ``ceil(vocab_size / tp.size)`` rows (the
last range is zero-padded past ``vocab_size``):

* :class:`VocabParallelEmbedding` — each rank looks up only the ids in its range, writes zeros
  for the others, and an all-reduce sums the partial embeddings.
* :class:`ParallelLMHead` — each rank computes logits for its range; an all-gather gives every
  rank the full ``[n, vocab_size]`` float32 logits. With tied embeddings it reuses the embedding's
  (identically split) weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distserve.model.parallel import TensorParallelGroup
from distserve.model.weights import CheckpointModule, CheckpointReader, TensorSlice, empty_param


class VocabParallelEmbedding(CheckpointModule):
    def __init__(
        self,
        prefix: str,
        vocab_size: int,
        hidden_size: int,
        tp: TensorParallelGroup,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.prefix = prefix  # checkpoint name without ".weight"
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp = tp
        self.num_local_rows = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.num_local_rows
        self.weight = empty_param(self.num_local_rows, hidden_size, dtype=dtype, device=device)

    def load_from(self, reader: CheckpointReader) -> None:
        load_vocab_rows(
            reader, f"{self.prefix}.weight", self.weight, self.vocab_start, self.vocab_size
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        is_local = (local_ids >= 0) & (local_ids < self.num_local_rows)
        embedded = F.embedding(local_ids.masked_fill(~is_local, 0), self.weight)
        embedded.masked_fill_(~is_local[:, None], 0)
        return self.tp.all_reduce(embedded)


class ParallelLMHead(CheckpointModule):
    """With ``tied_to`` the head shares that embedding's weight; otherwise it owns rows split the
    same way as the embedding's (so a pipeline's last stage needs no embedding of its own)."""

    def __init__(
        self,
        prefix: str,
        vocab_size: int,
        hidden_size: int,
        tp: TensorParallelGroup,
        dtype: torch.dtype,
        device: torch.device | str,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.is_tied = tied_to is not None
        self.vocab_size = vocab_size
        self.tp = tp
        if tied_to is not None:
            self.vocab_start = tied_to.vocab_start
            self.weight = tied_to.weight
        else:
            num_local_rows = -(-vocab_size // tp.size)
            self.vocab_start = tp.rank * num_local_rows
            self.weight = empty_param(num_local_rows, hidden_size, dtype=dtype, device=device)

    def load_from(self, reader: CheckpointReader) -> None:
        name = f"{self.prefix}.weight"
        if not self.is_tied:
            load_vocab_rows(reader, name, self.weight, self.vocab_start, self.vocab_size)
        elif reader.has(name):
            reader.skip(name)  # some tied checkpoints store a copy; the embedding is authoritative

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[n, vocab_size]``, complete on every rank."""
        local_logits = F.linear(hidden, self.weight).float()
        logits = self.tp.all_gather_last_dim(local_logits)
        return logits if logits.shape[-1] == self.vocab_size else logits[:, : self.vocab_size]


def load_vocab_rows(
    reader: CheckpointReader, name: str, param: torch.Tensor, vocab_start: int, vocab_size: int
) -> None:
    """Fill ``param`` with rows ``[vocab_start, vocab_start + len(param))``; rows past the vocab are 0."""
    end = min(vocab_start + param.shape[0], vocab_size)
    param.zero_()
    if end > vocab_start:
        rows = reader.read(TensorSlice(name, (vocab_size, param.shape[1]), 0, vocab_start, end))
        param[: end - vocab_start].copy_(rows)
