"""scripts.chat_rl: the GSM8K reward on real rows, group advantages, the masked token-level loss, RL that learns a
toy task through the real engine, and the script itself for a few steps with an exact resume."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, require
from nanochat import train
from nanochat.checkpoint import build_model, find_last_step, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from scripts import chat_rl
from scripts.chat_rl import (
    Rollout,
    backward_groups,
    build_batch,
    group_advantages,
    policy_gradient_loss,
    sample_group,
)
from tasks.gsm8k import GSM8K, extract_answer, reference_text


@pytest.fixture(scope="module")
def data_dir():
    return require(SHARED_DATA)


# ---------------------------------------------------------------------------- reward


def test_reward_on_real_gsm8k_answers(data_dir):
    task = GSM8K("main", "train", data_dir=data_dir)
    checked_commas = False
    for index in range(200):
        conversation = task[index]
        reference = reference_text(conversation)
        answer = extract_answer(reference)
        assert task.reward(conversation, reference) == 1.0  # the published solution itself
        number = int(answer)
        if number >= 1000:  # "#### 1,234" is the same answer as 1234
            assert task.reward(conversation, f"So the total is {number:,}.\n#### {number:,}") == 1.0
            checked_commas = True
        assert task.reward(conversation, f"Some reasoning.\n#### {number + 1}") == 0.0
        assert task.reward(conversation, f"The answer is {number}.") == 0.0  # no "#### N" line
    assert checked_commas


# ---------------------------------------------------------------------------- advantages


def test_advantages_are_centred_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = group_advantages(rewards)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.0] * 4, [0.75, -0.25, -0.25, -0.25]])
    assert torch.equal(advantages, expected)
    assert torch.allclose(advantages.sum(dim=1), torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([[3, 3, 3]])), torch.zeros(1, 3))  # ints, all equal: no std


# ---------------------------------------------------------------------------- the batch and the loss

PROMPT = [1, 2, 3]
# Row 0: samples 10 11, the calculator forces 12 13, samples 14 and the stop token 9. Row 1: samples 20, stops.
ROLLOUTS = [Rollout([10, 11, 12, 13, 14, 9], [1, 1, 0, 0, 1, 1], True), Rollout([20, 9], [1, 1], True)]


def test_build_batch_masks_prompt_forced_output_and_padding():
    inputs, targets = build_batch(PROMPT, ROLLOUTS, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12, 13, 14], [1, 2, 3, 20, 0, 0, 0, 0]]
    # position t predicts token t + 1: the prompt's own tokens and forced 12, 13 are never targets
    assert targets.tolist() == [[-1, -1, 10, 11, -1, -1, 14, 9], [-1, -1, 20, 9, -1, -1, -1, -1]]


def logprobs_of(logits, targets):
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]


def test_loss_trains_only_sampled_tokens_towards_the_advantage():
    _, targets = build_batch(PROMPT, ROLLOUTS, pad_id=0)
    torch.manual_seed(0)
    logits = torch.randn(2, targets.size(1), 32, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    loss = policy_gradient_loss(logprobs_of(logits, targets), targets, advantages, num_tokens=6)
    loss.backward()
    trained = targets >= 0
    assert torch.all(logits.grad[~trained] == 0)  # prompt, forced output and padding: no gradient at all
    assert torch.all(logits.grad[trained].abs().sum(-1) > 0)
    with torch.no_grad():  # one small gradient step: log p up where A > 0, down where A < 0
        change = logprobs_of(logits - 0.1 * logits.grad, targets) - logprobs_of(logits, targets)
    assert torch.all(change[0][trained[0]] > 0) and torch.all(change[1][trained[1]] < 0)


def test_loss_is_normalised_by_the_global_sampled_token_count():
    _, targets = build_batch(PROMPT, ROLLOUTS, pad_id=0)
    torch.manual_seed(1)
    logprobs = -torch.rand(targets.shape)
    advantages = torch.tensor([0.5, -0.25])
    trained = targets >= 0
    by_hand = -(logprobs * advantages[:, None])[trained].sum() / 6
    assert torch.allclose(policy_gradient_loss(logprobs, targets, advantages, 6), by_hand)
    assert torch.allclose(policy_gradient_loss(logprobs, targets, advantages, 12), by_hand / 2)
    # Two ranks holding one row each, both dividing by the global count: the optimizer's average of their
    # losses (gradients) is the one-process loss, although the rows have 4 and 2 sampled tokens.
    shares = [
        policy_gradient_loss(logprobs[i : i + 1], targets[i : i + 1], advantages[i : i + 1], 6, 2) for i in (0, 1)
    ]
    assert torch.allclose((shares[0] + shares[1]) / 2, by_hand)


def test_backward_groups_matches_the_loss_and_skips_all_equal_groups(small_tokenizer):
    """Through the real model, chunked by device batch: the same gradient as one forward over every row."""
    model = tiny_gpt(small_tokenizer, seed=3)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
    groups = [
        (PROMPT, ROLLOUTS, torch.tensor([0.5, -0.5])),
        ([1, 5], [Rollout([7, 9], [1, 1], True)] * 2, torch.zeros(2)),
    ]
    loss = backward_groups(model, groups, device_batch_size=1, pad_id=0)
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    inputs, targets = build_batch(PROMPT, ROLLOUTS, pad_id=0)
    logprobs = -model(inputs, targets, loss_reduction="none").view(targets.shape)
    reference = policy_gradient_loss(logprobs, targets, torch.tensor([0.5, -0.5]), num_tokens=6 + 4)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(chunked[name], p.grad, atol=1e-6), name


# ---------------------------------------------------------------------------- RL learns a toy task


def tiny_gpt(tokenizer, seed=0, sequence_len=64) -> GPT:
    torch.manual_seed(seed)
    return GPT.build(GPTConfig.from_depth(depth=1, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))


def test_rl_raises_the_reward_of_a_toy_task(small_tokenizer):
    """Reward 1 when the answer's first token starts with a space (93 of the 512 tokens, so ~18% at the uniform
    start): the script's own rollout, advantage and loss functions lift it above 0.8 within 20 steps (measured:
    from 0.06 to 1.0 by step 11)."""
    tokenizer = small_tokenizer
    starts_with_space = {i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]).startswith(" ")}
    model = tiny_gpt(tokenizer)
    engine = Engine(model, tokenizer)
    optimizer = build_optimizer(model, matrix_lr=0.005, embedding_lr=0.05, unembedding_lr=0.004)
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in ("Say a word:", "Another one:")]
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    mean_rewards = []
    for step in range(20):
        groups, rewards_seen = [], []
        for example, prompt in enumerate(prompts):
            seed = chat_rl.rollout_seed(0, step, example)
            rollouts = sample_group(engine, prompt, 8, 1, seed, temperature=1.0, top_k=None)
            rewards = torch.tensor([[float(r.tokens[0] in starts_with_space) for r in rollouts]])
            groups.append((prompt, rollouts, group_advantages(rewards)[0]))
            rewards_seen += rewards[0].tolist()
        backward_groups(model, groups, device_batch_size=8, pad_id=pad_id)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        mean_rewards.append(sum(rewards_seen) / len(rewards_seen))
    first, last = sum(mean_rewards[:5]) / 5, sum(mean_rewards[-5:]) / 5
    assert first < 0.4 and last > 0.8, mean_rewards


# ---------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def base_dir(small_tokenizer, tmp_path_factory):
    """A base dir with the throwaway tokenizer and the same depth-1 random SFT checkpoint under three tags."""
    root = tmp_path_factory.mktemp("nanochat")
    small_tokenizer.save(str(root / "tokenizer"))
    torch.manual_seed(0)
    model = GPT.build(GPTConfig.from_depth(depth=1, vocab_size=small_tokenizer.get_vocab_size(), sequence_len=512))
    with torch.no_grad():  # random everywhere: GPT's init zeroes output projections (uniform answers)
        for parameter in model.parameters():
            if parameter.dim() == 2 and not parameter.any():
                parameter.normal_(0.0, parameter.size(1) ** -0.5)
    for tag in ("cli", "whole", "resumed"):
        save_checkpoint(str(root / "chatsft_checkpoints" / tag), 5, model)
    return root


TINY = [
    "--device-type", "cpu", "--examples-per-step", "2", "--num-samples", "2", "--max-new-tokens", "8",
    "--device-batch-size", "2", "--eval-examples", "2", "--eval-samples", "2", "--init-lr-frac", "1",
]  # fmt: skip


def test_cli_two_steps_saves_a_checkpoint_the_engine_loads(base_dir, data_dir, small_tokenizer):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "scripts.chat_rl", *TINY, "--model-tag", "cli", "--num-steps", "2",
         "--eval-every", "-1", "--data-dir", data_dir],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert re.search(r"step 00002/2 \| loss -?[\d.]+ \| reward [\d.]+", launched.stdout)
    assert re.search(r"step 00002 \| pass@1 [\d.]+ \| pass@2", launched.stdout) and '"git_commit"' in launched.stdout
    rl_dir = base_dir / "chatrl_checkpoints" / "cli"
    assert find_last_step(str(rl_dir)) == 2
    model, meta = build_model(str(rl_dir), phase="eval")
    assert meta["source"] == {"stage": "sft", "model_tag": "cli", "step": 5}
    prompt = small_tokenizer.encode("Hello", prepend="<|bos|>")
    assert Engine(model, small_tokenizer).generate_batch(prompt, 2, 4, temperature=1.0)[0].tokens
    report = json.loads((base_dir / "report" / "chat_rl.json").read_text())
    assert report["steps"] == 2 and len(report["mean_reward_by_step"]) == 2
    assert set(report["pass_at_k"]) == {"pass@1", "pass@2"}


def test_resume_continues_exactly(base_dir, data_dir, monkeypatch, capsys):
    # A random model never writes "#### N": reward answers by their length instead, so advantages are non-zero.
    monkeypatch.setattr(GSM8K, "reward", lambda self, conversation, completion: float(len(completion) % 2))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    args = [*TINY, "--num-steps", "3", "--save-every", "2", "--eval-every", "-1", "--eval-examples", "1",
            "--data-dir", data_dir]  # fmt: skip
    chat_rl.main([*args, "--model-tag", "whole"])
    whole_out = capsys.readouterr().out

    real_save = train.save_checkpoint

    def save_then_die(checkpoint_dir, step, *rest, **kwargs):
        real_save(checkpoint_dir, step, *rest, **kwargs)
        if step == 2:
            raise KeyboardInterrupt("killed right after the step-2 checkpoint")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        chat_rl.main([*args, "--model-tag", "resumed"])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    capsys.readouterr()
    chat_rl.main([*args, "--model-tag", "resumed", "--resume"])
    resumed_out = capsys.readouterr().out

    def step_lines(out):
        return re.findall(r"step (\d+)/3 \| loss (-?[\d.]+) \| reward ([\d.]+)", out)

    assert [line[0] for line in step_lines(resumed_out)] == ["00003"]  # only step 3 ran
    assert step_lines(resumed_out)[0] == step_lines(whole_out)[2]
    assert any(float(loss) != 0 for _, loss, _ in step_lines(whole_out))  # the steps did train
    whole, _ = build_model(str(base_dir / "chatrl_checkpoints" / "whole"))
    resumed, _ = build_model(str(base_dir / "chatrl_checkpoints" / "resumed"))
    source, _ = build_model(str(base_dir / "chatsft_checkpoints" / "whole"))
    whole_state, resumed_state = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(whole_state[name], resumed_state[name]) for name in whole_state)
    assert not all(torch.equal(whole_state[name], p) for name, p in source.state_dict().items())


def test_resume_without_checkpoint_is_a_clear_error(base_dir, data_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    save_checkpoint(
        str(base_dir / "chatsft_checkpoints" / "never"),
        1,
        build_model(str(base_dir / "chatsft_checkpoints" / "cli"))[0],
    )
    with pytest.raises(SystemExit, match="no checkpoint"):
        chat_rl.main([*TINY, "--model-tag", "never", "--num-steps", "1", "--resume", "--data-dir", data_dir])


LENGTH_REWARD_LAUNCHER = """
import sys
from scripts import chat_rl
from tasks.gsm8k import GSM8K

