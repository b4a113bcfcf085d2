"""Reinforcement learning on GSM8K: on-policy policy gradient with a group-mean baseline, from a chat checkpoint.

    python -m scripts.chat_rl                                                          # from sft, one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run rl-d20        # one 8-GPU node
    python -m scripts.chat_rl --source sft --device-type cpu --examples-per-step 2 --num-samples 2 \\
        --max-new-tokens 16 --num-steps 2 --eval-every -1 --eval-examples 2 --data-dir /path/to/data  # tiny, CPU

Each step samples `--num-samples` answers (engine, calculator on) to each of `--examples-per-step` GSM8K train
questions (a fixed seeded shuffle) and rewards an answer 1 when its `#### N` is the reference's. As the
reference's "GRPO simplified to REINFORCE" (karpathy/nanochat chat_rl.py): on-policy, so no PPO ratio, KL or
reference model; advantage = reward - its group's mean, not divided by the std (Dr. GRPO, arXiv 2503.20783
3.1); the loss is normalised per token over the whole step (DAPO, arXiv 2503.14476):

    loss = -sum over sampled tokens t of the step (all ranks) of A(t) * log p(t) / (sampled tokens of the step)

Only sampled tokens are trained (not the prompt or the calculator's forced output). Rollouts depend only on the
weights and (seed, step, question), so `--resume` replays exactly. Writes <base dir>/chatrl_checkpoints/<tag>/
and report/chat_rl.json with pass@1..k on the first `--eval-examples` GSM8K test problems (sample j of problem
i is the one `scripts.chat_eval -n k` draws).
Not here: other tasks or reward models, PPO/KL machinery, torch.compile (every step has new shapes).
"""

import argparse
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import train
from nanochat.chat_data import padded_batch
from nanochat.checkpoint import build_model, checkpoint_dir, last_verified_step, load_model
from nanochat.common import compute_init, dist_info, print0
from nanochat.engine import ContextFullError, Engine
from nanochat.tokenizer import get_tokenizer
from tasks.common import resolve_data_dir
from tasks.gsm8k import GSM8K


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--source", choices=["base", "mid", "sft"], default="sft", help="stage to start from")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("--source-step", type=int, default=None, help="source checkpoint step (default: last)")
    # Rollouts
    parser.add_argument("--examples-per-step", type=int, default=16, help="questions per step, over all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="answers sampled per question (the group)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer, at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (-1 = off)")
    # Optimization
    parser.add_argument("--num-steps", type=int, default=-1, help="RL steps (-1 = one epoch of GSM8K train)")
    parser.add_argument("--device-batch-size", type=int, default=8, help="rollouts per training forward pass")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR before --init-lr-frac")
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of wte at width 768")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head at width 768")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    parser.add_argument("--init-lr-frac", type=float, default=0.05, help="starting LR as a fraction of the above")
    # Evaluation and saving
    parser.add_argument("--eval-every", type=int, default=60, help="steps between GSM8K test pass@k (-1 = end only)")
    parser.add_argument("--eval-examples", type=int, default=400, help="GSM8K test problems per evaluation")
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per test problem: pass@1..k")
    # Runtime
    parser.add_argument("--data-dir", default=None, help="local data dir (default: $NANOCHAT_DATA_DIR, else hub)")
    train.add_stage_flags(parser, save_every=60)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    tokens: list[int]  # generated tokens, the stop token included when the row stopped
    masks: list[int]  # 1 = sampled (trained), 0 = forced by the calculator (not trained)
    stopped: bool  # the row ended with a sampled stop token

    @property
    def answer_tokens(self) -> list[int]:
        """The answer without its stop token: what gets decoded and scored."""
        return self.tokens[:-1] if self.stopped else self.tokens


def rollout_seed(seed: int, step: int, example: int) -> int:
    """The engine seed of one question's group at one step: distinct for every (seed, step, example)."""
    return (seed * 1_000_003 + step) * 10_000_019 + example


def sample_group(engine: Engine, prompt: list[int], num_samples: int, max_tokens: int, seed: int, **sampling):
    """`num_samples` rollouts of one prompt; unlike `generate_batch`, keeps the sampled stop token (it is trained)."""
    rollouts = [Rollout([], [], False) for _ in range(num_samples)]
    for column, masks in engine.generate(prompt, num_samples, max_tokens, seed=seed, **sampling):
        for rollout, token, mask in zip(rollouts, column, masks):
            if rollout.stopped:
                continue
            rollout.tokens.append(token)
            rollout.masks.append(mask)
            rollout.stopped = mask == 1 and token in engine.stop_ids
    return rollouts


# ---------------------------------------------------------------------------- the policy gradient, pure


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (G, S) of G groups of S samples -> advantages (G, S) = reward - its group's mean (no std; a group
    of equal rewards gets zeros: it says nothing about which answer is better)."""
    rewards = rewards.float()
    return rewards - rewards.mean(dim=-1, keepdim=True)


def build_batch(prompt: list[int], rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded inputs and targets (N, T) of prompt + rollout: only the sampled tokens are targets."""
    return padded_batch([(prompt + r.tokens, [0] * len(prompt) + r.masks) for r in rollouts], pad_id)


