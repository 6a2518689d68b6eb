"""The torchrun environment of one rank of a Ray actor group (teacher TP ranks, student data-parallel ranks).

Each actor sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT exactly as torchrun would, so the
framework inside (transformers' TP loader, DeepSpeed) initialises torch.distributed as it does under torchrun.
Rank 0 picks the group's rendezvous address on its own node.
"""

from __future__ import annotations

import os
import socket

import ray

# Ray's GCS keeps the events of up to 100,000 tasks (3.6 KB each, measured): at ~6 actor calls a step that is
# +350 MiB of gcs_server memory before it levels off (bench/soak.py). The run's actors do not record them (the
# trade-off: `ray list tasks` and the dashboard's timeline do not show their calls).
NO_TASK_EVENTS = {"enable_task_events": False}


class TorchrunWorker:
    """Base of the teacher and student actors: the rendezvous and environment every rank of a group shares."""

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (groups check where their actors landed, and notice lost nodes)."""
        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): called on rank 0, handed to every rank of the group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    @staticmethod
    def join_group_env(
        *, rank: int, world_size: int, local_rank: int, device: str, address: tuple[str, int]
    ) -> None:
        master_addr, master_port = address
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its one GPU is local rank 0.
            LOCAL_RANK="0" if device == "cuda" else str(local_rank),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
