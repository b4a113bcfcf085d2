"""Pretrain the base model: next-token prediction on pretraining shards.

`--depth` is the single dial. Width, heads, training tokens, batch size, learning rates and weight decay follow
from it (the formulas are in `derive_hyperparameters`, with sources); every derived value can be overridden.
One process or many (torchrun), CPU or GPU, the same code: gradients are averaged by the optimizer itself.

    python -m scripts.base_train --depth 20                                            # one GPU (accumulates)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20          # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m scripts.base_train
    python -m scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 512 \\
        --num-iterations 30 --eval-every 10 --eval-tokens 2048 --sample-every -1       # tiny, CPU, seconds

Writes <base dir>/base_checkpoints/d<depth>/ (`--resume` continues the last intact one exactly) and the report
card's <base dir>/report/base_train.json with the loss and bpb curves. Logs to wandb with `--run NAME`.
Not here: CORE evaluation (scripts/base_eval.py), bpb of a finished model (scripts/base_loss.py).
"""

import argparse
import math
import os

import torch

from nanochat import train
from nanochat.common import compute_init, get_base_dir, print0
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import add_data_argument, default_pretrain_paths
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_tokenizer

MOMENTUM_SCHEDULES = {"classic": train.MomentumSchedule(),
                      "tuned": train.MomentumSchedule(peak=0.97, ramp_steps=400, warmdown_to=0.90)}  # fmt: skip
# Muon upgrades (nanochat/optim.py muon_update): NorMuon (arXiv 2510.05491) with the reference's beta2, MuonEq, Muon+,
# cautious weight decay (acts only with --weight-decay > 0)
MUON_EXTRAS = {"normuon": {"beta2": 0.95}, "muoneq": {"muoneq": True}, "muon_plus": {"muon_plus": True},
               "cautious_wd": {"cautious_wd": True}}  # fmt: skip
REFERENCE_BATCH = 2**19  # tokens per step at the reference depth (nanochat: 524,288 for d12 and the d20 speedrun)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--depth", type=int, default=20, help="number of layers; decides everything else")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--n-kv-head", type=int, default=-1, help="key/value heads (-1 = as many as heads; 1 = MQA)")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    # The 2026 recipe is the default (dev/LOG.md, issue 14: -1.4% val bpb at d4 on CPU); each part has its flag,
    # and --no-value-embeds --no-resid-scalars --no-backout --window-pattern L --qk-scale 1 --rope-base 10000
    # --init classic --muon-extras "" --momentum-schedule classic trains the classic model.
    on_off = argparse.BooleanOptionalAction
    parser.add_argument("--value-embeds", action=on_off, default=True, help="value embeddings on alternate layers")
    parser.add_argument("--resid-scalars", action=on_off, default=True, help="learned per-layer residual weights")
    parser.add_argument("--backout", action=on_off, default=True, help="subtract part of the mid-depth stream")
    parser.add_argument("--window-pattern", default="SSSL", help="attention per layer, tiled: S short, L full")
    parser.add_argument("--short-window", type=int, default=-1, help="keys per S layer (-1 = context/4, min 128)")
    parser.add_argument("--qk-scale", type=float, default=1.2, help="q and k multiplier after QK-norm")
    parser.add_argument("--rope-base", type=float, default=100000.0, help="RoPE base frequency")
    parser.add_argument("--init", choices=["classic", "tuned"], default="tuned", help="weight initialisation")
    # Training horizon (first one set wins: iterations > FLOPs > tokens:params ratio)
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive)")
    parser.add_argument("--target-flops", type=float, default=-1, help="training FLOPs budget (-1 = off)")
    parser.add_argument("--target-param-data-ratio", type=float, default=12,
                        help="training tokens per scaling parameter (block matrices + lm_head)")  # fmt: skip
    # Optimization
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass per process")
    parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = derive)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR at the reference batch")
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of wte at width 768, ref. batch")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head at width 768")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay at the ref. depth")
    parser.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps (at most 1/10 of the run)")
    parser.add_argument("--muon-extras", default="normuon,muoneq,muon_plus",
                        help=f"comma list of Muon upgrades: {', '.join(MUON_EXTRAS)} ('' = none)")  # fmt: skip
    parser.add_argument("--momentum-schedule", choices=sorted(MOMENTUM_SCHEDULES), default="tuned",
                        help="Muon momentum: classic 0.85->0.95; tuned 0.85->0.97, 0.90 by the end")  # fmt: skip
    parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps decaying the LR")
    parser.add_argument("--final-lr-frac", type=float, default=0.05, help="LR multiplier at the last step")
    # Evaluation and saving
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (-1 = end only)")
    parser.add_argument("--eval-tokens", type=int, default=20 * 2**19, help="validation tokens per evaluation")
    parser.add_argument("--sample-every", type=int, default=2000, help="steps between samples (-1 = off)")
    # Runtime
    add_data_argument(parser, "training text")
    train.add_stage_flags(parser)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto = on for CUDA")
    return parser.parse_args(argv)


