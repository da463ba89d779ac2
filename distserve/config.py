"""Engine-level configuration: one frozen, validated dataclass per component.

An instance (or the offline ``LLM``) is configured by an :class:`EngineConfig` composed of a
:class:`CacheConfig`, a :class:`ParallelConfig` and the scheduler's ``SchedulerConfig``. Each
component receives only its own section. Invalid values raise ``ValueError`` naming the field.
The cluster YAML (``distserve.launch.cluster_config``) builds these for every instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.engine.scheduler import SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # fixed pool size; None = derive from the memory settings below
    cpu_memory_gib: float = 1.0  # KV pool size per rank on CPU
    gpu_memory_utilization: float = 0.9  # fraction of free GPU memory the KV pool may take
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(
                f"cache.block_size must be a power of two in [1, 256], got {self.block_size}"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"cache.num_blocks must be >= 1, got {self.num_blocks}")
        if not self.cpu_memory_gib > 0:
            raise ValueError(f"cache.cpu_memory_gib must be > 0, got {self.cpu_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path of a Hugging Face checkpoint folder
    dtype: str = "auto"  # "auto" = float32 on CPU, the checkpoint's dtype on CUDA
    device: str = "auto"  # "auto" = cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"
    seed: int = 0  # seeds the RNG of requests without a seed of their own
    num_threads: int | None = None  # CPU threads per rank (torch.set_num_threads); None = leave
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
