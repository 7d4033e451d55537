"""The `bicot` console script: LightningCLI over BiCoTGRPO and the prompt DataModule."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from bicot.checkpointing import read_checkpoint_meta, recover_checkpoint
from bicot.grpo import BiCoTGRPO, NonFiniteError, check_even_shares
from bicot.progress import step_bar_for
from datamodules.prompts import PromptDataModule
from modules.rewards.ensemble import RewardExpertError

# Lightning warnings that describe bicot's deliberate choices, not problems: frozen towers stay in eval
# mode; checkpoints hold the post-step state; batches come from a sized iterable; no val prompts.
for _message in (
    r"Found \d+ module\(s\) in eval mode",
    r"Using ModelCheckpoint with manual optimization",
    r"Your `IterableDataset` has `__len__` defined",
    r"Total length of `list` across ranks is zero",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" lines, which advertise other tracking services on every run (bicot logs to
    MLflow); every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


# Lightning's rank-zero logger is whichever of these its packages imported last (each reassigns it on import).
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
              "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
              "lightning_utilities.core.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


class SaveConfigToRun(SaveConfigCallback):
    """Store the fully resolved config in the run: ``config/config.yaml`` in MLflow, or the log folder.

    A resumed run keeps the ``config/config.yaml`` that started it; a resume whose config differs adds its own
    beside it, ``config/config_resume_<k>.yaml`` (k = 1, 2, ...), so every stretch of steps keeps its config.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, config_artifact(logger, text))
                return
        if trainer.loggers and trainer.log_dir is not None:  # no logger: no run folder to write into
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, self.config_filename), "w") as f:
                f.write(text)


def config_artifact(logger: MLFlowLogger, text: str) -> str:
    """Where this config goes in the run: ``config/config.yaml``, or, in a run that has one (a resume),
    the next ``config/config_resume_<k>.yaml``; the same text as the last one written goes there again."""
    client, run_id = logger.experiment, logger.run_id
    saved = sorted(
        (a.path for a in client.list_artifacts(run_id, "config") if not a.is_dir),
        key=lambda path: (path != "config/config.yaml", len(path), path),
    )
    if "config/config.yaml" not in saved:
        return "config/config.yaml"
    last = saved[-1]
    with tempfile.TemporaryDirectory() as folder:
        if Path(client.download_artifacts(run_id, last, folder)).read_text() == text:
            return last
    return f"config/config_resume_{len(saved)}.yaml"


def fresh_run_name() -> str:
    """An MLflow-style run name ("bold-owl-123") drawn from fresh entropy: ``seed_everything`` has seeded
    ``random`` by the time MLflow would draw one, and every run would get the same name."""
    state = random.getstate()
    random.seed()
    try:
        from mlflow.utils.name_utils import _generate_random_name

        return _generate_random_name()
    except ImportError:  # a private helper: a plain unique name if it moves
        return f"run-{random.randrange(16**8):08x}"
    finally:
        random.setstate(state)


