"""HFExport: the policy/ folder loads with stock transformers alone and scores image tokens like the trained policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file
from toyfit import REGISTERED
from transformers import JanusForConditionalGeneration

from callbacks.hf_export import plain_class_name, save_hf
from modules import janus_ops

# Runs in a fresh interpreter that imports only torch and transformers: the HF image-token log-prob
# (the language model on [context; image-token embeddings], then generation_head), written from scratch.
STOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoProcessor, JanusForConditionalGeneration

    folder, inputs, output = sys.argv[1:]
    model = JanusForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    d = torch.load(inputs, weights_only=True)
    ids, mask, tokens = d["cond_ids"], d["cond_mask"], d["tokens"]
    with torch.no_grad():
        embeds = torch.cat(
            [model.get_input_embeddings()(ids), model.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1
        )
        full = torch.cat([mask, torch.ones_like(tokens[:, :-1])], 1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=full, position_ids=positions
        ).last_hidden_state
        logits = model.model.generation_head(hidden[:, ids.shape[1] - 1 :]).float() / d["temperature"]
        logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("bicot", "modules", "datamodules", "callbacks"))
    text_ids = processor.tokenizer(d["text"], add_special_tokens=False).input_ids
    torch.save({"logp": logp, "text_ids": text_ids, "ours": ours}, output)
    """
)


def test_export_folder_is_hf_format_and_logged_as_policy_artifact(toy_run):
    folder = toy_run.workdir / "export"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)  # safetensors only
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "JanusForConditionalGeneration"
    ]
    logged = {a.path for a in toy_run.client.list_artifacts(toy_run.run_id, "policy")}
    assert {f"policy/{name}" for name in files} == logged


def stock_logprobs_match(policy, folder, tmp_path) -> torch.Tensor:
    """Score random image tokens with ``policy`` and, in a fresh interpreter, with stock transformers
    loading ``folder``; assert they agree and return the policy's log-probs ``[2, N]``."""
    policy = policy.eval()
    prompts = ["a red circle", "two blue squares"]
    context = policy.image_context(prompts, ["a plan with words", "another plan"])
    generator = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vq_config.num_embeddings
    tokens = torch.randint(vocab, (2, policy.num_image_tokens), generator=generator)
    with torch.no_grad():
        # the trainer's own pass, conditional (what the stock script computes), whatever the config's mode
        expected = janus_ops.image_logprobs(
            policy.model, context.cond_ids, context.cond_mask, tokens, policy.sampling.image_temperature or 1.0, None, 1.0
        )
    inputs, output = tmp_path / "inputs.pt", tmp_path / "output.pt"
    temperature = policy.sampling.image_temperature or 1.0
    data = dict(
        cond_ids=context.cond_ids, cond_mask=context.cond_mask, tokens=tokens, temperature=temperature
    )
    torch.save({**data, "text": prompts[0]}, inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(folder), str(inputs), str(output)],
        cwd=tmp_path,  # not the repository, so nothing of bicot is importable by accident of the cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(output, weights_only=True)
    assert got["ours"] == []
    torch.testing.assert_close(got["logp"], expected, rtol=1e-5, atol=1e-5)
    assert got["text_ids"] == policy.tokenizer(prompts[0], add_special_tokens=False).input_ids
    return expected


def test_stock_transformers_gives_the_trained_policys_image_logprobs(toy_run, tmp_path):
    stock_logprobs_match(toy_run.module.policy, toy_run.workdir / "export", tmp_path)


def test_save_hf_of_a_peaked_policy_loads_with_stock_transformers(sharp_policy, tmp_path):
    """A fresh tiny Janus is nearly uniform over image tokens; a peaked one makes any mismatch visible."""
    folder = save_hf(sharp_policy.model, sharp_policy.processor, tmp_path / "export")
    expected = stock_logprobs_match(sharp_policy, folder, tmp_path)
    assert expected.std() > 0.5  # the check above compared numbers that differ, not near-constants


def test_export_is_registered_as_a_model_version(toy_run):
    versions = toy_run.client.search_model_versions(f"name='{REGISTERED}'")
    assert [v.run_id for v in versions] == [toy_run.run_id]
    assert versions[0].source.rstrip("/").endswith("/policy")


def test_explicit_full_state_dict_saves_like_the_model_itself(tiny_policy, tmp_path):
    """The FSDP2 path hands save_pretrained gathered copies; tied weights must still be written once."""
    model, processor = tiny_policy.model, tiny_policy.processor
    plain = save_hf(model, processor, tmp_path / "plain")
    copies = {k: v.clone() for k, v in model.state_dict().items()}  # no shared storage, like the gather
    gathered = save_hf(model, processor, tmp_path / "gathered", copies)
    a, b = load_file(plain / "model.safetensors"), load_file(gathered / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_class_name_sees_through_fsdp_subclasses():
    fsdp_like = type("FSDPJanusForConditionalGeneration", (JanusForConditionalGeneration,), {})
    assert plain_class_name(fsdp_like.__new__(fsdp_like)) == "JanusForConditionalGeneration"


class Tiny(pl.LightningModule):
    """One weight trained by plain automatic optimization: enough for Lightning to step and checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch).pow(2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(16, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_exports_are_named_by_the_steps_trained(tmp_path, monkeypatch):
    """A checkpoint written after 2 steps is exported as step_000002, the name of the grid of those weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.hf_export import HFExport

    exported = []
    monkeypatch.setattr(HFExport, "export", lambda self, trainer, module, folder, path: exported.append(path))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=4, callbacks=[HFExport(every_checkpoint=True), checkpoints], logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Tiny())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert exported[:2] == ["policy_steps/step_000002", "policy_steps/step_000004"]
