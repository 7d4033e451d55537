"""Loading from a Hugging Face hub id: read the local cache first, so an offline machine does not wait.

``from_pretrained("org/name")`` asks the hub for every file before it falls back to the cache, and
huggingface_hub retries an unreachable hub five times per file with back-off. On a machine without
internet that held the model in its cache, loading a tiny Janus that way took 326 s before it succeeded
(measured here). A hub id whose files are in the cache is read with ``local_files_only=True`` instead; only
when that cached copy is incomplete does the load go to the hub. Before it does, one request checks that the
hub answers: where it does not, the load fails at once (about 50 s of retries saved on a machine without
internet) with a message that says so. A local folder is first checked against what the loader reads: transformers
only warns about a config.json of another model type and then starts every weight at random.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# a repository with one of these in the cache has been downloaded (a model, a tokenizer, a pipeline)
MARKER_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "model_index.json")


def local_folder(source: str) -> Path | None:
    """The folder ``source`` names, or ``None`` where it is a hub id (``name`` or ``owner/name``).

    A source that starts with ``.``, ``/`` or ``~``, exists, or has more than one slash is meant as a folder,
    whether or not it exists (so a missing one is reported as a missing folder, not looked up on the hub).
    """
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    return path if looks_local else None


def cached_locally(source: str) -> bool:
    """Whether hub id ``source`` has files in the local Hugging Face cache (asks no server)."""
    from huggingface_hub import try_to_load_from_cache

    for name in MARKER_FILES:
        try:
            if isinstance(try_to_load_from_cache(source, name), str):
                return True
        except ValueError:  # not a valid repo id (a local-looking path, say)
            return False
    return False


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (one request, no retries), or ``None`` when it answers (any HTTP status).

    Asked before a load that must go to the hub: an unreachable hub otherwise costs huggingface_hub's retries,
    about 50 s per load on a machine without internet (measured here), before the same error.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # the loaders fail at once themselves, and say why
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as error:  # URLError, a timeout, a refused connection, a malformed endpoint
        return f"{constants.ENDPOINT} did not answer: {getattr(error, 'reason', error)}"
    return None


def check_local_folder(load: Callable[..., Any], folder: Path) -> None:
    """Refuse a folder whose files cannot be what ``load`` reads, before it reads them.

    A ``config.json`` of another model type: transformers warns, builds the model with every weight at random and
    loads none (a reward expert pointed at the policy's folder scored with a random model). A config that holds a
    sub-config of the model's type (``vision_config`` ...) is one transformers reads. A ``*.safetensors`` file cut
    short: the loader's own error names no file.

    Raises:
        OSError: naming the file and the problem (callers turn a loader's ``OSError`` into their message).
    """
    cls = getattr(load, "__self__", None)
    wanted = getattr(getattr(cls, "config_class", None), "model_type", None)
    config_file = folder / "config.json"
    if wanted and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (ValueError, OSError):
            config = None  # the loader reports a malformed config itself
        if isinstance(config, dict) and config.get("model_type") not in (None, wanted):
            nested = [v.get("model_type") for v in config.values() if isinstance(v, dict)]
            if wanted not in nested:
                raise OSError(
                    f"{config_file} has model_type {config['model_type']!r}; {cls.__name__} reads {wanted!r} checkpoints"
                )
    bad = unreadable_safetensors(folder)
    if bad is not None:
        raise OSError(f"{bad[0]} is not a readable safetensors file ({bad[1]}); re-download or re-save it")


def unreadable_safetensors(folder: Path, pattern: str = "*.safetensors") -> tuple[Path, str] | None:
    """The first ``pattern`` file of ``folder`` whose header cannot be read (cut short, not safetensors), with the
    reason on one line; ``None`` when all can. Reads headers only."""
    from safetensors import SafetensorError, safe_open

    for weights in sorted(folder.glob(pattern)):
        try:
            with safe_open(weights, "pt"):
                pass
        except SafetensorError as err:
            return weights, " ".join(str(err).split())
    return None


def load_cache_first(load: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained``), from the local cache alone when ``source`` is a
    hub id the cache holds; from the hub when it is not, or when the cached copy lacks a file.

    Raises:
        OSError: what ``load`` raises; at once, without the loader's retries, when the load needs the hub and the
            hub does not answer; before loading, when a local folder cannot be what ``load`` reads
            (:func:`check_local_folder`).
    """
    local = Path(source).expanduser().is_dir()
    if local:
        check_local_folder(load, Path(source).expanduser())
    if not local and cached_locally(source):
        try:
            return load(source, **kwargs, local_files_only=True)
        except OSError:
            pass  # a file the cache lacks: let the hub provide it
    if not local and (reason := hub_unreachable()):
        raise OSError(f"{source!r} is not complete in the local Hugging Face cache and the hub cannot be reached "
                      f"({reason})")
    return load(source, **kwargs)
