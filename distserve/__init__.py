"""distserve: LLM serving with disaggregated prefill and decode.

The in-process engine is the entry point for offline use::

    from distserve import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=16))

Attributes are imported lazily so that ``import distserve`` stays cheap for the CLI and the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from distserve.engine.llm import LLM, RequestOutput
    from distserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from distserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from distserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'distserve' has no attribute {name!r}")
