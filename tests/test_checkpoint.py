"""Checkpoints: exact round trips of weights, optimizer state and meta; crash safety; clear errors.

A 2-layer, 128-wide GPT on the CPU; every test saves into its own tmp_path.
"""

import json
import os
import struct
import time
import zipfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_dir,
    complete_steps,
    find_last_step,
    last_verified_step,
    load_checkpoint,
    load_model,
    meta_path,
    model_path,
    optimizer_path,
    save_checkpoint,
    sha256_file,
    verifies,
)
from nanochat.gpt import GPT, GPTConfig

CONFIG = GPTConfig.from_depth(depth=2, vocab_size=256, sequence_len=32)


def make_model(seed: int = 0) -> GPT:
    """A GPT whose weights are all nonzero (GPT's init zeroes lm_head, which would make every logit 0)."""
    torch.manual_seed(seed)
    model = GPT.build(CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def make_tokens(seed: int, batch_size: int = 2, length: int = 17) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch_size, length), generator=generator)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: GPT) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def edit_meta(directory, step: int, edit) -> None:
    path = meta_path(str(directory), step)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


# ---------------------------------------------------------------------------- round trips


def test_weights_round_trip_gives_identical_logits(tmp_path):
    model = make_model()
    tokens = make_tokens(1)
    with torch.no_grad():
        expected = model(tokens)
    save_checkpoint(str(tmp_path), 7, model)

    trained, meta = build_model(str(tmp_path), phase="train")
    assert trained.training and meta["step"] == 7
    with torch.no_grad():
        assert torch.equal(trained(tokens), expected)

    evaluated, _ = build_model(str(tmp_path), phase="eval")
    assert not evaluated.training
    with torch.no_grad():
        assert torch.equal(evaluated(tokens), expected)

    half, _ = build_model(str(tmp_path), phase="eval", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        logits = half(tokens)
    # bf16 keeps 8 mantissa bits (relative error ~0.4% per rounding); through 2 layers the logits stay
    # within a few percent of their range.
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() <= 0.03 * expected.abs().max()

    with pytest.raises(ValueError, match="fp32 master weights"):
        build_model(str(tmp_path), phase="train", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="phase must be"):
        build_model(str(tmp_path), phase="inference")


def test_optimizer_round_trip_gives_identical_next_step(tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, make_tokens(1))
    train_step(model, optimizer, make_tokens(2))
    save_checkpoint(str(tmp_path), 2, model, optimizer, meta={"loop_state": {"smooth_train_loss": 5.5}})
    train_step(model, optimizer, make_tokens(3))

    resumed, meta = build_model(str(tmp_path), phase="train")
    assert meta["loop_state"] == {"smooth_train_loss": 5.5}
    _, optimizer_state, _ = load_checkpoint(str(tmp_path), load_optimizer=True)
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(optimizer_state)
    train_step(resumed, resumed_optimizer, make_tokens(3))
    for original, reloaded in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, reloaded)

    # The comparison has teeth: a fresh optimizer (no moments) takes a different step.
    fresh, _ = build_model(str(tmp_path), phase="train")
    train_step(fresh, make_optimizer(fresh), make_tokens(3))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_meta_round_trip_and_last_complete_step(tmp_path):
    model = make_model()
    user_meta = {
        "val_bpb": 1.25,
        "user_config": {"depth": 2, "tags": ["a", "b"], "schedule": {"warmdown": 0.2, "off": None}},
        "dataloader_state": [{"shard": 3, "row_group": 17}, {"shard": 4, "row_group": 0}],
        "ok": True,
    }
    assert find_last_step(str(tmp_path / "absent")) is None
    for step in (1, 5, 10):
        save_checkpoint(str(tmp_path), step, model, meta=user_meta)
    assert complete_steps(str(tmp_path)) == [1, 5, 10]
    _, optimizer_state, meta = load_checkpoint(str(tmp_path))
    assert optimizer_state is None
    checksums = {"model_000010.pt": sha256_file(model_path(str(tmp_path), 10))}
    assert meta == {"step": 10, "model_config": CONFIG.to_dict(), "world_size": 1, "checksums": checksums, **user_meta}

    os.remove(meta_path(str(tmp_path), 10))  # step 10's model file is there but it is no longer complete
    assert find_last_step(str(tmp_path)) == 5
    assert load_checkpoint(str(tmp_path))[2]["step"] == 5
    with pytest.raises(FileNotFoundError, match=r"step 10 has no complete checkpoint.*\[1, 5\]"):
        load_checkpoint(str(tmp_path), step=10)


