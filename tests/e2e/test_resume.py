"""Exact resume: 2 steps + resume + 2 steps equals 4 uninterrupted steps, in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_cli import REPO, bicot, cli_in_process, run_in_process, tiny_args  # noqa: I001

E2E = Path(__file__).resolve().parent
COMPARED = ("train/loss", "train/reward", "train/kl", "train/grad_norm", "train/plan_tokens")


def checkpointing(tmp_path: Path, name: str, every: int = 1, extra_callbacks: str = "") -> list[str]:
    """A config fragment that checkpoints every ``every`` steps into ``tmp_path/name``."""
    fragment = tmp_path / f"{name}.yaml"
    fragment.write_text(
        f"""trainer:
  enable_checkpointing: true
  plugins:
    - class_path: bicot.checkpointing.AtomicCheckpointIO
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {tmp_path / name}
        save_last: true
        every_n_train_steps: {every}
        save_top_k: 0
    - class_path: callbacks.faults.GracefulStop
{extra_callbacks}"""
    )
    return ["-c", str(fragment), "--data.shuffle=true"]


def runs(db: Path):
    client = MlflowClient(f"sqlite:///{db}")
    return client, client.search_runs([client.get_experiment_by_name("bicot").experiment_id])


def metrics(db: Path) -> dict[str, list[tuple[int, float]]]:
    client, (run,) = runs(db)
    return {
        name: [
            (m.step, m.value)
            for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        ]
        for name in COMPARED
    }


def trainable_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def checkpointed(workdir: Path, *overrides: str, resume: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """The overrides of a fit that checkpoints every step into ``workdir/ckpt`` (``resume``: from its last)."""
    return [*overrides, *checkpointing(workdir, "ckpt"), *extra, *(["--ckpt_path=last"] if resume else [])]


def fit(workdir: Path, *overrides: str, resume: bool = False, extra: tuple[str, ...] = ()):
    """``bicot fit`` of the tiny config in ``workdir`` (a process), checkpointing every step into ``workdir/ckpt``."""
    return bicot("fit", *tiny_args(workdir, *checkpointed(workdir, *overrides, resume=resume, extra=extra)), cwd=workdir)


def fit_in_process(capsys, workdir: Path, *overrides: str, resume: bool = False) -> tuple[int, str]:
    """:func:`fit` in this process (no interpreter start-up); returns (exit code, stderr)."""
    return run_in_process(capsys, workdir, *checkpointed(workdir, *overrides, resume=resume))


@pytest.mark.slow
def test_two_steps_resume_two_steps_equals_four_steps(capsys, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    code, err = fit_in_process(capsys, full, "--trainer.max_steps=4")
    assert code == 0, err[-3000:]
    code, err = fit_in_process(capsys, part, "--trainer.max_steps=2")
    assert code == 0, err[-3000:]
    two = trainable_state(part / "ckpt" / "last.ckpt")
    code, err = fit_in_process(capsys, part, "--trainer.max_steps=4", resume=True)
    assert code == 0, err[-3000:]
    assert "resuming MLflow run" in err
    a, b = trainable_state(full / "ckpt" / "last.ckpt"), trainable_state(part / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys() and all(k.startswith("policy.model.model.language_model.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-exact on CPU
    assert any(not torch.equal(two[k], b[k]) for k in b)  # the resumed steps did train
    assert metrics(full / "mlflow.db") == metrics(part / "mlflow.db")  # same values at the same steps
    client, (run,) = runs(part / "mlflow.db")  # one run, continued
    assert run.info.status == "FINISHED"
    # the config that trained steps 0-1 stays; the resume's (max_steps 4) is kept beside it
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == [
        "config/config.yaml",
        "config/config_resume_1.yaml",
    ]
    assert saved_config(client, run.info.run_id)["trainer"]["max_steps"] == 2
    assert saved_config(client, run.info.run_id, "config_resume_1.yaml")["trainer"]["max_steps"] == 4


def test_checkpoint_holds_only_trainable_weights_and_its_fingerprint(capsys, tmp_path):
    code, err = run_in_process(capsys, tmp_path, "--trainer.max_steps=1", *checkpointing(tmp_path, "ckpt"))
    assert code == 0, err[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert keys and not any(k.startswith(("reference.", "rewards.")) for k in keys)
    assert not any(".vqmodel." in k or "generation_head" in k for k in keys)
    assert len(checkpoint["bicot"]["fingerprint"]) == 16
    _, (run,) = runs(tmp_path / "mlflow.db")
    assert checkpoint["bicot"]["mlflow_run_id"] == run.info.run_id
    # A resume under another model shape is refused with a message, not a traceback.
    code, err = run_in_process(
        capsys,
        tmp_path,
        "--trainer.max_steps=2",
        "--model.policy.init_args.tiny.hidden_size=64",
        *checkpointing(tmp_path, "ckpt"),
        "--ckpt_path=last",
    )
    assert code not in (0, None)
    assert "another model (model source" in err and "Traceback" not in err
    # ... before the run it came from is touched: still FINISHED, with the config that trained it
    client, (after,) = runs(tmp_path / "mlflow.db")
    assert after.info.status == "FINISHED" and after.info.run_id == run.info.run_id
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/config.yaml"]
    assert saved_config(client, run.info.run_id)["trainer"]["max_steps"] == 1
    # A file that is not a checkpoint: one line, for fit and for the other subcommands.
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    code, err = run_in_process(capsys, tmp_path, f"--ckpt_path={tmp_path / 'notes.ckpt'}")
    assert code not in (0, None) and "notes.ckpt' is not a readable bicot checkpoint" in err
    assert "Traceback" not in err
    code, _, err = cli_in_process(capsys, tmp_path, "test", *tiny_args(tmp_path, f"--ckpt_path={tmp_path / 'notes.ckpt'}"))
    assert code not in (0, None) and "notes.ckpt' is not a readable bicot checkpoint" in err
    assert len(runs(tmp_path / "mlflow.db")[1]) == 1  # refused before a run was opened
    # A resume may change what leaves the model alone (here the data): the run goes on, both configs kept.
    code, err = run_in_process(
        capsys, tmp_path, "--trainer.max_steps=2", "--data.max_prompts=12", *checkpointing(tmp_path, "ckpt"),
        "--ckpt_path=last",
    )
    assert code in (0, None), err[-3000:]
    client, (after,) = runs(tmp_path / "mlflow.db")
    assert after.info.status == "FINISHED" and after.info.run_id == run.info.run_id
    assert saved_config(client, run.info.run_id)["data"]["max_prompts"] is None
    assert saved_config(client, run.info.run_id, "config_resume_1.yaml")["data"]["max_prompts"] == 12


def saved_config(client: MlflowClient, run_id: str, name: str = "config.yaml") -> dict:
    return yaml.safe_load(Path(client.download_artifacts(run_id, f"config/{name}", tempfile.mkdtemp())).read_text())


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, err = run_in_process(capsys, tmp_path, *checkpointing(tmp_path, "nothing_here"), "--ckpt_path=last")
    assert code not in (0, None)
    assert "no last.ckpt" in err and "Traceback" not in err


KILL_DURING_SAVE = r"""
import os, sys, time, torch
from bicot.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
path = sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "bicot": {"n": 1}}, path)
print("first saved", flush=True)
real_save = torch.save
def slow_save(obj, f, *a, **k):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout.readline().strip() == "first saved"
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - start < timeout
        time.sleep(0.2)