class BiCoTCLI(LightningCLI):
    """``bicot fit|validate|test|predict -c CONFIG [-c MORE] [--dotted.override=value]``.

    Configs are parsed in jsonargparse's ``omegaconf+`` mode: ``${model.x}`` interpolation is resolved
    once every source is merged, so a later ``-c`` file or a command-line override reaches the places
    that refer to it. Several ``-c`` files compose left to right (a recipe, then a fragment such as
    configs/strategy/fsdp2.yaml). Interpolation paths are absolute from the config's top level.
    """

    def __init__(self, args=None, run: bool = True) -> None:
        # Keep `${seed_everything}` meaning the top of the config file, not of the subcommand namespace.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        # A config may name its own root classes (`model.class_path`: a folder scorer, a diffusers
        # baseline); otherwise BiCoTGRPO and PromptDataModule take their init args directly.
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        other_model, other_data = names_class(argv, "model"), names_class(argv, "data")
        super().__init__(
            None if other_model else BiCoTGRPO,
            None if other_data else PromptDataModule,
            subclass_mode_model=other_model,
            subclass_mode_data=other_data,
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, "exit_on_error": False},
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything is built: a truncated or foreign file is one line, not a traceback.

        Lightning's own version loads the whole checkpoint (every tensor, into memory) to merge hyperparameters
        saved in it into the config. bicot's modules save none (the config is the record, kept in the run), so
        this one only reads the checkpoint's small entries, memory-mapped. ``fit`` reads them once, in
        :meth:`before_instantiate_classes`, after resolving ``last`` and recovering a checkpoint a crash left aside.
        ``validate``/``test``/``predict`` resolve ``last`` here the same way: where Lightning finds no last checkpoint
        it warns and evaluates the weights the run starts from."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand not in (None, "fit") else None
        ckpt_path = str(config.get("ckpt_path") or "") if config is not None else ""
        if ckpt_path and ckpt_path not in ("best", "hpc") and not ckpt_path.startswith("registry"):
            path = resolve_checkpoint(ckpt_path, config.trainer)
            config.ckpt_path = str(path)
            self._checkpoint_meta = read_checkpoint_meta(path)

    def before_instantiate_classes(self) -> None:
        """Resolving ``--ckpt_path`` early lets a resumed fit log into the MLflow run that wrote it. A run
        without a name gets a fresh one (MLflow's own draw would follow the seeded RNG: the same every run)."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        for logger in _mlflow_loggers(config.trainer.get("logger")):
            if logger.init_args.get("run_name") is None and logger.init_args.get("run_id") is None:
                logger.init_args.run_name = fresh_run_name()
        if self.subcommand == "fit":
            check_config_shares(config)
        if self.subcommand != "fit" or not config.get("ckpt_path"):
            return
        path = resolve_checkpoint(config.ckpt_path, config.trainer)
        config.ckpt_path = str(path)
        self._checkpoint_meta = read_checkpoint_meta(path)
        run_id = self._checkpoint_meta.get("mlflow_run_id")
        logger = config.trainer.get("logger")
        if run_id and isinstance(logger, Namespace) and logger.class_path.endswith("MLFlowLogger"):
            if logger.init_args.get("run_id") is None:
                logger.init_args.run_id = run_id
                logger.init_args.run_name = None  # the run has its name
                self._resumed_run = run_id

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, with the step bar (bicot/progress.py) in place of Lightning's default bar; a
        progress bar named in the config's callbacks stays."""
        given = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        # read before the trainer exists: Lightning appends its own callbacks to this very list
        given = [*(given if isinstance(given, list) else [given]), *(kwargs.get("callbacks") or [])]
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if bar is not None and not any(isinstance(c, ProgressBar) for c in given):
            step_bar = step_bar_for(bar)
            if step_bar is not None:
                trainer.callbacks[trainer.callbacks.index(bar)] = step_bar
        return trainer

    def check_inputs(self, stage: str) -> None:
        """Refuse a checkpoint of another model and read the stage's prompt files before any MLflow run is opened
        or resumed. Lightning checks both only after its loggers have started the run: a bad input left an empty
        FAILED run, or marked FAILED the FINISHED run a refused resume came from. Lightning's own ``setup`` then
        finds the prompts loaded."""
        meta = getattr(self, "_checkpoint_meta", None)
        if meta is not None and isinstance(self.model, BiCoTGRPO):
            self.model.check_checkpoint({"bicot": meta} if meta else {})
        if isinstance(self.datamodule, PromptDataModule):
            self.datamodule.setup(stage)

    def before_fit(self) -> None:
        self.check_inputs("fit")  # before the run the checkpoint came from is touched (its status, its config)
        check_checkpoint_folders(self.trainer)
        run_id = getattr(self, "_resumed_run", None)
        for logger in self.trainer.loggers:
            if run_id and isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero:
                logger.experiment.update_run(run_id, status="RUNNING")
                print(f"bicot: resuming MLflow run {run_id}", file=sys.stderr)

    def before_validate(self) -> None:
        self.check_inputs("validate")

    def before_test(self) -> None:
        self.check_inputs("test")

    def before_predict(self) -> None:
        self.check_inputs("predict")


def check_config_shares(config: Namespace) -> None:
    """Refuse, before any process starts, a training batch whose rollout rows do not split evenly over the
    processes the trainer config asks for (each process would stop at its first step, each saying so)."""
    trainer, model, data = config.get("trainer") or {}, config.get("model"), config.get("data")
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():  # the command line gives "2"
        devices = int(devices)
    algo = model.get("algo") if isinstance(model, Namespace) and "class_path" not in model else None
    batch = data.get("batch_size") if isinstance(data, Namespace) and "class_path" not in data else None
    group = algo.get("num_generations") if isinstance(algo, Namespace) else None
    world = None
    if isinstance(devices, int | list) and isinstance(nodes, int):
        world = (len(devices) if isinstance(devices, list) else devices) * nodes
    if isinstance(world, int) and isinstance(batch, int) and isinstance(group, int) and world >= 1:
        check_even_shares(batch, group, world)  # else ("auto" devices, another model or data class): the first step


def check_checkpoint_folders(trainer) -> None:
    """Refuse a ModelCheckpoint ``dirpath`` that cannot be written (below a file, read-only) before the first step;
    Lightning would find out at the first save, with the steps before it paid for and lost."""
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if not dirpath or "://" in str(dirpath):  # set by Lightning at setup, or a remote filesystem
            continue
        folder = Path(dirpath).expanduser()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "is not a folder" if not existing.is_dir() else "is not writable"
            raise ValueError(f"ModelCheckpoint dirpath {str(folder)!r} cannot be written: {str(existing)!r} {why}")