def test_meta_must_be_json_and_leave_reserved_keys_alone(tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="JSON-serialisable.*item"):
        save_checkpoint(str(tmp_path), 1, model, meta={"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(str(tmp_path), 1, model, meta={"step": 3})
    assert not tmp_path.exists() or os.listdir(tmp_path) == []  # nothing was written


def test_old_config_keys_default_and_unknown_keys_fail(tmp_path):
    model = make_model()
    tokens = make_tokens(1)
    save_checkpoint(str(tmp_path), 1, model)

    def drop_new_keys(meta):
        del meta["model_config"]["rope_base"]

    edit_meta(tmp_path, 1, drop_new_keys)
    old, _ = build_model(str(tmp_path), phase="eval")
    assert old.config == CONFIG
    with torch.no_grad():
        assert torch.equal(old(tokens), model(tokens))

    edit_meta(tmp_path, 1, lambda meta: meta["model_config"].update(window_pattern="SSSL"))
    with pytest.raises(CheckpointError, match=r"meta_000001\.json.*window_pattern"):
        build_model(str(tmp_path))


def test_compile_prefix_is_stripped(tmp_path):
    model = make_model()
    tokens = make_tokens(1)
    # A state_dict written by a torch.compile'd model (e.g. by an older save path) still loads.
    save_checkpoint(str(tmp_path), 1, model)
    prefixed = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    torch.save(prefixed, model_path(str(tmp_path), 1))
    edit_meta(tmp_path, 1, lambda meta: meta.pop("checksums"))  # that older save path recorded no checksums
    loaded, _ = build_model(str(tmp_path), phase="eval")
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))

    # Saving the compiled wrapper itself writes plain keys (compilation is lazy: nothing compiles here).
    save_checkpoint(str(tmp_path), 2, torch.compile(model))
    model_state, _, _ = load_checkpoint(str(tmp_path), step=2)
    assert set(model_state) == set(model.state_dict())


# ---------------------------------------------------------------------------- crash safety


def test_crash_while_writing_leaves_no_partial_files(tmp_path, monkeypatch):
    directory = str(tmp_path)
    model = make_model()
    save_checkpoint(directory, 1, model, make_optimizer(model))
    step_one_files = sorted(os.listdir(directory))
    with open(model_path(directory, 1), "rb") as f:
        step_one_model = f.read()

    def torch_save_then_crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")
        raise OSError("No space left on device")

    # Crash inside torch.save of a new step: its model file never appears, nor does any temp file.
    monkeypatch.setattr(torch, "save", torch_save_then_crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(directory, 2, model)
    assert sorted(os.listdir(directory)) == step_one_files

    # Crash while re-saving step 1: its model file keeps the old bytes, and the step is marked incomplete
    # (meta removed first) rather than vouching for a mix of old and new files.
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(directory, 1, make_model(seed=1))
    monkeypatch.undo()
    with open(model_path(directory, 1), "rb") as f:
        assert f.read() == step_one_model
    assert find_last_step(directory) is None
    save_checkpoint(directory, 1, model, make_optimizer(model))

    # Crash at the final rename of meta: weights of step 3 are written, but step 3 is not complete.
    real_replace = os.replace

    def replace_unless_meta(source, destination):
        if os.path.basename(destination).startswith("meta_"):
            raise OSError("power cut")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_unless_meta)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(directory, 3, model)
    monkeypatch.undo()
    assert os.path.exists(model_path(directory, 3))
    assert find_last_step(directory) == 1
    assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]

    # Temp files left by a killed process (no cleanup ran) are invisible to the loaders.
    for name in (".model_000004.pt.x1.tmp", ".meta_000004.json.x2.tmp", ".optim_000001_rank0.pt.x3.tmp"):
        (tmp_path / name).write_bytes(b"garbage")
    assert find_last_step(directory) == 1
    _, optimizer_state, meta = load_checkpoint(directory, load_optimizer=True)
    assert meta["step"] == 1 and optimizer_state is not None


