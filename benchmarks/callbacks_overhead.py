"""How much the review callbacks slow a training step when sample grids are rare: same process, with vs without.

Runs ``configs/toy.yaml`` fits alternately with its ``trainer.callbacks`` (SampleGrid's ``every_n_steps`` set
very large) and with none, several rounds, every fit logging to its own MLflow store. A step's time is the
interval between consecutive ``on_train_batch_start`` hooks, so it holds everything a step does: the
module's work, every callback hook and the logger's writes. The first intervals (warm-up, and the one
grid drawn at step 0) are left out; one-off costs (set-up, the step-0 grid, the final grid and export)
are reported separately. On a busy shared machine the A/B ratio is noisy, so the time spent inside the
callbacks' batch hooks is also measured within each step and reported as a fraction of that step.

    python benchmarks/callbacks_overhead.py [--steps 14] [--rounds 3] [--warmup 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from bicot.cli import BiCoTCLI

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "configs" / "toy.yaml"


class StepClock(pl.Callback):
    """Records the start of every training batch, the end of fit, and the time spent in other callbacks'
    batch hooks per step (:meth:`watch`)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # process CPU time: less sensitive than wall time to other jobs
        self.hook_s: dict[int, float] = {}
        self.log_s: dict[int, float] = {}  # the loggers' writes of each step's metrics
        self.fit_start = self.fit_end = 0.0

    def watch_logger(self, logger) -> None:
        """Time ``logger.log_metrics``, charged to the current step."""
        original = logger.log_metrics

        def timed(*args, **kwargs):
            start = time.perf_counter()
            original(*args, **kwargs)
            step = len(self.starts) - 1
            self.log_s[step] = self.log_s.get(step, 0.0) + time.perf_counter() - start

        logger.log_metrics = timed

    def watch(self, callback: pl.Callback) -> None:
        """Time ``callback``'s batch hooks, charged to the current step (this clock must run first)."""
        for hook in ("on_train_batch_start", "on_train_batch_end"):
            original = getattr(callback, hook)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                _original(*args, **kwargs)
                step = len(self.starts) - 1
                self.hook_s[step] = self.hook_s.get(step, 0.0) + time.perf_counter() - start

            setattr(callback, hook, timed)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_end = time.perf_counter()


