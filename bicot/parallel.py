"""FSDP2 in one place: shard policy and reference per decoder layer, and gather weights once per rollout."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply ``fully_shard`` to a ``JanusForConditionalGeneration``: each decoder layer is its own unit,
    then the root takes the rest (embeddings, heads, vision and VQ towers, which are small or frozen).

    Args:
        model: the Janus model (policy or reference).
        mesh: the data-parallel mesh (``LightningModule.device_mesh["data_parallel"]``).
    """
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # bicot's teacher-forced passes call embeddings and heads directly, not model.forward: route them
    # through one method that FSDP2 treats as a forward (see modules.janus_ops.model_entry).
    model.bicot_forward = types.MethodType(lambda self, fn, *args, **kwargs: fn(self, *args, **kwargs), model)
    register_fsdp_forward_method(model, "bicot_forward")
    return model


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    """The FSDP2 units inside ``model`` (empty when it is not sharded)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Hold every FSDP2 unit of ``model`` unsharded for the duration of the block.

    The rollout runs hundreds of forwards (one per token); without this, each forward would
    all-gather every layer again. Inside the block the weights are gathered once and stay; on exit
    they are resharded. Costs one unsharded copy of the model per process while it lasts.
    """
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with all processes in one data-parallel group: plain FSDP2.

    ``ModelParallelStrategy`` sizes its data-parallel group to the number of nodes by default; bicot
    shards over every process (``num_nodes x devices``) and uses no tensor parallelism.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__("auto", 1, save_distributed_checkpoint, process_group_backend, timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
