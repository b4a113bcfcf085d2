"""Checkpoints: save and load a model, its per-rank optimizer state and the run's metadata, crash-safely.

One triplet per saved step in a checkpoint directory (e.g. `<base dir>/base_checkpoints/d12/`):
    model_{step:06d}.pt            model state_dict (rank 0; keys without torch.compile's prefix)
    optim_{step:06d}_rank{r}.pt    optimizer state_dict of rank r (one file per rank; only when saved)
    meta_{step:06d}.json           {"step", "model_config" (GPTConfig.to_dict()), "world_size", **caller meta}

Contract:
- Every file is written atomically (temp file in the same directory, fsync, os.replace), and meta is written
  last, by rank 0: it is the one mark of a complete step (`find_last_step` and `load_checkpoint` only see steps
  with a meta). Re-saving a step first deletes its meta, so a crash halfway leaves the step incomplete.
- Every rank calls `save_checkpoint` with its own rank. With a process group, barriers order the save (stale
  meta removed -> all ranks write -> rank 0 writes meta) on one shared filesystem; without one, the caller
  saves the other ranks first and rank 0 checks their files are there.
- Optimizer state is sharded per rank, so resuming it needs the world size it was saved with; model weights
  load on any world size. torch.load runs with weights_only=True: nothing in a checkpoint can run code.
- Meta must be JSON-serialisable (tuples come back as lists).
Not here: the tokenizer (its vocab must match model_config's vocab_size), what goes into meta (the stages;
nanochat/train.py saves their StageRecord), deleting old checkpoints, conversion to other formats.
"""

import json
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, fsync_directory, get_base_dir
from nanochat.gpt import GPT, GPTConfig

RESERVED_META_KEYS = ("step", "model_config", "world_size")  # filled by save_checkpoint itself
COMPILE_PREFIX = "_orig_mod."  # torch.compile's OptimizedModule prefixes every state_dict key with this

