"""Midtrain: continue a base checkpoint on packed conversations, teaching the chat format and the tools.

Conversations of the recipe (MIXTURE below) are packed into full rows like pretraining and EVERY token is a
target, as in reference nanochat's mid_train. Batch sizes and LRs are the base checkpoint's StageRecord's unless set.

    python -m scripts.mid_train                                                      # one GPU, one epoch
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run mid-d20   # one 8-GPU node, wandb
    NANOCHAT_DATA_DIR=/path/to/data python -m scripts.mid_train --device-type cpu --num-iterations 20 \\
        --device-batch-size 4 --total-batch-size 512 --eval-every 10 --eval-tokens 2048   # tiny, CPU, offline

Writes <base dir>/mid_checkpoints/<model tag>/ (`--resume` continues exactly) and report/mid_train.json.
Not here: chat evaluation, SFT.
"""

import argparse
import os
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from nanochat import train
from nanochat.chat_data import PackedChatLoader
from nanochat.common import compute_init, print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_tokenizer
from tasks.mixture import COMPONENTS, add_mixture_flags, load_stage_mixtures

# The recipe: component -> sizes (epochs: listed n times; size: generated examples). Reference nanochat's mid
# mixture: identity twice, 200K SimpleSpelling, 80K SpellingBee. `--mixture` picks among all but "data".
MIXTURE = {"smoltalk": {}, "mmlu-aux": {}, "gsm8k": {}, "identity": {"epochs": 2},
           "simplespelling": {"size": 200_000}, "spelling": {"size": 80_000}}  # fmt: skip
STAGE_COMPONENTS = [name for name in COMPONENTS if name != "data"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--model-tag", default=None, help="base checkpoint dir, and ours (default: largest d<N>)")
    parser.add_argument("--model-step", type=int, default=-1, help="base checkpoint step (-1 = last)")
    # Data
    add_mixture_flags(parser, STAGE_COMPONENTS)
    # Training horizon
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch)")
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
    # Runtime
    train.add_stage_flags(parser)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto = on for CUDA")
    return parser.parse_args(argv)


@train.one_line_errors("mid_train")
def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device = runtime.device
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)

    # ---------------------------------------------------------------- model
    model, source, source_dir, output_dir, seq_len = train.load_source(args, "base", "mid", runtime)
    model_tag = os.path.basename(output_dir)

    # Derived values: the base stage's record unless given
    device_batch = args.device_batch_size if args.device_batch_size > 0 else source.device_batch_size
    total_batch = args.total_batch_size if args.total_batch_size > 0 else source.total_batch_size
    tokens_per_micro_step = device_batch * seq_len * runtime.world_size
    if total_batch % tokens_per_micro_step:
        raise SystemExit(
            f"--total-batch-size {total_batch} must be a multiple of {tokens_per_micro_step} "
            f"(device batch {device_batch} x seq len {seq_len} x {runtime.world_size} processes)"
        )
    grad_accum = total_batch // tokens_per_micro_step
    record = replace(source, stage="mid", model_tag=model_tag, device_batch_size=device_batch,
                     total_batch_size=total_batch)  # fmt: skip
    use_compile = args.compile == "on" or (args.compile == "auto" and runtime.device_type == "cuda")
    forward = torch.compile(model, dynamic=False) if use_compile else model

    # ---------------------------------------------------------------- data
    train_mixture, train_rows, val_mixture, data_dir = load_stage_mixtures(args, MIXTURE)

    # ---------------------------------------------------------------- optimizer and resume
    layout = {"total_batch_size": total_batch, "device_batch_size": device_batch}
    optimizer, scaler, start_step, loop, loader_states = train.start_optimizer(
        model, source, args.init_lr_frac, args.weight_decay, runtime, args.resume, output_dir, layout
    )
    # One loader per (process, micro-step), slices of one data width, as in base_train.
    data_width = grad_accum * runtime.world_size
    loaders = [
        PackedChatLoader(tokenizer, train_mixture, device_batch, seq_len, device, runtime.rank * grad_accum + micro,
                         data_width, state=loader_states[micro] if loader_states else None)
        for micro in range(grad_accum)
    ]  # fmt: skip

    resolved = {**vars(args), **asdict(record), "max_seq_len": seq_len, "grad_accum_steps": grad_accum,
                "source": source_dir, "data_dir": data_dir, "train_mixture": train_rows}  # fmt: skip
    num_steps = args.num_iterations if args.num_iterations > 0 else None
    log = train.StageLog("mid_train", runtime, resolved, args.run, loop, num_steps, model.estimate_flops(), start_step)
    horizon = f"{args.num_iterations:,} steps" if num_steps else "one epoch of the mixture"
    print0(f"parameters: {model.num_params():,}; {horizon} x {total_batch:,} tokens "
           f"(grad accumulation {grad_accum}); start at step {start_step}")  # fmt: skip

    def data_progress() -> float:
        progress = torch.tensor(sum(loader.progress() for loader in loaders) / grad_accum, device=device)
        if runtime.is_distributed:
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return progress.item()

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
        if val_mixture is not None and ((args.eval_every > 0 and step % args.eval_every == 0) or last_step):
            val_bpb = validate()
            log.evaluated(step, {"val_bpb": val_bpb})
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            train.save_stage(output_dir, step, model, optimizer, runtime, record, log, loaders, val_bpb=val_bpb,
                             user_config=vars(args), max_seq_len=seq_len, grad_accum_steps=grad_accum)  # fmt: skip
        if last_step:
            break

        log.start()
        lrm = train.warmdown_multiplier(progress, args.warmdown_ratio, args.final_lr_frac)
        train.set_schedule(optimizer, lrm, train.muon_momentum(step))
        train_loss = train.accumulate(forward, loaders, runtime, scaler)
        train.optimizer_step(model, optimizer, scaler, train_loss, runtime, args.grad_clip, output_dir)
        step += 1
        log.step(step, train_loss.item(), total_batch, lrm=lrm, progress=progress)

    summary = {"model_tag": model_tag, "step": step, "val_bpb": val_bpb, "min_val_bpb": log.state.get("min_val_bpb"),
               "steps": step, **log.summary(), "train_mixture": dict(train_rows), "source": source_dir}  # fmt: skip
    return log.finish(summary, curves=("train_loss", "val_bpb"))


if __name__ == "__main__":
    main()
