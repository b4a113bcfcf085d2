"""The training spine of the four training stages (base_train, mid_train, chat_sft, chat_rl): plain functions.

Each stage keeps its own visible `while` loop and calls these for start-up, schedules, one optimizer step (with
the non-finite stop), logging and checkpoints with the loop and loader states.
Not here: data, losses and evaluations (the stage scripts, nanochat/chat_data.py, nanochat/loss_eval.py).
"""

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    build_model,
    checkpoint_dir,
    complete_steps,
    last_verified_step,
    load_checkpoint,
    save_checkpoint,
)
from nanochat.common import compute_cleanup, describe_environment, gpu_peaks, needs_grad_scaler, print0
from nanochat.dataset import DatasetError
from nanochat.gpt import GPTConfig
from nanochat.optim import build_optimizer
from nanochat.report import write_stage_summary

# Prompts whose greedy continuations show what the model has picked up (facts, arithmetic, grammar).
SAMPLE_PROMPTS = ["The largest ocean on Earth is the", "Water boils at a temperature of", "Seven plus five equals",
                  "The author of the play Romeo and Juliet is", "In the winter, many birds fly"]  # fmt: skip


@dataclass(frozen=True)
class StageRecord:
    """What a stage hands the next, saved as meta["record"]: its batch layout and LRs (before --init-lr-frac)."""

    stage: str = ""  # base | mid | sft | rl
    model_tag: str = ""
    step: int = 0
    device_batch_size: int = 32  # rows per forward pass
    total_batch_size: int = 2**19  # tokens per optimizer step of the packed stages (base, mid)
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004

    @classmethod
    def from_meta(cls, meta: dict) -> "StageRecord":
        """The record of a checkpoint; older metas give what they hold (flat keys, else user_config)."""
        held = {**meta.get("user_config", {}), **meta, **meta.get("record", {})}
        return cls(**{f.name: held[f.name] for f in fields(cls) if held.get(f.name) is not None})


def add_stage_flags(parser, save_every: int = -1) -> None:
    parser.add_argument("--grad-clip", type=float, default=-1, help="max global grad norm (-1 = off)")
    parser.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints (-1 = end only)")
    parser.add_argument("--resume", action="store_true", help="continue from this stage's last checkpoint of the tag")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("--run", default=None, help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=42, help="initialisation, data order and sampling")


@contextlib.contextmanager
def one_line_errors(stage: str):
    """Decorates a stage's main: an unusable checkpoint or dataset ends the run with one line, not a traceback."""
    try:
        yield
    except (CheckpointError, DatasetError) as e:
        raise SystemExit(f"{stage}: {e}") from e


def load_source(args, source_stage: str, stage: str, runtime) -> tuple:
    """A chat stage's start (mid_train, chat_sft): the source checkpoint (--model-tag, --model-step) as
    (model, its StageRecord, source dir, our output dir, sequence length: --max-seq-len, else the model's)."""
    source_dir = checkpoint_dir(source_stage, args.model_tag)
    model, meta = build_model(source_dir, None if args.model_step < 0 else args.model_step, runtime.device)
    model.compute_dtype = runtime.dtype
    seq_len = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    if seq_len > model.config.sequence_len:
        raise SystemExit(f"--max-seq-len {seq_len} exceeds the model's context {model.config.sequence_len}")
    output_dir = checkpoint_dir(stage, os.path.basename(source_dir))
    return model, StageRecord.from_meta(meta), source_dir, output_dir, seq_len


def start_optimizer(model, lrs: StageRecord, lr_frac, weight_decay, runtime, resume, directory, must_match,
                    muon_options=None) -> tuple:  # fmt: skip
    """The optimizer at lrs' LRs x lr_frac, the fp16 grad scaler and, when `resume`, resume_stage of `directory`:
    (optimizer, scaler, start step, loop state or None, loader states or None)."""
    optimizer = build_optimizer(model, lrs.matrix_lr, lrs.embedding_lr, lrs.unembedding_lr, weight_decay, lr_frac,
                                muon_options)  # fmt: skip
    scaler = torch.amp.GradScaler(runtime.device.type) if needs_grad_scaler(runtime.dtype) else None
    if not resume:
        return optimizer, scaler, 0, None, None
    return optimizer, scaler, *resume_stage(directory, model, optimizer, runtime, must_match)[:3]