# stage -> (directory under the base dir, the script that writes it)
STAGES = {
    "base": ("base_checkpoints", "scripts/base_train.py"),
    "mid": ("mid_checkpoints", "scripts/mid_train.py"),
    "sft": ("chatsft_checkpoints", "scripts/chat_sft.py"),
    "rl": ("chatrl_checkpoints", "scripts/chat_rl.py"),
}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used: corrupt or truncated file, or incompatible with the request."""


def model_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def optimizer_path(checkpoint_dir: str, step: int, rank: int) -> str:
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def meta_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


# ---------------------------------------------------------------------------- saving


def _strip_compile_prefix(state_dict: dict) -> dict:
    return {key.removeprefix(COMPILE_PREFIX): value for key, value in state_dict.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier_if_distributed(world_size: int) -> None:
    if world_size > 1 and _distributed():
        dist.barrier()


def save_checkpoint(
    checkpoint_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Save one step: model weights (rank 0), this rank's optimizer state (if given), then meta (rank 0).

    `model` is the GPT, or a torch.compile wrapper of it (its `_orig_mod.` prefix is stripped); it must carry
    `.config` (a GPTConfig). Every rank must call this, with the same arguments apart from `rank`, when a
    process group is initialized (the barriers are collective).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    meta = dict(meta or {})
    clashing = [key for key in RESERVED_META_KEYS if key in meta]
    if clashing:
        raise ValueError(f"meta keys {clashing} are filled in by save_checkpoint; rename them in your meta")
    config = getattr(model, "config", None)
    if not isinstance(config, GPTConfig):
        raise TypeError(f"model must carry a GPTConfig as .config (got {type(model).__name__}); pass the GPT")
    meta = {"step": step, "model_config": config.to_dict(), "world_size": world_size, **meta}
    try:  # checked on every rank before any file is touched, so a bad meta writes nothing anywhere
        meta_text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint meta must be JSON-serialisable (dict, list, str, int, float, bool, None): {e}. "
            "Convert tensors with .item() or .tolist() and other objects to plain values."
        ) from e

    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        os.remove(meta_path(checkpoint_dir, step))  # re-saving: the step is incomplete until meta returns
        fsync_directory(checkpoint_dir)
    _barrier_if_distributed(world_size)  # no rank overwrites its files while the old meta still vouches for them

    if rank == 0:
        state = _strip_compile_prefix(model.state_dict())
        atomic_write(model_path(checkpoint_dir, step), lambda f: torch.save(state, f))
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        atomic_write(optimizer_path(checkpoint_dir, step, rank), lambda f: torch.save(optimizer_state, f))
    _barrier_if_distributed(world_size)  # every rank's optimizer file is in place before meta marks completion

    if rank != 0:
        return
    if optimizer is not None and not _distributed():
        missing = [
            optimizer_path(checkpoint_dir, step, r)
            for r in range(world_size)
            if not os.path.exists(optimizer_path(checkpoint_dir, step, r))
        ]
        if missing:
            raise CheckpointError(
                f"optimizer files {missing} are missing, so step {step} is left incomplete: without a process "
                "group, save the other ranks before rank 0 (rank 0 writes meta, which marks completion)"
            )
    atomic_write(meta_path(checkpoint_dir, step), lambda f: f.write(meta_text.encode("utf-8")))


# ---------------------------------------------------------------------------- finding and loading


def complete_steps(checkpoint_dir: str) -> list[int]:
    """Steps with a meta file (complete checkpoints), ascending; [] when the directory does not exist."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        match = re.fullmatch(r"meta_(\d+)\.json", name)
        if match and os.path.isfile(os.path.join(checkpoint_dir, name)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir: str) -> int | None:
    """The largest step with a complete checkpoint, or None when there is none."""
    steps = complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def _torch_load(path: str, device, step: int, missing_hint: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing although step {step} has its meta file; {missing_hint}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean the file cannot be used
        raise CheckpointError(
            f"cannot read {path} ({type(e).__name__}: {e}). The file is truncated or corrupt (an interrupted "
            f"copy, a full disk); restore it, or delete step {step}'s files to fall back to an earlier step"
        ) from e


def _read_meta(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"cannot parse {path} as JSON ({e}); the meta file is corrupt: restore it, or delete it to make "
            "loading fall back to an earlier step"
        ) from e


def load_checkpoint(
    checkpoint_dir: str,
    step: int | None = None,
    device: torch.device | str = "cpu",
    load_optimizer: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict, dict | None, dict]:
    """(model state_dict, this rank's optimizer state_dict or None, meta) of `step` (None = the last one).

    Tensors are mapped to `device`. The optimizer state is refused when the checkpoint was saved by a
    different number of processes, since each rank's file holds that rank's shard.
    """
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
        saved_world_size = meta.get("world_size")
        if saved_world_size is not None and saved_world_size != world_size:
            raise CheckpointError(
                f"step {step} in {checkpoint_dir} was saved by {saved_world_size} processes but this run has "
                f"{world_size}: optimizer state is sharded per rank and cannot be redistributed. Resume with "
                f"{saved_world_size} processes, or load the model weights alone (load_optimizer=False) and "
                "start the optimizer afresh"
            )
        optimizer_state = _torch_load(
            optimizer_path(checkpoint_dir, step, rank),
            device,
            step,
            "the step was saved without optimizer state (model only), or the file was lost: load the model "
            "weights alone (load_optimizer=False) and start the optimizer afresh",
        )
    model_state = _torch_load(
        model_path(checkpoint_dir, step),
        device,
        step,
        "the checkpoint was partly deleted or copied: restore the file or load an earlier step",
    )
    return model_state, optimizer_state, meta


def build_model(
    checkpoint_dir: str,
    step: int | None = None,
    device: torch.device | str = "cpu",
    phase: str = "train",
    dtype: torch.dtype | None = None,
) -> tuple[GPT, dict]:
    """(GPT with the checkpoint's weights on `device`, meta). Step None = the last complete one.

    phase "train": train mode, weights in the checkpoint's dtype (fp32 masters). phase "eval": eval mode,
    weights converted to `dtype` (the compute dtype, e.g. bf16, so inference pays no per-step casts;
    None = keep).
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
        model.load_state_dict(_strip_compile_prefix(model_state), strict=True)
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
    depths = {}
    for name in entries:
        match = re.fullmatch(r"d(\d+)", name)
        if match and os.path.isdir(os.path.join(stage_dir, name)):
            depths[int(match.group(1))] = name
    if not depths:
        raise FileNotFoundError(
            f"no d<depth> model directory in {stage_dir} (it holds: {entries or 'nothing'}); {stage} "
            f"checkpoints are written by {script}, or pass model_tag explicitly"
        )
    return os.path.join(stage_dir, depths[max(depths)])  # numeric: d10 beats d9


def load_model(
    stage: str,
    device: torch.device | str,
    phase: str,
    model_tag: str | None = None,
    step: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[GPT, dict]:
    """build_model on a stage's checkpoints: stage in base | mid | sft | rl; None = largest depth, last step."""
    directory = checkpoint_dir(stage, model_tag)
    if find_last_step(directory) is None:
        raise FileNotFoundError(
            f"no complete {stage} checkpoint in {directory}; run {STAGES[stage][1]} to create one "
            f"(or pick another model_tag)"
        )
    return build_model(directory, step, device, phase, dtype)
