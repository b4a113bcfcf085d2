"""Chat SFT: fine-tune a mid (or base) checkpoint on whole conversations, trained only on the assistant's tokens.

    python -m scripts.chat_sft                                                       # one GPU, from mid
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run sft-d20
    python -m scripts.chat_sft --data my.jsonl --num-iterations 50                    # your data alone
    python -m scripts.chat_sft --mixture default --data my.jsonl --data-epochs 10     # yours x10 + the recipe
    NANOCHAT_DATA_DIR=/path/to/data python -m scripts.chat_sft --device-type cpu --num-iterations 20 \\
        --device-batch-size 2 --examples-per-step 4 --eval-every 10 --eval-steps 4 \\
        --eval-metrics-max-problems 16                                                # tiny, CPU, offline

One conversation per row (nanochat.chat_data.sft_micro_batches); the loss is normalised over the supervised
tokens of the WHOLE step, so the gradient does not depend on the split. LRs and device batch are the source
StageRecord's unless set. No torch.compile: rows have variable lengths. A mixture without held-out rows (identity)
trains with validation skipped, and says so. Validation reads each held-out row at most once (--eval-steps caps).

Your own conversations (JSONL; tasks/mixture.py and tasks/customjson.py have the contract): `--data` alone trains
on that file alone, with a few rows held out for a validation loss on it (`--val-data` gives them instead);
`--mixture default` (or named components) mixes it into the built-ins, `--data-epochs N` listing it N times.
Mixed, the loss on your held-out rows is printed apart ("validation data_loss"); the summary's "val_data_loss"
is the loss on your rows either way.

Writes <base dir>/chatsft_checkpoints/<model tag>/ (`--resume` continues exactly) and report/chat_sft.json.
Not here: full chat evaluation (scripts/chat_eval.py -i sft).
"""

import argparse
import os
from dataclasses import asdict, replace

from nanochat import train
from nanochat.chat_data import conversation_batch, evaluate_loss, sft_micro_batches, supervised_backward
from nanochat.common import compute_init, print0
from nanochat.tokenizer import get_tokenizer
from tasks.evaluate import evaluate_task, load_task
from tasks.mixture import COMPONENTS, add_mixture_flags, load_stage_mixtures, user_validation

# The recipe: component -> sizes (stop: the first n rows; size: generated examples). Reference nanochat's SFT
# mixture: SmolTalk's first 10K, 300 of each spelling task. `--mixture` picks among all but mmlu-aux.
MIXTURE = {"arc": {}, "gsm8k": {}, "smoltalk": {"stop": 10_000}, "identity": {},
           "simplespelling": {"size": 300}, "spelling": {"size": 300}}  # fmt: skip
STAGE_COMPONENTS = [name for name in COMPONENTS if name not in ("mmlu-aux", "data")]
METRIC_TASKS = ("MMLU", "ARC-Easy")


def parse_args(argv=None):
    usage = "\n\n".join(__doc__.split("\n\n")[:2])  # --help: what it is and how to run it; the contract stays here
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--source", choices=["mid", "base"], default="mid", help="checkpoint stage to start from")
    parser.add_argument("--model-tag", default=None, help="source checkpoint dir, and ours (default: largest d<N>)")
    parser.add_argument("--model-step", type=int, default=-1, help="source checkpoint step (-1 = last)")
    # Data
    add_mixture_flags(parser, STAGE_COMPONENTS, user_data=True)
    # Training horizon
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch)")
    # Optimization (-1 = inherit from the source checkpoint)
    parser.add_argument("--max-seq-len", type=int, default=-1, help="rows are cropped to this (-1 = inherit)")
    parser.add_argument("--device-batch-size", type=int, default=-1, help="conversations per forward pass "
                        "(-1 = inherit, at most examples per step / processes)")  # fmt: skip
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
    # Runtime
    train.add_stage_flags(parser)
    return parser.parse_args(argv)


