"""One rank's share of an instance: the model's weights, that rank's KV cache and its KV transfers.

A worker runs whatever its driver tells it; it does not schedule. Each engine step the driver
sends every rank of its instance one :class:`RankCommand` — the step's model inputs (if any) and
the KV-transfer operations to start — and each rank answers with its transfer results. The
driver rank owns a worker in its own process; the other ranks run :func:`worker_loop`.

    driver                          rank k (k > 0)
    ──────                          ──────────────
    broadcast(RankCommand) ───────▶ receive
    worker.run(cmd)                 worker.run(cmd)
    gather(results) ◀────────────── send results      (only when cmd.gather_transfers)

Pipeline parallelism. A rank is ``(pp_rank, tp_rank)``; the driver is ``(0, 0)``. Each stage holds
its own layers' weights and KV cache (``kv_cache.shape[0]`` is the stage's layer count). Inside
``worker.run`` a step goes through the stages one after another:

    stage 0 (embed + layers)  ──hidden [T, H]──▶  stage 1 (layers) ──▶ … ──▶ last stage (layers,
    norm, LM head) ──logits [S, vocab] from its TP rank 0──▶ driver

Hidden states go point-to-point from TP rank ``r`` of stage ``s`` to TP rank ``r`` of stage
``s + 1`` (the instance's group). Every TP rank of a stage already holds the full, replicated
``[T, H]`` after its last all-reduce, so the pairs send in parallel and each next-stage rank has
its input after one hop; sending from TP rank 0 only and broadcasting inside the next stage
would add a second, serial collective to every stage boundary. TP all-reduces stay inside a
stage's own TP group. Only the driver samples, so the last stage's TP rank 0 sends it the
logits of the sampling rows (their shape is known from the step inputs every rank has).

Known limitation: no micro-batching. The scheduler hands the engine one batch per step and the
engine samples from it before it schedules the next, so there is no second batch to put in the
pipeline: stage ``s`` idles while the others run and a step takes the sum of the stages' times
plus the hops. Overlapping stages needs the scheduler to keep ``pp`` batches in flight (and to
sample them as they come out), which this first version does not do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from distserve.engine.kv_spec import KVCacheSpec
from distserve.engine.step_inputs import StepInputs
from distserve.model.config import ModelConfig
from distserve.model.loader import load_model
from distserve.model.parallel import PipelineParallelGroup, TensorParallelGroup

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its worker (sent to spawned ranks as plain data)."""

    model_path: str
    dtype: str  # resolved: "float32" | "bfloat16" | "float16"
    device: str  # resolved: "cpu" | "cuda:N"
    num_blocks: int
    block_size: int
    attention_backend: str = "auto"
    num_threads: int | None = None
    transfer_backend: str | None = None  # "gloo" | "nccl" | "auto"; None: this rank moves no KV
    global_rank: int = 0  # this rank in the torch.distributed world (for KV transfer)
    transfer_timeout_s: float = 60.0


@dataclass
class TransferOp:
    """One KV-transfer operation for every rank of an instance to start this step."""

    kind: Literal["recv", "send", "void_send", "cancel"]
    transfer_id: str
    descriptor: object | None = (
        None  # a distserve.transfer.TransferDescriptor (recv/send/void_send)
    )
    block_ids: list[int] = field(default_factory=list)  # this instance's blocks (recv/send)
    reason: str = ""  # void_send: why the KV is gone


@dataclass
class RankCommand:
    step: StepInputs | None  # the model step, or None for a transfer-only tick
    transfer_ops: list[TransferOp] = field(default_factory=list)
    gather_transfers: bool = False  # ranks send their transfer results to the driver


