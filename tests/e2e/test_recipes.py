"""The paper recipes: they parse with --print_config, and fit one step end to end on tiny local checkpoints."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_store import store_uri

from bicot.cli import main
from modules.rewards.tiny import save_tiny_git, save_tiny_grounding_dino, save_tiny_hps, save_tiny_orm

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "t2i_r1_janus_pro_7b.yaml"
ONE_GPU = REPO / "configs" / "janus_pro_1b_1gpu.yaml"
SAMPLE = REPO / "datamodules" / "fixtures" / "t2i_r1_sample.jsonl"
EXPERT_NAMES = ["hps", "gdino", "git", "orm"]
EXPERT_CLASSES = [
    "modules.rewards.hps.HPSExpert",
    "modules.rewards.grounding.GroundingDinoExpert",
    "modules.rewards.git_vqa.GitVQAExpert",
    "modules.rewards.orm.ORMExpert",
]


def printed_config(recipe: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", str(recipe), "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", [PAPER, ONE_GPU], ids=["7b", "1b_1gpu"])
def test_recipe_parses_with_the_papers_algorithm(recipe, capsys):
    config = printed_config(recipe, capsys)
    model = config["model"]
    assert model["lr"] == pytest.approx(1e-6)
    assert model["algo"]["beta"] == pytest.approx(0.01) and model["algo"]["kl_estimator"] == "k3"
    assert model["algo"]["num_generations"] == 8 and model["algo"]["mu"] == 1
    sampling = model["policy"]["init_args"]["sampling"]
    assert sampling["cfg_scale"] == 5.0
    # the paper's plans: transformers' default top_k of 50 in its generate() call; its images: no top-k
    assert sampling["plan_top_k"] == 50 and sampling["image_top_k"] == 0
    assert model["policy"]["init_args"]["trainable"] == ["language_model", "lm_head"]
    assert [e["class_path"] for e in model["rewards"]["init_args"]["experts"]] == EXPERT_CLASSES
    assert model["rewards"]["init_args"]["weights"] is None  # equal weights, 1.0 each
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["train_file"].endswith("t2i_r1/geneval_and_t2i_data_final.jsonl")
    assert config["trainer"]["logger"]["init_args"]["tracking_uri"] == "sqlite:///mlflow.db"
    # what the README's "Resume and faults" promises: SIGTERM / Ctrl+C write last.ckpt; checkpoint writes are
    # atomic (one process: the plugin; FSDP2 swaps its checkpoint folders into place itself)
    assert "callbacks.faults.GracefulStop" in [c["class_path"] for c in config["trainer"]["callbacks"]]
    strategy = config["trainer"].get("strategy")
    fsdp2 = isinstance(strategy, dict) and strategy["class_path"] == "bicot.parallel.FSDP2Strategy"
    plugins = [p["class_path"] for p in config["trainer"].get("plugins") or []]
    assert fsdp2 or "bicot.checkpointing.AtomicCheckpointIO" in plugins


def test_7b_recipe_is_the_papers_run(capsys):
    config = printed_config(PAPER, capsys)
    assert config["model"]["policy"]["init_args"]["model_name_or_path"] == "deepseek-community/Janus-Pro-7B"
    assert config["data"]["batch_size"] == 16  # 16 prompts x 8 samples = 128 images per optimizer step
    assert config["trainer"]["max_steps"] == 1600
    # the static engine over the weights FSDP2 gathers per rollout (the one-step fit below runs it on CPU)
    assert config["model"]["policy"]["init_args"]["sampling"]["engine"] == "static"
    assert (
        config["trainer"]["devices"] == 8
        and config["trainer"]["strategy"]["class_path"] == "bicot.parallel.FSDP2Strategy"
    )


def test_1b_recipe_is_sized_for_one_gpu(capsys):
    config = printed_config(ONE_GPU, capsys)
    assert config["model"]["policy"]["init_args"]["model_name_or_path"] == "deepseek-community/Janus-Pro-1B"
    assert config["trainer"]["devices"] == 1
    orm = config["model"]["rewards"]["init_args"]["experts"][3]["init_args"]
    assert orm["placement"] == "offload"
    # Fewer prompts per step, proportionally more steps: the same prompts seen as the paper's run.
    assert config["data"]["batch_size"] * config["trainer"]["max_steps"] == 16 * 1600


def test_missing_expert_checkpoint_stops_at_start_up(tmp_path, monkeypatch, capsys, tiny_janus_dir):
    monkeypatch.chdir(tmp_path)  # the recipe's relative weights/HPS_v2.1_compressed.pt does not exist here
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "-c",
                str(ONE_GPU),
                f"--model.policy.init_args.model_name_or_path={tiny_janus_dir}",
                "--trainer.accelerator=cpu",
                f"--trainer.logger.init_args.tracking_uri={store_uri(tmp_path)}",
            ]
        )
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "reward expert 'hps'" in message and "weights/HPS_v2.1_compressed.pt" in message
    assert "huggingface-cli download xswu/HPSv2" in message


# ----------------------------------------------------------------------------- one step on tiny checkpoints


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_experts")
    checkpoint, tokenizer, arch, _ = save_tiny_hps(root / "hps")
    return {
        "modules.rewards.hps.HPSExpert": {
            "checkpoint": str(checkpoint),
            "tokenizer": str(tokenizer),
            "arch": asdict(arch),
        },
        "modules.rewards.grounding.GroundingDinoExpert": {
            "model_name_or_path": str(save_tiny_grounding_dino(root / "gdino"))
        },
        "modules.rewards.git_vqa.GitVQAExpert": {"model_name_or_path": str(save_tiny_git(root / "git"))},
        "modules.rewards.orm.ORMExpert": {"model_name_or_path": str(save_tiny_orm(root / "orm"))},
    }


def with_tiny_checkpoints(recipe: Path, out: Path, janus_dir: Path, experts: dict) -> Path:
    """The recipe with only its checkpoint paths swapped for tiny local ones (and checkpoints kept in ``out``)."""
    config = yaml.safe_load(recipe.read_text())
    config["model"]["policy"]["model_name_or_path"] = str(janus_dir)
    for expert in config["model"]["rewards"]["experts"]:
        expert["init_args"].update(experts[expert["class_path"]])
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / "checkpoints")
    path = out / recipe.name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [PAPER, ONE_GPU], ids=["7b", "1b_1gpu"])
def test_recipe_fits_one_step_on_tiny_checkpoints(
    recipe, tmp_path, monkeypatch, tiny_janus_dir, tiny_experts
):
    monkeypatch.chdir(tmp_path)  # exports and logs land here
    config = with_tiny_checkpoints(recipe, tmp_path, tiny_janus_dir, tiny_experts)
    main(
        [
            "fit",
            "-c",
            str(config),
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.max_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.tracking_uri={store_uri(tmp_path)}",
            f"--data.train_file={SAMPLE}",
            "--data.batch_size=2",
            # Short plans keep a CPU step brief; the recipe's own plan length is checked by --print_config.
            "--model.policy.init_args.sampling.plan_max_tokens=8",
        ]
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bicot").experiment_id])
    metrics = run.data.metrics
    for name in EXPERT_NAMES:
        assert 0.0 <= metrics[f"train/reward/{name}"] <= 1.0, name
    assert 0.0 <= metrics["train/reward"] <= 4.0  # four experts, weight 1 each
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