def _mlflow_loggers(node) -> list[Namespace]:
    """The MLFlowLogger entries of a config's ``trainer.logger`` (one entry or a list)."""
    nodes = node if isinstance(node, list) else [node]
    return [n for n in nodes if isinstance(n, Namespace) and str(n.get("class_path", "")).endswith("MLFlowLogger")]


def names_class(argv: list[str], key: str) -> bool:
    """Whether the command line or a ``-c``/``--config`` file gives ``<key>.class_path``."""
    for i, arg in enumerate(argv):
        if arg.startswith((f"--{key}.class_path", f"--{key}=")):
            return True
        config = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        if config and Path(config).is_file():
            try:
                node = yaml.safe_load(Path(config).read_text())
            except yaml.YAMLError as err:  # jsonargparse would name "<unicode string>", not the file
                mark = getattr(err, "problem_mark", None)
                where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err)
                raise ValueError(f"{config}{where}: not valid YAML ({problem})") from None
            if not isinstance(node, dict):  # jsonargparse would say "Unexpected config" and not name the file
                what = "nothing" if node is None else f"a {type(node).__name__}"
                raise ValueError(f"{config}: not a config (a YAML mapping of trainer, model, data ...); it holds {what}")
            if isinstance(node.get(key), dict) and "class_path" in node[key]:
                return True
    return False


def resolve_checkpoint(ckpt_path: str, trainer_config: Namespace) -> Path:
    """``last`` -> the newest ``last.ckpt`` (or Lightning's versioned ``last-vN.ckpt``, written when a fresh run
    found an older run's ``last.ckpt``) in the config's ModelCheckpoint dirpath; otherwise the path itself."""
    if ckpt_path == "last":
        for callback in trainer_config.get("callbacks") or []:
            if isinstance(callback, Namespace) and callback.class_path.endswith("ModelCheckpoint"):
                dirpath = callback.init_args.get("dirpath")
                if not dirpath:
                    continue
                recover_checkpoint(Path(dirpath) / "last.ckpt")  # a crash mid-swap left it renamed aside
                found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
                if found:
                    return found[-1]
        raise FileNotFoundError(
            "--ckpt_path=last: no last.ckpt found; give the checkpoint's path, or configure a "
            "ModelCheckpoint with a fixed dirpath and save_last: true (configs/toy.yaml does)"
        )
    path = Path(ckpt_path).expanduser()
    recover_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path: checkpoint not found: {str(path)!r}")
    return path


# Failures caused by what the user gave (configs, data, checkpoints): one line, no traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,  # a path through a file (an output folder, a store), named in the message
    IsADirectoryError,
    PermissionError,
    MisconfigurationException,
    RewardExpertError,
    NonFiniteError,
    ArgumentError,  # jsonargparse's, raised (exit_on_error: False) rather than printed after the whole usage
)


# the lines of jsonargparse's Union report that are not reasons
_UNION_REPORT = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
)


def user_message(err: BaseException) -> str:
    """The error as one line, led by the config key it concerns.

    jsonargparse reports a value refused by a field that may also be ``None`` (``algo``, ``sampling``,
    ``trainer.precision``) on every member of the Union, with a dump of the value: only the members' reasons
    are kept, without the ``NoneType`` one, and the given value where it is short.
    """
    text, key = str(err), None
    lead = re.match(r'\s*Parser key "([^"]+)":\s*\n', text)
    if lead:
        key, text = lead.group(1), text[lead.end() :]
    if "Does not validate against any of the Union subtypes" in text:
        reasons: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("- "):
                reasons.append(line[2:])
            elif reasons and line and not line.startswith(_UNION_REPORT):
                reasons[-1] += " " + line  # a reason's nested lines
        reasons = [r for r in dict.fromkeys(reasons) if not r.startswith(_UNION_REPORT)]
        given = re.findall(r"\n\s*Given value: (.*)", text)
        value = given[-1].strip() if given else ""
        if reasons:
            text = "; ".join(reasons)
            if value and len(value) < 80 and not value.startswith(("Namespace(", "NestedArg(")):
                text += f" (got {value})"
    text = " ".join(text.split())
    return f"{key}: {text}" if key else text


def main(args: list[str] | None = None) -> None:
    """Entry point. Errors in configs or data end with one clear line; ``BICOT_DEBUG=1`` shows tracebacks."""
    try:
        BiCoTCLI(args=args)
    except SIGTERMException:
        # Lightning raises this (a SystemExit without a code, i.e. status 0) after a SIGTERM stop.
        print(
            "bicot: stopped by SIGTERM after saving a checkpoint; resume with --ckpt_path=last",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)
    except USER_ERRORS as err:
        if os.environ.get("BICOT_DEBUG") == "1":
            raise
        print(f"bicot: error: {user_message(err)}", file=sys.stderr)
        if isinstance(err, ArgumentError):  # the command line or a config file: point at the options
            print("bicot: the options: bicot --help, bicot fit --help", file=sys.stderr)
        else:
            print("bicot: set BICOT_DEBUG=1 to see the full traceback", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
