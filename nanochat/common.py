"""Shared helpers for every stage: where artifacts live.

Contract: no side effects at import. `get_base_dir()` is the one place that decides the artifacts
directory (`$NANOCHAT_BASE_DIR`, default `~/.cache/nanochat`); every script writes under it.
"""

import os


def get_base_dir() -> str:
    """The artifacts directory (tokenizer, data shards, checkpoints, reports), created if missing."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir
