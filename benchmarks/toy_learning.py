"""Does BiCoT-GRPO learn in the toy world? Fits a config for several seeds and tabulates accuracy before/after.

    python benchmarks/toy_learning.py                       # configs/toy.yaml, seeds 0 1 2
    python benchmarks/toy_learning.py --seeds 0 --reuse     # tabulate runs already in the store

Each seed is one ``bicot fit`` (validation before the first step and after the last), run one after
another; the numbers are read back from MLflow. Writes a Markdown table (per category: validation
accuracy before -> after, mean +- std over seeds; mean training reward over the first and last tenth
of the steps) to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("color", "shape", "numeracy", "spatial", "complex", "reasoning")
EXPERIMENT = "bicot"


def fit(configs: list[str], seed: int, tracking_uri: str, run_name: str, extra: list[str]) -> float:
    """Run one ``bicot fit`` in a subprocess; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "bicot.cli", "fit"]
    for config in configs:
        cmd += ["-c", config]
    cmd += [
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        f"--trainer.logger.init_args.run_name={run_name}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def find_run(client: MlflowClient, run_name: str):
    """The newest finished run of that name, or ``None``."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.runName = '{run_name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def run_numbers(client: MlflowClient, run) -> dict[str, float]:
    """``acc/<cat>/before|after`` (validation at the first and last step), train reward early/late, minutes."""
    out: dict[str, float] = {}
    for key in ("all", *CATEGORIES):
        name = "val/accuracy" if key == "all" else f"val/accuracy/{key}"
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
        if len(history) >= 2:
            out[f"acc/{key}/before"], out[f"acc/{key}/after"] = history[0].value, history[-1].value
    rewards = sorted(client.get_metric_history(run.info.run_id, "train/reward"), key=lambda m: m.step)
    if rewards:
        tenth = max(1, len(rewards) // 10)
        out["reward/first"] = statistics.fmean(m.value for m in rewards[:tenth])
        out["reward/last"] = statistics.fmean(m.value for m in rewards[-tenth:])
    out["minutes"] = (run.info.end_time - run.info.start_time) / 60000
    return out


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` of the values (times ``scale``); std over seeds, 0 for one seed."""
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * scale:.{digits}f} ± {std * scale:.{digits}f}"


def learning_table(per_seed: list[dict[str, float]]) -> str:
    """Markdown: one row per category, accuracy before / after / change (points), mean ± std over seeds."""
    lines = ["| category | before | after | change |", "|---|---|---|---|"]
    for key in ("all", *CATEGORIES):
        before = [r[f"acc/{key}/before"] for r in per_seed if f"acc/{key}/before" in r]
        after = [r[f"acc/{key}/after"] for r in per_seed if f"acc/{key}/after" in r]
        change = [a - b for a, b in zip(after, before, strict=True)]
        lines.append(f"| {key} | {mean_std(before)} | {mean_std(after)} | {mean_std(change)} |")
    first = [r["reward/first"] for r in per_seed if "reward/first" in r]
    last = [r["reward/last"] for r in per_seed if "reward/last" in r]
    lines.append(f"| train reward (first / last tenth of steps) | {mean_std(first, 1, 3)} | {mean_std(last, 1, 3)} | "
                 f"{mean_std([b - a for a, b in zip(first, last, strict=True)], 1, 3)} |")
    return "\n".join(lines)


def run_seeds(configs: list[str], seeds: list[int], tracking_uri: str, tag: str, reuse: bool, extra: list[str]):
    """Fit (or, with ``reuse``, look up) one run per seed; returns each run's numbers."""
    client = MlflowClient(tracking_uri)
    per_seed = []
    for seed in seeds:
        name = f"{tag}-seed{seed}"
        run = find_run(client, name) if reuse else None
        if run is None:
            seconds = fit(configs, seed, tracking_uri, name, extra)
            print(f"{name}: {seconds / 60:.1f} min", flush=True)
            run = find_run(client, name)
        per_seed.append(run_numbers(client, run))
    return per_seed


def write_report(path: str, text: str) -> None:
    """Write a Markdown report under the repository (creating its folder) and print it."""
    out = REPO / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["configs/toy.yaml"], help="one or more -c files, in order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--tag", default="toy-learning", help="runs are named <tag>-seed<N>")
    parser.add_argument("--reuse", action="store_true", help="tabulate finished runs of the same name instead of refitting")
    parser.add_argument("--out", default="benchmarks/results/toy_learning.md")
    parser.add_argument("extra", nargs="*", help="more `bicot fit` arguments, after --")
    args = parser.parse_args()
    per_seed = run_seeds(args.config, args.seeds, args.tracking_uri, args.tag, args.reuse, args.extra)
    minutes = [r["minutes"] for r in per_seed]
    command = " ".join(["bicot fit", *(f"-c {c}" for c in args.config), *args.extra])
    text = (
        f"Validation accuracy (%, toy_orm = 1) on datamodules/toyworld/data/val.jsonl before and after `{command}`, "
        f"seeds {args.seeds}, mean ± std over seeds. Fit wall time {mean_std(minutes, 1)} min per seed.\n\n"
        + learning_table(per_seed)
        + "\n"
    )
    write_report(args.out, text)


if __name__ == "__main__":
    main()