def _wait_for_steps(db: Path, proc: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    """Poll MLflow until the run has logged ``steps`` training steps."""
    start = time.monotonic()
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - start < timeout
        if db.exists():
            try:
                client, found = runs(db)
                if found and len(client.get_metric_history(found[0].info.run_id, "train/loss")) >= steps:
                    return
            except Exception:  # the database is being created by the run
                pass
        time.sleep(0.5)


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen:
    # Create the MLflow store first: the test polls it while the run works, and two processes creating
    # the same SQLite schema at once can leave a half-migrated database.
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "bicot.cli", "fit", *args]
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_mark_the_run_killed(capsys, tmp_path, sig):
    # Checkpoints every 1000 steps, so the only checkpoint can come from the signal handler.
    fragment = checkpointing(tmp_path, "ckpt", every=1000)
    proc = _launch(tmp_path, *tiny_args(tmp_path, "--trainer.max_steps=100000"), *fragment)
    _wait_for_steps(tmp_path / "mlflow.db", proc, steps=2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert (tmp_path / "ckpt" / "last.ckpt").exists(), err[-3000:]
    _, (run,) = runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"
    steps = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert steps >= 1
    # the resume runs in this process: the checkpoint and the run it continues came from the killed one
    code, err = run_in_process(capsys, tmp_path, f"--trainer.max_steps={steps + 1}", *fragment, "--ckpt_path=last")
    assert code == 0, err[-3000:]
    _, (run,) = runs(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(capsys, tmp_path):
    fragment = checkpointing(tmp_path, "ckpt", every=2)
    proc = _launch(tmp_path, *tiny_args(tmp_path, "--trainer.max_steps=100000"), *fragment)
    _wait_for(tmp_path / "ckpt" / "last.ckpt", proc)
    time.sleep(3)
    proc.kill()
    proc.communicate(timeout=60)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved >= 2 and saved % 2 == 0
    code, err = run_in_process(capsys, tmp_path, f"--trainer.max_steps={saved + 2}", *fragment, "--ckpt_path=last")
    assert code == 0, err[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == saved + 2


@pytest.mark.slow
def test_fsdp2_distributed_checkpoint_resumes_exactly(capsys, tmp_path):
    """2 FSDP2 processes: 2 steps + resume from the sharded checkpoint folder + 2 steps equals 4 steps."""
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    fsdp = ("-c", str(REPO / "configs" / "strategy" / "fsdp2.yaml"), "--trainer.devices=2")
    common = ("--model.algo.num_generations=4", "--data.batch_size=2")
    r = fit(full, "--trainer.max_steps=4", *common, extra=fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    r = fit(part, "--trainer.max_steps=2", *common, extra=fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    last = part / "ckpt" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()  # a distributed checkpoint: one shard per process
    assert len(list(last.glob("*.distcp"))) == 2
    assert sorted(p.name for p in (part / "ckpt").iterdir()) == ["last.ckpt"]  # no temporary or old copy left
    r = fit(part, "--trainer.max_steps=4", *common, resume=True, extra=fsdp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming MLflow run" in r.stderr
    assert metrics(full / "mlflow.db") == metrics(part / "mlflow.db")  # bit-exact on CPU, same steps
    _, (run,) = runs(part / "mlflow.db")
    assert run.info.status == "FINISHED"
    # A sharded checkpoint of another model is refused before any shard is read, with a message. The CLI refuses
    # it before the trainer starts the other processes, so one process (this one) shows it as two would.
    code, err = run_in_process(
        capsys,
        part,
        *checkpointed(part, "--trainer.max_steps=6", "--model.policy.init_args.tiny.hidden_size=64", *common,
                      resume=True, extra=(*fsdp[:2], "--trainer.devices=1")),
    )
    assert code != 0
    assert "another model (model source" in err
