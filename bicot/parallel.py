"""FSDP2 in one place: shard policy and reference per decoder layer, and gather weights once per rollout."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from bicot.checkpointing import DISTRIBUTED_META, recover_checkpoint, remove_path, swap_into_place

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """How the models are laid out for training, applied once from ``configure_model``.

    Attributes:
        activation_checkpointing: recompute each decoder layer's activations in the backward pass
            (saves activation memory of the update for about a third more update compute).
        param_dtype: FSDP2 mixed precision: gather and compute in this dtype (``bfloat16``) while the
            sharded master weights and optimizer stay in their own dtype; ``None`` keeps the weights'.
        reduce_dtype: FSDP2 gradient reduction dtype (``float32`` keeps reductions exact enough).
        reference: ``shard`` (the reference sharded like the policy) or ``cpu`` (sharded and
            CPU-offloaded with FSDP2's CPUOffloadPolicy; without FSDP2 the reference stays where the
            module is, use the memory plan to decide).
        compile_update: ``torch.compile`` each decoder layer for the update (the rollout keeps eager
            or its own engine).
    """

    activation_checkpointing: bool = False
    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    reference: str = "shard"
    compile_update: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"parallel.{name} must be one of {sorted(DTYPES)} or null, got {value!r}")
        if self.reference not in ("shard", "cpu"):
            raise ValueError(f"parallel.reference must be 'shard' or 'cpu', got {self.reference!r}")


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant, so it composes with FSDP2 and frozen inputs)."""
    lm = model.model.language_model
    # transformers renamed the method (5.2x); the GPU machines run 5.17, which has only the old name.
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mixed_precision(config: ParallelConfig) -> MixedPrecisionPolicy:
    """FSDP2's policy: gather in ``param_dtype`` and reduce gradients in ``reduce_dtype``, each independently
    (``reduce_dtype: float32`` applies with ``param_dtype: null`` too, e.g. to bf16 weights); ``None`` keeps
    FSDP2's default (the weights' dtype, resp. the gathered dtype)."""
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[config.param_dtype] if config.param_dtype else None,
        reduce_dtype=DTYPES[config.reduce_dtype] if config.reduce_dtype else None,
    )


def parallelize(
    model: torch.nn.Module,
    mesh: DeviceMesh | None,
    config: ParallelConfig | None = None,
    offload: bool = False,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    """Lay out a ``JanusForConditionalGeneration`` in the fixed order: activation checkpointing,
    compile, then ``fully_shard`` (each decoder layer its own unit, then the root takes the rest:
    embeddings, heads, vision and VQ towers, which are small or frozen).

    Args:
        model: the Janus model (policy or reference).
        mesh: the data-parallel mesh (``LightningModule.device_mesh["data_parallel"]``), or ``None``
            on one device (checkpointing and compile still apply).
        config: see :class:`ParallelConfig`.
        offload: keep the sharded parameters on CPU (FSDP2 CPUOffloadPolicy), e.g. for the reference.
    """
    config = config or ParallelConfig()
    trains = any(p.requires_grad for p in model.parameters())
    if config.activation_checkpointing and trains:
        apply_activation_checkpointing(model)
    if config.compile_update and trains:
        for layer in model.model.language_model.layers:
            layer.compile()
    if mesh is None:
        return model
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mixed_precision(config))
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
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

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Distributed checkpoints are written to a temporary folder, then swapped into place by rank 0.

        Lightning writes a distributed checkpoint's shards into the target folder in place, so a process
        killed mid-save would leave the last checkpoint half old, half new. Here the previous checkpoint
        stays whole until the new one is complete (:func:`bicot.checkpointing.swap_into_place`).
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        written = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and written.exists():
            remove_path(written)
        self.barrier("bicot_checkpoint_start")
        super().save_checkpoint(checkpoint, written, storage_options)
        self.barrier("bicot_checkpoint_written")
        if self.global_rank == 0:
            swap_into_place(written, path)
        self.barrier("bicot_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Distributed checkpoints hold only the trainable weights (``BiCoTGRPO.on_save_checkpoint``): load those
        into the sharded model, leave the frozen parts as they were loaded from their sources."""
        if self.global_rank == 0:
            recover_checkpoint(checkpoint_path)
        self.barrier("bicot_checkpoint_recovered")
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        metadata = torch.load(path / DISTRIBUTED_META, map_location="cpu", weights_only=True)
        module = self.lightning_module
        # a checkpoint of another model is refused before any shard is read (Lightning calls the module's
        # on_load_checkpoint only after this method returns)
        if hasattr(module, "check_checkpoint"):
            module.check_checkpoint(metadata)
        state = {"state_dict": get_model_state_dict(self.model)}
        load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        self.model.load_state_dict(state["state_dict"], strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return metadata