# ---------------------------------------------------------------------------- schedules
# Two LR shapes: base counts whole steps, the chat stages count progress (folding one into the other changes bits).


def short_run_warmup(warmup_steps: int, num_steps: int) -> int:
    """Warmup steps for a run of num_steps: as asked, but at most a tenth of the run, so a short run still spends
    most of its steps at full LR and then decays (a 40-step run with 40 warmup steps never left warmup)."""
    return min(warmup_steps, num_steps // 10)


def lr_multiplier(step: int, num_steps: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_ratio * num_steps)
    if step <= num_steps - warmdown_steps:
        return 1.0
    progress = (num_steps - step) / max(1, warmdown_steps)
    return progress + (1 - progress) * final_lr_frac


def warmdown_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Constant, then linear to final_lr_frac over the last warmdown_ratio of progress 0..1 (1, 0: RL's decay)."""
    if progress <= 1 - warmdown_ratio:
        return 1.0
    remaining = max(0.0, 1 - progress) / max(warmdown_ratio, 1e-9)
    return remaining + (1 - remaining) * final_lr_frac


@dataclass(frozen=True)
class MomentumSchedule:
    """Muon's momentum: `start` -> `peak` over the first `ramp_steps` (less momentum while the loss moves fast;
    modded-nanogpt), then, when `warmdown_to` is set, linearly down to it over the LR's warmdown (nanochat
    autoresearch round 2: 0.85 -> 0.97 over 400 steps, 0.90 at the end). The ramp is at most a third of a run."""

    start: float = 0.85
    peak: float = 0.95
    ramp_steps: int = 300
    warmdown_to: float | None = None

    def __call__(self, step: int, num_steps: int | None = None, warmdown_ratio: float = 0.0) -> float:
        ramp = self.ramp_steps if num_steps is None else max(1, min(self.ramp_steps, num_steps // 3))
        momentum = self.start + (self.peak - self.start) * min(1.0, step / ramp)
        warmdown_steps = round(warmdown_ratio * num_steps) if num_steps else 0
        if self.warmdown_to is not None and warmdown_steps and step > num_steps - warmdown_steps:
            done = (step - (num_steps - warmdown_steps)) / warmdown_steps
            momentum += (self.warmdown_to - momentum) * done
        return momentum


muon_momentum = MomentumSchedule()  # mid_train's; base_train builds its own from its flags


def set_schedule(optimizer, lrm: float, momentum: float | None = None, wdm: float = 1.0) -> None:
    """Every group's LR = its initial LR x lrm and weight decay = its initial weight decay x wdm; Muon's momentum
    too when given (else left as built, 0.95)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if "initial_weight_decay" in group:
            group["weight_decay"] = group["initial_weight_decay"] * wdm
        if momentum is not None and group["kind"] == "muon":
            group["momentum"] = momentum


# ---------------------------------------------------------------------------- one optimizer step


def accumulate(forward, loaders, runtime, scaler=None) -> torch.Tensor:
    """Forward and backward of one micro-batch per loader; returns the step's mean loss over ranks."""
    train_loss = torch.zeros((), device=runtime.device)
    for loader in loaders:
        inputs, targets = next(loader)
        loss = forward(inputs, targets) / len(loaders)
        train_loss += loss.detach()
        (scaler.scale(loss) if scaler else loss).backward()
    if runtime.is_distributed:
        dist.all_reduce(train_loss)
        train_loss /= runtime.world_size
    return train_loss


def optimizer_step(model, optimizer, scaler, train_loss, runtime, grad_clip=-1, checkpoint_dir=None):
    """Stop on a non-finite loss (exit 1, naming the last checkpoint that verifies), else unscale, clip, step and
    zero the grads."""
    if not torch.isfinite(torch.as_tensor(train_loss)):
        last = last_verified_step(checkpoint_dir) if checkpoint_dir and runtime.is_master else None
        verified = f"step {last} verifies (--resume continues from it)" if last else "no checkpoint verifies"
        print0(
            f"loss is {float(train_loss)}; stopping. Lower the LRs (or --init-lr-frac); in {checkpoint_dir} {verified}."
        )
        compute_cleanup()
        raise SystemExit(1)
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        # Clipping needs the norm of the averaged gradient, so average here (one extra all-reduce; the
        # optimizer's own averaging of identical gradients then changes nothing).
        if runtime.is_distributed:
            for grad in [p.grad for p in model.parameters() if p.grad is not None]:
                dist.all_reduce(grad)
                grad /= runtime.world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- the stage log


class StageLog:
    """Bookkeeping of one run: prints, EMA, timing, MFU (given flops_per_token and a known GPU), curves, wandb.
    `state` (JSON) travels in checkpoints."""

    def __init__(self, stage: str, runtime, config: dict, run: str | None, state: dict | None = None,
                 num_steps: int | None = None, flops_per_token: float | None = None, start_step: int = 0):  # fmt: skip
        self.stage, self.runtime, self.num_steps, self.start_step = stage, runtime, num_steps, start_step
        fresh = {"smooth_loss": 0.0, "training_seconds": 0.0, "timed_tokens": 0, "train_loss_curve": []}
        self.state = fresh | (state or {})
        environment = describe_environment(runtime)
        print0(json.dumps({"config": config, "environment": environment}, indent=2, default=str))
        peaks = gpu_peaks(environment["gpu"]) if "gpu" in environment else None
        self.peak_flops = peaks[0] * runtime.world_size if peaks and flops_per_token else None
        self.flops_per_token = flops_per_token
        self.wandb = None
        if run and runtime.is_master:
            import wandb

            project = "nanochat" + {"mid_train": "-mid", "chat_sft": "-sft", "chat_rl": "-rl"}.get(stage, "")
            self.wandb = wandb.init(project=project, name=run, config={**config, **environment})
        self.started = None

    def start(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        self.started = time.time()

    def step(self, step: int, loss: float, tokens: int | None = None, smooth: bool = True, **shown) -> float:
        """Record step `step` (1-based, just finished): print and log it; returns the debiased EMA of the loss."""
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, state = time.time() - self.started, self.state
        state["smooth_loss"] = 0.9 * state["smooth_loss"] + 0.1 * loss
        value = state["smooth_loss"] / (1 - 0.9**step) if smooth else loss
        if step - self.start_step > 2:  # the first steps of a session include compilation and warmup
            state["training_seconds"] += seconds
            state["timed_tokens"] += tokens or 0
        if not self.num_steps or step % max(1, self.num_steps // 500) == 0 or step == self.num_steps:
            state["train_loss_curve"].append([step, round(value, 5)])  # at most ~500 points in the report
        shown = {"loss": value, **shown, "ms": seconds * 1000}
        if tokens:
            shown["tok_per_s"] = tokens / seconds
            if self.peak_flops:
                shown["mfu"] = self.flops_per_token * tokens / seconds / self.peak_flops
        if self.num_steps:
            shown["eta_min"] = (self.num_steps - step) * seconds / 60
        total = f"/{self.num_steps}" if self.num_steps else ""
        print0(f"step {step:05d}{total} | " + " | ".join(_show(key, v) for key, v in shown.items()))
        if self.wandb:
            self.wandb.log({"step": step, **{f"train/{key}": v for key, v in shown.items()}})
        return value

    def evaluated(self, step: int, results: dict) -> None:
        """Record {name: value} at `step` in the curves (once per step: a resume re-evaluates) and the minima."""
        for name, value in results.items():
            curve = self.state.setdefault(f"{name}_curve", [])
            if not curve or curve[-1][0] != step:
                curve.append([step, value])
            if name.startswith("val_"):  # losses: the best so far too
                best = self.state.get(f"min_{name}")
                self.state[f"min_{name}"] = value if best is None else min(best, value)
        shown = " | ".join(f"{name.replace('val_', 'validation ')} {value:.4f}" for name, value in results.items())
        print0(f"step {step:05d} | {shown}")
        if self.wandb:
            self.wandb.log({"step": step, **{f"val/{name.removeprefix('val_')}": v for name, v in results.items()}})

    def summary(self) -> dict:
        state, summary = self.state, {"training_minutes": self.state["training_seconds"] / 60}
        if self.peak_flops and state["training_seconds"]:
            summary["mfu"] = self.flops_per_token * state["timed_tokens"] / state["training_seconds"] / self.peak_flops
        if self.runtime.device_type == "cuda":
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return summary

    def finish(self, summary: dict, curves=("train_loss",)) -> dict:
        print0(f"done: {json.dumps(summary, default=str)}")
        if self.runtime.is_master:
            write_stage_summary(self.stage, {**summary, **{f"{c}_curve": self.state.get(f"{c}_curve") for c in curves}})
        if self.wandb:
            self.wandb.summary.update(summary)
            self.wandb.finish()
        compute_cleanup()
        return summary


_FORMATS = {"mfu": "MFU {:.1%}", "loss": "loss {:.6f}", "eta_min": "ETA {:.1f} min", "ms": "{:,.0f} ms",
            "tok_per_s": "{:,.0f} tok/s"}  # fmt: skip


def _show(key: str, value) -> str:
    return _FORMATS.get(key, key.replace("_", " ") + (" {:.4f}" if isinstance(value, float) else " {:,}")).format(value)


# ---------------------------------------------------------------------------- checkpoints of a run


def save_stage(directory, step, model, optimizer, runtime, record: StageRecord, log: StageLog, loaders=(), **meta):
    """Save `step` with meta {"record" (at this step), "loop", "dataloader": states[rank][micro], **meta}."""
    local_states = [loader.state_dict() for loader in loaders]
    states = [local_states] * runtime.world_size
    if runtime.is_distributed:
        dist.all_gather_object(states, local_states)
    meta = {"record": asdict(replace(record, step=step)), "loop": log.state, "dataloader": states, **meta}
    save_checkpoint(directory, step, model, optimizer, meta, runtime.rank, runtime.world_size)
    print0(f"saved checkpoint step {step} to {directory}")


def _load_last_intact(directory, runtime, below: int | None = None) -> tuple:
    """load_checkpoint of the last step (below `below`) whose files this rank reads intact; (None, None, {}) if none."""
    for step in reversed([step for step in complete_steps(directory) if below is None or step <= below]):
        try:
            return load_checkpoint(directory, step, runtime.device, True, runtime.rank, runtime.world_size)
        except CorruptCheckpointError as e:
            print(f"--resume: step {step} is unusable, trying the one before: {e}", flush=True)
    return None, None, {}


def resume_stage(directory, model, optimizer, runtime, must_match: dict) -> tuple[int, dict, list | None, dict]:
    """Load the last intact checkpoint of `directory` into model and optimizer: (step, loop state, this rank's
    loader states or None, meta). `must_match`: settings that must equal the checkpoint's for an exact replay."""
    if not complete_steps(directory):
        raise SystemExit(f"--resume: no checkpoint in {directory}; start without --resume")
    model_state, optim_state, meta = _load_last_intact(directory, runtime)
    if runtime.is_distributed:  # every rank continues from the last step that all of them read intact
        agreed = torch.tensor(meta.get("step", -1), device=runtime.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if agreed.item() != meta.get("step", -1):
            model_state, optim_state, meta = _load_last_intact(directory, runtime, below=agreed.item())
    if not meta:
        raise SystemExit(f"--resume: no checkpoint in {directory} is intact (see above); start without --resume")
    if GPTConfig.from_dict(meta["model_config"]) != model.config:
        raise SystemExit(f"--resume: {directory} holds a different model ({meta['model_config']})")
    saved = {**meta.get("user_config", {}), **meta, **meta.get("record", {})}
    changed = [key for key, value in must_match.items() if saved.get(key) != value]
    if changed:
        raise SystemExit(f"--resume: {changed} changed since the checkpoint; the run would not continue exactly")
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    states = meta.get("dataloader")
    return meta["step"], meta["loop"], states[runtime.rank] if states else None, meta


def sample(model, tokenizer) -> list[str]:
    """Greedy 16-token continuations of SAMPLE_PROMPTS with the slow reference sampler (rank 0 only)."""
    outputs = []
    for prompt in SAMPLE_PROMPTS:
        continuation = list(model.generate(tokenizer.encode(prompt, prepend="<|bos|>"), 16, temperature=0))
        outputs.append(prompt + tokenizer.decode(continuation))
    return outputs
