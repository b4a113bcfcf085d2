"""scripts.mid_train for real on a depth-1 model over the offline mixture: packing, resume, mixture selection."""

import json
import os

import pytest
import torch

from conftest import SHARED_DATA, make_base_dir, require, torchrun_matches_accumulation
from nanochat import train
from nanochat.chat_data import PackedChatLoader
from nanochat.checkpoint import build_model, find_last_step, load_model
from nanochat.engine import Engine
from nanochat.train import StageRecord
from scripts import mid_train
from tasks.mixture import Sources, build_mixture

OFFLINE = "gsm8k,identity,spelling,simplespelling,arc"
TINY = ["--device-type", "cpu", "--compile", "off", "--eval-tokens", "512", "--mixture", OFFLINE]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, small_tokenizer):
    require(SHARED_DATA)
    return make_base_dir(tmp_path_factory.mktemp("nanochat"), small_tokenizer)


@pytest.fixture(autouse=True)
def environment(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", SHARED_DATA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub-only components fail at once instead of retrying the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_runs_inherits_batch_saves_and_the_engine_generates(base_dir, capsys):
    summary = mid_train.main([*TINY, "--num-iterations", "4", "--eval-every", "2"])
    out = capsys.readouterr().out
    for name in OFFLINE.split(","):  # every component is printed with its row count
        assert f"  {name} " in out
    assert "  gsm8k               7,473" in out and "  identity            1,992" in out  # identity twice
    assert len([line for line in out.splitlines() if "validation bpb" in line]) == 3
    directory = base_dir / "mid_checkpoints" / "d1"
    assert find_last_step(str(directory)) == 4
    meta = json.loads((directory / "meta_000004.json").read_text())
    # inherited from the base checkpoint's meta, written before StageRecord existed (conftest.make_base_dir)
    record = StageRecord.from_meta(meta)
    assert (record.stage, record.step, record.device_batch_size, record.total_batch_size) == ("mid", 4, 4, 512)
    assert meta["max_seq_len"] == 128 and record.matrix_lr == 0.02
    report = json.loads((base_dir / "report" / "mid_train.json").read_text())
    assert report["val_bpb"] == summary["val_bpb"] and report["steps"] == 4
    model, _ = load_model("mid", "cpu", "eval")
    tokenizer = mid_train.get_tokenizer()
    prompt = tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    )
    completion = Engine(model, tokenizer).generate_batch(prompt, max_tokens=8, temperature=0)[0]
    assert 1 <= len(completion.tokens) <= 8


def test_stopped_and_resumed_equals_uninterrupted(base_dir, monkeypatch):
    args = [*TINY, "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1"]
    mid_train.main([*args, "--model-tag", "d1"])
    whole, whole_meta = build_model(str(base_dir / "mid_checkpoints" / "d1"))
    for name in os.listdir(base_dir / "mid_checkpoints" / "d1"):
        os.remove(base_dir / "mid_checkpoints" / "d1" / name)

    real_save = train.save_checkpoint

    def save_then_die(directory, step, *rest, **kwargs):
        real_save(directory, step, *rest, **kwargs)
        if step == 3:
            raise KeyboardInterrupt("stopped right after the step-3 checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        mid_train.main(args)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    mid_train.main([*args, "--resume"])
    resumed, resumed_meta = build_model(str(base_dir / "mid_checkpoints" / "d1"))
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert whole_meta["loop"]["smooth_loss"] == resumed_meta["loop"]["smooth_loss"]
    assert whole_meta["dataloader"] == resumed_meta["dataloader"]


def test_a_component_that_cannot_load_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit, match=r"smoltalk[\s\S]*mmlu-aux[\s\S]*--mixture gsm8k,identity"):
        mid_train.main([*TINY[:-2], "--mixture", "smoltalk,mmlu-aux,gsm8k,identity", "--num-iterations", "1"])
    with pytest.raises(SystemExit):
        mid_train.main([*TINY[:-2], "--mixture", "gsm8k,nonsense"])
    assert "unknown mixture component(s) ['nonsense']" in capsys.readouterr().err


def test_the_default_mixture_keeps_what_a_local_data_dir_holds(capsys):
    mid_train.main([*TINY[:-2], "--num-iterations", "1", "--eval-every", "-1", "--model-tag", "d1"])
    out = capsys.readouterr().out
    assert "left out (not available from" in out and "smoltalk, mmlu-aux" in out
    assert "  identity            1,992" in out and "  spelling " in out and "  smoltalk" not in out


def test_the_record_round_trips_and_old_metas_take_todays_values():
    record = StageRecord("mid", "d4", 7, 8, 4096, 0.01, 0.1, 0.002)
    meta = json.loads(json.dumps({"step": 7, "record": train.asdict(record), "total_batch_size": 1}))
    assert StageRecord.from_meta(meta) == record  # the record wins over any flat key
    old = {"step": 3, "model_config": {}, "user_config": {"device_batch_size": 16, "model_tag": None}}
    assert StageRecord.from_meta(old) == StageRecord(step=3, device_batch_size=16)  # 2**19 tokens, default LRs


def test_one_warmdown_schedule_is_rls_linear_decay_bit_for_bit():
    assert all(train.warmdown_multiplier(s / n, 1.0, 0.0) == 1.0 - s / n for n in (3, 7, 30, 467) for s in range(n))
    assert train.warmdown_multiplier(0.5, 0.2, 0.0) == 1.0  # constant until the last 20%
    assert train.warmdown_multiplier(0.9, 0.2, 0.1) == pytest.approx(0.55)  # halfway down to 0.1


def test_mixture_selects_components(capsys):
    mid_train.main([*TINY[:-2], "--mixture", "simplespelling", "--num-iterations", "1", "--eval-every", "-1",
                    "--model-tag", "d1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "train mixture: 200,000 conversations\n  simplespelling" in out and "gsm8k" not in out.split("{")[0]


def test_packed_rows_are_full_bos_aligned_and_resume_exactly(small_tokenizer):
    mixture, _ = build_mixture(["gsm8k", "simplespelling"], "train", Sources(SHARED_DATA), {})
    loader = PackedChatLoader(small_tokenizer, mixture, 2, 64, buffer_size=8)
    bos = small_tokenizer.get_bos_token_id()
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (2, 64) and (inputs[:, 0] == bos).all()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # all tokens are targets in midtraining
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(3)]
    again = PackedChatLoader(small_tokenizer, mixture, 2, 64, buffer_size=8, state=state)
    for (x, y), (x2, y2) in zip(expected, [next(again) for _ in range(3)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.slow  # two torchrun processes and one plain one, each importing torch
def test_torchrun_two_processes_match_one_process_with_accumulation(base_dir):
    args = [*TINY, "--num-iterations", "3", "--eval-every", "-1", "--device-batch-size", "2",
            "--total-batch-size", "512", "--model-tag", "d1"]  # fmt: skip
    (ddp, ddp_meta), (alone, alone_meta) = torchrun_matches_accumulation("scripts.mid_train", args, base_dir,
                                                                         "mid_checkpoints")  # fmt: skip
    assert ddp_meta["grad_accum_steps"] == 1 and alone_meta["grad_accum_steps"] == 2
    for name in ddp:
        assert torch.allclose(ddp[name], alone[name], atol=2e-3, rtol=0), name
    assert ddp_meta["loop"]["smooth_loss"] == pytest.approx(alone_meta["loop"]["smooth_loss"], abs=1e-4)
