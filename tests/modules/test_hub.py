"""Hub ids held in the local Hugging Face cache load from it without asking the hub."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest

from modules import hub
from modules.hub import cached_locally, load_cache_first

ROOT = Path(__file__).resolve().parents[2]


def fake_cache(root: Path, repo: str, files: dict[str, str]) -> Path:
    """The hub cache's layout for ``repo`` at revision ``main``: ``models--org--name/{refs/main,snapshots/REV}``."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


class Offline:
    """A ``from_pretrained`` on a machine without internet: only ``local_files_only`` loads can work."""

    def __init__(self, local_ok: bool = True) -> None:
        self.calls: list[dict] = []
        self.local_ok = local_ok

    def __call__(self, source, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get("local_files_only") and self.local_ok:
            return f"loaded {source}"
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {source}")


def test_a_cached_hub_id_is_read_from_the_cache_alone(hub_cache):
    fake_cache(hub_cache, "org/model", {"config.json": "{}"})
    fake_cache(hub_cache, "org/tokenizer", {"tokenizer_config.json": "{}"})
    assert cached_locally("org/model") and cached_locally("org/tokenizer")
    assert not cached_locally("org/elsewhere")
    load = Offline()
    assert load_cache_first(load, "org/model", dtype="x") == "loaded org/model"
    assert load.calls == [{"dtype": "x", "local_files_only": True}]


def test_an_uncached_hub_id_or_an_incomplete_cache_goes_to_the_hub(hub_cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # the hub answers; the loader then fails
    load = Offline()
    with pytest.raises(OSError, match="couldn't connect"):
        load_cache_first(load, "org/elsewhere")
    assert load.calls == [{}]  # not in the cache: straight to the hub, as before
    fake_cache(hub_cache, "org/partial", {"config.json": "{}"})
    partial = Offline(local_ok=False)  # the cache lacks a file the load needs
    with pytest.raises(OSError, match="couldn't connect"):
        load_cache_first(partial, "org/partial")
    assert partial.calls == [{"local_files_only": True}, {}]


def test_an_unreachable_hub_fails_at_once_instead_of_retrying(hub_cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "https://hub.example did not answer: no route")
    load = Offline()
    with pytest.raises(OSError, match=r"'org/elsewhere' is not complete in the local .* no route"):
        load_cache_first(load, "org/elsewhere")
    assert load.calls == []  # the loader, and its retries, never ran
    fake_cache(hub_cache, "org/partial", {"config.json": "{}"})
    partial = Offline(local_ok=False)
    with pytest.raises(OSError, match="cannot be reached"):
        load_cache_first(partial, "org/partial")
    assert partial.calls == [{"local_files_only": True}]  # the cache was tried, the hub was not


def test_hub_unreachable_asks_the_endpoint_once(monkeypatch):
    """Against real sockets: a local server that answers 404 is reachable; a closed port is not."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub.hub_unreachable() is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    reason = hub.hub_unreachable()
    assert reason and f"127.0.0.1:{port} did not answer" in reason
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable() is None  # offline mode: the loaders say so themselves


def test_a_local_folder_is_loaded_as_it_is(tmp_path, hub_cache):
    load = Offline(local_ok=False)
    with pytest.raises(OSError):
        load_cache_first(load, str(tmp_path))
    assert load.calls == [{}]


class ClipLoader:
    """A model class's ``from_pretrained`` that reads ``clip`` checkpoints and records what it was asked to load."""

    class config_class:
        model_type = "clip"

    calls: list[str] = []

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        cls.calls.append(source)
        return f"loaded {source}"


@pytest.mark.parametrize(
    "config",
    [{"model_type": "clip"}, {"model_type": "llava", "vision_config": {"model_type": "clip"}}, {"vocab_size": 3}],
)
def test_a_local_folder_the_model_class_reads_is_loaded(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_cache_first(ClipLoader.from_pretrained, str(tmp_path)) == f"loaded {tmp_path}"


def test_a_local_folder_of_another_model_type_is_refused_before_loading(tmp_path):
    """transformers only warns, and starts every weight at random: a reward expert would score with noise."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus", "vision_config": {"model_type": "siglip"}}))
    ClipLoader.calls = []
    with pytest.raises(OSError, match=r"config\.json has model_type 'janus'; ClipLoader reads 'clip' checkpoints"):
        load_cache_first(ClipLoader.from_pretrained, str(tmp_path))
    assert ClipLoader.calls == []


def test_a_cut_safetensors_file_is_named_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short
    with pytest.raises(OSError, match=r"model\.safetensors is not a readable safetensors file"):
        load_cache_first(ClipLoader.from_pretrained, str(tmp_path))


def test_policy_loads_a_cached_hub_id_without_asking_the_hub(tmp_path, tiny_janus_dir):
    """The real loading code in a fresh process whose HF cache holds the tiny Janus as ``someorg/tiny-janus``,
    with every HTTP client refusing to send and counting the requests about that repository.

    Asking the hub first, on this machine without internet, retried for 326 s before the cache was read.
    """
    snapshot = fake_cache(tmp_path / "hub", "someorg/tiny-janus", {})
    for path in tiny_janus_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))
    code = textwrap.dedent("""
        import importlib
        attempts = []

        def refuse(self, request, *args, **kwargs):
            attempts.append(str(getattr(request, "url", request)))
            raise RuntimeError("no network in this test")

        for name, cls in (("httpx2", "Client"), ("httpx", "Client"), ("requests", "Session")):
            try:
                setattr(getattr(importlib.import_module(name), cls), "send", refuse)
            except ImportError:
                pass
        from modules.policy import JanusPolicy
        policy = JanusPolicy("someorg/tiny-janus")
        asked = [url for url in attempts if "someorg/tiny-janus" in url]  # other calls are not the loader's
        print("loaded", policy.model.config.model_type, "file requests", len(asked), asked[:3])
    """)
    # the limit only keeps a regression from hanging the suite; the assertions are below
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded janus file requests 0 " in out.stdout, out.stdout
