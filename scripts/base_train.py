"""Pretrain the base model: next-token prediction on pretraining shards.

`--depth` is the single dial. Width, heads, training tokens, batch size, learning rates and weight decay follow
from it (the formulas are in `derive_hyperparameters`, with sources); every derived value can be overridden.
One process or many (torchrun), CPU or GPU, the same code: gradients are averaged by the optimizer itself.

    python -m scripts.base_train --depth 20                                            # one GPU (accumulates)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20          # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m scripts.base_train
    python -m scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 512 \\
        --num-iterations 30 --eval-every 10 --eval-tokens 2048 --sample-every -1       # tiny, CPU, seconds

Writes checkpoints to <base dir>/base_checkpoints/d<depth>/ (model, per-rank optimizer, meta with the loop and
dataloader state); `--resume` continues the last one exactly. Logs to wandb with `--run NAME`. The report card's
summary, with the train-loss and val-bpb curves (kept in the loop state, so they survive a resume), goes to
<base dir>/report/base_train.json.
Not here: CORE evaluation (scripts/base_eval.py), bpb of a finished model (scripts/base_loss.py).
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import (
    compute_cleanup,
    compute_init,
    describe_environment,
    get_base_dir,
    gpu_peaks,
    needs_grad_scaler,
    print0,
)
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import default_pretrain_paths
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizer
from nanochat.report import write_stage_summary
from nanochat.tokenizer import get_tokenizer

# Prompts whose greedy continuations show what the model has picked up (facts, arithmetic, grammar).
SAMPLE_PROMPTS = [
    "The largest ocean on Earth is the",
    "Water boils at a temperature of",
    "Seven plus five equals",
    "The author of the play Romeo and Juliet is",
    "In the winter, many birds fly",
]

REFERENCE_BATCH = 2**19  # tokens per step at the reference depth (nanochat: 524,288 for d12 and the d20 speedrun)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--depth", type=int, default=20, help="number of layers; decides everything else")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--n-kv-head", type=int, default=-1, help="key/value heads (-1 = as many as heads; 1 = MQA)")
    parser.add_argument("--mlp", choices=["relu2", "swiglu"], default="relu2")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    # Training horizon (first one set wins: iterations > FLOPs > tokens:params ratio)
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive)")
    parser.add_argument("--target-flops", type=float, default=-1, help="training FLOPs budget (-1 = off)")
    parser.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=12,
        help="training tokens per scaling parameter (block matrices + lm_head)",
    )
    # Optimization
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass per process")
    parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = derive)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR at the reference batch")
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of wte at width 768, ref. batch")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head at width 768")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay at the ref. depth")
    parser.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps decaying the LR")
    parser.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the last step")
    parser.add_argument("--grad-clip", type=float, default=-1, help="max global grad norm (-1 = off)")
    # Evaluation and saving
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (-1 = end only)")
    parser.add_argument("--eval-tokens", type=int, default=20 * 2**19, help="validation tokens per evaluation")
    parser.add_argument("--sample-every", type=int, default=2000, help="steps between samples (-1 = off)")
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = end only)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this model tag")
    # Runtime
    parser.add_argument("--data", nargs="+", default=None, help="shards (default: <base dir>/base_data)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto = on for CUDA")
    parser.add_argument("--run", default=None, help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def scaling_params(config: GPTConfig) -> int:
    """Parameters that the token budget scales with: block matrices plus lm_head (nanochat HEAD's rule; the
    embedding is a lookup and costs no FLOPs). Counted on a meta-device model: no memory, exact for any MLP."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameter_roles()["matrix"]) + model.lm_head.weight.numel()