def overlay(workdir: Path, with_callbacks: bool) -> Path:
    """A config fragment: toy.yaml's callbacks with rare grids, or no callbacks at all."""
    callbacks = []
    if with_callbacks:
        callbacks = yaml.safe_load(TOY.read_text())["trainer"]["callbacks"]
        for cb in callbacks:
            if cb["class_path"].endswith("SampleGrid"):
                cb.setdefault("init_args", {})["every_n_steps"] = 10**9
            if cb["class_path"].endswith("HFExport"):
                cb.setdefault("init_args", {})["dirpath"] = str(workdir / "export")
    path = workdir / "overlay.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def one_fit(with_callbacks: bool, steps: int) -> tuple[StepClock, float]:
    """One fit in a fresh temp folder; returns its clock and the last ``train/reward``."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(REPO):
        workdir = Path(tmp)
        args = [
            "-c", str(TOY), "-c", str(overlay(workdir, with_callbacks)),
            f"--trainer.max_steps={steps}",
            f"--trainer.logger.init_args.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            f"--trainer.logger.init_args.artifact_location={workdir / 'artifacts'}",
            f"--trainer.default_root_dir={workdir}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            cli = BiCoTCLI(args=args, run=False)
            clock = StepClock()
            for callback in cli.trainer.callbacks:
                if type(callback).__module__.startswith("callbacks."):
                    clock.watch(callback)
            cli.trainer.callbacks.insert(0, clock)
            for logger in cli.trainer.loggers:
                clock.watch_logger(logger)
            cli.trainer.fit(cli.model, cli.datamodule)
        return clock, float(cli.trainer.callback_metrics["train/reward"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="training steps per fit")
    parser.add_argument("--rounds", type=int, default=3, help="fits per variant, alternating")
    parser.add_argument(
        "--warmup", type=int, default=2, help="step intervals left out at the start of each fit"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {True: [], False: []}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)  # drift on a shared machine hits both
        for with_callbacks in order:
            clock, reward = one_fit(with_callbacks, args.steps)
            runs[with_callbacks].append((clock, reward))
            timed = intervals(clock)[args.warmup :]
            label = "with   " if with_callbacks else "without"
            print(f"round {round_} {label}: median step {statistics.median(timed):.4f} s, "
                  f"fit {clock.fit_end - clock.fit_start:.2f} s", flush=True)  # fmt: skip
    report(runs, args)


def intervals(clock: StepClock, cpu: bool = False) -> list[float]:
    """Seconds from each batch start to the next (wall, or this process's CPU): one step, everything in it."""
    marks = clock.cpu_starts if cpu else clock.starts
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def median_step(clocks: list[StepClock], warmup: int, cpu: bool = False) -> float:
    """Median step time over the fits, leaving out each fit's first ``warmup`` steps."""
    return statistics.median(t for clock in clocks for t in intervals(clock, cpu)[warmup:])


def report(runs: dict[bool, list], args) -> None:
    clocks = {k: [clock for clock, _ in v] for k, v in runs.items()}
    wall = {k: median_step(v, args.warmup) for k, v in clocks.items()}
    cpu = {k: median_step(v, args.warmup, cpu=True) for k, v in clocks.items()}
    # each round ran both variants back to back: their ratio sees the same load on the machine
    paired = [
        median_step([w], args.warmup) / median_step([wo], args.warmup)
        for w, wo in zip(clocks[True], clocks[False], strict=True)
    ]
    # within the same steps: the callbacks' own hook time over the step's time
    hook = [c.hook_s.get(i, 0.0) for c in clocks[True] for i in range(args.warmup, len(c.starts) - 1)]
    step = [t for c in clocks[True] for t in intervals(c)[args.warmup :]]
    fractions = [h / t for h, t in zip(hook, step, strict=True)]
    writes = {
        k: statistics.median(c.log_s.get(i, 0.0) for c in v for i in range(args.warmup, len(c.starts) - 1))
        for k, v in clocks.items()
    }
    first = {k: statistics.median(intervals(c)[0] for c in v) for k, v in clocks.items()}
    total = {k: statistics.median(c.fit_end - c.fit_start for c in v) for k, v in clocks.items()}
    rewards = {k: [reward for _, reward in v] for k, v in runs.items()}
    print(f"\n{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} torch threads, "
          f"{len(step)} timed steps per variant (SampleGrid every_n_steps = 1e9)")  # fmt: skip
    print(
        f"median step wall time   with / without: {wall[True]:.4f} s / {wall[False]:.4f} s = {wall[True] / wall[False]:.3f}"
    )
    print(
        f"median step CPU time    with / without: {cpu[True]:.4f} s / {cpu[False]:.4f} s = {cpu[True] / cpu[False]:.3f}"
    )
    print(f"per-round wall ratios (back to back)  : {', '.join(f'{r:.3f}' for r in paired)}; "
          f"median {statistics.median(paired):.3f}")  # fmt: skip
    print(f"callback hooks inside a step          : median {1000 * statistics.median(hook):.2f} ms = "
          f"{100 * statistics.median(fractions):.2f}% of the step (max {100 * max(fractions):.2f}%)")  # fmt: skip
    print(
        f"MLflow metric writes per step         : {1000 * writes[True]:.2f} ms vs {1000 * writes[False]:.2f} ms"
    )
    print(f"first step (holds the step-0 grid)    : {first[True]:.3f} s vs {first[False]:.3f} s")
    print(f"whole fit (set-up, final grid, export): {total[True]:.2f} s vs {total[False]:.2f} s")
    print(f"training unchanged (same last train/reward in every fit): {rewards[True] == rewards[False]}")


if __name__ == "__main__":
    main()
