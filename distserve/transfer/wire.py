"""The bytes of one message: a 64-byte header followed by the KV payload, in one flat buffer.

Owns the message layout and its header. One message carries one chunk (a run of consecutive
entries of the transfer's block list, see ``chunking.py``) of one transfer from one prefill rank
to one decode rank::

    message (uint8, contiguous, sent with a single isend)
    | header: int64[8]                                        | payload                          |
    | magic kind seq_no tag src_rank payload_bytes            | (num_layers, 2, chunk's blocks,  |
    |   chunk_index num_chunks                                |  block_size, num_heads, head_dim)|
    0                                                        64   in the KV dtype                 |

The header is how a receiver refuses bytes it must not scatter: a VOID message (the sender had
no KV to give but must still fill the posted receive to keep the pair in step), or a message for
another transfer or another chunk (an ordering bug would otherwise write one request's KV into
another's blocks). Putting it first keeps the payload aligned for every KV dtype.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass

import torch

from distserve.engine.kv_spec import KVCacheSpec

HEADER_BYTES = 64
_MAGIC = 0x4B5658464552  # b"KVXFER"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MessageKind(enum.IntEnum):
    DATA = 1  # the payload holds the requested KV
    VOID = 2  # placeholder of the right size; the payload must be discarded


class MessageFormatError(ValueError):
    """A received buffer does not start with a valid header."""


@dataclass(frozen=True)
class MessageHeader:
    kind: MessageKind  # DATA or VOID
    seq_no: int  # the descriptor's seq_no
    tag: int  # transfer_tag(transfer_id)
    src_rank: int  # global rank of the sender
    payload_bytes: int  # bytes after the header
    chunk_index: int = 0  # which chunk of the (transfer, pair) this is: 0 .. num_chunks - 1
    num_chunks: int = 1  # chunks the sender split the (transfer, pair) into


def torch_dtype(spec: KVCacheSpec) -> torch.dtype:
    return _TORCH_DTYPES[spec.dtype]


def transfer_tag(transfer_id: str) -> int:
    """A 32-bit fingerprint of a transfer id, carried in the header."""
    return zlib.crc32(transfer_id.encode())


def payload_shape(spec: KVCacheSpec, num_blocks: int, num_heads: int) -> tuple[int, ...]:
    return (spec.num_layers, 2, num_blocks, spec.block_size, num_heads, spec.head_dim)


def message_bytes(spec: KVCacheSpec, num_blocks: int, num_heads: int) -> int:
    return HEADER_BYTES + _numel(payload_shape(spec, num_blocks, num_heads)) * spec.dtype_bytes


def alloc_message(
    spec: KVCacheSpec, num_blocks: int, num_heads: int, device: torch.device, is_pinned: bool
) -> torch.Tensor:
    """A fresh uninitialized message buffer (pinned: host memory that stages a CUDA cache)."""
    num_bytes = message_bytes(spec, num_blocks, num_heads)
    return torch.empty(num_bytes, dtype=torch.uint8, device=device, pin_memory=is_pinned)


def payload_view(
    message: torch.Tensor, spec: KVCacheSpec, num_blocks: int, num_heads: int
) -> torch.Tensor:
    """The payload region of ``message`` as a contiguous KV tensor (a view, no copy)."""
    return (
        message[HEADER_BYTES:]
        .view(torch_dtype(spec))
        .view(payload_shape(spec, num_blocks, num_heads))
    )


def write_header(message: torch.Tensor, header: MessageHeader) -> None:
    words = [
        _MAGIC,
        int(header.kind),
        header.seq_no,
        header.tag,
        header.src_rank,
        header.payload_bytes,
        header.chunk_index,
        header.num_chunks,
    ]
    message[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))


def read_header(message: torch.Tensor) -> MessageHeader:
    """Parse the header (a 64-byte device→host copy when the message is on a GPU)."""
    words = message[:HEADER_BYTES].view(torch.int64).tolist()
    if words[0] != _MAGIC or words[1] not in (MessageKind.DATA, MessageKind.VOID):
        raise MessageFormatError(f"not a KV transfer message (header words {words[:2]})")
    return MessageHeader(MessageKind(words[1]), *words[2:8])


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
