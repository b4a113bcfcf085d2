"""Proof that a refactor of the training stages changed nothing: same seed, same data -> bit-identical runs.

Checks out `--before` (a commit) in a temporary `git worktree` (and `--after` too when given; else this checkout
is the after side), trains one tokenizer and writes two parquet shards from <data dir>/pretrain, then runs
base_train, mid_train, chat_sft and chat_rl tiny on CPU on both sides, each in its own NANOCHAT_BASE_DIR with the
same tokenizer, seed and arguments. Compares every loss, bpb, accuracy and reward the stages print (to the
precision both print) and each stage's final weights with torch.equal. Exit status 0 only when all are equal.

    NANOCHAT_DATA_DIR=/path/to/data python -m dev.check_same_training --before 695b575    # ~5 min on 2 cores

Not here: GPU runs (kernels differ between runs there) or speed.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTURE = "gsm8k,identity,spelling,simplespelling,arc"
STAGES = [  # (script, checkpoint dir, arguments): tiny, with accumulation, evaluation and clipping in play
    ("base_train", "base_checkpoints", "--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 "
     "--num-iterations 12 --eval-every 6 --eval-tokens 2048 --sample-every -1 --grad-clip 1.0 --model-tag d2"),
    ("mid_train", "mid_checkpoints", f"--mixture {MIXTURE} --num-iterations 8 --device-batch-size 4 "
     "--total-batch-size 1024 --eval-every 4 --eval-tokens 2048"),
    ("chat_sft", "chatsft_checkpoints", f"--mixture {MIXTURE} --num-iterations 8 --device-batch-size 2 "
     "--examples-per-step 4 --eval-every 4 --eval-steps 4 --eval-metrics-max-problems 8"),
    ("chat_rl", "chatrl_checkpoints", "--examples-per-step 2 --num-samples 2 --max-new-tokens 16 --num-steps 3 "
     "--eval-every -1 --eval-examples 2 --save-every -1"),
]  # fmt: skip
# A tiny random model never solves GSM8K, so every advantage would be 0 and RL would not train: both sides reward
# answers by their length instead (as tests/test_chat_rl.py does), so the policy gradient is exercised.
LENGTH_REWARD = ("import sys; from tasks.gsm8k import GSM8K; from scripts import chat_rl; "
                 "GSM8K.reward = lambda self, conversation, completion: float(len(completion) % 2); "
                 "chat_rl.main(sys.argv[1:])")  # fmt: skip
# Every number a stage prints about the model: train loss, validation bpb/loss, accuracies, rewards, pass@k.
NUMBERS = re.compile(r"(loss|bpb|MMLU|ARC-Easy|reward|pass@\d+) ([-0-9.]+)")


def prepare(work: str, data_dir: str) -> str:
    """A base dir holding a 512-token tokenizer and shards of the first 660 articles; copied for each side."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.tokenizer import Tokenizer

    with gzip.open(os.path.join(data_dir, "pretrain", "enwiki-sample.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(660), f)]
    template = os.path.join(work, "template")
    Tokenizer.train_from_iterator(docs[:300], 512).save(os.path.join(template, "tokenizer"))
    os.makedirs(os.path.join(template, "base_data"))
    pq.write_table(pa.table({"text": docs[:600]}), os.path.join(template, "base_data", "shard_00000.parquet"),
                   row_group_size=64)  # fmt: skip
    pq.write_table(pa.table({"text": docs[600:]}), os.path.join(template, "base_data", "val_00000.parquet"))
    return template


def run_stages(tree: str, base_dir: str, template: str, data_dir: str) -> dict:
    """{stage: (printed numbers, final state_dict)} of the four stages run in `tree`."""
    shutil.copytree(template, base_dir)
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_DATA_DIR": data_dir, "PYTHONPATH": tree,
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    results = {}
    for script, directory, args in STAGES:
        launch = ["-c", LENGTH_REWARD] if script == "chat_rl" else ["-m", f"scripts.{script}"]
        command = [sys.executable, *launch, *args.split(), "--device-type", "cpu", "--seed", "7"]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{script} failed in {tree}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        numbers = {}  # name -> the values printed, in order
        for line in done.stdout.splitlines():
            for key, value in NUMBERS.findall(line) if line.startswith("step") else []:
                numbers.setdefault(key, []).append(value)
        last = sorted(glob.glob(os.path.join(base_dir, directory, "d2", "model_*.pt")))[-1]
        results[script] = (numbers, torch.load(last, weights_only=True))
        count = sum(map(len, numbers.values()))
        print(f"  {script}: {count} printed numbers, weights from {os.path.basename(last)}", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare against, e.g. 695b575")
    parser.add_argument("--after", default=None, help="a commit to run instead of this checkout (e.g. HEAD)")
    parser.add_argument("--data-dir", default=os.environ.get("NANOCHAT_DATA_DIR"), help="default: $NANOCHAT_DATA_DIR")
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("check_same_training: set NANOCHAT_DATA_DIR or pass --data-dir (the local datasets)")
    data_dir = os.path.abspath(args.data_dir)
    work = tempfile.mkdtemp(prefix="same_training_")
    before_tree = os.path.join(work, "before")
    after_tree = os.path.join(work, "after") if args.after else REPO
    for tree, commit in ((before_tree, args.before), (after_tree, args.after)):
        if commit:
            subprocess.run(["git", "worktree", "add", "--detach", tree, commit], cwd=REPO, check=True)
    try:
        template = prepare(work, data_dir)
        print(f"before ({args.before}):", flush=True)
        before = run_stages(before_tree, os.path.join(work, "base_before"), template, data_dir)
        print(f"after ({args.after or 'this checkout'}):", flush=True)
        after = run_stages(after_tree, os.path.join(work, "base_after"), template, data_dir)
    finally:
        for tree in (before_tree, after_tree if args.after else None):
            if tree:
                subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)
    failures = 0
    for script, (numbers, weights) in before.items():
        new_numbers, new_weights = after[script]
        # equal to the precision printed by both (a stage may print more digits than before)
        same_numbers = numbers.keys() == new_numbers.keys() and all(
            len(numbers[key]) == len(new_numbers[key])
            and all(round(float(a), d) == round(float(b), d) for a, b in zip(numbers[key], new_numbers[key])
                    for d in [min(len(a.partition(".")[2]), len(b.partition(".")[2]))])
            for key in numbers
        )  # fmt: skip
        same_weights = weights.keys() == new_weights.keys() and all(torch.equal(weights[k], new_weights[k])
                                                                    for k in weights)  # fmt: skip
        failures += not (same_numbers and same_weights)
        previous = list(before).index(script) - 1  # a stage that did not move the weights would prove nothing
        moved = previous < 0 or any(not torch.equal(weights[k], before[list(before)[previous]][1][k]) for k in weights)
        count = sum(map(len, numbers.values()))
        print(f"{script:<11} printed numbers {'identical' if same_numbers else 'DIFFER'} ({count}), "
              f"final weights {'bit-identical' if same_weights else 'DIFFER'} ({len(weights)} tensors"
              f"{', changed by this stage' if moved else ', NOT changed by this stage'})")  # fmt: skip
        if not same_numbers:
            print(f"  before: {numbers}\n  after:  {new_numbers}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
