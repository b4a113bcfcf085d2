"""scripts.chat_sft for real on a depth-1 model: masks, loss normalisation over the step, resume, mixtures."""

import json
import os

import pytest
import torch

from conftest import SHARED_DATA, make_base_dir, require, torchrun_matches_accumulation
from nanochat import train
from nanochat.chat_data import conversation_batch, supervised_backward
from nanochat.checkpoint import build_model, find_last_step, load_checkpoint, load_model
from nanochat.engine import Engine
from nanochat.train import StageRecord
from scripts import chat_sft, mid_train
from tasks.customjson import CustomJSON
from tasks.mixture import Sources, build_mixture

OFFLINE = "gsm8k,identity,spelling,simplespelling,arc"
TINY = ["--device-type", "cpu", "--device-batch-size", "2", "--examples-per-step", "4", "--eval-steps", "2",
        "--eval-metrics-max-problems", "4", "--init-lr-frac", "0.5", "--mixture", OFFLINE]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, small_tokenizer):
    """A tiny base checkpoint and a 2-step mid checkpoint made from it."""
    require(SHARED_DATA)
    root = make_base_dir(tmp_path_factory.mktemp("nanochat"), small_tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(root))
        patch.setenv("NANOCHAT_DATA_DIR", SHARED_DATA)
        mid_train.main(["--device-type", "cpu", "--compile", "off", "--mixture", "gsm8k,simplespelling",
                        "--num-iterations", "2", "--eval-every", "-1", "--eval-tokens", "512"])  # fmt: skip
    return root


