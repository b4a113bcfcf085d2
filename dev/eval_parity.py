"""Parity of the evaluation stages across a refactor: CORE (scripts/base_eval.py) and chat eval (scripts/chat_eval.py)
run by the code of git revision `--old` and by this working tree, on the same checkpoint, must give identical numbers.

    NANOCHAT_BASE_DIR=/tmp/tiny NANOCHAT_DATA_DIR=/path/to/data \\
        .venv/bin/python -m dev.eval_parity --old 695b575 --model-tag d2 --core-per-task 8 --chat-problems 8

The base dir must hold a base checkpoint and its tokenizer (e.g. tok_train, then base_train --depth 2 for a few
dozen steps on the CPU). The old revision is checked out in a temporary git worktree (removed afterwards); each
side runs both stages as subprocesses with the same flags, and every number of their JSON results is compared:
CORE and each task's examples, accuracy and centered accuracy; ChatCORE and each chat task's problems, passed,
too long, accuracy and centered accuracy. Exit status 0 only when all are equal (==, not approximately).

Not here: timing (dev/bench_core.py), or checkpoints of other stages (chat_eval -i base scores the base model).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_FIELDS = ("examples", "accuracy", "centered", "missing")
CHAT_FIELDS = ("problems", "passed", "too_long", "accuracy", "centered")


def run_stages(code_dir: str, args) -> dict:
    """Both evaluations run by the scripts in `code_dir`; their numbers, keyed for comparison."""
    base = os.environ["NANOCHAT_BASE_DIR"]
    core_cmd = ["-m", "scripts.base_eval", "--model-tag", args.model_tag, "--max-per-task", str(args.core_per_task)]
    core_cmd += ["--device-type", "cpu", "--bundle", os.path.join(args.data_dir, "core", "eval_bundle")]
    chat_cmd = ["-m", "scripts.chat_eval", "-i", "base", "-g", args.model_tag, "-x", str(args.chat_problems)]
    chat_cmd += ["-m", str(args.max_new_tokens), "--device-type", "cpu", "--data-dir", args.data_dir]
    chat_cmd += ["--arc-split", "validation"]
    for command in (core_cmd, chat_cmd):
        subprocess.run([sys.executable, *command], cwd=code_dir, check=True, stdout=subprocess.DEVNULL)
    numbers = {}
    for stage, pattern in (("core", "base_eval/core_"), ("chat", "chat_eval/chat_base_")):
        directory, prefix = os.path.split(os.path.join(base, pattern))
        (name,) = [n for n in os.listdir(directory) if n.startswith(prefix + args.model_tag) and n.endswith(".json")]
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            result = json.load(f)
        os.remove(os.path.join(directory, name))  # the other side must write its own
        if stage == "core":
            numbers["CORE"] = result["core"]
            numbers.update({f"core {t['task']} {k}": t[k] for t in result["tasks"] for k in CORE_FIELDS})
        else:
            numbers["ChatCORE"] = result["chatcore"]
            numbers.update({f"chat {t['name']} {k}": t[k] for t in result["tasks"] for k in CHAT_FIELDS})
    return numbers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git revision whose evaluation code is the reference")
    parser.add_argument("--model-tag", required=True, help="base checkpoint directory in $NANOCHAT_BASE_DIR")
    parser.add_argument("--core-per-task", type=int, default=4, help="CORE examples per task")
    parser.add_argument("--chat-problems", type=int, default=4, help="chat eval problems per task")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per generative chat eval sample")
    parser.add_argument("--data-dir", default=os.environ.get("NANOCHAT_DATA_DIR"), help="default: $NANOCHAT_DATA_DIR")
    args = parser.parse_args(argv)
    if not args.data_dir or "NANOCHAT_BASE_DIR" not in os.environ:
        parser.error("set NANOCHAT_BASE_DIR (with a base checkpoint) and NANOCHAT_DATA_DIR (or --data-dir)")

    with tempfile.TemporaryDirectory() as scratch:
        worktree = os.path.join(scratch, "old")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, args.old], cwd=REPO, check=True)
        try:
            old = run_stages(worktree, args)
            new = run_stages(REPO, args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO, check=True)
    differing = [key for key in old.keys() | new.keys() if old.get(key, "absent") != new.get(key, "absent")]
    for key in sorted(differing):
        print(f"DIFFERS {key}: old {old.get(key, 'absent')} new {new.get(key, 'absent')}")
    print(f"{len(old)} numbers from {args.old}, {len(new)} from the working tree: {len(differing)} differ")
    print(f"CORE {new.get('CORE')} ChatCORE {new.get('ChatCORE')}")
    names = sorted({key.split()[1] for key in new if key.startswith("chat ")})
    counts = [f"{n} {new[f'chat {n} passed']}/{new[f'chat {n} problems']} ({new[f'chat {n} too_long']})" for n in names]
    print("chat passed/problems (too long): " + ", ".join(counts))
    return 1 if differing or not old else 0


if __name__ == "__main__":
    sys.exit(main())