class Worker:
    def __init__(
        self,
        spec: WorkerSpec,
        tp: TensorParallelGroup | None = None,
        pp: PipelineParallelGroup | None = None,
    ) -> None:
        tp = tp or TensorParallelGroup()
        pp = pp or PipelineParallelGroup()
        if spec.num_threads is not None and spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.tp = tp
        self.pp = pp
        self.device = torch.device(spec.device)
        model_config = ModelConfig.from_pretrained(spec.model_path)
        self.kv_spec: KVCacheSpec = model_config.kv_spec(spec.block_size, spec.dtype)
        self.model = load_model(
            spec.model_path,
            dtype=TORCH_DTYPES[spec.dtype],
            device=self.device,
            tp=tp,
            attention_backend=spec.attention_backend,
            pp=pp,
        )
        self.layer_range = (self.model.layer_start, self.model.layer_end)  # global layer ids
        self.kv_cache = torch.zeros(
            (
                len(self.model.layers),  # this stage's layers only
                2,
                spec.num_blocks,
                spec.block_size,
                self.kv_spec.num_local_kv_heads(tp.size),
                self.kv_spec.head_dim,
            ),
            dtype=TORCH_DTYPES[spec.dtype],
            device=self.device,
        )
        self._sender = self._receiver = None
        if spec.transfer_backend is not None:
            if pp.size > 1:
                raise ValueError(
                    "pipeline parallelism is supported for colocated pools; KV transfer between "
                    "pipeline stages is not implemented yet"
                )
            from distserve.transfer import KVReceiver, KVSender, create_backend

            backend = create_backend(spec.transfer_backend, self.device)
            self._sender = KVSender(
                self.kv_cache, spec.global_rank, backend, timeout_s=spec.transfer_timeout_s
            )
            self._receiver = KVReceiver(
                self.kv_cache, spec.global_rank, backend, timeout_s=spec.transfer_timeout_s
            )

    @property
    def is_driver(self) -> bool:
        return self.pp.is_first and self.tp.rank == 0

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run this rank's part of one model step.

        Returns float32 logits ``[S, vocab]`` for the sampling rows on the driver (and on every
        rank of a single-stage instance); ``None`` on the other ranks of a pipeline.
        """
        if self.device.type != "cpu":
            inputs = inputs.to(self.device)
        pp = self.pp
        hidden_in = None
        if not pp.is_first:
            num_tokens = inputs.input_ids.shape[0]
            hidden_in = torch.empty(
                (num_tokens, self.model.config.hidden_size),
                dtype=self.model.dtype,
                device=self.device,
            )
            pp.recv(hidden_in, pp.prev_peer)
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn, hidden_in
        )
        logits = None
        if pp.is_last:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
        else:
            pp.send(hidden, pp.next_peer)
        if pp.size == 1:
            return logits
        num_rows = inputs.logits_indices.shape[0]  # 0 when only partial prefill chunks ran
        if pp.is_last and self.tp.rank == 0:
            if num_rows:
                pp.send(logits, pp.driver)
        elif self.is_driver:
            logits = torch.empty(
                (num_rows, self.model.config.vocab_size), dtype=torch.float32, device=self.device
            )
            return pp.recv(logits, pp.logits_src) if num_rows else logits
        return None

    def run(self, cmd: RankCommand) -> tuple[torch.Tensor | None, list]:
        """Start the command's transfers, run its step, and poll transfers; (logits, results)."""
        for op in cmd.transfer_ops:
            self._start(op)
        logits = self.execute(cmd.step) if cmd.step is not None else None
        results: list = []
        if self._sender is not None:
            results = self._sender.poll() + self._receiver.poll()
        return logits, results

    def _start(self, op: TransferOp) -> None:
        if self._sender is None or self._receiver is None:
            raise RuntimeError("this worker was built without a transfer backend")
        if op.kind == "recv":
            self._receiver.post_recv(op.descriptor, op.block_ids)
        elif op.kind == "send":
            self._sender.start_send(op.descriptor, op.block_ids)
        elif op.kind == "void_send":
            self._sender.start_void_send(op.descriptor, op.reason)
        else:
            self._sender.cancel(op.transfer_id)
            self._receiver.cancel(op.transfer_id)


def broadcast_command(
    cmd: RankCommand | None, src: int, group: dist.ProcessGroup | None
) -> RankCommand | None:
    """Driver → ranks: one step's command, or None to stop the worker loop."""
    box = [cmd]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_results(
    results: list, dst: int, group: dist.ProcessGroup | None, is_driver: bool
) -> list[list]:
    """Ranks → driver: every rank's transfer results (the driver gets one list per rank)."""
    out: list | None = [None] * dist.get_world_size(group) if is_driver else None
    dist.gather_object(results, out, dst=dst, group=group)
    return out if out is not None else []


def wait_ranks_ready(src: int, group: dist.ProcessGroup | None) -> None:
    """Driver: return once every rank of the instance has built its worker.

    Without it a driver could register its instance and start its first step while slower ranks
    still load weights, and its first broadcast would block for that long (long enough, on a
    loaded machine, to miss the router's heartbeat deadline). A rank that failed to build has
    exited, and this raises instead of serving a broken instance.
    """
    gather_results([], src, group, is_driver=True)


def worker_loop(worker: Worker, src: int, group: dist.ProcessGroup | None) -> None:
    """The life of a non-driver rank: run every command the driver broadcasts, until told to stop.

    It starts by telling the driver that this rank's worker is built (see :func:`wait_ranks_ready`).
    """
    gather_results([], src, group, is_driver=False)
    while True:
        cmd = broadcast_command(None, src, group)
        if cmd is None:
            return
        _, results = worker.run(cmd)
        if cmd.gather_transfers:
            gather_results(results, src, group, is_driver=False)