@pytest.fixture(autouse=True)
def environment(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", SHARED_DATA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub-only components fail at once instead of retrying the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def conversations():
    mixture, _ = build_mixture(["gsm8k", "arc", "simplespelling"], "train", Sources(SHARED_DATA), {})
    return [mixture[i] for i in range(4)]


def test_runs_from_mid_with_user_data_saves_and_the_engine_generates(base_dir, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        json.dumps([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Me."}]) + "\n"
    )
    summary = chat_sft.main([*TINY, "--num-iterations", "3", "--eval-every", "-1", "--data", str(data)])
    out = capsys.readouterr().out
    assert "  data                    1" in out and "  arc                 3,370" in out
    assert "MMLU" in out and "ARC-Easy" in out and 0 <= summary["MMLU_acc"] <= 1
    assert find_last_step(str(base_dir / "chatsft_checkpoints" / "d1")) == 3
    assert json.loads((base_dir / "report" / "chat_sft.json").read_text())["steps"] == 3
    model, meta = load_model("sft", "cpu", "eval")
    assert meta["max_seq_len"] == 128 and meta["grad_accum_steps"] == 2  # seq len inherited, 4 = 2 x 2
    record = StageRecord.from_meta(meta)  # mid's record, read and passed on: its token batch and LRs
    assert (record.stage, record.total_batch_size, record.matrix_lr) == ("sft", 512, 0.02)
    tokenizer = chat_sft.get_tokenizer()
    prompt = tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    )
    completion = Engine(model, tokenizer).generate_batch(prompt, max_tokens=8, temperature=0)[0]
    assert 1 <= len(completion.tokens) <= 8


def test_targets_follow_the_render_mask(small_tokenizer, conversations):
    inputs, targets = conversation_batch(small_tokenizer, conversations, 128)
    for row, conversation in enumerate(conversations):
        ids, mask = small_tokenizer.render_conversation(conversation, max_tokens=129)
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        assert targets[row, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (targets[row, n:] == -1).all()  # padding is never a target


def test_only_the_supervised_token_gets_gradient(small_tokenizer):
    model, _ = load_model("mid", "cpu", "train")
    conversation = {"messages": [{"role": "user", "content": "Spell cat"}, {"role": "assistant", "content": "c,a,t"}]}
    ids, mask = small_tokenizer.render_conversation(conversation)
    first = mask.index(1)  # crop the row right after the first supervised token: it is the only target
    inputs, targets = conversation_batch(small_tokenizer, [conversation, {"messages": conversation["messages"][:1]
                                         + [{"role": "assistant", "content": ""}]}], first)  # fmt: skip
    targets[1] = -1  # the second row: no supervised token at all
    assert (targets >= 0).sum() == 1
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    supervised_backward(model, [(inputs, targets)])
    handle.remove()
    grad = captured["logits"].grad.abs().sum(-1)  # (B, T)
    assert grad[0, first - 1] > 0
    grad[0, first - 1] = 0
    assert (grad == 0).all()


@pytest.mark.parametrize("split", [(1, 4), (2, 2), (4, 1)])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split(small_tokenizer, conversations, split):
    model, _ = load_model("mid", "cpu", "train")

    def step(micro_batches, batch_size):
        model.zero_grad()
        batches = [conversation_batch(small_tokenizer, conversations[i : i + batch_size], 128)
                   for i in range(0, 4, batch_size)][:micro_batches]  # fmt: skip
        loss, _ = supervised_backward(model, batches)
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    whole_loss, whole_grads = step(1, 4)
    loss, grads = step(*split)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, whole_grads[name], atol=1e-6, rtol=1e-4), name


def test_stopped_and_resumed_equals_uninterrupted(base_dir, monkeypatch):
    args = [*TINY, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1", "--eval-metrics-every", "-1",
            "--model-tag", "d1"]  # fmt: skip
    chat_sft.main(args)
    directory = base_dir / "chatsft_checkpoints" / "d1"
    whole, whole_meta = build_model(str(directory))
    for name in os.listdir(directory):
        os.remove(directory / name)
    real_save = train.save_checkpoint

    def save_then_die(path, step, *rest, **kwargs):
        real_save(path, step, *rest, **kwargs)
        if step == 2:
            raise KeyboardInterrupt("stopped right after the step-2 checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        chat_sft.main(args)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    chat_sft.main([*args, "--resume"])
    resumed, resumed_meta = build_model(str(directory))
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert whole_meta["loop"]["smooth_loss"] == resumed_meta["loop"]["smooth_loss"]


def test_mixture_errors_and_selection(capsys):
    with pytest.raises(SystemExit, match=r"smoltalk[\s\S]*Leave them out with --mixture arc,gsm8k"):
        chat_sft.main([*TINY[:-2], "--mixture", "arc,smoltalk,gsm8k", "--num-iterations", "1"])  # hub only
    with pytest.raises(SystemExit, match="data"):
        chat_sft.main([*TINY, "--data", "/nonexistent.jsonl"])
    chat_sft.main([*TINY[:-2], "--mixture", "arc", "--source", "base", "--num-iterations", "1", "--eval-every", "-1",
                   "--eval-metrics-every", "-1", "--model-tag", "d1"])  # fmt: skip
    assert "train mixture: 3,370 conversations\n  arc " in capsys.readouterr().out


def test_a_mixture_without_validation_rows_trains_and_saves(base_dir, tmp_path, capsys):
    # identity (like --data) has no held-out split: validation is skipped with a notice, not a crash at the end.
    summary = chat_sft.main([*TINY[:-2], "--mixture", "identity", "--num-iterations", "2", "--eval-every", "1",
                             "--eval-metrics-every", "-1", "--model-tag", "d1"])  # fmt: skip
    assert "validation is skipped" in capsys.readouterr().out and summary["val_loss"] is None
    _, _, meta = load_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), step=2)
    assert meta["val_loss"] is None and summary["step"] == 2  # saved by this run, without validation
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match=f"^chat_sft: --data {empty} holds no conversations"):
        chat_sft.main([*TINY, "--data", str(empty), "--num-iterations", "1"])
    with pytest.raises(SystemExit, match="^chat_sft: 3,370 conversations make no step"):
        chat_sft.main([*TINY[:-2], "--mixture", "arc", "--examples-per-step", "4096", "--device-batch-size", "1"])


