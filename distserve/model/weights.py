"""Reading tensors, or one rank's slice of them, from a safetensors checkpoint folder.

Owns: finding the weight files (``model.safetensors``, a sharded set listed in
``model.safetensors.index.json``, or a lone ``*.safetensors``), reading exactly the slice a TP rank
needs through ``safe_open(...).get_slice`` (the rest of the tensor is never materialised),
converting it to the requested dtype/device, and remembering which names were read so that the
loader can report unexpected tensors. Modules that own weights subclass :class:`CheckpointModule`
and name their own tensors. Does not own the model structure (``decoder.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorSlice:
    name: str  # tensor name in the checkpoint, e.g. "model.layers.0.mlp.up_proj.weight"
    full_shape: tuple[int, ...]  # shape the whole tensor must have
    dim: int = 0  # dimension this rank slices
    start: int = 0  # first index of the slice along ``dim``
    end: int | None = None  # one past the last index; None means to the end


class CheckpointReader:
    """Name → file map of a checkpoint folder, with per-file ``safe_open`` handles kept open."""

    def __init__(
        self, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        self._file_of: dict[str, Path] = self._index_files(self.model_dir)
        self._handles: dict[Path, Any] = {}
        self._read_names: set[str] = set()

    @staticmethod
    def _index_files(model_dir: Path) -> dict[str, Path]:
        index = model_dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: model_dir / file for name, file in weight_map.items()}
        candidates = [model_dir / SINGLE_FILE] if (model_dir / SINGLE_FILE).exists() else []
        candidates = candidates or sorted(model_dir.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ValueError(
                f"{model_dir}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
                f"{[p.name for p in candidates] or 'no safetensors files'}"
            )
        with safe_open(str(candidates[0]), framework="pt") as f:
            return {name: candidates[0] for name in f.keys()}  # noqa: SIM118 (not a dict)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            if not path.exists():
                raise ValueError(f"checkpoint file {path} listed in {INDEX_FILE} does not exist")
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self._file_of

    def read(self, ts: TensorSlice) -> torch.Tensor:
        """Read ``ts`` (checking the full tensor's shape) as ``self.dtype`` on ``self.device``."""
        if ts.name not in self._file_of:
            raise ValueError(f"checkpoint {self.model_dir} is missing tensor {ts.name!r}")
        tensor_slice = self._handle(self._file_of[ts.name]).get_slice(ts.name)
        shape = tuple(tensor_slice.get_shape())
        if shape != ts.full_shape:
            raise ValueError(
                f"tensor {ts.name!r} has shape {shape}, the config implies {ts.full_shape}"
            )
        index = [slice(None)] * len(shape)
        index[ts.dim] = slice(ts.start, ts.end)
        self._read_names.add(ts.name)
        return tensor_slice[tuple(index)].to(device=self.device, dtype=self.dtype)

    def skip(self, name: str) -> None:
        """Mark ``name`` as consumed without reading it (e.g. an lm_head tied to the embedding)."""
        self._read_names.add(name)

    def unread_names(self) -> list[str]:
        return sorted(set(self._file_of) - self._read_names)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointModule(nn.Module):
    """A module whose own parameters come from named checkpoint tensors."""

    def load_from(self, reader: CheckpointReader) -> None:
        raise NotImplementedError


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """An uninitialised, frozen parameter, filled later by ``load_from``."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
