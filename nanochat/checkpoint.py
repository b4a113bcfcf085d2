"""Checkpoints: save and load a model, its per-rank optimizer state and the run's metadata, crash-safely.

One triplet per saved step in a checkpoint directory (e.g. `<base dir>/base_checkpoints/d12/`):
    model_{step:06d}.pt            model state_dict (rank 0; keys without torch.compile's prefix)
    optim_{step:06d}_rank{r}.pt    optimizer state_dict of rank r (one file per rank; only when saved)
    meta_{step:06d}.json           {"step", "model_config", "world_size", "checksums", **caller meta}

Contract:
- Every file is written atomically, and meta last, by rank 0: it is the one mark of a complete step. Re-saving
  a step first deletes its meta, so a crash halfway leaves the step incomplete. Every rank calls
  `save_checkpoint`; with a process group, barriers order the save on one shared filesystem; without one, the
  caller saves the other ranks first and rank 0 checks their files are there.
- meta["checksums"] holds the sha256 of every tensor file; loading verifies the files it reads, so a file
  changed after saving (NaNs written in place, a bad copy) is a CheckpointError, not a silent model. Hashing
  reads each file once more (3.7 s/GiB measured on a 2-core box at load 8.5, so about 1 s/GiB on an idle core);
  checkpoints from before checksums load unverified.
- Optimizer state is sharded per rank, so resuming it needs the saving world size; model weights load on any.
  torch.load runs with weights_only=True: nothing in a checkpoint can run code.
Not here: the tokenizer, what goes into meta (nanochat/train.py saves the StageRecord), deleting old steps.
"""

import hashlib
import json
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, dist_info, fsync_directory, get_base_dir
from nanochat.gpt import GPT, GPTConfig

RESERVED_META_KEYS = ("step", "model_config", "world_size", "checksums")  # filled by save_checkpoint itself

STAGES = {  # stage -> (directory under the base dir, the script that writes it)
    "base": ("base_checkpoints", "scripts/base_train.py"), "mid": ("mid_checkpoints", "scripts/mid_train.py"),
    "sft": ("chatsft_checkpoints", "scripts/chat_sft.py"), "rl": ("chatrl_checkpoints", "scripts/chat_rl.py"),
}  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used: corrupt or truncated file, or incompatible with the request."""


class CorruptCheckpointError(CheckpointError):
    """A file of the step is damaged (checksum mismatch, unreadable): an earlier step may still be intact."""


def model_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def optimizer_path(checkpoint_dir: str, step: int, rank: int) -> str:
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def meta_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- saving


def save_checkpoint(checkpoint_dir: str, step: int, model: torch.nn.Module, optimizer=None, meta: dict | None = None,
                    rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
    """Save one step: model weights (rank 0), this rank's optimizer state (if given), then meta (rank 0).

    `model` is the GPT, or a torch.compile wrapper of it; every rank calls this with the same arguments apart
    from `rank` (the barriers and the gathering of checksums are collective).
    """
    meta = dict(meta or {})
    clashing = [key for key in RESERVED_META_KEYS if key in meta]
    if clashing:
        raise ValueError(f"meta keys {clashing} are filled in by save_checkpoint; rename them in your meta")
    meta = {"step": step, "model_config": model.config.to_dict(), "world_size": world_size, **meta}
    try:  # checked on every rank before any file is touched, so a bad meta writes nothing anywhere
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}; convert tensors with .item()") from e

    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        os.remove(meta_path(checkpoint_dir, step))  # re-saving: the step is incomplete until meta returns
        fsync_directory(checkpoint_dir)
    distributed = world_size > 1 and dist_info().is_distributed
    if distributed:
        dist.barrier()  # no rank overwrites its files while the old meta still vouches for them

    written = []
    if rank == 0:
        state = {key.removeprefix("_orig_mod."): value for key, value in model.state_dict().items()}
        written.append(model_path(checkpoint_dir, step))
        atomic_write(written[-1], lambda f: torch.save(state, f))
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        written.append(optimizer_path(checkpoint_dir, step, rank))
        atomic_write(written[-1], lambda f: torch.save(optimizer_state, f))
    checksums = {os.path.basename(path): sha256_file(path) for path in written}  # each rank hashes its own
    if distributed:
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, checksums)  # also orders every file before meta
        checksums = {name: digest for ranks in every_rank for name, digest in ranks.items()}

    if rank != 0:
        return
    if optimizer is not None and not distributed:
        others = [optimizer_path(checkpoint_dir, step, r) for r in range(1, world_size)]
        missing = [path for path in others if not os.path.exists(path)]
        if missing:
            raise CheckpointError(
                f"optimizer files {missing} are missing, so step {step} is left incomplete: without a process "
                "group, save the other ranks before rank 0 (rank 0 writes meta, which marks completion)"
            )
        checksums |= {os.path.basename(path): sha256_file(path) for path in others}
    meta_text = json.dumps({**meta, "checksums": checksums}, indent=2)
    atomic_write(meta_path(checkpoint_dir, step), lambda f: f.write(meta_text.encode("utf-8")))


# ---------------------------------------------------------------------------- finding, verifying and loading


def complete_steps(checkpoint_dir: str) -> list[int]:
    """Steps with a meta file (complete checkpoints), ascending; [] when the directory does not exist."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    return sorted(int(m.group(1)) for m in (re.fullmatch(r"meta_(\d+)\.json", name) for name in names) if m)


