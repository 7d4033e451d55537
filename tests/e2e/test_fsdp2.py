"""FSDP2 on 2 and 4 CPU processes (gloo) takes the same steps as one process with the same seed, the static
rollout engine (over the weights gathered for the rollout) included."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from test_cli import REPO, bicot, run_in_process, tiny_args

COMPARED = (
    "train/loss", "train/reward", "train/kl", "train/kl_plan", "train/kl_image", "train/grad_norm", "train/plan_tokens"
)


def history(db, name: str) -> list[float]:
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])[0]
    assert run.info.status == "FINISHED"
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]


LORA_AND_CHECKPOINTING = (
    "--model.policy.init_args.lora.r=4",
    "--model.policy.init_args.lora.alpha=8",
    "--model.parallel.activation_checkpointing=true",
    "--model.lr=1e-2",
)
# the static-KV-cache engine in the FSDP2 processes only: against the eager loop of the single process
STATIC_ENGINE = ("--model.policy.init_args.sampling.engine=static",)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompts", "processes", "extra", "sharded_only"),
    [
        # Each launch costs a minute or more of a 2-core machine, so one launch varies everything at once from the
        # plain case (2 prompts on 2 processes, not run on its own): 1 prompt, its group of 4 samples split across
        # 4 processes (one row each); LoRA (the reference: adapters off) with activation checkpointing; the
        # processes roll out with the static engine, the single one with the eager loop
        (1, 4, LORA_AND_CHECKPOINTING, STATIC_ENGINE),
    ],
)
def test_several_processes_match_one_process(capsys, tmp_path, prompts, processes, extra, sharded_only):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    common = ("--trainer.max_steps=2", "--model.algo.num_generations=4", f"--data.batch_size={prompts}", *extra)
    code, err = run_in_process(capsys, single, *common)  # the single process: this one (no start-up to pay)
    assert code == 0, err[-3000:]
    fsdp = REPO / "configs" / "strategy" / "fsdp2.yaml"
    two = bicot("fit", *tiny_args(double, *common, *sharded_only), "-c", str(fsdp), f"--trainer.devices={processes}",
                cwd=double)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in COMPARED:
        a, b = history(single / "mlflow.db", name), history(double / "mlflow.db", name)
        assert len(a) == len(b) == 2, name
        # Same global batch, same per-row noise, gradients averaged over ranks with the global token
        # count: only float summation order differs. Measured differences are ~1e-7.
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), name
    assert history(single / "mlflow.db", "train/kl")[-1] > 0  # the policy moved, so the match is not trivial
    # the engine logs its compile time at every step: it sampled where it was asked to, and only there
    assert len(history(double / "mlflow.db", "time/engine_compile_s")) == (2 if sharded_only else 0)
    assert not history(single / "mlflow.db", "time/engine_compile_s")
    # group statistics on gathered rewards: the same fraction of all-equal groups either way
    assert history(single / "mlflow.db", "train/zero_std_frac") == history(double / "mlflow.db", "train/zero_std_frac")
    # and the same spreads (a spread over each process's rows, averaged, depended on the process count)
    for name in ("train/reward_std", "train/advantage_std"):
        spread = history(single / "mlflow.db", name)
        assert spread == pytest.approx(history(double / "mlflow.db", name), rel=1e-5, abs=1e-7), name


@pytest.mark.slow
def test_test_on_two_processes_scores_every_image_once_when_a_process_has_no_share(tmp_path):
    # 3 prompts in batches of 2: the last batch's one prompt leaves process 1 nothing to draw; it must still
    # take part in gathering the sharded weights (a hang before), and no image is counted twice or lost.
    prompts = tmp_path / "three.jsonl"
    prompts.write_text("".join((REPO / "datamodules/toyworld/data/test.jsonl").read_text().splitlines(True)[:3]))
    root = tmp_path / "scored"
    run = bicot("test", "-c", str(REPO / "tests/e2e/configs/tiny.yaml"), "-c", str(REPO / "configs/eval/toy.yaml"),
                "-c", str(REPO / "configs/strategy/fsdp2.yaml"), "--trainer.devices=2", f"--data.test_file={prompts}",
                "--data.val_batch_size=2", "--model.policy.init_args.predict_images_per_prompt=1",
                f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/m.db",
                cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (root / "test_scores" / "scores.csv").read_text().splitlines()
    assert [line.split(",")[2:4] for line in table[1:]] == [["color", "3"], ["all", "3"]]
    rows = [json.loads(line) for line in (root / "test_scores" / "scores.jsonl").read_text().splitlines()]
    images = [row["seed"] for row in rows]
    assert len(images) == len(set(images)) == 3
    # in the prompt file's order, as one process writes them (process 0 drew prompts 1 and 3, process 1 prompt 2)
    assert [row["prompt"] for row in rows] == [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