def write_conversations(path, count: int):
    """`count` conversations in the {"messages": [...]} format, one template a depth-1 model learns in steps."""
    rows = [{"messages": [{"role": "user", "content": f"What is your number {i}?"},
                          {"role": "assistant", "content": f"My number is {i}, thank you for asking."}]}
            for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_your_data_alone_trains_on_it_and_its_held_out_loss_falls(base_dir, tmp_path, capsys):
    data = write_conversations(tmp_path / "mine.jsonl", 40)
    summary = chat_sft.main([*TINY[:-2], "--data", str(data), "--data-epochs", "2", "--num-iterations", "12",
                             "--eval-every", "4", "--init-lr-frac", "1.0", "--model-tag", "d1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "train mixture: 72 conversations\n  data                   72  100.0%\n" in out  # the file alone, twice
    assert f"--data {data}: 36 conversations train (x2 epochs), 4 validate, held out of the file" in out
    assert "validation mixture: 4 conversations" in out
    report = json.loads((base_dir / "report" / "chat_sft.json").read_text())
    curve = [loss for _, loss in report["val_loss_curve"]]  # loss on the 4 held-out conversations
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.5, curve
    assert summary["val_data_loss"] == summary["val_loss"] == curve[-1]


def test_your_data_mixed_in_is_repeated_and_validated_apart(base_dir, tmp_path, capsys):
    data = write_conversations(tmp_path / "mine.jsonl", 40)
    mixture, rows = build_mixture(["arc", "data"], "train", Sources(SHARED_DATA, user_data=str(data)),
                                  {"data": {"epochs": 3}})  # fmt: skip
    texts = [json.dumps(mixture[i]) for i in range(len(mixture))]
    assert rows == [("arc", 3370), ("data", 108)] and len(texts) == 3478
    assert {texts.count(json.dumps(row)) for row in CustomJSON(str(data), "train")} == {3}  # each listed 3 times
    validation = tmp_path / "val.jsonl"
    validation.write_text(data.read_text().splitlines()[0] + "\n")
    summary = chat_sft.main([*TINY[:-2], "--mixture", "arc", "--data", str(data), "--val-data", str(validation),
                             "--data-epochs", "3", "--num-iterations", "1", "--eval-metrics-every", "-1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "  data                  120    3.4%" in out and "validation data_loss" in out
    assert f"40 conversations train (x3 epochs), 1 validate, --val-data {validation}" in out
    assert summary["val_data_loss"] > 0 and summary["val_data_loss"] != summary["val_loss"]


def test_bad_own_data_is_one_line(tmp_path):
    data = write_conversations(tmp_path / "mine.jsonl", 5)
    data.write_text(data.read_text() + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit, match=f"^chat_sft: {data}:6: expected at least one user message [^\n]*$"):
        chat_sft.main([*TINY, "--data", str(data)])
    with pytest.raises(SystemExit, match="^chat_sft: nothing to train on: --mixture data .* needs --data"):
        chat_sft.main([*TINY[:-2], "--mixture", "data"])
    with pytest.raises(SystemExit, match="^chat_sft: --val-data is the validation of --data"):
        chat_sft.main([*TINY, "--val-data", str(data)])


def test_grad_clip_bounds_the_global_norm_of_what_the_optimizer_sees(monkeypatch):
    real_clip, norms = torch.nn.utils.clip_grad_norm_, []

    def clip_and_measure(parameters, max_norm, *rest, **kwargs):
        parameters = list(parameters)
        before = real_clip(parameters, max_norm, *rest, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((before.item(), after.item()))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_measure)
    chat_sft.main([*TINY, "--num-iterations", "2", "--eval-every", "-1", "--eval-metrics-every", "-1",
                   "--grad-clip", "0.05", "--model-tag", "d1"])  # fmt: skip
    assert len(norms) == 2 and all(before > 0.05 and after <= 0.05 * (1 + 1e-4) for before, after in norms), norms


@pytest.mark.slow  # two torchrun processes and one plain one, each importing torch
def test_torchrun_two_processes_match_one_process_with_accumulation(base_dir):
    """The loss is normalised by the supervised tokens of the whole step across ranks: 2 ranks x 1 micro-batch
    and 1 rank x 2 micro-batches give the same update."""
    args = [*TINY, "--num-iterations", "3", "--eval-every", "-1", "--eval-metrics-every", "-1", "--model-tag", "d1"]
    (ddp, ddp_meta), (alone, alone_meta) = torchrun_matches_accumulation("scripts.chat_sft", args, base_dir,
                                                                         "chatsft_checkpoints")  # fmt: skip
    assert ddp_meta["grad_accum_steps"] == 1 and alone_meta["grad_accum_steps"] == 2
    for name in ddp:
        assert torch.allclose(ddp[name], alone[name], atol=2e-3, rtol=0), name
    assert ddp_meta["loop"]["smooth_loss"] == pytest.approx(alone_meta["loop"]["smooth_loss"], abs=1e-4)
