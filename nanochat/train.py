"""The training spine of every training stage (base_train, mid_train, chat_sft, chat_rl): plain functions.

Each stage script keeps its own visible `while` loop and calls these for what used to be written four times:
- `StageRecord`: the typed record a stage saves in its checkpoint meta ("record") and the next stage reads
  (`StageRecord.from_meta`; metas from before the record load too, missing fields taking today's values).
- Schedules, all here: `lr_multiplier` (base: warmup, constant, warmdown by steps), `warmdown_multiplier` (chat
  stages: constant, then linear over the last fraction of the run's progress), `muon_momentum`, `set_schedule`.
- `accumulate` (forward and backward over one micro-batch per loader), `optimizer_step` (the non-finite stop,
  the fp16 scaler, optional clipping of the global grad norm, the step).
- `StageLog`: the resolved config and environment printed, debiased EMA of the loss, timed steps, tok/s, MFU,
  the curves of the report card, wandb, and the stage summary; its `state` is saved with every checkpoint.
- `save_stage` / `resume_stage`: checkpoints with the record, the loop state and every rank's loader states.
- `add_stage_flags`: the flags all four share. `sample`: greedy continuations of SAMPLE_PROMPTS (base_train, base_loss).
Not here: data, losses and evaluations (the stage scripts, nanochat/chat_data.py, nanochat/loss_eval.py).
"""

import json
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist

from nanochat.checkpoint import find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import compute_cleanup, describe_environment, gpu_peaks, print0
from nanochat.gpt import GPTConfig
from nanochat.report import write_stage_summary

# Prompts whose greedy continuations show what the model has picked up (facts, arithmetic, grammar).
SAMPLE_PROMPTS = [
    "The largest ocean on Earth is the",
    "Water boils at a temperature of",
    "Seven plus five equals",
    "The author of the play Romeo and Juliet is",
    "In the winter, many birds fly",
]


@dataclass(frozen=True)
class StageRecord:
    """What a training stage hands the next, saved as meta["record"]: its batch layout and the LRs it was given
    (before any --init-lr-frac). A chat stage inherits device batch, token batch and LRs from its source's."""

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
    """The flags every training stage shares, spelled and defaulted once (they drifted when written four times)."""
    parser.add_argument("--grad-clip", type=float, default=-1, help="max global grad norm (-1 = off)")
    parser.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints (-1 = end only)")
    parser.add_argument("--resume", action="store_true", help="continue from this stage's last checkpoint of the tag")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("--run", default=None, help="wandb run name (default: no wandb)")
    parser.add_argument("--seed", type=int, default=42, help="initialisation, data order and sampling")


# ---------------------------------------------------------------------------- schedules
# Two LR shapes, not one: base counts whole steps (its warmdown is rounded to steps), the chat stages count
# progress (mid: the fraction of its data read). Folding either into the other changes the LRs in the last bits.


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
    """Constant, then linear to final_lr_frac over the last warmdown_ratio of the run (progress 0..1); with
    ratio 1 and final 0 it is RL's linear decay 1 - progress."""
    if progress <= 1 - warmdown_ratio:
        return 1.0
    remaining = max(0.0, 1 - progress) / max(warmdown_ratio, 1e-9)
    return remaining + (1 - remaining) * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 over the first 300 steps (modded-nanogpt / nanochat): less momentum while the loss moves fast."""
    return 0.85 + 0.10 * min(1.0, step / 300)


def set_schedule(optimizer, lrm: float, momentum: float | None = None) -> None:
    """Every group's LR = its initial LR x lrm; Muon's momentum too when given (else left as built, 0.95)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if momentum is not None and group["kind"] == "muon":
            group["momentum"] = momentum


# ---------------------------------------------------------------------------- one optimizer step


def accumulate(forward, loaders, runtime, scaler=None) -> torch.Tensor:
    """Forward and backward of one micro-batch from each loader, each loss divided by their number; returns the
    step's mean loss averaged over ranks (the optimizer itself averages the gradients)."""
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