@train.one_line_errors("chat_sft")
def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device = runtime.device
    tokenizer = get_tokenizer()

    # ---------------------------------------------------------------- model
    model, source, source_dir, output_dir, seq_len = train.load_source(args, args.source, "sft", runtime)
    model_tag = os.path.basename(output_dir)

    # Derived values: the source stage's record unless given
    per_process = max(1, args.examples_per_step // runtime.world_size)
    device_batch = args.device_batch_size if args.device_batch_size > 0 else min(source.device_batch_size, per_process)
    if args.examples_per_step % (device_batch * runtime.world_size):
        raise SystemExit(f"--examples-per-step {args.examples_per_step} must be a multiple of device batch "
                         f"{device_batch} x {runtime.world_size} processes")  # fmt: skip
    grad_accum = args.examples_per_step // (device_batch * runtime.world_size)
    record = replace(source, stage="sft", model_tag=model_tag, device_batch_size=device_batch)

    # ---------------------------------------------------------------- data
    train_mixture, train_rows, val_mixture, data_dir = load_stage_mixtures(args, MIXTURE)
    # your held-out rows apart, when built-in rows are mixed in beside them
    user_val = user_validation(args) if len(train_rows) > 1 else None
    num_iterations = args.num_iterations if args.num_iterations > 0 else len(train_mixture) // args.examples_per_step
    if num_iterations < 1:
        raise SystemExit(f"chat_sft: {len(train_mixture):,} conversations make no step of --examples-per-step "
                         f"{args.examples_per_step}; lower it, add data or raise --data-epochs")  # fmt: skip
    if args.num_iterations < 0 and num_iterations < 20:  # a few dozen conversations of your own make a step or two
        print0(f"note: one pass over {len(train_mixture):,} conversations is {num_iterations} step(s) of "
               f"{args.examples_per_step}; --data-epochs or --num-iterations trains longer")  # fmt: skip
    metric_tasks = [load_task(name, data_dir, "validation" if data_dir else "test") for name in METRIC_TASKS]

    # ---------------------------------------------------------------- optimizer and resume
    # batches are a function of the step: nothing else to restore
    layout = {"examples_per_step": args.examples_per_step}
    optimizer, scaler, start_step, loop, _ = train.start_optimizer(
        model, source, args.init_lr_frac, args.weight_decay, runtime, args.resume, output_dir, layout
    )

    resolved = {**vars(args), **asdict(record), "max_seq_len": seq_len, "grad_accum_steps": grad_accum,
                "num_iterations": num_iterations, "source_dir": source_dir, "data_dir": data_dir,
                "train_mixture": train_rows}  # fmt: skip
    log = train.StageLog(
        "chat_sft", runtime, resolved, args.run, loop, num_iterations, model.estimate_flops(), start_step
    )
    print0(f"parameters: {model.num_params():,}; {num_iterations:,} steps x {args.examples_per_step} conversations "
           f"(grad accumulation {grad_accum}); start at step {start_step}")  # fmt: skip

    def batches(task, step):
        return sft_micro_batches(tokenizer, task, step, args.examples_per_step, device_batch, seq_len,
                                 runtime.rank, runtime.world_size, device)  # fmt: skip

    def validate(task) -> float:
        """Loss over the first --eval-steps x device batch x processes rows, each at most once; micro-batch m of
        rank r takes slice (m * W + r) of B rows."""
        model.eval()
        starts = [(m * runtime.world_size + runtime.rank) * device_batch for m in range(args.eval_steps)]
        micro = [conversation_batch(tokenizer, task[first : first + device_batch], seq_len, device)
                 for first in starts if first < len(task)]  # fmt: skip
        loss = evaluate_loss(model, micro)
        model.train()
        return loss

    def metrics() -> dict:
        model.eval()
        limit = args.eval_metrics_max_problems
        results = {name: evaluate_task(name, task, model, tokenizer, device, limit, device_batch).accuracy
                   for name, task in zip(METRIC_TASKS, metric_tasks)}  # fmt: skip
        model.train()
        return results

    # ---------------------------------------------------------------- loop
    step, val_loss, val_data_loss, accuracies = start_step, None, None, {}
    while True:
        last_step = step == num_iterations
        if val_mixture is not None and ((args.eval_every > 0 and step % args.eval_every == 0) or last_step):
            val_loss = validate(val_mixture)
            val_data_loss = validate(user_val) if user_val is not None else None
            log.evaluated(step, {"val_loss": val_loss} | ({"val_data_loss": val_data_loss} if user_val else {}))
        if (args.eval_metrics_every > 0 and step % args.eval_metrics_every == 0) or last_step:
            accuracies = metrics()
            log.evaluated(step, accuracies)
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            train.save_stage(output_dir, step, model, optimizer, runtime, record, log, val_loss=val_loss,
                             metrics=accuracies, user_config=vars(args), max_seq_len=seq_len,
                             grad_accum_steps=grad_accum)  # fmt: skip
        if last_step:
            break

        log.start()
        lrm = train.warmdown_multiplier(step / num_iterations, args.warmdown_ratio, args.final_lr_frac)
        train.set_schedule(optimizer, lrm)  # Muon's momentum stays 0.95 here, as in reference nanochat's SFT
        micro_batches = batches(train_mixture, step)
        train_loss, supervised = supervised_backward(model, micro_batches, scaler.scale if scaler else None)
        train.optimizer_step(model, optimizer, scaler, train_loss, runtime, args.grad_clip, output_dir)
        step += 1
        tokens = sum(inputs.numel() for inputs, _ in micro_batches) * runtime.world_size
        log.step(step, train_loss.item(), tokens, lrm=lrm, supervised_tokens=supervised)

    summary = {"model_tag": model_tag, "step": step, "val_loss": val_loss,
               "min_val_loss": log.state.get("min_val_loss"),
               "val_data_loss": val_data_loss if user_val else (val_loss if args.data else None),
               **{f"{name}_acc": acc for name, acc in accuracies.items()}, "steps": step, **log.summary(),
               "train_mixture": dict(train_rows), "source": source_dir}  # fmt: skip
    return log.finish(summary, curves=("train_loss", "val_loss", "val_data_loss"))


if __name__ == "__main__":
    main()
