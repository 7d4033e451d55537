"""The `bicot` console script: LightningCLI over BiCoTGRPO and the prompt DataModule."""

from __future__ import annotations

import os
import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from bicot.grpo import BiCoTGRPO
from datamodules.prompts import PromptDataModule


class SaveConfigToRun(SaveConfigCallback):
    """Store the fully resolved config in the run: ``config/config.yaml`` in MLflow, or the log folder."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, "config/config.yaml")
                return
        if trainer.log_dir is not None:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, self.config_filename), "w") as f:
                f.write(text)


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
        super().__init__(
            BiCoTGRPO,
            PromptDataModule,
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
            run=run,
        )


def main(args: list[str] | None = None) -> None:
    """Entry point. Errors in configs or data end with one clear line; ``BICOT_DEBUG=1`` shows tracebacks."""
    try:
        BiCoTCLI(args=args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("BICOT_DEBUG") == "1":
            raise
        print(f"bicot: error: {err}", file=sys.stderr)
        print("bicot: set BICOT_DEBUG=1 to see the full traceback", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
