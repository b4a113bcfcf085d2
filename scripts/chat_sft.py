"""Chat SFT: fine-tune a mid (or base) checkpoint on whole conversations, trained only on the assistant's tokens.

One conversation per row, right-padded to the longest in its micro-batch; targets are -1 where the render mask
is 0 (user turns, tool output) and on padding. The loss of a step is the sum over its supervised tokens divided
by their number in the WHOLE step (every micro-batch, every process; nanochat.chat_data.supervised_backward),
so the gradient does not depend on how the step is split. The LR starts at `--init-lr-frac` of the source's
LRs and decays linearly to `--final-lr-frac` (reference: 0.02, to 0). Sequence length and device batch are
inherited from the source checkpoint unless set. No torch.compile: rows have variable lengths.

Mixture (`--mixture`): arc, gsm8k, smoltalk (first 10K), identity, simplespelling (300), spelling (300), as in
reference nanochat; `--data PATH.jsonl` adds your own conversations (CustomJSON lines) as the component "data".

    python -m scripts.chat_sft                                                       # one GPU, from mid
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run sft-d20
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.chat_sft --device-type cpu \\
        --mixture gsm8k,identity,spelling,simplespelling,arc --num-iterations 20 --device-batch-size 2 \\
        --examples-per-step 4 --eval-every 10 --eval-steps 4 --eval-metrics-max-problems 16   # tiny, CPU, offline

Offline (../shared/data) the mixture above is what loads: smoltalk is hub-only, and asking for it without the
hub is an error that says to leave it out.

Writes <base dir>/chatsft_checkpoints/<model tag>/ (model, per-rank optimizer, meta; `--resume` continues
exactly) and <base dir>/report/chat_sft.json. Not here: full chat evaluation (scripts/chat_eval.py -i sft).
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
    Sources,
    build_mixture,
    default_identity_path,
    describe_mixture,
    evaluate_loss,
    lr_multiplier,
    parse_mixture,
    sft_micro_batches,
    source_settings,
    supervised_backward,
)
from nanochat.checkpoint import build_model, checkpoint_dir, find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import (
    compute_cleanup,
    compute_init,
    describe_environment,
    needs_grad_scaler,
    print0,
)
from nanochat.optim import build_optimizer
from nanochat.report import write_stage_summary
from nanochat.tokenizer import get_tokenizer
from scripts.chat_eval import evaluate_categorical, load_task
from tasks.common import resolve_data_dir

DEFAULT_MIXTURE = "arc,gsm8k,smoltalk,identity,simplespelling,spelling"
OFFLINE_MIXTURE = "gsm8k,identity,spelling,simplespelling,arc"
# Sizes of reference nanochat's SFT mixture (§1.11): SmolTalk's first 10K, 300 of each spelling task.
RECIPE = {"smoltalk": {"stop": 10_000}, "simplespelling": {"size": 300}, "spelling": {"size": 300}}
STAGE_COMPONENTS = [name for name in COMPONENTS if name not in ("mmlu-aux", "data")]
METRIC_TASKS = ("MMLU", "ARC-Easy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--source", choices=["mid", "base"], default="mid", help="checkpoint stage to start from")
    parser.add_argument("--model-tag", default=None, help="source checkpoint dir, and ours (default: largest d<N>)")
    parser.add_argument("--model-step", type=int, default=-1, help="source checkpoint step (-1 = last)")
    # Data
    parser.add_argument("--mixture", default=DEFAULT_MIXTURE, help=f"components (offline: {OFFLINE_MIXTURE})")
    parser.add_argument("--data", default=None, help="your conversations, JSONL (adds the component 'data')")
    parser.add_argument(
        "--data-dir", default=None, help="data like ../shared/data (default: $NANOCHAT_DATA_DIR, else hub)"
    )
    parser.add_argument("--identity", default=None, help="identity JSONL (default: <data dir>/chat/ or <base dir>/)")
    # Training horizon
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch)")
    # Optimization (-1 = inherit from the source checkpoint)
    parser.add_argument("--max-seq-len", type=int, default=-1, help="rows are cropped to this (-1 = inherit)")
    parser.add_argument(
        "--device-batch-size",
        type=int,
        default=-1,
        help="conversations per forward pass (-1 = inherit, at most examples per step / processes)",
    )
    parser.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step")
    parser.add_argument("--init-lr-frac", type=float, default=0.02, help="multiplier on the source's LRs")
    parser.add_argument("--warmdown-ratio", type=float, default=1.0, help="fraction of the run decaying the LR")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    # Evaluation and saving
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation loss (-1 = end only)")
    parser.add_argument("--eval-steps", type=int, default=100, help="validation micro-batches per process")
    parser.add_argument("--eval-metrics-every", type=int, default=200, help="steps between MMLU/ARC-Easy (-1 = end)")
    parser.add_argument("--eval-metrics-max-problems", type=int, default=1024, help="problems per task (-1 = all)")
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1 = end only)")
    parser.add_argument("--resume", action="store_true", help="continue from the last sft checkpoint of this tag")
    # Runtime
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("--run", default=None, help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    try:
        args.mixture_names = parse_mixture(args.mixture, STAGE_COMPONENTS) + (["data"] if args.data else [])
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device, master = runtime.device, runtime.is_master
    tokenizer = get_tokenizer()

    # ---------------------------------------------------------------- model
    source_dir = checkpoint_dir(args.source, args.model_tag)
    model, source_meta = build_model(source_dir, None if args.model_step < 0 else args.model_step, device)
    model.compute_dtype = runtime.dtype
    model_tag = os.path.basename(source_dir)
    output_dir = checkpoint_dir("sft", model_tag)

    # Derived values: inherited from the source checkpoint unless given
    inherited = source_settings(source_meta)
    seq_len = args.max_seq_len if args.max_seq_len > 0 else inherited["max_seq_len"]
    per_process = args.examples_per_step // runtime.world_size
    device_batch = args.device_batch_size if args.device_batch_size > 0 else min(inherited["device_batch_size"],
                                                                                 max(1, per_process))  # fmt: skip
    if seq_len > model.config.sequence_len:
        raise SystemExit(f"--max-seq-len {seq_len} exceeds the model's context {model.config.sequence_len}")
    if args.examples_per_step % (device_batch * runtime.world_size):
        raise SystemExit(f"--examples-per-step {args.examples_per_step} must be a multiple of device batch "
                         f"{device_batch} x {runtime.world_size} processes")  # fmt: skip
    hp = {
        "max_seq_len": seq_len, "device_batch_size": device_batch, "examples_per_step": args.examples_per_step,
        "grad_accum_steps": args.examples_per_step // (device_batch * runtime.world_size),
        **{key: inherited[key] for key in ("matrix_lr", "embedding_lr", "unembedding_lr")},
    }  # fmt: skip

    # ---------------------------------------------------------------- data
    data_dir = resolve_data_dir(args.data_dir)
    sources = Sources(data_dir, args.identity or default_identity_path(data_dir), args.data)
    try:
        train_mixture, train_rows = build_mixture(args.mixture_names, "train", sources, RECIPE)
        val_mixture, val_rows = build_mixture(args.mixture_names, "val", sources, RECIPE)
    except MixtureError as e:
        raise SystemExit(f"chat_sft: {e}") from e
    print0(describe_mixture("train mixture", train_rows))
    print0(describe_mixture("validation mixture", val_rows))
    num_iterations = args.num_iterations if args.num_iterations > 0 else len(train_mixture) // args.examples_per_step
    metric_tasks = [load_task(name, data_dir, "validation" if data_dir else "test") for name in METRIC_TASKS]

    # ---------------------------------------------------------------- optimizer
    frac = args.init_lr_frac
    optimizer = build_optimizer(model, hp["matrix_lr"] * frac, hp["embedding_lr"] * frac,
                                hp["unembedding_lr"] * frac, weight_decay=args.weight_decay)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(runtime.dtype) else None

    # ---------------------------------------------------------------- resume
    start_step, loop = 0, {"smooth_loss": 0.0, "training_seconds": 0.0, "min_val_loss": None}
    loop.update(train_loss_curve=[], val_loss_curve=[])  # [[step, value], ...] for the report card
    if args.resume:
        last = find_last_step(output_dir)
        if last is None:
            raise SystemExit(f"--resume: no checkpoint in {output_dir}; start without --resume")
        model_state, optim_state, meta = load_checkpoint(
            output_dir, last, device, load_optimizer=True, rank=runtime.rank, world_size=runtime.world_size
        )
        if meta["examples_per_step"] != args.examples_per_step:
            raise SystemExit("--resume: --examples-per-step changed since the checkpoint")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        # Batches are a function of the step: nothing else to restore. Older checkpoints lack the curves.
        start_step, loop = meta["step"], {**loop, **meta["loop"]}
        del model_state, optim_state

    resolved = {**vars(args), **hp, "num_iterations": num_iterations, "model_tag": model_tag, "source_dir": source_dir,
                "data_dir": data_dir, "train_mixture": train_rows, "val_mixture": val_rows}  # fmt: skip
    environment = describe_environment(runtime)
    print0(json.dumps({"config": resolved, "environment": environment}, indent=2, default=str))
    print0(f"parameters: {model.num_params():,}; {num_iterations:,} steps x {args.examples_per_step} conversations "
           f"(grad accumulation {hp['grad_accum_steps']}); start at step {start_step}")  # fmt: skip
    wandb_run = None
    if args.run and master:
        import wandb

        wandb_run = wandb.init(project="nanochat-sft", name=args.run, config={**resolved, **environment})

    def batches(task, step):
        return sft_micro_batches(tokenizer, task, step, args.examples_per_step, device_batch, seq_len,
                                 runtime.rank, runtime.world_size, device)  # fmt: skip

    def validate() -> float:
        model.eval()
        steps = -(-args.eval_steps // hp["grad_accum_steps"])  # enough optimizer-step layouts for eval_steps
        micro = [batch for step in range(steps) for batch in batches(val_mixture, step)]
        loss = evaluate_loss(model, micro[: args.eval_steps])
        model.train()
        return loss

    def metrics() -> dict:
        model.eval()
        results = {}
        for name, task in zip(METRIC_TASKS, metric_tasks):
            count = len(task) if args.eval_metrics_max_problems < 0 else min(len(task), args.eval_metrics_max_problems)
            indices = range(runtime.rank, count, runtime.world_size)
            passed, _ = evaluate_categorical(model, tokenizer, task, indices, device_batch, device)
            passed = torch.tensor(passed, device=device)
            if runtime.is_distributed:
                dist.all_reduce(passed)
            results[name] = passed.item() / max(1, count)
        model.train()
        return results

    def save(step: int, val_loss: float | None, accuracies: dict):
        meta = {"loop": loop, "val_loss": val_loss, "metrics": accuracies, "user_config": vars(args), **hp}
        save_checkpoint(output_dir, step, model, optimizer, meta, runtime.rank, runtime.world_size)
        print0(f"saved checkpoint step {step} to {output_dir}")

    # ---------------------------------------------------------------- loop
    step, val_loss, accuracies = start_step, None, {}
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            val_loss = validate()
            best = loop["min_val_loss"]
            loop["min_val_loss"] = val_loss if best is None else min(best, val_loss)
            if not loop["val_loss_curve"] or loop["val_loss_curve"][-1][0] != step:  # a resume re-evaluates its step
                loop["val_loss_curve"].append([step, val_loss])
            print0(f"step {step:05d} | validation loss {val_loss:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/loss": val_loss})
        if (args.eval_metrics_every > 0 and step % args.eval_metrics_every == 0) or last_step:
            accuracies = metrics()
            print0(f"step {step:05d} | " + " | ".join(f"{name} {acc:.4f}" for name, acc in accuracies.items()))
            if wandb_run:
                wandb_run.log({"step": step, **{f"val/{name}": acc for name, acc in accuracies.items()}})
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_loss, accuracies)
        if last_step:
            break

        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        started = time.time()
        lrm = lr_multiplier(step / num_iterations, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        train_loss, supervised = supervised_backward(
            model, batches(train_mixture, step), scaler.scale if scaler else None
        )
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

        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss.item()
        smooth = loop["smooth_loss"] / (1 - 0.9**step)
        if step - start_step > 2:
            loop["training_seconds"] += step_seconds
        loop["train_loss_curve"].append([step, round(smooth, 5)])
        print0(f"step {step:05d}/{num_iterations} | loss {smooth:.4f} | lrm {lrm:.3f} | supervised tokens "
               f"{supervised:,} | {step_seconds * 1000:.0f} ms")  # fmt: skip
        if wandb_run:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/supervised": supervised})

    summary = {
        "val_loss": val_loss,
        "min_val_loss": loop["min_val_loss"],
        **{f"{name}_acc": acc for name, acc in accuracies.items()},
        "steps": step,
        "training_minutes": loop["training_seconds"] / 60,
        "train_mixture": dict(train_rows),
        "source": source_dir,
    }
    print0(f"done: {json.dumps(summary)}")
    if master:
        curves = {key: loop[key] for key in ("train_loss_curve", "val_loss_curve")}
        write_stage_summary("chat_sft", {**summary, **curves})
    if wandb_run:
        wandb_run.summary.update(summary)
        wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    main()