def derive_hyperparameters(args, config: GPTConfig, flops_per_token: float, world_size: int) -> dict:
    """Every value the depth decides, in one place. Sources: nanochat dev/LOG.md at HEAD (auto hyperparameters
    from depth, 2026) as summarised in shared/reference/nanochat.md §2 row 8."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    # Reference point: depth 12 with a 32,768 vocab at ratio 12 trains on D_ref tokens with a 2^19 batch.
    ref = GPTConfig.from_depth(12, vocab_size=32768)
    ref_tokens = args.target_param_data_ratio * scaling_params(ref)
    target_tokens = args.target_param_data_ratio * scaling_params(config)
    if args.total_batch_size > 0:
        total_batch = args.total_batch_size
    else:
        # Optimal batch grows with the data: B = 2^19 (D / D_ref)^0.383, rounded to a power of two.
        total_batch = 2 ** round(math.log2(REFERENCE_BATCH * (target_tokens / ref_tokens) ** 0.383))
        total_batch = max(total_batch, tokens_per_micro_step)
    if total_batch % tokens_per_micro_step:
        raise SystemExit(
            f"--total-batch-size {total_batch} must be a multiple of device batch x seq len x processes = "
            f"{args.device_batch_size} x {args.max_seq_len} x {world_size} = {tokens_per_micro_step}"
        )
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = math.ceil(args.target_flops / (flops_per_token * total_batch))
    else:
        num_iterations = math.ceil(target_tokens / total_batch)
    # LRs scale with sqrt(batch / 2^19) and decoupled weight decay also with 1 / data (T_epoch rule). The scaling is
    # part of the dial: it follows the derived batch; with --total-batch-size set by hand, the LRs are used as given.
    lr_scale = math.sqrt(total_batch / REFERENCE_BATCH) if args.total_batch_size <= 0 else 1.0
    return {
        "total_batch_size": total_batch,
        "grad_accum_steps": total_batch // tokens_per_micro_step,
        "num_iterations": num_iterations,
        "training_tokens": num_iterations * total_batch,
        "matrix_lr": args.matrix_lr * lr_scale,
        "embedding_lr": args.embedding_lr * lr_scale,
        "unembedding_lr": args.unembedding_lr * lr_scale,
        "weight_decay": args.weight_decay * lr_scale * ref_tokens / target_tokens,
    }


def lr_multiplier(step: int, num_iterations: int, args) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    warmdown_steps = round(args.warmdown_ratio * num_iterations)
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / max(1, warmdown_steps)
    return progress + (1 - progress) * args.final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 over the first 300 steps (modded-nanogpt / nanochat): less momentum while the loss moves fast."""
    return 0.85 + 0.10 * min(1.0, step / 300)


