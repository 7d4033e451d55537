"""Run a test function on N CPU processes joined in a gloo process group (FSDP2 tests without GPUs)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, results)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int) -> dict:
    """Spawn ``world`` processes that each run ``fn(rank, world, results)`` inside the group; return ``results``.

    ``fn`` must be a module-level function (the children import it by name); ``results`` is a shared dict.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(fn, world, free_port(), results), nprocs=world, join=True)
        return dict(results)