def optimizer_step(model, optimizer, scaler, train_loss, runtime, grad_clip: float = -1, hint: str = "") -> None:
    """Stop on a non-finite loss (exit 1, checkpoints untouched), else unscale, clip, step and zero the grads."""
    if not torch.isfinite(torch.as_tensor(train_loss)):
        print0(f"loss is {float(train_loss)}; stopping. The last checkpoint is intact: {hint or 'lower the LRs'}.")
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
    """Bookkeeping of one run: prints, EMA, timing, MFU, curves, wandb. `state` (JSON) travels in checkpoints.

    `flops_per_token`: the model's training FLOPs per token (MFU needs it and a known GPU; else no MFU).
    """

    def __init__(self, stage: str, runtime, config: dict, run: str | None, state: dict | None = None,
                 num_steps: int | None = None, flops_per_token: float | None = None, start_step: int = 0):  # fmt: skip
        self.stage, self.runtime, self.num_steps, self.start_step = stage, runtime, num_steps, start_step
        self.state = {"smooth_loss": 0.0, "training_seconds": 0.0, "timed_steps": 0, "timed_tokens": 0,
                      "train_loss_curve": []} | (state or {})  # fmt: skip
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
        """Mark the start of a step's work (after syncing the device, so the time is the step's own)."""
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        self.started = time.time()

    def step(self, step: int, loss: float, tokens: int | None = None, smooth: bool = True, **shown) -> float:
        """Record step `step` (1-based, just finished) with its loss and `tokens` processed; print and log it.
        Returns the debiased EMA of the loss (or the loss itself with smooth=False)."""
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, state = time.time() - self.started, self.state
        state["smooth_loss"] = 0.9 * state["smooth_loss"] + 0.1 * loss
        value = state["smooth_loss"] / (1 - 0.9**step) if smooth else loss
        if step - self.start_step > 2:  # the first steps of a session include compilation and warmup
            state["training_seconds"] += seconds
            state["timed_steps"] += 1
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
        """Record evaluation results {name: value} at `step`: curves (once per step, so a resume that re-evaluates
        its step adds nothing) and the minimum of each."""
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
        """Timing and MFU over the timed steps (not the first steps of each session), for the stage summary."""
        state, summary = self.state, {"training_minutes": self.state["training_seconds"] / 60}
        if self.peak_flops and state["training_seconds"]:
            summary["mfu"] = self.flops_per_token * state["timed_tokens"] / state["training_seconds"] / self.peak_flops
        if self.runtime.device_type == "cuda":
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return summary

    def finish(self, summary: dict, curves=("train_loss",)) -> dict:
        """Print the summary, write it (with the named curves) as the stage's report card entry, close wandb."""
        print0(f"done: {json.dumps(summary, default=str)}")
        if self.runtime.is_master:
            write_stage_summary(self.stage, {**summary, **{f"{c}_curve": self.state.get(f"{c}_curve") for c in curves}})
        if self.wandb:
            self.wandb.summary.update(summary)
            self.wandb.finish()
        compute_cleanup()
        return summary


def _show(key: str, value) -> str:
    if key == "mfu":
        return f"MFU {value:.1%}"
    if key == "loss":
        return f"loss {value:.6f}"
    if key == "eta_min":
        return f"ETA {value:.1f} min"
    if key in ("ms", "tok_per_s"):
        return f"{value:,.0f} {key.replace('_per_', '/')}"
    return f"{key.replace('_', ' ')} {value:.4f}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value:,}"


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


def resume_stage(directory, model, optimizer, runtime, must_match: dict) -> tuple[int, dict, list | None, dict]:
    """Load the last checkpoint of `directory` into model and optimizer: (step, loop state, this rank's loader
    states or None, meta). `must_match`: settings that must equal the checkpoint's for an exact replay."""
    last = find_last_step(directory)
    if last is None:
        raise SystemExit(f"--resume: no checkpoint in {directory}; start without --resume")
    model_state, optim_state, meta = load_checkpoint(directory, last, runtime.device, load_optimizer=True,
                                                     rank=runtime.rank, world_size=runtime.world_size)  # fmt: skip
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