# ---------------------------------------------------------------------------- errors


def test_empty_directory_is_a_clear_error(tmp_path):
    for directory in (tmp_path, tmp_path / "absent"):
        with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {directory}"):
            load_checkpoint(str(directory))


def test_corrupt_files_are_clear_errors(tmp_path):
    directory = str(tmp_path)
    model = make_model()
    save_checkpoint(directory, 1, model)
    path = model_path(directory, 1)
    with open(path, "rb") as f:
        intact = f.read()

    with open(path, "wb") as f:
        f.write(intact[: len(intact) // 2])  # truncated, like an interrupted copy
    with pytest.raises(CheckpointError, match=f"{path} does not match the sha256.*corrupt"):
        build_model(directory)
    edit_meta(tmp_path, 1, lambda meta: meta.pop("checksums"))  # a checkpoint from before checksums
    with pytest.raises(CheckpointError, match=f"cannot read {path}.*truncated or corrupt"):
        build_model(directory)
    with open(path, "wb") as f:
        f.write(os.urandom(256))
    with pytest.raises(CheckpointError, match=f"cannot read {path}"):
        load_checkpoint(directory)

    with open(path, "wb") as f:
        f.write(intact)
    with open(meta_path(directory, 1), "w") as f:
        f.write('{"step": 1, "model_con')
    with pytest.raises(CheckpointError, match=r"cannot parse .*meta_000001\.json as JSON"):
        load_checkpoint(directory)

    save_checkpoint(directory, 2, model)
    os.remove(model_path(directory, 2))
    with pytest.raises(FileNotFoundError, match=r"model_000002\.pt is missing"):
        load_checkpoint(directory)


def test_tensors_changed_in_place_fail_the_checksum(tmp_path):
    # Same size, NaNs in every tensor: torch.load reads it happily, so only the checksum in meta can tell.
    directory = str(tmp_path)
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, make_tokens(1))
    for step in (1, 2):
        save_checkpoint(directory, step, model, optimizer)
    path = model_path(directory, 2)
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:  # torch's zip stores tensors uncompressed: NaNs over the largest one
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length)
        f.write(struct.pack("<f", float("nan")) * (entry.file_size // 4))
    assert os.path.getsize(path) == size
    with pytest.raises(CheckpointError, match=r"model_000002\.pt does not match the sha256"):
        build_model(directory)
    assert last_verified_step(directory) == 1 and verifies(directory, 1) and not verifies(directory, 2)
    loaded, _ = build_model(directory, step=1)  # the earlier step is untouched
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    edit_meta(tmp_path, 2, lambda meta: meta.pop("checksums"))
    assert last_verified_step(directory) == 2  # old checkpoints without checksums load unverified, as before
    unverified, _ = build_model(directory)
    assert not all(torch.isfinite(p).all() for p in unverified.parameters())  # what used to load silently


def test_optimizer_state_needs_the_saving_world_size(tmp_path):
    directory = str(tmp_path)
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, make_tokens(1))  # so the optimizer has moments to save
    # Without a process group, the other ranks save first; rank 0 checks their files and writes meta last.
    with pytest.raises(CheckpointError, match=r"optim_000001_rank1\.pt.*missing"):
        save_checkpoint(directory, 1, model, optimizer, rank=0, world_size=2)
    assert find_last_step(directory) is None
    save_checkpoint(directory, 1, model, optimizer, rank=1, world_size=2)
    save_checkpoint(directory, 1, model, optimizer, rank=0, world_size=2)
    assert os.path.exists(optimizer_path(directory, 1, 1))

    with pytest.raises(CheckpointError, match="saved by 2 processes but this run has 1.*load_optimizer=False"):
        load_checkpoint(directory, load_optimizer=True, world_size=1)
    _, optimizer_state, _ = load_checkpoint(directory, load_optimizer=True, rank=1, world_size=2)
    assert optimizer_state["state"]
    model_state, _, _ = load_checkpoint(directory, world_size=1)  # weights alone load anywhere
    assert set(model_state) == set(model.state_dict())

    save_checkpoint(directory, 2, model)  # model only, as SFT and RL save
    with pytest.raises(FileNotFoundError, match="saved without optimizer state"):
        load_checkpoint(directory, load_optimizer=True)


class ShardedOptimizerStandIn:
    """What save_checkpoint needs of an optimizer (state_dict), holding a different shard on each rank.

    A real torch.optim optimizer would do, but constructing the first one imports torch._dynamo (~5 s in a
    fresh process); the AdamW round trip itself is tested in one process above.
    """

    def __init__(self, rank: int, seconds_to_save: float = 0.0):
        self.shard = torch.full((4,), float(rank))
        self.seconds_to_save = seconds_to_save

    def state_dict(self) -> dict:
        time.sleep(self.seconds_to_save)  # a slow rank: called inside save_checkpoint, after the first barrier
        return {"state": {0: {"exp_avg": self.shard}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def save_as_one_of_two_ranks(rank: int, directory: str) -> None:
    """One rank of a 2-process gloo group; rank 1 is slow to save, so meta must wait for its file."""
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        model = GPT(CONFIG)  # plain construction: default init is enough here, and quicker than GPT.build
        optimizer = ShardedOptimizerStandIn(rank, seconds_to_save=0.5 if rank == 1 else 0.0)
        save_checkpoint(f"{directory}/ckpt", 1, model, optimizer, rank=rank, world_size=2)
        if rank == 0:
            assert os.path.exists(optimizer_path(f"{directory}/ckpt", 1, 1)), "meta was written before rank 1's file"
    finally:
        dist.destroy_process_group()


def test_two_processes_save_their_own_optimizer_shards(tmp_path):
    # Rank 1 in a spawned process, rank 0 here: one torch import instead of two keeps this test quick.
    rank_1 = mp.get_context("spawn").Process(target=save_as_one_of_two_ranks, args=(1, str(tmp_path)))
    rank_1.start()
    try:
        save_as_one_of_two_ranks(0, str(tmp_path))
    finally:
        rank_1.join(timeout=60)
    assert rank_1.exitcode == 0
    directory = str(tmp_path / "ckpt")
    assert find_last_step(directory) == 1
    for rank in (0, 1):
        _, optimizer_state, _ = load_checkpoint(directory, load_optimizer=True, rank=rank, world_size=2)
        assert torch.equal(optimizer_state["state"][0]["exp_avg"], ShardedOptimizerStandIn(rank).shard)


# ---------------------------------------------------------------------------- stages


def test_load_model_picks_the_deepest_tag_and_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"scripts/chat_sft\.py"):
        load_model("sft", "cpu", "eval")

    model = make_model()
    base = tmp_path / "base_checkpoints"
    save_checkpoint(str(base / "d10"), 3, model)
    (base / "d9").mkdir()
    (base / "notes.txt").write_text("not a model")
    assert checkpoint_dir("base") == str(base / "d10")  # by depth, not alphabetically
    assert checkpoint_dir("sft", "d4") == str(tmp_path / "chatsft_checkpoints" / "d4")

    loaded, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 3 and not loaded.training
    with pytest.raises(FileNotFoundError, match=r"no complete base checkpoint.*scripts/base_train\.py"):
        load_model("base", "cpu", "eval", model_tag="d9")
    with pytest.raises(ValueError, match="stage must be one of"):
        checkpoint_dir("pretrain")
