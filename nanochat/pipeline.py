"""The speedrun's decisions, kept out of shell: which profile to run, where data comes from, what is already done.

speedrun.sh is the table of contents; it asks this module three things:

    python -m nanochat.pipeline profile        # shell variables for the detected (or $NANOCHAT_PROFILE) profile;
                                               # exits 1 AT ONCE, saying what to do, when there is no data source
    python -m nanochat.pipeline run STAGE -- CMD ...   # CMD, unless STAGE is done; `--resume` added when a
                                               # training stage left a partial checkpoint; wall time printed
    python -m nanochat.pipeline done STAGE     # exit 0 when STAGE's outputs are complete, else 1
    python -m nanochat.pipeline times          # the per-stage wall times of this base dir, as a table

Profiles (override the detection with NANOCHAT_PROFILE=cpu|gpu|1000):
- gpu: the reference run, depth 20 (~561M params), on every visible GPU: torchrun --nproc_per_node=N; with
  fewer than 8 GPUs base_train accumulates gradients to the same batch (same result, 8/N times longer).
- 1000: the "$1000" tier, depth 32 (~1.9B params), 800 shards, device batch 8 (16 runs out of memory on 80 GB).
- cpu: a tiny model (depth 4, vocab 4,096, 256-token context) through every stage in ~15 minutes on 2 cores.
  It only exercises the code paths and leaves a model that answers, not one that is any good.
Multi-node: set NANOCHAT_TORCHRUN to the torchrun arguments (they replace `--standalone --nproc_per_node=N`).

Done means (per stage; `tag` is the profile's model tag, `step` the stage's last checkpoint step):
data: <base dir>/base_data holds a validation shard; tok_train: tokenizer/tokenizer.json; tok_eval:
tokenizer/eval.json; base_train: the last checkpoint's step equals its num_iterations; base_loss, base_eval:
base_eval/{loss,core}_<tag>_<step:06d>.json; mid_train, chat_sft, chat_rl: report/<stage>.json; chat_eval_<source>:
chat_eval/chat_<source>_<tag>_<step>[_tasks].json; report_reset: the tokenizer exists (a resumed run keeps its
report). Not here: the stages themselves, downloading (nanochat.dataset), the report (nanochat.report).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

OFFLINE_MIXTURE = "gsm8k,identity,spelling,simplespelling,arc"  # what ../shared/data supports (no smoltalk/mmlu-aux)
TIMES_FILE = "speedrun_times.json"
TRAINING_STAGES = {"base_train": "base", "mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}


# ---------------------------------------------------------------------------- profiles


def detect_profile() -> tuple[str, int]:
    """(profile, number of GPUs): $NANOCHAT_PROFILE if set, else gpu when CUDA sees a GPU, else cpu."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    profile = os.environ.get("NANOCHAT_PROFILE") or ("gpu" if gpus else "cpu")
    if profile not in ("cpu", "gpu", "1000"):
        raise SystemExit(f"pipeline: NANOCHAT_PROFILE must be cpu, gpu or 1000, got {profile!r}")
    if profile != "cpu" and gpus == 0:
        raise SystemExit(f"pipeline: profile {profile!r} needs CUDA GPUs and none is visible; use NANOCHAT_PROFILE=cpu")
    return profile, gpus


