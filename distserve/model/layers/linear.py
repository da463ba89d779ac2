"""Tensor-parallel linear layers.

Owns how a weight matrix ``W [out, in]`` is split over TP ranks and loaded slice by slice:

* :class:`ColumnParallelLinear` — each rank holds some *output rows* of one or more checkpoint
  matrices stacked together (q/k/v → one ``qkv`` matmul, gate/up → one ``gate_up`` matmul). Its
  output stays split; no communication.
* :class:`RowParallelLinear` — each rank holds some *input columns*; partial products are summed
  with an all-reduce, then the (replicated) bias is added once.

The caller decides the row/column ranges (they follow attention heads, so GQA with replicated KV
heads is expressed simply by giving several ranks the same K/V rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distserve.model.parallel import TensorParallelGroup
from distserve.model.weights import CheckpointModule, CheckpointReader, TensorSlice, empty_param


@dataclass(frozen=True)
class RowRange:
    prefix: str  # checkpoint name without ".weight"/".bias", e.g. "model.layers.0.self_attn.q_proj"
    num_rows: int  # output rows of the whole checkpoint matrix
    start: int  # first row this rank holds
    end: int  # one past the last row this rank holds

    @property
    def num_local_rows(self) -> int:
        return self.end - self.start


class ColumnParallelLinear(CheckpointModule):
    def __init__(
        self,
        in_features: int,
        parts: list[RowRange],
        has_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = parts
        self.output_sizes = [part.num_local_rows for part in parts]
        out_features = sum(self.output_sizes)
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if has_bias else None

    def load_from(self, reader: CheckpointReader) -> None:
        row = 0
        for part in self.parts:
            rows = slice(row, row + part.num_local_rows)
            weight = TensorSlice(
                f"{part.prefix}.weight", (part.num_rows, self.in_features), 0, part.start, part.end
            )
            self.weight[rows].copy_(reader.read(weight))
            if self.bias is not None:
                bias = TensorSlice(f"{part.prefix}.bias", (part.num_rows,), 0, part.start, part.end)
                self.bias[rows].copy_(reader.read(bias))
            row = rows.stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(CheckpointModule):
    def __init__(
        self,
        prefix: str,
        in_features: int,
        out_features: int,
        in_range: tuple[int, int],
        has_bias: bool,
        tp: TensorParallelGroup,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.in_features = in_features
        self.in_range = in_range  # [start, end) input columns this rank holds
        self.tp = tp
        local_in = in_range[1] - in_range[0]
        self.weight = empty_param(out_features, local_in, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if has_bias else None

    def load_from(self, reader: CheckpointReader) -> None:
        full_shape = (self.weight.shape[0], self.in_features)
        start, end = self.in_range
        self.weight.copy_(
            reader.read(TensorSlice(f"{self.prefix}.weight", full_shape, 1, start, end))
        )
        if self.bias is not None:
            self.bias.copy_(reader.read(TensorSlice(f"{self.prefix}.bias", (full_shape[0],))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
