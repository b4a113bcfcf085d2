"""Shared fixtures: the real datasets ($NANOCHAT_DATA_DIR, else ../shared/data beside the repository) and a small
tokenizer trained on them."""

import gzip
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(os.path.dirname(REPO), "shared", "data")
WIKI_PATH = os.path.join(SHARED_DATA, "pretrain", "enwiki-sample.jsonl.gz")


def require(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: these tests read the real datasets (set NANOCHAT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def wiki_path() -> str:
    return require(WIKI_PATH)


@pytest.fixture(scope="session")
def wiki_docs(wiki_path) -> list[str]:
    """All 28,560 Wikipedia articles of the sample, in file order."""
    with gzip.open(wiki_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def small_tokenizer(wiki_docs):
    """A 512-token tokenizer (256 bytes, 247 merges, 9 specials) trained on the first 300 articles."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(wiki_docs[:300], 512)


def make_base_dir(root, tokenizer, tag="d1"):
    """A base dir holding the tokenizer and a random depth-1, 128-token base checkpoint with base_train's meta
    (the starting point of the post-training stages' tests), with the 2026 parts base_train now defaults to that
    a single layer has (value embeddings, residual scalars, QK scale, RoPE base, tuned init)."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig

    tokenizer.save(str(root / "tokenizer"))
    torch.manual_seed(0)
    parts = {"value_embeds": True, "resid_scalars": True, "qk_scale": 1.2, "rope_base": 100000.0, "init": "tuned"}
    model = GPT.build(GPTConfig.from_depth(1, tokenizer.get_vocab_size(), 128, **parts))
    meta = {"user_config": {"device_batch_size": 4}, "total_batch_size": 512,
            "matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004}  # fmt: skip
    save_checkpoint(str(root / "base_checkpoints" / tag), 0, model, None, meta)
    return root


def torchrun_matches_accumulation(module: str, args: list[str], base_dir, stage_dir: str, tag: str = "d1"):
    """Runs `python -m module` under torchrun with 2 processes, then alone (accumulating 2 micro-batches), and
    returns both runs' final (state_dict, meta): the same global batches, so the same weights to tolerance."""
    import shutil
    import subprocess
    import sys

    from nanochat.checkpoint import build_model

    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    output = os.path.join(str(base_dir), stage_dir, tag)
    results = []
    for launcher in ([torchrun, "--standalone", "--nproc_per_node=2"], [sys.executable]):
        shutil.rmtree(output, ignore_errors=True)
        done = subprocess.run([*launcher, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        model, meta = build_model(output)
        results.append((model.state_dict(), meta))
    shutil.rmtree(output, ignore_errors=True)
    return results


def randomized(config, seed: int = 0):
    """A GPT whose zero-initialised projections are filled too (weights N(0, 0.05), embedding N(0, 1)), so
    every path affects the logits."""
    import torch

    from nanochat.gpt import GPT

    torch.manual_seed(seed)
    model = GPT.build(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.05)
    return model
