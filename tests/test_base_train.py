"""scripts.base_train for real on a depth-2 model: learning, exact resume, torchrun vs accumulation, NaN, wandb."""

import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from nanochat import train
from nanochat.checkpoint import build_model, find_last_step
from nanochat.tokenizer import Tokenizer
from scripts import base_train

TINY = [
    "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
    "--warmup-steps", "0", "--eval-tokens", "1024", "--sample-every", "-1", "--compile", "off",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, wiki_docs):
    """A base dir with a throwaway tokenizer and shards of real Wikipedia text."""
    root = tmp_path_factory.mktemp("nanochat")
    Tokenizer.train_from_iterator(wiki_docs[:300], 512).save(str(root / "tokenizer"))
    data = root / "base_data"
    data.mkdir()
    pq.write_table(pa.table({"text": wiki_docs[:600]}), data / "shard_00000.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": wiki_docs[600:660]}), data / "val_00000.parquet", row_group_size=16)
    return root


def run(base_dir, monkeypatch, *args, tag="t"):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    return base_train.main([*TINY, "--model-tag", tag, *args])


def final_weights(base_dir, tag):
    model, meta = build_model(os.path.join(base_dir, "base_checkpoints", tag))
    return model.state_dict(), meta


def test_training_reduces_validation_bpb_and_saves(base_dir, monkeypatch, capsys):
    summary = run(base_dir, monkeypatch, "--num-iterations", "30", "--eval-every", "15", tag="learn")
    out = capsys.readouterr().out
    bpbs = [float(x) for x in re.findall(r"validation bpb (\d+\.\d+)", out)]
    assert len(bpbs) == 3 and bpbs[-1] < bpbs[0] - 0.5, bpbs
    assert round(summary["val_bpb"], 4) == bpbs[-1]
    assert find_last_step(os.path.join(base_dir, "base_checkpoints", "learn")) == 30
    assert '"git_commit"' in out and "FLOPs/token" in out  # resolved config and environment printed


def test_killed_and_resumed_equals_uninterrupted(base_dir, monkeypatch):
    args = ["--num-iterations", "20", "--save-every", "10", "--eval-every", "-1"]
    run(base_dir, monkeypatch, *args, tag="whole")

    real_save = train.save_checkpoint

    def save_then_die(checkpoint_dir, step, *rest, **kwargs):
        real_save(checkpoint_dir, step, *rest, **kwargs)
        if step == 10:
            raise KeyboardInterrupt("killed right after the step-10 checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(base_dir, monkeypatch, *args, tag="resumed")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    run(base_dir, monkeypatch, *args, "--resume", tag="resumed")

    whole, whole_meta = final_weights(base_dir, "whole")
    resumed, resumed_meta = final_weights(base_dir, "resumed")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert whole_meta["loop"]["smooth_loss"] == resumed_meta["loop"]["smooth_loss"]
    assert whole_meta["dataloader"] == resumed_meta["dataloader"]


def test_resume_without_checkpoint_is_a_clear_error(base_dir, monkeypatch):
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(base_dir, monkeypatch, "--num-iterations", "2", "--resume", tag="never-saved")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_dir, monkeypatch, capsys):
    real_forward = base_train.GPT.forward
    calls = {"n": 0}

    def forward_going_nan(self, idx, targets=None, **kwargs):
        out = real_forward(self, idx, targets, **kwargs)
        if targets is not None and self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 6:  # step 6 onwards (one micro-batch per step here)
                out = out * float("nan")
        return out

    monkeypatch.setattr(base_train.GPT, "forward", forward_going_nan)
    with pytest.raises(SystemExit) as exit_info:
        run(base_dir, monkeypatch, "--num-iterations", "10", "--save-every", "5", "--eval-every", "-1",
            "--device-batch-size", "8", tag="nan")  # fmt: skip
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "loss is nan" in out and "step 5 verifies (--resume continues from it)" in out
    assert find_last_step(os.path.join(base_dir, "base_checkpoints", "nan")) == 5


