"""Loading from a Hugging Face hub id: read the local cache first, so an offline machine does not wait.

``from_pretrained("org/name")`` asks the hub for every file before it falls back to the cache, and
huggingface_hub retries an unreachable hub five times per file with back-off. On a machine without
internet that held the model in its cache, loading a tiny Janus that way took 326 s before it succeeded
(measured here). A hub id whose files are in the cache is read with ``local_files_only=True`` instead; only
when that cached copy is incomplete does the load go to the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# a repository with one of these in the cache has been downloaded (a model, a tokenizer, a pipeline)
MARKER_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "model_index.json")


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


def load_cache_first(load: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained``), from the local cache alone when ``source`` is a
    hub id the cache holds; from the hub when it is not, or when the cached copy lacks a file."""
    if not Path(source).expanduser().is_dir() and cached_locally(source):
        try:
            return load(source, **kwargs, local_files_only=True)
        except OSError:
            pass  # a file the cache lacks: let the hub provide it
    return load(source, **kwargs)
