"""``load_model``: checkpoint folder → a ready :class:`CausalLM` on one (pipeline stage, TP) rank.

Validates the config (``config.py``), builds the model with uninitialised parameters directly on
the target device, fills each parameter with this rank's slice read from safetensors
(``weights.py``), and rejects checkpoints with missing or unexpected tensors, naming them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distserve.model.attention import get_backend
from distserve.model.causal_lm import CausalLM
from distserve.model.config import ModelConfig
from distserve.model.parallel import PipelineParallelGroup, TensorParallelGroup
from distserve.model.weights import CheckpointReader

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def load_model(
    model_path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tp: TensorParallelGroup = TensorParallelGroup(),  # noqa: B008 (frozen, so a safe default)
    attention_backend: str = "auto",
    pp: PipelineParallelGroup = PipelineParallelGroup(),  # noqa: B008 (frozen, so a safe default)
) -> CausalLM:
    """Load ``model_path`` in ``dtype`` on ``device`` as rank ``tp.rank`` of ``tp.size`` of
    pipeline stage ``pp.rank`` of ``pp.size``; eval mode. Only the stage's tensors are read.

    Raises ``ValueError`` naming the problem for: an architecture other than Llama/Mistral/Qwen2,
    an unsupported rope type or activation, a sliding window smaller than
    ``max_position_embeddings`` (sliding-window attention is unsupported), shapes that do not
    split over ``tp.size``, more pipeline stages than decoder layers, missing, unexpected or mis-shaped tensors, an unknown or unavailable
    ``attention_backend`` (``"auto"``, ``"sdpa"``, ``"flash_attn"``).
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {SUPPORTED_DTYPES}")
    config = ModelConfig.from_pretrained(model_path)
    device = torch.device(device)
    backend = get_backend(attention_backend, device)
    model = CausalLM(config, tp=tp, backend=backend, dtype=dtype, device=device, pp=pp)
    with CheckpointReader(model_path, dtype, device) as reader:
        model.load_weights(reader)
        unexpected = [
            n
            for n in reader.unread_names()
            if not n.endswith(_IGNORED_SUFFIXES) and model.holds_tensor(n)
        ]
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ValueError(
            f"checkpoint {model_path} has {len(unexpected)} unexpected tensors: {shown}"
        )
    return model.eval()