def sample(model, tokenizer, device) -> list[str]:
    """Greedy 16-token continuations of SAMPLE_PROMPTS with the slow reference sampler (rank 0 only)."""
    outputs = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        continuation = list(model.generate(ids, 16, temperature=0))
        outputs.append(prompt + tokenizer.decode(continuation))
    return outputs


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device, master = runtime.device, runtime.is_master
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    data = args.data or default_pretrain_paths()

    # ---------------------------------------------------------------- model
    config = GPTConfig.from_depth(
        args.depth, tokenizer.get_vocab_size(), args.max_seq_len, n_kv_head=args.n_kv_head, mlp=args.mlp
    )
    model = GPT.build(config, device)
    model.compute_dtype = runtime.dtype
    hp = derive_hyperparameters(args, config, model.estimate_flops(), runtime.world_size)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    use_compile = args.compile == "on" or (args.compile == "auto" and runtime.device_type == "cuda")
    forward = torch.compile(model, dynamic=False) if use_compile else model

    # ---------------------------------------------------------------- optimizer
    optimizer = build_optimizer(
        model, hp["matrix_lr"], hp["embedding_lr"], hp["unembedding_lr"], weight_decay=hp["weight_decay"]
    )
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(runtime.dtype) else None

    # ---------------------------------------------------------------- resume
    start_step, loop = 0, {"smooth_loss": 0.0, "training_seconds": 0.0, "min_val_bpb": None}
    loop.update(timed_steps=0, train_loss_curve=[], val_bpb_curve=[])  # [[step, value], ...] for the report
    loader_states = None
    if args.resume:
        last = find_last_step(checkpoint_dir)
        if last is None:
            raise SystemExit(f"--resume: no checkpoint in {checkpoint_dir}; start without --resume")
        model_state, optim_state, meta = load_checkpoint(
            checkpoint_dir, last, device, load_optimizer=True, rank=runtime.rank, world_size=runtime.world_size
        )
        if GPTConfig.from_dict(meta["model_config"]) != config:
            raise SystemExit(f"--resume: {checkpoint_dir} holds a different model ({meta['model_config']})")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        start_step, loop = meta["step"], {**loop, **meta["loop"]}  # older checkpoints lack the curves
        if meta["total_batch_size"] != hp["total_batch_size"] or len(meta["dataloader"]) != runtime.world_size:
            raise SystemExit("--resume: the batch layout changed since the checkpoint (total batch or processes)")
        loader_states = meta["dataloader"][runtime.rank]
        del model_state, optim_state
    # One loader per (process, accumulation micro-step), all slices of one data-parallel width W x A: a global
    # batch holds the same rows whether it is spread over 8 GPUs or accumulated on 1, so runs are comparable.
    grad_accum, data_width = hp["grad_accum_steps"], hp["grad_accum_steps"] * runtime.world_size
    loaders = [
        PretrainLoader(
            tokenizer, data, "train", args.device_batch_size, args.max_seq_len, device,
            rank=runtime.rank * grad_accum + micro, world_size=data_width, seed=args.seed,
            state=loader_states[micro] if loader_states else None,
        )
        for micro in range(grad_accum)
    ]  # fmt: skip

    resolved = {**vars(args), **hp, "model_config": config.to_dict(), "model_tag": model_tag, "data": data}
    environment = describe_environment(runtime)
    print0(json.dumps({"config": resolved, "environment": environment}, indent=2, default=str))
    print0(
        f"parameters: {model.num_params():,}; scaling parameters: {scaling_params(config):,}; "
        f"FLOPs/token: {model.estimate_flops():.3e}; steps: {hp['num_iterations']:,} x {hp['total_batch_size']:,} "
        f"tokens (grad accumulation {hp['grad_accum_steps']}); start at step {start_step}"
    )
    wandb_run = None
    if args.run and master:
        import wandb

        wandb_run = wandb.init(project="nanochat", name=args.run, config={**resolved, **environment})
    peaks = gpu_peaks(environment["gpu"]) if "gpu" in environment else None

    def save(step: int, val_bpb: float | None):
        local_states = [loader.state_dict() for loader in loaders]
        states = [None] * runtime.world_size  # states[rank] = that process's loaders' states
        if runtime.is_distributed:
            dist.all_gather_object(states, local_states)
        else:
            states = [local_states]
        meta = {"loop": loop, "dataloader": states, "val_bpb": val_bpb, "user_config": vars(args), **hp}
        save_checkpoint(checkpoint_dir, step, model, optimizer, meta, runtime.rank, runtime.world_size)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    def validate() -> float:
        val_loader = PretrainLoader(
            tokenizer, data, "val", args.device_batch_size, args.max_seq_len, device, runtime.rank, runtime.world_size
        )
        steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * runtime.world_size))
        return evaluate_bpb(model, val_loader, steps, token_bytes)

    # ---------------------------------------------------------------- loop
    num_iterations = hp["num_iterations"]
    curve_every = max(1, num_iterations // 500)  # at most ~500 points of train loss in the report
    step, val_bpb = start_step, None
    while True:
        last_step = step == num_iterations
        if args.eval_every > 0 and (step % args.eval_every == 0 or last_step) or (last_step and args.eval_every <= 0):
            val_bpb = validate()
            best = loop["min_val_bpb"]
            loop["min_val_bpb"] = val_bpb if best is None else min(best, val_bpb)
            if not loop["val_bpb_curve"] or loop["val_bpb_curve"][-1][0] != step:  # a resume re-evaluates its step
                loop["val_bpb_curve"].append([step, val_bpb])
            print0(f"step {step:05d} | validation bpb {val_bpb:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/bpb": val_bpb})
        if master and args.sample_every > 0 and (step % args.sample_every == 0 or last_step) and step > 0:
            for text in sample(model, tokenizer, device):
                print0(f"  sample: {text!r}")
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_bpb)
        if last_step:
            break

        # one optimizer step over grad_accum micro-batches
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        started = time.time()
        lrm = lr_multiplier(step, num_iterations, args)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        train_loss = torch.zeros((), device=device)
        for loader in loaders:
            inputs, targets = next(loader)
            loss = forward(inputs, targets) / grad_accum
            train_loss += loss.detach()
            (scaler.scale(loss) if scaler else loss).backward()
        if runtime.is_distributed:
            dist.all_reduce(train_loss)
            train_loss /= runtime.world_size
        if not torch.isfinite(train_loss):
            print0(
                f"step {step}: loss is {train_loss.item()}; stopping. The last good checkpoint in "
                f"{checkpoint_dir} is intact: lower the learning rates and resume with --resume."
            )
            compute_cleanup()
            raise SystemExit(1)
        if scaler:
            scaler.unscale_(optimizer)
        if args.grad_clip > 0:
            # Clipping needs the norm of the averaged gradient, so average here (one extra all-reduce; the
            # optimizer's own averaging of identical gradients then changes nothing).
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if runtime.is_distributed:
                for grad in grads:
                    dist.all_reduce(grad)
                    grad /= runtime.world_size
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize()
        step_seconds = time.time() - started
        step += 1

        # logging: debiased EMA of the loss, throughput, MFU, ETA
        loss_value = train_loss.item()
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss_value
        smooth = loop["smooth_loss"] / (1 - 0.9**step)
        if step - start_step > 2:  # the first steps include compilation and warmup
            loop["training_seconds"] += step_seconds
            loop["timed_steps"] += 1
        if step % curve_every == 0 or step == num_iterations:
            loop["train_loss_curve"].append([step, round(smooth, 5)])
        tokens_per_s = hp["total_batch_size"] / step_seconds
        mfu = model.estimate_flops() * tokens_per_s / (peaks[0] * runtime.world_size) if peaks else None
        eta = (num_iterations - step) * step_seconds
        filled = int(20 * step / num_iterations)
        print0(
            f"step {step:05d}/{num_iterations} [{'#' * filled}{'.' * (20 - filled)}] loss {smooth:.4f} | lrm {lrm:.3f} "
            f"| {step_seconds * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s"
            + (f" | MFU {mfu:.1%}" if mfu is not None else "")
            + f" | ETA {eta / 60:.1f} min"
        )
        if wandb_run:
            wandb_run.log(
                {"step": step, "train/loss": smooth, "train/lrm": lrm, "train/tok_per_s": tokens_per_s}
                | ({"train/mfu": mfu} if mfu is not None else {})
            )

    summary = {
        "val_bpb": val_bpb,
        "min_val_bpb": loop["min_val_bpb"],
        "training_minutes": loop["training_seconds"] / 60,
    }
    print0(f"done: {json.dumps(summary)}")
    # Mean MFU over the timed steps (the first steps of each session, compilation and warmup, are not timed).
    timed_tokens_per_s = (
        loop["timed_steps"] * hp["total_batch_size"] / loop["training_seconds"] if loop["timed_steps"] else 0
    )
    report = {
        **summary,
        "depth": args.depth,
        "model_tag": model_tag,
        "parameters": model.num_params(),
        "flops_per_token": model.estimate_flops(),
        "steps": step,
        "tokens": step * hp["total_batch_size"],
        "total_batch_size": hp["total_batch_size"],
        "mfu": model.estimate_flops() * timed_tokens_per_s / (peaks[0] * runtime.world_size) if peaks else None,
        "world_size": runtime.world_size,
        "train_loss_curve": loop["train_loss_curve"],
        "val_bpb_curve": loop["val_bpb_curve"],
    }
    if runtime.device_type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print0(f"peak memory {report['peak_memory_gib']:.1f} GiB")
    if master:
        write_stage_summary("base_train", report)
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