def profile_settings(profile: str, gpus: int, offline: bool, data_dir: str | None) -> dict[str, str]:
    """Shell variables: the launcher, each stage's arguments and the data to fetch. Values are shell words."""
    bundle = f"--bundle {shlex.quote(os.path.join(data_dir, 'core', 'eval_bundle'))}" if offline else ""
    mixture = f"--mixture {OFFLINE_MIXTURE}" if offline else ""
    arc = "--arc-split validation" if offline else ""  # the local ARC copy has no test split
    if profile == "cpu":
        # Measured on 2 cores (tests/test_speedrun.py prints the per-stage times): ~15 min in all.
        s = {
            "LAUNCH": f"{shlex.quote(sys.executable)} -m",
            "MODEL_TAG": "d4",
            "DATA_SHARDS": "1",  # online: one 250M-character shard (~100 MB) is plenty
            "TOK_TRAIN_ARGS": "--vocab-size 4096 --max-chars 20000000",
            "TOK_EVAL_ARGS": "--heldout-chars 200000",
            "BASE_TRAIN_ARGS": "--depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 "
            "--num-iterations 80 --eval-every 40 --eval-tokens 16384 --sample-every -1 --save-every 40 "
            "--device-type cpu",
            "BASE_LOSS_ARGS": "--device-batch-size 16 --split-tokens 16384 --device-type cpu",
            "BASE_EVAL_ARGS": f"--max-per-task 8 --device-type cpu {bundle}",
            "MID_TRAIN_ARGS": f"{mixture} --num-iterations 30 --device-batch-size 16 --total-batch-size 4096 "
            "--eval-every 15 --eval-tokens 16384 --save-every 15 --device-type cpu",
            "CHAT_EVAL_ARGS": f"-x 8 -m 32 --device-type cpu {arc}",
            "CHAT_SFT_ARGS": f"{mixture} --num-iterations 30 --device-batch-size 8 --examples-per-step 16 "
            "--eval-every 15 --eval-steps 4 --eval-metrics-max-problems 16 --save-every 15 --device-type cpu",
            "CHAT_RL_ARGS": "--examples-per-step 2 --num-samples 2 --max-new-tokens 16 --num-steps 2 --eval-every -1 "
            "--eval-examples 2 --save-every -1 --device-type cpu",
            "CHAT_EVAL_RL_ARGS": "-x 8 -m 32 --device-type cpu",
        }
    else:
        # Reference (shared/reference/nanochat.md §1.19): d20 on 240 shards; d32 on 800 shards at device batch 8.
        depth, shards, device_batch, tok_chars = (20, 240, 32, 2_000_000_000)
        if profile == "1000":
            depth, shards, device_batch, tok_chars = (32, 800, 8, 4_000_000_000)
        depth = int(os.environ.get("NANOCHAT_DEPTH", depth))  # e.g. 12 for a quicker single-GPU run
        torchrun_args = os.environ.get("NANOCHAT_TORCHRUN") or f"--standalone --nproc_per_node={gpus}"
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        s = {
            "LAUNCH": f"{shlex.quote(torchrun)} {torchrun_args} -m",
            "MODEL_TAG": f"d{depth}",
            "DATA_SHARDS": str(shards),
            "TOK_TRAIN_ARGS": f"--max-chars {tok_chars}",
            "TOK_EVAL_ARGS": "",
            # A checkpoint every 1,000 steps (~10 min of d20 on 8 GPUs) so an interrupted run resumes.
            "BASE_TRAIN_ARGS": f"--depth {depth} --device-batch-size {device_batch} --save-every 1000",
            "BASE_LOSS_ARGS": f"--device-batch-size {device_batch}",
            "BASE_EVAL_ARGS": bundle,
            "MID_TRAIN_ARGS": f"{mixture} --device-batch-size {device_batch} --save-every 200",
            "CHAT_EVAL_ARGS": arc,
            "CHAT_SFT_ARGS": f"{mixture} --save-every 200",
            "CHAT_RL_ARGS": "",
            "CHAT_EVAL_RL_ARGS": "",
        }
    s.update(PROFILE=profile, GPUS=str(gpus), DATA_MODE="offline" if offline else "online")
    return {key: " ".join(value.split()) for key, value in s.items()}


# ---------------------------------------------------------------------------- data source

LOCAL_LAYOUT = ("pretrain", "gsm8k", "arc", "chat/identity_conversations.jsonl", "words", "core/eval_bundle/core.yaml")


def check_data_source(timeout: float = 5.0) -> tuple[bool, str | None]:
    """(offline, data dir). Raises SystemExit with instructions when neither local data nor the hub is usable."""
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    if data_dir:
        missing = [p for p in LOCAL_LAYOUT if not os.path.exists(os.path.join(data_dir, p))]
        if missing:
            raise SystemExit(
                f"pipeline: NANOCHAT_DATA_DIR={data_dir} lacks {', '.join(missing)}; it must be laid out like "
                "shared/data (see shared/data/README.md)"
            )
        return True, os.path.abspath(data_dir)
    import requests

    url = os.environ.get("NANOCHAT_DATA_URL") or "https://huggingface.co"
    try:
        requests.head(url, timeout=timeout, allow_redirects=False)
    except requests.RequestException as e:
        raise SystemExit(
            f"pipeline: cannot reach {url} ({type(e).__name__}) and NANOCHAT_DATA_DIR is not set, so there is no "
            "data to train on. Either\n"
            "  - run where https://huggingface.co is reachable (pretraining shards, chat datasets, CORE bundle), or\n"
            "  - set NANOCHAT_DATA_DIR to a directory laid out like shared/data (pretrain/*.jsonl.gz, gsm8k/, arc/,\n"
            "    chat/identity_conversations.jsonl, words/, core/eval_bundle/; see shared/data/README.md):\n"
            "      NANOCHAT_DATA_DIR=/path/to/data bash speedrun.sh\n"
            "  - or serve shards from a mirror: NANOCHAT_DATA_URL=http://mirror/fineweb bash speedrun.sh"
        ) from None
    return False, None


# ---------------------------------------------------------------------------- stage completion


def _base_dir() -> str:
    from nanochat.common import get_base_dir

    return get_base_dir()


