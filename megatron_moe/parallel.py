"""Process groups: the only module that initialises torch.distributed and megatron-core's parallel state.

Works under torchrun (reads RANK/WORLD_SIZE/MASTER_ADDR/...) and as a plain single process (a private
loopback rendezvous). The backend is decided in `backend_for` alone.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_moe.config import ParallelConfig


@dataclass(frozen=True)
class ParallelInfo:
    """Ranks and sizes of this process in every parallel dimension."""

    rank: int
    world_size: int
    tensor: int
    pipeline: int
    expert: int
    data: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: tp 0, dp 0 of the last pipeline stage."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for training on `device`.

    On GPU every group is mixed-device: NCCL for CUDA tensors (gradients, activations, expert dispatch) and
    gloo for CPU tensors (the loop's small bookkeeping collectives: loss totals, MoE losses, expert load,
    stop and checkpoint agreement). An NCCL-only group refuses CPU tensors, and megatron-core's subgroups
    inherit this default.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed if needed; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=30)
    if "RANK" in os.environ:  # torchrun, srun + torchrun, ...
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a lone process: a private rendezvous, leaving the environment to child processes untouched
        init = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend=backend, init_method=init, rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def initialize_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelInfo:
    """Create every process group for layout `cfg` (already validated against the world size)."""
    from megatron.core import parallel_state as ps

    rank, world = init_distributed(device)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor,
        pipeline_model_parallel_size=cfg.pipeline,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline if cfg.virtual_pipeline > 1 else None,
        expert_model_parallel_size=cfg.expert,
        # Experts are never tensor-sharded: gloo lacks the uneven all-gather that needs, and at the
        # expert sizes we study expert parallelism is the better split anyway.
        expert_tensor_parallel_size=1,
        create_gloo_process_groups=device.type != "cuda",
    )
    return ParallelInfo(
        rank=rank,
        world_size=world,
        tensor=cfg.tensor,
        pipeline=cfg.pipeline,
        expert=cfg.expert,
        data=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