def test_a_checkpoint_corrupted_in_place_is_refused_and_resume_falls_back(base_dir, monkeypatch, capsys):
    from scripts import base_loss

    run(base_dir, monkeypatch, "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1", tag="bitrot")
    path = os.path.join(base_dir, "base_checkpoints", "bitrot", "model_000006.pt")
    with open(path, "r+b") as f:  # same size, some weights overwritten with NaN (0x7fc00000)
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00\x00\xc0\x7f" * 64)
    with pytest.raises(SystemExit, match=r"^base_loss: .*model_000006\.pt does not match the sha256"):
        base_loss.main(["--model-tag", "bitrot", "--device-batch-size", "4", "--split-tokens", "512"])
    summary = run(base_dir, monkeypatch, "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1",
                  "--resume", tag="bitrot")  # fmt: skip
    assert "step 6 is unusable" in capsys.readouterr().out and summary["step"] == 6
    model, _ = final_weights(base_dir, "bitrot")  # step 6 saved again, from the intact step 3
    assert all(torch.isfinite(value).all() for value in model.values())


def test_bad_data_is_one_line(base_dir, monkeypatch, tmp_path):
    (tmp_path / "text.csv").write_text("a,b\n")
    with pytest.raises(SystemExit, match=r"^base_train: .*text\.csv: unsupported file type"):
        run(base_dir, monkeypatch, "--num-iterations", "1", "--data", str(tmp_path / "text.csv"), tag="csv")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_accumulation(base_dir, tmp_path):
    """Same global batches either way (the loaders slice one data-parallel width), so same weights to tolerance."""
    common = [*TINY, "--num-iterations", "8", "--eval-every", "-1", "--device-batch-size", "4"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", *common, "--model-tag", "ddp"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "scripts.base_train", *common, "--model-tag", "accum"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    ddp, ddp_meta = final_weights(base_dir, "ddp")
    accum, accum_meta = final_weights(base_dir, "accum")
    assert ddp_meta["grad_accum_steps"] == 1 and accum_meta["grad_accum_steps"] == 2
    for name in ddp:
        assert torch.allclose(ddp[name], accum[name], atol=2e-3, rtol=0), name
    assert abs(ddp_meta["loop"]["smooth_loss"] - accum_meta["loop"]["smooth_loss"]) < 1e-3


@pytest.mark.slow
def test_wandb_offline_run_records_metrics(base_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(base_dir, monkeypatch, "--num-iterations", "4", "--eval-every", "2", "--run", "tiny-test", tag="wandb")
    runs = [d for d in (tmp_path / "wandb").iterdir() if d.name.startswith("offline-run-")]
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
    content = files[0].read_bytes()
    assert b"train/loss" in content and b"val/bpb" in content


def test_base_loss_reports_the_checkpoints_validation_bpb(base_dir, monkeypatch):
    from scripts import base_loss

    summary = run(base_dir, monkeypatch, "--num-iterations", "5", "--eval-every", "-1", tag="d2")
    results = base_loss.main(["--model-tag", "d2", "--device-batch-size", "4", "--split-tokens", "1024"])
    # Same val batches (a fresh val loader), same weights -> the number base_train printed at its end.
    assert results["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    assert results["train_bpb"] > 0 and len(results["samples"]) == len(train.SAMPLE_PROMPTS)
    assert (base_dir / "base_eval" / "loss_d2_000005.json").exists()


def test_muon_extras_reach_the_muon_groups(base_dir, monkeypatch):
    run(base_dir, monkeypatch, "--num-iterations", "2", "--eval-every", "-1", "--weight-decay", "0.1",
        "--muon-extras", "cautious_wd,muoneq", tag="extras")  # fmt: skip
    state = torch.load(os.path.join(base_dir, "base_checkpoints", "extras", "optim_000002_rank0.pt"))
    muon = [g for g in state["param_groups"] if g["kind"] == "muon"]
    assert muon and all(g["cautious_wd"] and g["muoneq"] and not g["muon_plus"] and g["beta2"] is None for g in muon)
    with pytest.raises(SystemExit, match="--muon-extras: unknown"):
        run(base_dir, monkeypatch, "--num-iterations", "2", "--muon-extras", "cautious", tag="bad")