def _last_step(source: str, tag: str) -> int | None:
    from nanochat.checkpoint import STAGES, find_last_step

    return find_last_step(os.path.join(_base_dir(), STAGES[source][0], tag))


def stage_done(stage: str, tag: str) -> str | None:
    """Why `stage` is complete (a short reason), or None when it must run."""
    base = _base_dir()
    if stage == "data":
        shards = os.path.join(base, "base_data")
        found = sorted(n for n in os.listdir(shards) if n.startswith("val")) if os.path.isdir(shards) else []
        return f"{shards} has {found[0]}" if found else None
    if stage in ("tok_train", "report_reset"):
        path = os.path.join(base, "tokenizer", "tokenizer.json")
        return f"{path} exists" if os.path.exists(path) else None
    if stage == "tok_eval":
        path = os.path.join(base, "tokenizer", "eval.json")
        return f"{path} exists" if os.path.exists(path) else None
    if stage == "base_train":
        from nanochat.checkpoint import STAGES

        step = _last_step("base", tag)
        if step is None:
            return None
        with open(os.path.join(base, STAGES["base"][0], tag, f"meta_{step:06d}.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return f"checkpoint {tag} step {step} is the last" if step == meta.get("num_iterations") else None
    if stage in ("base_loss", "base_eval"):
        step = _last_step("base", tag)
        name = f"{'loss' if stage == 'base_loss' else 'core'}_{tag}_{step:06d}.json" if step is not None else ""
        path = os.path.join(base, "base_eval", name)
        return f"{path} exists" if step is not None and os.path.isfile(path) else None
    if stage in ("mid_train", "chat_sft", "chat_rl"):
        path = os.path.join(base, "report", f"{stage}.json")
        return f"{path} exists" if os.path.exists(path) and _last_step(TRAINING_STAGES[stage], tag) else None
    if stage.startswith("chat_eval_"):
        source = stage.removeprefix("chat_eval_")
        step = _last_step(source, tag)
        directory = os.path.join(base, "chat_eval")
        pattern = re.compile(rf"chat_{source}_{re.escape(tag)}_0*{step}(_.*)?\.json")
        found = [n for n in os.listdir(directory) if pattern.fullmatch(n)] if os.path.isdir(directory) else []
        return f"{os.path.join(directory, found[0])} exists" if step is not None and found else None
    raise SystemExit(f"pipeline: unknown stage {stage!r}")


def resume_flag(stage: str, tag: str) -> list[str]:
    """['--resume'] when a training stage that is not done left a checkpoint to continue from."""
    if stage in TRAINING_STAGES and _last_step(TRAINING_STAGES[stage], tag) is not None:
        return ["--resume"]
    return []


def record_time(stage: str, seconds: float, status: str) -> None:
    path = os.path.join(_base_dir(), TIMES_FILE)
    times = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            times = json.load(f)
    times[stage] = {"seconds": round(seconds, 1), "status": status}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(times, f, indent=2)


def run_stage(stage: str, tag: str, command: list[str]) -> int:
    start = time.time()
    reason = stage_done(stage, tag)
    if reason:
        print(f"speedrun: skip {stage} (done: {reason})", flush=True)
        record_time(stage, time.time() - start, "skipped")
        return 0
    command = command + resume_flag(stage, tag)
    print(f"speedrun: {stage}: {shlex.join(command)}", flush=True)
    code = subprocess.call(command)
    seconds = time.time() - start
    print(f"speedrun: {stage} {'took' if code == 0 else f'FAILED (exit {code}) after'} {seconds:.1f} s", flush=True)
    if code == 0:
        record_time(stage, seconds, "ran")
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("profile", help="print the profile's shell variables (exit 1 when there is no data)")
    run = commands.add_parser("run", help="run a stage unless it is done")
    run.add_argument("stage")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    done = commands.add_parser("done", help="exit 0 when the stage is complete")
    done.add_argument("stage")
    commands.add_parser("times", help="print the recorded per-stage wall times")
    args = parser.parse_args(argv)
    tag = os.environ.get("MODEL_TAG", "d20")

    if args.command == "profile":
        offline, data_dir = check_data_source()
        profile, gpus = detect_profile()
        for key, value in profile_settings(profile, gpus, offline, data_dir).items():
            print(f"{key}={shlex.quote(value)}")
        return 0
    if args.command == "run":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            parser.error("run: give the command after --")
        return run_stage(args.stage, tag, command)
    if args.command == "done":
        reason = stage_done(args.stage, tag)
        print(reason or f"{args.stage}: not done")
        return 0 if reason else 1
    path = os.path.join(_base_dir(), TIMES_FILE)
    times = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    for stage, entry in times.items():
        print(f"{stage:<16} {entry['seconds']:>8.1f} s  {entry['status']}")
    print(f"{'total':<16} {sum(e['seconds'] for e in times.values()):>8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