GSM8K.reward = lambda self, conversation, completion: float(len(completion) % 2)  # see test_resume_continues_exactly
chat_rl.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(base_dir, data_dir, tmp_path):
    """Questions strided over two ranks, token counts all-reduced, gradients averaged by the optimizer: the same
    steps as one process holding both questions (same questions, same seeds), to float tolerance."""
    launcher = tmp_path / "length_reward_rl.py"
    launcher.write_text(LENGTH_REWARD_LAUNCHER)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    source = build_model(str(base_dir / "chatsft_checkpoints" / "cli"))[0]
    for tag in ("one", "two"):
        save_checkpoint(str(base_dir / "chatsft_checkpoints" / tag), 5, source)
    common = [*TINY, "--num-steps", "2", "--eval-every", "-1", "--eval-examples", "2", "--data-dir", data_dir]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    outputs = {}
    for tag, launch in (("two", [torchrun, "--standalone", "--nproc_per_node=2"]), ("one", [sys.executable])):
        launched = subprocess.run(
            [*launch, str(launcher), *common, "--model-tag", tag],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert launched.returncode == 0, launched.stderr[-3000:]
        outputs[tag] = re.findall(r"loss (-?[\d.]+) \| reward ([\d.]+) \| answer length ([\d.]+)", launched.stdout)
    assert len(outputs["one"]) == len(outputs["two"]) == 2
    assert any(float(loss) != 0 for loss, _, _ in outputs["one"])
    for (loss_one, reward_one, length_one), (loss_two, reward_two, length_two) in zip(outputs["one"], outputs["two"]):
        assert (reward_one, length_one) == (reward_two, length_two)
        assert float(loss_one) == pytest.approx(float(loss_two), abs=1e-5)
    one, _ = build_model(str(base_dir / "chatrl_checkpoints" / "one"))
    two, _ = build_model(str(base_dir / "chatrl_checkpoints" / "two"))
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-3, rtol=0), name
