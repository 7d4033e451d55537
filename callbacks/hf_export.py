"""HFExport: save the trained policy in Hugging Face format (stock transformers loads it) and log it to MLflow."""

from __future__ import annotations

import inspect
import json
import posixpath
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from mlflow.exceptions import MlflowException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from bicot.parallel import fsdp_units
from bicot.progress import steps_trained
from callbacks._run import MlflowRun, find_run
from modules.lora import merge_lora_state_dict


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU when ``model`` is FSDP2-sharded (a collective: every
    rank must call it; other ranks get an empty dict); ``None`` for an unsharded model."""
    if not fsdp_units(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def without_tied_copies(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` without the second name of each tied parameter (``lm_head.weight`` when it is the
    input embedding). ``save_pretrained`` drops those itself only when the tensors share storage, which
    the gathered copies no longer do; loading re-ties them from the config."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            copies.add(name)
    return {k: v for k, v in state_dict.items() if k not in copies}


def plain_class_name(model: torch.nn.Module) -> str:
    """The model's class name without FSDP2's dynamic ``FSDP<Name>`` subclass."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(model).__name__


def save_hf(model, processor, directory: Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) of model and processor into ``directory``.

    Args:
        model: a ``JanusForConditionalGeneration`` (possibly FSDP2-wrapped, then with ``state_dict``).
        processor: its processor (tokenizer, image processor, chat template).
        state_dict: full weights to write instead of ``model.state_dict()``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"state_dict": without_tied_copies(model, state_dict)} if state_dict is not None else {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    model.save_pretrained(directory, **kwargs)
    processor.save_pretrained(directory)
    # fully_shard swaps the class for FSDP<Name>; transformers 5.24 strips that prefix itself, older
    # releases record it as the architecture, which AutoModel then cannot resolve
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("architectures") != [plain_class_name(model)]:
        config["architectures"] = [plain_class_name(model)]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def upload(run: MlflowRun, directory: Path, artifact_path: str) -> None:
    """Log every file under ``directory`` as ``artifact_path/...``, one file at a time with a progress bar."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for path in tqdm(files, desc=f"MLflow {artifact_path}/", unit="file", disable=None):
        parent = path.parent.relative_to(directory).as_posix()
        run.client.log_artifact(
            run.run_id, str(path), artifact_path if parent == "." else posixpath.join(artifact_path, parent)
        )


def register(run: MlflowRun, artifact_path: str, name: str) -> str:
    """Register the logged folder as a new version of the registered model ``name``; returns the version."""
    try:
        run.client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = posixpath.join(run.client.get_run(run.run_id).info.artifact_uri, artifact_path)
    return run.client.create_model_version(name, source, run_id=run.run_id).version


class HFExport(pl.Callback):
    """At the end of ``fit`` (and optionally at each checkpoint), export the policy in Hugging Face format.

    On disk: ``dirpath`` holds ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
    processor files; ``transformers.JanusForConditionalGeneration.from_pretrained(dirpath)`` and
    ``AutoProcessor.from_pretrained(dirpath)`` load it without bicot. In MLflow the same folder is the
    ``policy/`` artifact. Under FSDP2 the full weights are gathered to rank 0's CPU first and only
    rank 0 writes and uploads.

    Args:
        dirpath: the export folder; ``None``: ``<default_root_dir>/outputs/<run id>/policy``.
        artifact_path: the MLflow artifact folder of the final export.
        log_artifact: upload the export to the run.
        every_checkpoint: also export whenever Lightning saves a checkpoint, to ``<dirpath>_steps/step_XXXXXX``
            and the artifact ``<artifact_path>_steps/step_XXXXXX``.
        register_name: register the final ``policy/`` artifact as a version of this MLflow registered model.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        artifact_path: str = "policy",
        log_artifact: bool = True,
        every_checkpoint: bool = False,
        register_name: str | None = None,
    ) -> None:
        self.dirpath, self.artifact_path, self.log_artifact = dirpath, artifact_path, log_artifact
        self.every_checkpoint, self.register_name = every_checkpoint, register_name
        self.exported: Path | None = None  # the last final export, for callers and tests

    def export_dir(self, trainer: pl.Trainer) -> Path:
        """Where the final export goes on this run."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        run = find_run(trainer)
        return Path(trainer.default_root_dir) / "outputs" / (run.run_id if run else "latest") / "policy"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.exported = self.export(trainer, pl_module, self.export_dir(trainer), self.artifact_path)
        run = find_run(trainer)
        if run is not None and self.log_artifact and self.register_name:
            version = register(run, self.artifact_path, self.register_name)
            rank_zero_info(
                f"HFExport: registered {self.artifact_path}/ as {self.register_name!r} version {version}"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if not self.every_checkpoint:
            return
        tag = f"step_{steps_trained(trainer):06d}"  # the weights the grid samples/step_XXXXXX shows
        final = self.export_dir(trainer)
        self.export(
            trainer,
            pl_module,
            final.with_name(final.name + "_steps") / tag,
            f"{self.artifact_path}_steps/{tag}",
        )

    def export(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: Path, artifact_path: str
    ) -> Path | None:
        """Gather (every rank), then save and upload (rank 0). Returns the folder on rank 0, else ``None``."""
        policy = pl_module.policy
        state = full_state_dict(policy.model)
        lora = getattr(policy, "lora", None)
        if lora is not None and trainer.is_global_zero:
            # Stock transformers knows no adapters: write the merged weights under stock names.
            full = state if state is not None else {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}
            state = merge_lora_state_dict(full, lora)
        saved = None
        if trainer.is_global_zero:
            saved = save_hf(policy.model, policy.processor, directory, state)
            rank_zero_info(f"HFExport: policy saved to {saved}")
        del state  # a full copy of the weights: free it before anything else allocates
        # the other ranks wait here, not inside a later collective, while rank 0 writes
        trainer.strategy.barrier("bicot_hf_export")
        run = find_run(trainer)
        if saved is not None and run is not None and self.log_artifact:
            upload(run, saved, artifact_path)
        return saved