def policy_gradient_loss(
    logprobs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, num_tokens: int, world_size: int = 1
) -> torch.Tensor:
    """This rank's share of -sum(A * log p) / num_tokens over the tokens with targets >= 0.

    logprobs, targets (B, T); advantages (B,); num_tokens: trained tokens of the whole step, all ranks. The
    optimizer averages gradients over ranks, so each share is scaled by world_size.
    """
    trained = targets >= 0
    weighted = torch.where(trained, logprobs * advantages[:, None].to(logprobs.dtype), 0.0)
    return -weighted.sum() * (world_size / max(1, num_tokens))


def backward_groups(model, groups, device_batch_size: int, pad_id: int, world_size: int = 1, scale=None) -> float:
    """Accumulate the policy gradient of this rank's groups [(prompt, rollouts, advantages (S,))] into .grad;
    returns the step's loss (all ranks). All-zero groups are skipped (zero gradient); parameters left without a
    gradient get zeros, so every rank's optimizer collectives match. `scale`: fp16's GradScaler.scale."""
    device = model.wte.weight.device
    local_tokens = sum(sum(r.masks) for _, rollouts, _ in groups for r in rollouts)
    counts = torch.tensor([local_tokens], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    num_tokens = int(counts.item())
    total_loss = torch.zeros((), device=device)
    for prompt, rollouts, advantages in groups:
        if not advantages.any():
            continue
        for start in range(0, len(rollouts), device_batch_size):
            inputs, targets = build_batch(prompt, rollouts[start : start + device_batch_size], pad_id)
            inputs, targets = inputs.to(device), targets.to(device)
            # cross entropy per token = -log p(target); 0 where the target is -1
            logprobs = -model(inputs, targets, loss_reduction="none").view(targets.shape)  # (B, T)
            chunk_advantages = advantages[start : start + device_batch_size].to(device)
            loss = policy_gradient_loss(logprobs, targets, chunk_advantages, num_tokens, world_size)
            (scale(loss) if scale else loss).backward()
            total_loss += loss.detach() / world_size
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size > 1:
        dist.all_reduce(total_loss)
    return total_loss.item()


# ---------------------------------------------------------------------------- evaluation


def evaluate_pass_at_k(engine, tokenizer, task, num_problems: int, k: int, max_tokens: int, temperature, top_k):
    """[pass@1, ..., pass@k] over the first `num_problems` of `task`, strided over ranks; problem i is sampled
    with seed i, as scripts/chat_eval.py does, so pass@j is what `chat_eval -n j` reports."""
    rank, _, world_size = dist_info()
    passed = torch.zeros(k, dtype=torch.long, device=engine.device)
    num_problems = min(num_problems, len(task))
    for index in range(rank, num_problems, world_size):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        try:
            completions = engine.generate_batch(prompt, k, max_tokens, temperature=temperature, top_k=top_k, seed=index)
        except ContextFullError:
            continue
        outcomes = [task.evaluate(conversation, tokenizer.decode(c.tokens)) for c in completions]
        for j in range(k):
            passed[j] += any(outcomes[: j + 1])
    if world_size > 1:
        dist.all_reduce(passed)
    return [count / max(1, num_problems) for count in passed.tolist()]


# ---------------------------------------------------------------------------- the run


@train.one_line_errors("chat_rl")
def main(argv=None):
    args = parse_args(argv)
    # Derived values
    top_k = None if args.top_k == -1 else args.top_k
    if args.top_k == 0 or args.top_k < -1:
        raise SystemExit(f"--top-k must be >= 1, or -1 for off, got {args.top_k}")
    for flag in ("examples_per_step", "num_samples", "max_new_tokens", "device_batch_size", "eval_samples"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device, world_size = runtime.device, runtime.world_size
    if args.examples_per_step % world_size:
        raise SystemExit(f"--examples-per-step {args.examples_per_step} must divide by the {world_size} processes")
    tokenizer = get_tokenizer()
    data_dir = resolve_data_dir(args.data_dir)
    train_task, test_task = GSM8K("main", "train", data_dir=data_dir), GSM8K("main", "test", data_dir=data_dir)
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)  # one fixed order: the questions of step k never depend on history
    num_steps = args.num_steps if args.num_steps > 0 else len(train_task) // args.examples_per_step
    examples_per_rank = args.examples_per_step // world_size

    # ---------------------------------------------------------------- model
    model_tag = args.model_tag or os.path.basename(checkpoint_dir(args.source))
    out_dir = checkpoint_dir("rl", model_tag)
    if args.resume:  # the weights come from our own last intact checkpoint (resume_stage loads it with the optimizer)
        if (last := last_verified_step(out_dir)) is None:
            raise SystemExit(f"--resume: no checkpoint in {out_dir} verifies; start without --resume")
        model, meta = build_model(out_dir, last, device)
        source = meta["source"]
    else:
        model, meta = load_model(args.source, device, "train", model_tag, args.source_step)
        source = {"stage": args.source, "model_tag": model_tag, "step": meta["step"]}
    model.compute_dtype = runtime.dtype  # fp32 master weights, computing in the compute dtype
    engine = Engine(model, tokenizer)  # the same weights: rollouts are always on-policy
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    source_batch = train.StageRecord.from_meta(meta).total_batch_size
    record = train.StageRecord("rl", model_tag, 0, args.device_batch_size, source_batch,
                               args.matrix_lr, args.embedding_lr, args.unembedding_lr)  # fmt: skip

    # ---------------------------------------------------------------- optimizer and resume
    # rollouts depend only on (weights, seed, step, question): these settings must not change
    layout = {key: getattr(args, key) for key in ("examples_per_step", "num_samples", "seed", "num_steps")}
    optimizer, scaler, start_step, loop, _ = train.start_optimizer(
        model, record, args.init_lr_frac, args.weight_decay, runtime, args.resume, out_dir, layout
    )

    resolved = {**vars(args), "num_steps": num_steps, "source": source, "model_tag": model_tag, "data_dir": data_dir}
    log = train.StageLog(
        "chat_rl", runtime, resolved, args.run, loop or {"rewards": []}, num_steps, start_step=start_step
    )
    print0(f"parameters: {model.num_params():,}; {num_steps} steps x {args.examples_per_step} questions x "
           f"{args.num_samples} samples; start at step {start_step}")  # fmt: skip

    def evaluate() -> dict:
        pass_at_k = evaluate_pass_at_k(engine, tokenizer, test_task, args.eval_examples, args.eval_samples,
                                       args.max_new_tokens, args.temperature, top_k)  # fmt: skip
        return {f"pass@{j + 1}": p for j, p in enumerate(pass_at_k)}

    # ---------------------------------------------------------------- loop
    step, pass_at_k = start_step, {}
    while True:
        last_step = step == num_steps
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            pass_at_k = evaluate()
            log.evaluated(step, pass_at_k)
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            train.save_stage(out_dir, step, model, optimizer, runtime, record, log, source=source,
                             user_config=vars(args), pass_at_k=list(pass_at_k.values()))  # fmt: skip
        if last_step:
            break

        log.start()
        # 1. rollouts: this rank's questions of the step, strided over ranks
        groups, reward_sum, num_rollouts, length_sum = [], 0.0, 0, 0
        for i in range(examples_per_rank):
            example = step * args.examples_per_step + runtime.rank + i * world_size
            conversation = train_task[order[example % len(order)]]
            prompt = tokenizer.render_for_completion(conversation)
            try:
                rollouts = sample_group(
                    engine, prompt, args.num_samples, args.max_new_tokens, rollout_seed(args.seed, step, example),
                    temperature=args.temperature, top_k=top_k,
                )  # fmt: skip
            except ContextFullError:
                continue  # a question longer than the context: nothing to learn from
            rewards = [train_task.reward(conversation, tokenizer.decode(r.answer_tokens)) for r in rollouts]
            groups.append((prompt, rollouts, group_advantages(torch.tensor([rewards]))[0]))
            reward_sum, num_rollouts = reward_sum + sum(rewards), num_rollouts + len(rewards)
            length_sum += sum(len(r.tokens) for r in rollouts)
        stats = torch.tensor([reward_sum, num_rollouts, length_sum], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(stats)
        mean_reward, mean_length = (stats[0] / stats[1].clamp(min=1)).item(), (stats[2] / stats[1].clamp(min=1)).item()

        # 2. the policy gradient and one optimizer step; the LR decays linearly to 0 (the reference's RL schedule)
        lrm = train.warmdown_multiplier(step / num_steps, 1.0, 0.0)
        train.set_schedule(optimizer, lrm)
        model.train()
        loss = backward_groups(model, groups, args.device_batch_size, pad_id, world_size, scaler and scaler.scale)
        train.optimizer_step(model, optimizer, scaler, loss, runtime, args.grad_clip, out_dir)
        model.eval()
        step += 1
        log.state["rewards"].append(mean_reward)
        log.step(step, loss, smooth=False, reward=mean_reward, answer_length=mean_length, lrm=lrm)

    # ---------------------------------------------------------------- report
    rewards = log.state["rewards"]
    summary = {"model_tag": model_tag, "step": step, "source": source, "steps": num_steps,
               "final_mean_reward": rewards[-1] if rewards else None, **log.summary(),
               "eval_problems": min(args.eval_examples, len(test_task)), "pass_at_k": pass_at_k}  # fmt: skip
    return log.finish(summary | {"mean_reward_by_step": rewards, "config": resolved}, curves=())


if __name__ == "__main__":
    main()
