"""Incremental detokenization that never splits a UTF-8 character, plus stop strings.

Byte-level tokenizers can end a token in the middle of a multi-byte character; decoding that
prefix yields U+FFFD. The detokenizer decodes a short window of recent tokens and holds back text
until the window decodes cleanly, so every delta it emits is final:

    token ids:  ... | prefix_offset ........ read_offset | new ids |
    emitted text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

Stop strings are searched in the text not yet released, and text that could be the start of a
stop string is held back until it is known not to be one. The router uses the same class, so
text is identical whether a request runs in-process or through the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerDelta:
    text: str  # newly released text (may be empty)
    stopped: bool  # a stop string was found; the request should finish


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._skip_special = skip_special_tokens
        self._hold = (
            max((len(s) for s in self._stop), default=1) - 1
        )  # chars kept back for stop matching
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""  # decoded, not yet released (checked against stop strings)
        self.text = ""  # everything released so far
        self.stopped = False

    def add(self, token_ids: Sequence[int], final: bool = False) -> DetokenizerDelta:
        """Feed newly generated tokens; ``final`` releases everything held back."""
        if self.stopped:
            return DetokenizerDelta("", True)
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._pending += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        elif final and len(full) > len(prefix):
            self._pending += full[len(prefix) :]  # a truly invalid byte sequence at the end
        return self._release(final)

    def _release(self, final: bool) -> DetokenizerDelta:
        for stop in self._stop:
            at = self._pending.find(stop)
            if at >= 0:
                end = at + len(stop) if self._include_stop else at
                out = self._pending[:end]
                self._pending = ""
                self.text += out
                self.stopped = True
                return DetokenizerDelta(out, True)
        keep = 0 if final else min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        self.text += out
        return DetokenizerDelta(out, False)

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