def find_last_step(checkpoint_dir: str) -> int | None:
    """The largest step with a complete checkpoint, or None when there is none."""
    steps = complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def _read_meta(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"cannot parse {path} as JSON ({e}); the meta file is corrupt: restore it, or delete it to make "
            "loading fall back to an earlier step"
        ) from e


def _load_file(path: str, device, meta: dict, missing_hint: str):
    """torch.load of one tensor file of meta's step, after checking it against meta's checksum (if recorded)."""
    step = meta["step"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing although step {step} has its meta file; {missing_hint}")
    expected = meta.get("checksums", {}).get(os.path.basename(path))
    if expected is not None and sha256_file(path) != expected:
        raise CorruptCheckpointError(
            f"{path} does not match the sha256 recorded when step {step} was saved: the file is corrupt or was "
            f"changed since; restore it, or delete step {step}'s files to fall back to an earlier step"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean the file cannot be used
        raise CorruptCheckpointError(
            f"cannot read {path} ({type(e).__name__}: {e}). The file is truncated or corrupt (an interrupted "
            f"copy, a full disk); restore it, or delete step {step}'s files to fall back to an earlier step"
        ) from e


def verifies(checkpoint_dir: str, step: int) -> bool:
    """Whether every file of `step` matches the checksums in its meta (True for a step saved without them)."""
    try:
        checksums = _read_meta(meta_path(checkpoint_dir, step)).get("checksums", {})
    except (CheckpointError, OSError):
        return False
    for name, expected in checksums.items():
        path = os.path.join(checkpoint_dir, name)
        if not os.path.exists(path) or sha256_file(path) != expected:
            return False
    return True


def last_verified_step(checkpoint_dir: str) -> int | None:
    """The largest complete step whose files all verify, or None."""
    return next((step for step in reversed(complete_steps(checkpoint_dir)) if verifies(checkpoint_dir, step)), None)


def load_checkpoint(checkpoint_dir: str, step: int | None = None, device="cpu", load_optimizer: bool = False,
                    rank: int = 0, world_size: int = 1) -> tuple[dict, dict | None, dict]:  # fmt: skip
    """(model state_dict, this rank's optimizer state_dict or None, meta) of `step` (None = the last one),
    tensors on `device`. The optimizer state is refused when saved by a different number of processes."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(
            f"no complete checkpoint in {checkpoint_dir} (no meta_*.json there); train one first or check "
            "the path and model tag"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"step {step} has no complete checkpoint in {checkpoint_dir} ({meta_path(checkpoint_dir, step)} is "
            f"absent); complete steps there: {steps}"
        )
    meta = _read_meta(meta_path(checkpoint_dir, step))
    optimizer_state = None
    if load_optimizer:
        saved_world_size = meta.get("world_size", world_size)
        if saved_world_size != world_size:
            raise CheckpointError(
                f"step {step} in {checkpoint_dir} was saved by {saved_world_size} processes but this run has "
                f"{world_size}: optimizer state is sharded per rank. Resume with {saved_world_size} processes, "
                "or load the model weights alone (load_optimizer=False) and start the optimizer afresh"
            )
        optimizer_state = _load_file(
            optimizer_path(checkpoint_dir, step, rank), device, meta,
            "the step was saved without optimizer state (model only), or the file was lost: load the model "
            "weights alone (load_optimizer=False) and start the optimizer afresh",
        )  # fmt: skip
    model_state = _load_file(model_path(checkpoint_dir, step), device, meta,
                             "the checkpoint was partly deleted: restore the file or load an earlier step")  # fmt: skip
    return model_state, optimizer_state, meta


def build_model(checkpoint_dir: str, step: int | None = None, device="cpu", phase: str = "train",
                dtype: torch.dtype | None = None) -> tuple[GPT, dict]:  # fmt: skip
    """(GPT with the checkpoint's weights on `device`, meta). Step None = the last complete one.

    phase "train": train mode, fp32 master weights. phase "eval": eval mode, weights converted to `dtype` (the
    compute dtype, so inference pays no per-step casts; None = keep).
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    if phase == "train" and dtype is not None:
        raise ValueError("dtype is for phase 'eval'; training keeps fp32 master weights (set compute_dtype)")
    # Weights land on the CPU first and are copied into the built model, so the device never holds two copies.
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device="cpu")
    step = meta["step"]
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad model_config in {meta_path(checkpoint_dir, step)}: {e}") from e
    model = GPT.build(config, device)
    if phase == "eval" and dtype is not None:
        model.to(dtype)  # before loading: load_state_dict's copy then rounds fp32 weights straight into dtype
    try:
        model.load_state_dict({key.removeprefix("_orig_mod."): value for key, value in model_state.items()})
    except RuntimeError as e:
        raise CheckpointError(
            f"{model_path(checkpoint_dir, step)} does not fit the model its meta describes ({e}); was it written "
            "by a different version of nanochat/gpt.py?"
        ) from e
    model.train(phase == "train")
    return model, meta


# ---------------------------------------------------------------------------- stages under the base dir


def checkpoint_dir(stage: str, model_tag: str | None = None) -> str:
    """`<base dir>/<stage dir>/<model_tag>`; model_tag None = the `d<N>` directory with the largest depth N."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    directory, script = STAGES[stage]
    stage_dir = os.path.join(get_base_dir(), directory)
    if model_tag is not None:
        return os.path.join(stage_dir, model_tag)
    entries = sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []
    depths = {int(name[1:]): name for name in entries
              if re.fullmatch(r"d\d+", name) and os.path.isdir(os.path.join(stage_dir, name))}  # fmt: skip
    if not depths:
        raise FileNotFoundError(
            f"no d<depth> model directory in {stage_dir} (it holds: {entries or 'nothing'}); {stage} "
            f"checkpoints are written by {script}, or pass model_tag explicitly"
        )
    return os.path.join(stage_dir, depths[max(depths)])  # numeric: d10 beats d9


def load_model(stage: str, device, phase: str, model_tag: str | None = None, step: int | None = None,
               dtype: torch.dtype | None = None) -> tuple[GPT, dict]:  # fmt: skip
    """build_model on a stage's checkpoints: stage in base | mid | sft | rl; None = largest depth, last step."""
    directory = checkpoint_dir(stage, model_tag)
    if find_last_step(directory) is None:
        raise FileNotFoundError(f"no complete {stage} checkpoint in {directory}; run {STAGES[stage][1]} to create one "
                                f"(or pick another model_tag)")  # fmt: skip
    return build_model(directory, step, device, phase, dtype)
