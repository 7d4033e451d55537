"""Bad input stops the run with one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_cli import E2E_CONFIGS, PROMPTS, REPO, bicot, cli_in_process, run_in_process, tiny_args  # noqa: I001

from bicot.cli import main
from datamodules.prompts import PromptDataError, load_prompts

GOOD = {"prompt": "a red circle", "task_type": "color", "nouns": ["circle"]}


def prompt_file(tmp_path, lines: list[str], name: str = "prompts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


BAD_PROMPT_FILES = [
    ([], "holds no prompts"),
    ([json.dumps(GOOD), "{not json"], "line 2"),
    ([json.dumps({**GOOD, "prompt": 3})], "prompt"),
    ([json.dumps({**GOOD, "numeracy_info": {"obj_name": "cup", "num": 2}})], "numeracy_info"),
    ([json.dumps({**GOOD, "spatial_info": {"obj1": "a", "obj2": "b", "locality": "inside"}})], "locality"),
    ([json.dumps({"task_type": "color"})], "prompt"),
]


@pytest.mark.parametrize(("lines", "named"), BAD_PROMPT_FILES)
def test_bad_prompt_files(capsys, tmp_path, lines, named):
    path = prompt_file(tmp_path, lines)
    code, err = run_in_process(capsys, tmp_path, f"--data.train_file={path}")
    assert code != 0
    assert named in err and str(path) in err
    assert "Traceback" not in err


def test_missing_prompt_file(capsys, tmp_path):
    code, err = run_in_process(capsys, tmp_path, f"--data.train_file={tmp_path / 'absent.jsonl'}")
    assert code != 0 and "absent.jsonl" in err and "not found" in err


def expert_fragment(tmp_path, body: str):
    path = tmp_path / "experts.yaml"
    path.write_text(body)
    return ["-c", str(path)]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("model:\n  rewards:\n    experts:\n      - class_path: modules.rewards.nonexistent.Expert\n", "nonexistent"),
        ("model:\n  rewards:\n    weights: {color: -1.0}\n", "color"),
        ("model:\n  rewards:\n    weights: {colour: 1.0}\n", "colour"),
        ("model:\n  rewards:\n    weights: {color: .nan}\n", "color"),
    ],
)
def test_bad_experts_and_weights(capsys, tmp_path, body, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path), *expert_fragment(tmp_path, body)])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.policy.init_args.tiny.image_size=30", "patch_size"),
        ("--model.algo.beta=-0.1", "beta"),
        ("--model.algo.num_generations=1", "num_generations"),
        ("--model.policy.init_args.sampling.image_top_p=1.5", "image_top_p"),
        ("--model.algo.betta=0.1", "model.algo: Problem with given class_path 'bicot.loss.GRPOConfig': Option 'betta'"),
        ("--trainer.precision=bf17", "trainer.precision: "),
        ("--model.lr=0", "lr"),
        ("--data.batch_size=0", "batch_size"),
    ],
)
def test_bad_values(capsys, tmp_path, override, named):
    code, err = run_in_process(capsys, tmp_path, override)
    assert code != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("bicot: error:")]
    assert named in line and "Union" not in err and "Given value" not in err  # the reason, not jsonargparse's report
    assert "usage:" not in err  # a parse error is one line too, without the ~80 lines of usage


def test_a_folder_that_is_not_a_janus_checkpoint(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run_in_process(
        capsys,
        tmp_path,
        "--model.policy.init_args.tiny=null",
        f"--model.policy.init_args.model_name_or_path={tmp_path / 'ckpt'}",
    )
    assert code != 0 and "not a Janus checkpoint" in err and "Traceback" not in err


def test_a_failing_expert_is_named_and_the_logged_metrics_survive(tmp_path):
    """A process on purpose (the other fits here run in this one): the console command's own exit status, its one
    line on stderr, and the MLflow run marked FAILED by a process that then ends."""
    fragment = tmp_path / "explode.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "rewards": {
                        "experts": [
                            {"class_path": "modules.rewards.color.ColorMatchExpert"},
                            {"class_path": "fault_experts.Exploding"},
                        ]
                    }
                }
            }
        )
    )
    result = bicot("fit", *tiny_args(tmp_path), "-c", str(fragment), cwd=tmp_path, env={"PYTHONPATH": str(E2E_CONFIGS.parent)})
    assert result.returncode != 0
    assert "exploding" in result.stderr and "a red circle" in result.stderr.lower() or "first prompt" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    assert run.info.status == "FAILED"


def nan_fragment(tmp_path, calls: list[int]):
    fragment = tmp_path / "nan.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {"model": {"rewards": {"experts": [{"class_path": "fault_experts.NaNAtCalls", "init_args": {"calls": calls}}]}}}
        )
    )
    return ["-c", str(fragment)]


def test_a_nan_reward_skips_that_update_only(capsys, tmp_path):
    code, err = run_in_process(capsys, tmp_path, "--trainer.max_steps=3", *nan_fragment(tmp_path, [1]))
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    skipped = sorted(client.get_metric_history(run.info.run_id, "train/skipped_steps"), key=lambda m: m.step)
    # max_steps counts optimizer steps: the skipped batch does not count, so 4 batches make 3 steps.
    assert [m.value for m in skipped] == [0.0, 1.0, 1.0, 1.0]
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    finite = [m.value == m.value for m in losses]  # NaN marks the step whose update was skipped
    assert finite == [True, False, True, True]


def test_nan_rewards_in_a_row_stop_the_run(capsys, tmp_path):
    args = ("--trainer.max_steps=10", "--model.max_consecutive_skips=2", *nan_fragment(tmp_path, [1, 2, 3, 4, 5, 6]))
    code, err = run_in_process(capsys, tmp_path, *args)
    assert code != 0
    assert "2 updates in a row were skipped" in err and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    assert run.info.status == "FAILED"
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert losses[0].step == 0 and losses[0].value == losses[0].value  # the good first step is kept


def random_json_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null", "list", "dict"] if depth < 2 else ["str", "int", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice("ab {}%s\\\"'\n\u00e9_") for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "float":
        return rng.choice([0.5, float("nan"), -1.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["prompt", "task_type", "nouns", "attr_nouns", "spatial_info", "numeracy_info", "obj1", "locality", "x"]
    return {rng.choice(keys): random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_fuzzed_prompt_files_either_load_or_raise_a_prompt_data_error(tmp_path):
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "rejected": 0}
    for i in range(300):
        path = tmp_path / f"fuzz{i}.jsonl"
        if i % 3 == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
        else:
            rows = [random_json_value(rng) for _ in range(rng.randint(1, 4))]
            if i % 3 == 2:  # valid records carrying random extra fields, which must be kept, not choked on
                rows = [{**GOOD, "note": random_json_value(rng)} for _ in rows]
            path.write_text("\n".join(json.dumps(r) for r in rows))
        try:
            records = load_prompts(path)
        except PromptDataError as err:
            assert path.name in str(err)
            outcomes["rejected"] += 1
        else:
            assert records and all(isinstance(r.prompt, str) and r.prompt for r in records)
            outcomes["loaded"] += 1
    assert outcomes["loaded"] > 0 and outcomes["rejected"] > 0  # the fuzzer reached both outcomes


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_prompt_files_through_the_cli(capsys, tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(64)) if seed == 0 else b'{"prompt": ["x"]}\n')
    code, err = run_in_process(capsys, tmp_path, f"--data.train_file={path}")
    assert code != 0 and "fuzz.jsonl" in err and "Traceback" not in err


def test_a_failing_expert_can_score_zero_and_be_counted(capsys, tmp_path):
    fragment = tmp_path / "explode_zero.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "rewards": {
                        "on_error": "zero",
                        "experts": [
                            {"class_path": "modules.rewards.color.ColorMatchExpert"},
                            {"class_path": "fault_experts.Exploding"},
                        ],
                    }
                }
            }
        )
    )
    code, err = run_in_process(capsys, tmp_path, "-c", str(fragment))
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    errors = sorted(client.get_metric_history(run.info.run_id, "train/expert_errors/exploding"), key=lambda m: m.step)
    assert [m.value for m in errors] == [1.0, 2.0]
    assert all(m.value == 0 for m in client.get_metric_history(run.info.run_id, "train/reward/exploding"))


def checkpointing(tmp_path, dirpath=None):
    """A config fragment that checkpoints every step into ``dirpath`` (default ``tmp_path/ckpt``)."""
    fragment = tmp_path / "ckpt.yaml"
    fragment.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "enable_checkpointing": True,
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": str(dirpath or tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 1},
                        }
                    ],
                }
            }
        )
    )
    return ["-c", str(fragment)]


def only_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bicot")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_resume_with_a_bad_prompt_file_leaves_the_run_as_it_was(capsys, tmp_path):
    code, err = run_in_process(capsys, tmp_path, *checkpointing(tmp_path))
    assert code == 0, err[-3000:]
    client, (before,) = only_run(tmp_path)
    for bad in ("absent.jsonl", "malformed.jsonl"):
        (tmp_path / "malformed.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
        resume = ("--ckpt_path=last", "--trainer.max_steps=3", f"--data.train_file={tmp_path / bad}")
        code, err = run_in_process(capsys, tmp_path, *checkpointing(tmp_path), *resume)
        assert code != 0 and bad in err and "Traceback" not in err
        (after,) = client.search_runs([before.info.experiment_id])
        assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time), bad
        assert [a.path for a in client.list_artifacts(after.info.run_id, "config")] == ["config/config.yaml"]


@pytest.mark.parametrize(
    ("subcommand", "named"),
    [("fit", "absent.jsonl"), ("validate", "data.val_file"), ("test", "data.test_file"), ("predict", "data.predict_file")],
)
def test_missing_prompts_open_no_mlflow_run(capsys, tmp_path, subcommand, named):
    args = tiny_args(tmp_path, f"--data.train_file={tmp_path / 'absent.jsonl'}")
    code, _, err = cli_in_process(capsys, tmp_path, subcommand, *args)
    assert code != 0 and named in err and "Traceback" not in err
    assert only_run(tmp_path)[1] == []  # no empty FAILED run in the store


def test_evaluation_refuses_a_missing_or_foreign_checkpoint_before_opening_a_run(capsys, tmp_path):
    """Lightning evaluates the starting weights after a warning where ``--ckpt_path=last`` finds nothing, and
    checks the model only once the run is open."""
    prompts = [f"--data.{split}_file={tmp_path / 'absent.jsonl'}" for split in ("val", "test", "predict")]
    for subcommand in ("validate", "test", "predict"):
        code, _, err = cli_in_process(capsys, tmp_path, subcommand, *tiny_args(tmp_path, *prompts, "--ckpt_path=last"))
        assert code != 0 and "no last.ckpt found" in err and "Traceback" not in err, subcommand
        assert only_run(tmp_path)[1] == []
    code, err = run_in_process(capsys, tmp_path, *checkpointing(tmp_path))
    assert code == 0, err[-3000:]
    foreign = ("--ckpt_path=last", "--model.policy.init_args.tiny.hidden_size=64", f"--data.val_file={tmp_path / 'absent.jsonl'}")
    code, _, err = cli_in_process(capsys, tmp_path, "validate", *tiny_args(tmp_path, *checkpointing(tmp_path), *foreign))
    assert code != 0 and "another model" in err and "Traceback" not in err
    assert len(only_run(tmp_path)[1]) == 1  # the fit's run alone


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_the_first_step(capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    code, err = run_in_process(capsys, tmp_path, *checkpointing(tmp_path, tmp_path / "a_file" / "ckpt"))
    assert code != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("bicot: error:")]
    assert "ModelCheckpoint" in line and str(tmp_path / "a_file") in line
    assert only_run(tmp_path)[1] == []  # refused before any step was paid for


def test_a_prediction_folder_under_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    args = tiny_args(
        tmp_path,
        "-c",
        str(REPO / "configs" / "eval" / "plain.yaml"),
        f"--data.predict_file={PROMPTS}",
        "--data.max_prompts=1",
        f"--trainer.callbacks.init_args.output_dir={tmp_path / 'a_file' / 'out'}",
    )
    code, _, err = cli_in_process(capsys, tmp_path, "predict", *args)
    assert code != 0 and "Traceback" not in err
    assert str(tmp_path / "a_file") in err and "Not a directory" in err


@pytest.mark.parametrize(("text", "holds"), [("", "nothing"), ("- a\n- b\n", "a list"), ("just words\n", "a str")])
def test_a_config_file_that_is_not_a_mapping_is_named(capsys, tmp_path, text, holds):
    config = tmp_path / "odd.yaml"
    config.write_text(text)
    code, err = run_in_process(capsys, tmp_path, "-c", str(config))
    assert code != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("bicot: error:")]
    assert str(config) in line and holds in line


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(capsys, tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04" + bytes(200))  # the start of a zip archive, as a crash mid-copy leaves it
    for path in (tmp_path / "notes.ckpt", truncated):
        args = tiny_args(tmp_path, f"--data.val_file={tmp_path / 'absent.jsonl'}", f"--ckpt_path={path}")
        code, _, err = cli_in_process(capsys, tmp_path, "validate", *args)
        assert code != 0 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if line.startswith("bicot: error:")]
        assert str(path) in line and "not a complete checkpoint file" in line and "mmap" not in line


def test_a_reward_expert_pointed_at_the_policys_folder_is_refused(capsys, tmp_path):
    """transformers would only warn, and the CLIP expert would score every image with a random model (exit 0)."""
    fragment = tmp_path / "clip.yaml"
    clip = {"class_path": "modules.rewards.clipscore.CLIPScoreExpert", "init_args": {"model_name_or_path": str(REPO / "checkpoints" / "toy")}}
    fragment.write_text(yaml.safe_dump({"model": {"rewards": {"experts": [clip]}}}))
    code, err = run_in_process(capsys, tmp_path, "-c", str(fragment))
    assert code != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("bicot: error:")]
    assert "'clipscore'" in line and "model_type 'janus'" in line
