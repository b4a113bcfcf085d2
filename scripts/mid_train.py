"""Midtrain: continue a base checkpoint on packed conversations, teaching the chat format and the tools.

The mixture (`--mixture`, comma-separated; nanochat.chat_data.COMPONENTS) covers the special tokens and
multi-turn chat (smoltalk), multiple choice (mmlu-aux), the calculator tool (gsm8k), who the assistant is
(identity, `--identity PATH`) and spelling (simplespelling, spelling). Conversations are rendered and packed
into full rows like pretraining, and EVERY token is a target, as in reference nanochat's mid_train: this is
still next-token training on chat-shaped text (user turns included), which teaches the whole format; only SFT
(scripts/chat_sft.py) restricts the loss to the assistant's tokens. The LR is constant, then decays linearly to
`--final-lr-frac` over the last `--warmdown-ratio` of the run (reference: constant to 80%, then to 0).
Sequence length, batch and LRs are inherited from the base checkpoint unless set.

    python -m scripts.mid_train                                                      # one GPU, one epoch
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run mid-d20   # one 8-GPU node, wandb
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.mid_train --device-type cpu \\
        --mixture gsm8k,identity,spelling,simplespelling,arc --num-iterations 20 \\
        --device-batch-size 4 --total-batch-size 512 --eval-every 10 --eval-tokens 2048   # tiny, CPU, offline

The offline mixture above is what ../shared/data supports: smoltalk and mmlu-aux exist only on the Hugging
Face hub, and asking for them without it is an error that says to leave them out.

Writes <base dir>/mid_checkpoints/<model tag>/ (model, per-rank optimizer, meta with the loop and loader
state; `--resume` continues exactly) and <base dir>/report/mid_train.json. Not here: chat evaluation
(scripts/chat_eval.py -i mid), SFT (scripts/chat_sft.py).
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from nanochat.chat_data import (
    COMPONENTS,
    MixtureError,
    PackedChatLoader,
    Sources,
    build_mixture,
    default_identity_path,
    describe_mixture,
    lr_multiplier,
    parse_mixture,
    source_settings,
)
from nanochat.checkpoint import build_model, checkpoint_dir, find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import (
    compute_cleanup,
    compute_init,
    describe_environment,
    needs_grad_scaler,
    print0,
)
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizer
from nanochat.report import write_stage_summary
from nanochat.tokenizer import get_tokenizer
from scripts.base_train import muon_momentum
from tasks.common import resolve_data_dir

DEFAULT_MIXTURE = "smoltalk,mmlu-aux,gsm8k,identity,simplespelling,spelling"
OFFLINE_MIXTURE = "gsm8k,identity,spelling,simplespelling,arc"
# Sizes of reference nanochat's mid mixture (§1.10): identity twice, 200K SimpleSpelling, 80K SpellingBee.
RECIPE = {"identity": {"epochs": 2}, "simplespelling": {"size": 200_000}, "spelling": {"size": 80_000}}
STAGE_COMPONENTS = [name for name in COMPONENTS if name != "data"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--model-tag", default=None, help="base checkpoint dir, and ours (default: largest d<N>)")
    parser.add_argument("--model-step", type=int, default=-1, help="base checkpoint step (-1 = last)")
    # Data
    parser.add_argument("--mixture", default=DEFAULT_MIXTURE, help=f"components (offline: {OFFLINE_MIXTURE})")
    parser.add_argument(
        "--data-dir", default=None, help="data like ../shared/data (default: $NANOCHAT_DATA_DIR, else hub)"
    )
    parser.add_argument("--identity", default=None, help="identity JSONL (default: <data dir>/chat/ or <base dir>/)")
    # Training horizon
    parser.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)"
    )
    # Optimization (-1 = inherit from the base checkpoint)
    parser.add_argument("--max-seq-len", type=int, default=-1, help="row length in tokens (-1 = inherit)")
    parser.add_argument("--device-batch-size", type=int, default=-1, help="rows per forward pass (-1 = inherit)")
    parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = inherit)")
    parser.add_argument("--init-lr-frac", type=float, default=1.0, help="multiplier on the inherited LRs")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of the run decaying the LR")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    # Evaluation and saving
    parser.add_argument("--eval-every", type=int, default=150, help="steps between validation bpb (-1 = end only)")
    parser.add_argument("--eval-tokens", type=int, default=20 * 2**19, help="validation tokens per evaluation")
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = end only)")
    parser.add_argument("--resume", action="store_true", help="continue from the last mid checkpoint of this tag")
    # Runtime
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto = on for CUDA")
    parser.add_argument("--run", default=None, help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    try:
        args.mixture_names = parse_mixture(args.mixture, STAGE_COMPONENTS)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device, master = runtime.device, runtime.is_master
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)

    # ---------------------------------------------------------------- model
    source_dir = checkpoint_dir("base", args.model_tag)
    model, source_meta = build_model(source_dir, None if args.model_step < 0 else args.model_step, device)
    model.compute_dtype = runtime.dtype
    model_tag = os.path.basename(source_dir)
    output_dir = checkpoint_dir("mid", model_tag)

    # Derived values: inherited from the base checkpoint unless given
    inherited = source_settings(source_meta)
    seq_len = args.max_seq_len if args.max_seq_len > 0 else inherited["max_seq_len"]
    device_batch = args.device_batch_size if args.device_batch_size > 0 else inherited["device_batch_size"]
    total_batch = args.total_batch_size if args.total_batch_size > 0 else inherited["total_batch_size"]
    tokens_per_micro_step = device_batch * seq_len * runtime.world_size
    if seq_len > model.config.sequence_len:
        raise SystemExit(f"--max-seq-len {seq_len} exceeds the model's context {model.config.sequence_len}")
    if total_batch % tokens_per_micro_step:
        raise SystemExit(
            f"--total-batch-size {total_batch} must be a multiple of {tokens_per_micro_step} "
            f"(device batch {device_batch} x seq len {seq_len} x {runtime.world_size} processes)"
        )
    hp = {
        "max_seq_len": seq_len, "device_batch_size": device_batch, "total_batch_size": total_batch,
        "grad_accum_steps": total_batch // tokens_per_micro_step,
        **{key: inherited[key] for key in ("matrix_lr", "embedding_lr", "unembedding_lr")},
    }  # fmt: skip
    use_compile = args.compile == "on" or (args.compile == "auto" and runtime.device_type == "cuda")
    forward = torch.compile(model, dynamic=False) if use_compile else model

    # ---------------------------------------------------------------- data
    data_dir = resolve_data_dir(args.data_dir)
    sources = Sources(data_dir, args.identity or default_identity_path(data_dir))
    try:
        train_mixture, train_rows = build_mixture(args.mixture_names, "train", sources, RECIPE)
        val_mixture, val_rows = build_mixture(args.mixture_names, "val", sources, RECIPE)
    except MixtureError as e:
        raise SystemExit(f"mid_train: {e}") from e
    print0(describe_mixture("train mixture", train_rows))
    print0(describe_mixture("validation mixture", val_rows))

    # ---------------------------------------------------------------- optimizer
    frac = args.init_lr_frac
    optimizer = build_optimizer(model, hp["matrix_lr"] * frac, hp["embedding_lr"] * frac,
                                hp["unembedding_lr"] * frac, weight_decay=args.weight_decay)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(runtime.dtype) else None

    # ---------------------------------------------------------------- resume
    start_step, loop, loader_states = 0, {"smooth_loss": 0.0, "training_seconds": 0.0, "min_val_bpb": None}, None
    loop.update(train_loss_curve=[], val_bpb_curve=[])  # [[step, value], ...] for the report card
    if args.resume:
        last = find_last_step(output_dir)
        if last is None:
            raise SystemExit(f"--resume: no checkpoint in {output_dir}; start without --resume")
        model_state, optim_state, meta = load_checkpoint(
            output_dir, last, device, load_optimizer=True, rank=runtime.rank, world_size=runtime.world_size
        )
        if meta["total_batch_size"] != total_batch or len(meta["dataloader"]) != runtime.world_size:
            raise SystemExit("--resume: the batch layout changed since the checkpoint (total batch or processes)")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        start_step, loader_states = meta["step"], meta["dataloader"][runtime.rank]
        loop = {**loop, **meta["loop"]}  # older checkpoints lack the curves
        del model_state, optim_state
    # One loader per (process, micro-step), slices of one data width, as in base_train.
    grad_accum, data_width = hp["grad_accum_steps"], hp["grad_accum_steps"] * runtime.world_size
    loaders = [
        PackedChatLoader(tokenizer, train_mixture, device_batch, seq_len, device, runtime.rank * grad_accum + micro,
                         data_width, state=loader_states[micro] if loader_states else None)
        for micro in range(grad_accum)
    ]  # fmt: skip

    resolved = {**vars(args), **hp, "model_tag": model_tag, "source": source_dir, "data_dir": data_dir,
                "train_mixture": train_rows, "val_mixture": val_rows}  # fmt: skip
    environment = describe_environment(runtime)
    print0(json.dumps({"config": resolved, "environment": environment}, indent=2, default=str))
    horizon = f"{args.num_iterations:,} steps" if args.num_iterations > 0 else "one epoch of the mixture"
    print0(f"parameters: {model.num_params():,}; {horizon} x {total_batch:,} tokens "
           f"(grad accumulation {grad_accum}); start at step {start_step}")  # fmt: skip
    wandb_run = None
    if args.run and master:
        import wandb

        wandb_run = wandb.init(project="nanochat-mid", name=args.run, config={**resolved, **environment})

    def data_progress() -> float:
        progress = torch.tensor(sum(loader.progress() for loader in loaders) / grad_accum, device=device)
        if runtime.is_distributed:
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return progress.item()

    def save(step: int, val_bpb: float | None):
        local_states = [loader.state_dict() for loader in loaders]
        states = [None] * runtime.world_size
        if runtime.is_distributed:
            dist.all_gather_object(states, local_states)
        else:
            states = [local_states]
        meta = {"loop": loop, "dataloader": states, "val_bpb": val_bpb, "user_config": vars(args), **hp}
        save_checkpoint(output_dir, step, model, optimizer, meta, runtime.rank, runtime.world_size)
        print0(f"saved checkpoint step {step} to {output_dir}")

    def validate() -> float:
        val_loader = PackedChatLoader(tokenizer, val_mixture, device_batch, seq_len, device, runtime.rank,
                                      runtime.world_size)  # fmt: skip
        steps = max(1, args.eval_tokens // (device_batch * seq_len * runtime.world_size))
        return evaluate_bpb(model, val_loader, steps, token_bytes)

    # ---------------------------------------------------------------- loop
    step, val_bpb = start_step, None
    while True:
        progress = step / args.num_iterations if args.num_iterations > 0 else data_progress()
        last_step = progress >= 1
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            val_bpb = validate()
            best = loop["min_val_bpb"]
            loop["min_val_bpb"] = val_bpb if best is None else min(best, val_bpb)
            if not loop["val_bpb_curve"] or loop["val_bpb_curve"][-1][0] != step:  # a resume re-evaluates its step
                loop["val_bpb_curve"].append([step, val_bpb])
            print0(f"step {step:05d} | validation bpb {val_bpb:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/bpb": val_bpb})
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_bpb)
        if last_step:
            break

        # one optimizer step over grad_accum micro-batches
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        started = time.time()
        lrm = lr_multiplier(progress, args.warmdown_ratio, args.final_lr_frac)
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
            print0(f"step {step}: loss is {train_loss.item()}; stopping. Lower the LRs (--init-lr-frac) and resume.")
            compute_cleanup()
            raise SystemExit(1)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize()
        step_seconds = time.time() - started
        step += 1

        loss_value = train_loss.item()
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss_value
        smooth = loop["smooth_loss"] / (1 - 0.9**step)
        if step - start_step > 2:  # the first steps include compilation and warmup
            loop["training_seconds"] += step_seconds
        loop["train_loss_curve"].append([step, round(smooth, 5)])  # every step: midtraining is short
        print0(f"step {step:05d} ({100 * progress:.1f}%) | loss {smooth:.4f} | lrm {lrm:.3f} | "
               f"{step_seconds * 1000:.0f} ms | {total_batch / step_seconds:,.0f} tok/s")  # fmt: skip
        if wandb_run:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/progress": progress})

    summary = {
        "val_bpb": val_bpb,
        "min_val_bpb": loop["min_val_bpb"],
        "steps": step,
        "training_minutes": loop["training_seconds"] / 60,
        "train_mixture": dict(train_rows),
        "source": source_dir,
    }
    print0(f"done: {json.dumps(summary)}")
    if master:
        curves = {key: loop[key] for key in ("train_loss_curve", "val_bpb_curve")}
        write_stage_summary("mid_train", {**summary, **curves})
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