def scaling_params(config: GPTConfig) -> int:
    """Parameters the token budget scales with: block matrices plus lm_head (nanochat HEAD's rule; the embedding
    is a lookup and costs no FLOPs). Counted on the meta device: no memory."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameter_roles()["matrix"]) + model.lm_head.weight.numel()


def model_config(args, vocab_size: int) -> GPTConfig:
    short_window = args.short_window if args.short_window > 0 else max(128, -(-args.max_seq_len // 4 // 128) * 128)
    return GPTConfig.from_depth(
        depth=args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len,
        n_kv_head=args.n_kv_head, value_embeds=args.value_embeds, resid_scalars=args.resid_scalars,
        window_pattern=args.window_pattern, short_window=short_window if "S" in args.window_pattern else 0,
        backout=args.backout, qk_scale=args.qk_scale, rope_base=args.rope_base, init=args.init,
    )  # fmt: skip


def derive_hyperparameters(args, config: GPTConfig, flops_per_token: float, world_size: int) -> dict:
    """Every value the depth decides, in one place. Source: karpathy/nanochat dev/LOG.md (auto hyperparameters
    from depth, 2026)."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    # Reference point: depth 12 with a 32,768 vocab at ratio 12 trains on D_ref tokens with a 2^19 batch.
    ref = GPTConfig.from_depth(depth=12, vocab_size=32768)
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


@train.one_line_errors("base_train")
def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type, seed=args.seed)
    device = runtime.device
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    data = args.data or default_pretrain_paths()

    # ---------------------------------------------------------------- model
    config = model_config(args, tokenizer.get_vocab_size())
    model = GPT.build(config, device)
    model.compute_dtype = runtime.dtype
    hp = derive_hyperparameters(args, config, model.estimate_flops(), runtime.world_size)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    use_compile = args.compile == "on" or (args.compile == "auto" and runtime.device_type == "cuda")
    forward = torch.compile(model, dynamic=False) if use_compile else model
    record = train.StageRecord("base", model_tag, 0, args.device_batch_size, hp["total_batch_size"], hp["matrix_lr"],
                               hp["embedding_lr"], hp["unembedding_lr"])  # fmt: skip

    # ---------------------------------------------------------------- optimizer and resume
    layout = {"total_batch_size": hp["total_batch_size"], "device_batch_size": args.device_batch_size}
    extras = [name for name in args.muon_extras.split(",") if name]
    if set(extras) - set(MUON_EXTRAS):
        raise SystemExit(f"--muon-extras: unknown {sorted(set(extras) - set(MUON_EXTRAS))}; known: {list(MUON_EXTRAS)}")
    muon_options = {key: value for name in extras for key, value in MUON_EXTRAS[name].items()}
    optimizer, scaler, start_step, loop, loader_states = train.start_optimizer(
        model, record, 1.0, hp["weight_decay"], runtime, args.resume, checkpoint_dir, layout, muon_options
    )
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

    num_iterations = hp["num_iterations"]
    warmup_steps = train.short_run_warmup(args.warmup_steps, num_iterations)
    momentum = MOMENTUM_SCHEDULES[args.momentum_schedule]
    resolved = {**vars(args), **hp, "model_config": config.to_dict(), "model_tag": model_tag, "data": data}
    log = train.StageLog(
        "base_train", runtime, resolved, args.run, loop, num_iterations, model.estimate_flops(), start_step
    )
    print0(f"parameters: {model.num_params():,}; scaling parameters: {scaling_params(config):,}; FLOPs/token: "
           f"{model.estimate_flops():.3e}; steps: {num_iterations:,} x {hp['total_batch_size']:,} tokens (grad "
           f"accumulation {grad_accum}); start at step {start_step}")  # fmt: skip
    flat_until = num_iterations - round(args.warmdown_ratio * num_iterations)
    momenta = [momentum(s, num_iterations, args.warmdown_ratio) for s in (0, flat_until, num_iterations)]
    print0(f"schedule: LR warmup {warmup_steps} steps (asked {args.warmup_steps}), flat to step {flat_until}, then "
           f"down to {args.final_lr_frac}x at step {num_iterations}; Muon momentum "
           f"{' -> '.join(f'{m:.2f}' for m in momenta)}; weight decay cosine to 0")  # fmt: skip

    def validate() -> float:
        val_loader = PretrainLoader(
            tokenizer, data, "val", args.device_batch_size, args.max_seq_len, device, runtime.rank, runtime.world_size
        )
        steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * runtime.world_size))
        return evaluate_bpb(model, val_loader, steps, token_bytes)

    # ---------------------------------------------------------------- loop
    step, val_bpb = start_step, None
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            val_bpb = validate()
            log.evaluated(step, {"val_bpb": val_bpb})
        if runtime.is_master and args.sample_every > 0 and (step % args.sample_every == 0 or last_step) and step > 0:
            for text in train.sample(model, tokenizer):
                print0(f"  sample: {text!r}")
        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            train.save_stage(checkpoint_dir, step, model, optimizer, runtime, record, log, loaders, val_bpb=val_bpb,
                             user_config=vars(args), **hp)  # fmt: skip
        if last_step:
            break

        log.start()
        lrm = train.lr_multiplier(step, num_iterations, warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        wdm = 0.5 * (1 + math.cos(math.pi * step / num_iterations))  # weight decay: cosine to 0 (nanochat HEAD)
        train.set_schedule(optimizer, lrm, momentum(step, num_iterations, args.warmdown_ratio), wdm)
        train_loss = train.accumulate(forward, loaders, runtime, scaler)
        train.optimizer_step(model, optimizer, scaler, train_loss, runtime, args.grad_clip, checkpoint_dir)
        step += 1
        log.step(step, train_loss.item(), hp["total_batch_size"], lrm=lrm)

    summary = {"model_tag": model_tag, "step": step, "val_bpb": val_bpb, "min_val_bpb": log.state.get("min_val_bpb"),
               **log.summary(), "depth": args.depth, "parameters": model.num_params(),
               "flops_per_token": model.estimate_flops(), "steps": step, "tokens": step * hp["total_batch_size"],
               "total_batch_size": hp["total_batch_size"], "world_size": runtime.world_size}  # fmt: skip
    return log.finish(summary, curves=("train_loss", "val_bpb"))


if __name__ == "__main__":
    main()
