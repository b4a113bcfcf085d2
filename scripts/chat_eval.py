"""Chat evaluation: a chat checkpoint's accuracy on six tasks, and their summary, ChatCORE.

    python -m scripts.chat_eval -i sft                                               # all six tasks
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft -a "GSM8K|HumanEval" -n 8 -t 0.8
    NANOCHAT_DATA_DIR=/path/to/data python -m scripts.chat_eval -i sft --device-type cpu -x 4 -m 64 \\
        --arc-split validation                                                        # tiny, CPU, offline

ARC-Easy, ARC-Challenge (test split; `--arc-split validation` offline) and MMLU are categorical, `-b` prompts
per forward pass; GSM8K, HumanEval and SpellingBee generative: `-n` samples per problem (at most `-m` new tokens,
temperature `-t`, top-k `-k`), pass@n. `-x N`: the first N problems of each task (-1 = all).
Unless given, -x and -m follow the hardware: all problems and 512 tokens on a GPU (the reference's), elsewhere
CPU_MAX_PROBLEMS and CPU_MAX_NEW_TOKENS; the choice is printed in one line, and each task prints a progress
line with an ETA every few seconds.

Rank 0 prints a table and writes `<base dir>/chat_eval/chat_<source>_<tag>_<step>[_<tasks>].json` and `.md` (the
task names appended when not all six ran) and the report card's `report/chat_eval_<source>.json` ("model_tag",
"step", "tasks", "chatcore"; a partial run adds its tasks to an earlier run's of the same checkpoint).

Not here: the scoring, splitting across ranks and ChatCORE (tasks/evaluate.py), generation, CORE (base_eval).
"""

import argparse
import json
import os
import time
from dataclasses import asdict

from nanochat.common import atomic_write, compute_cleanup, compute_init, describe_environment, get_base_dir, print0
from nanochat.dataset import Progress
from nanochat.engine import Engine
from nanochat.report import read_stage, report_dir, write_stage_summary
from nanochat.train import one_line_errors
from tasks.common import resolve_data_dir
from tasks.evaluate import ALL_TASKS, TaskResult, chatcore, evaluate_task, load_task

CPU_MAX_PROBLEMS, CPU_MAX_NEW_TOKENS = 50, 256  # a few minutes for a d4 on CPU; -x / -m to change


def summary_line(results: list[TaskResult]) -> str:
    score = chatcore(results)
    if score is not None:
        return f"ChatCORE {score:.4f} over all {len(ALL_TASKS)} tasks"
    missing = [name for name in ALL_TASKS if name not in {result.name for result in results}]
    return f"ChatCORE not reported: it needs all {len(ALL_TASKS)} tasks; missing: {', '.join(missing)}"


def to_markdown(results: list[TaskResult], num_samples: int) -> str:
    """The results table (printed, and saved as .md) and the ChatCORE line."""
    lines = ["| task | scoring | problems | passed | too long | accuracy | baseline | centered |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        kind = "categorical" if r.eval_type == "categorical" else f"pass@{num_samples}"
        counts = f"{r.problems} | {r.passed} | {r.too_long}"
        lines.append(f"| {r.name} | {kind} | {counts} | {r.accuracy:.4f} | {r.baseline:.2f} | {r.centered:.4f} |")
    return "\n".join(lines) + f"\n\n{summary_line(results)}\n"


def task_rows(results: list[TaskResult]) -> list[dict]:
    return [{**asdict(r), "accuracy": r.accuracy, "centered": r.centered} for r in results]


def update_report(source: str, tag: str, step: int, results: list[TaskResult]) -> str:
    """Write chat_eval_<source>.json for the report card, keeping the tasks of an earlier run of this checkpoint."""
    stage = f"chat_eval_{source}"
    previous, _ = read_stage(report_dir(), stage)  # absent or unreadable: start afresh
    by_name = {}
    if previous and previous.get("model_tag") == tag and previous.get("step") == step:
        fields = ("name", "eval_type", "problems", "passed", "too_long", "baseline")
        for row in (previous.get("tasks") or {}).values():
            if isinstance(row, dict) and all(key in row for key in fields):
                by_name[row["name"]] = TaskResult(*(row[key] for key in fields))
    by_name.update({result.name: result for result in results})
    merged = [by_name[name] for name in ALL_TASKS if name in by_name]
    tasks = {row["name"]: row for row in task_rows(merged)}
    summary = {"source": source, "model_tag": tag, "step": step, "chatcore": chatcore(merged), "tasks": tasks}
    return write_stage_summary(stage, summary)


@one_line_errors("chat_eval")
def main(argv=None):
    usage = "\n\n".join(__doc__.split("\n\n")[:2])  # --help: what it is and how to run it; the contract stays here
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    # Evaluation
    parser.add_argument("-a", "--task-name", default="|".join(ALL_TASKS), help="tasks joined by '|' (default: all six)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="first N problems per task (-1 = all; "
                        f"default: all on a GPU, else {CPU_MAX_PROBLEMS})")  # fmt: skip
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="categorical prompts per forward pass")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=None, help="new tokens per sample, at most "
                        f"(default: 512 on a GPU, else {CPU_MAX_NEW_TOKENS})")  # fmt: skip
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens (-1 = off)")
    parser.add_argument("--data-dir", default=None, help="local data (default: $NANOCHAT_DATA_DIR, else the hub)")
    parser.add_argument("--arc-split", choices=["test", "validation"], default="test", help="local data: no test")
    args = parser.parse_args(argv)

    # Derived values
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    unknown = [name for name in task_names if name not in ALL_TASKS]
    if unknown or not task_names:
        parser.error(f"unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)}")
    if len(set(task_names)) != len(task_names):
        parser.error(f"task listed twice in {args.task_name!r}")
    for flag, value in (("-b", args.batch_size), ("-n", args.num_samples), ("-m", args.max_new_tokens or 1)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.top_k == 0 or args.top_k < -1:
        parser.error(f"-k must be >= 1, or -1 for off, got {args.top_k}")
    data_dir = resolve_data_dir(args.data_dir)  # None = the Hugging Face hub
    if data_dir is not None and args.arc_split == "test" and {"ARC-Easy", "ARC-Challenge"} & set(task_names):
        parser.error(f"the local data in {data_dir} has no ARC test split: pass --arc-split validation")

    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type)
    gpu = runtime.device.type == "cuda"
    max_problems = args.max_problems or (-1 if gpu else CPU_MAX_PROBLEMS)
    max_new_tokens = args.max_new_tokens or (512 if gpu else CPU_MAX_NEW_TOKENS)
    chosen = "as given" if args.max_problems and args.max_new_tokens else f"{runtime.device.type.upper()} default"
    problems = "all problems" if max_problems < 0 else f"at most {max_problems} problems"
    sampling = {"num_samples": args.num_samples, "max_new_tokens": max_new_tokens, "temperature": args.temperature,
                "top_k": None if args.top_k == -1 else args.top_k}  # fmt: skip
    resolved = {**vars(args), "max_problems": max_problems, "max_new_tokens": max_new_tokens, "tasks": task_names,
                "data_dir": data_dir}  # fmt: skip
    print0(json.dumps({"config": resolved, "environment": describe_environment(runtime)}, indent=2, default=str))
    if args.temperature == 0 and args.num_samples > 1:
        print0(f"note: greedy decoding (-t 0) makes all {args.num_samples} samples identical; pass@n = pass@1")

    # ---------------------------------------------------------------- model
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import get_tokenizer

    model, meta = load_model(args.source, runtime.device, "eval", args.model_tag, args.step, dtype=runtime.dtype)
    tokenizer = get_tokenizer()
    engine = Engine(model, tokenizer)
    tag, step = args.model_tag or f"d{meta['model_config']['n_layer']}", meta["step"]
    print0(f"chat eval of {args.source} {tag} step {step}: {problems} per task, at most {max_new_tokens} new tokens "
           f"a sample ({chosen}; -x, -m to change)")  # fmt: skip

    # ---------------------------------------------------------------- evaluate
    results, seconds = [], {}
    for name in task_names:
        start = time.time()
        task = load_task(name, data_dir, args.arc_split)
        progress = Progress(f"chat eval {name}") if runtime.is_master else None
        result = evaluate_task(name, task, model, tokenizer, runtime.device, max_problems, args.batch_size, engine,
                               progress, **sampling)  # fmt: skip
        seconds[name] = time.time() - start
        results.append(result)
        too_long = f" ({result.too_long} too long for the context, counted as failed)" if result.too_long else ""
        print0(f"{name}: {result.passed}/{result.problems} = {result.accuracy:.4f}{too_long} in {seconds[name]:.1f} s")
    markdown = to_markdown(results, args.num_samples)
    print0(markdown)

    # ---------------------------------------------------------------- save
    if runtime.is_master:
        summary = {"source": args.source, "model_tag": tag, "step": step, "chatcore": chatcore(results),
                   "summary": summary_line(results), "config": resolved,
                   "tasks": [{**row, "seconds": seconds[row["name"]]} for row in task_rows(results)]}  # fmt: skip
        out_dir = os.path.join(get_base_dir(), "chat_eval")
        os.makedirs(out_dir, exist_ok=True)
        partial = "" if task_names == list(ALL_TASKS) else "_" + "_".join(task_names)  # never overwrites a full run
        stem = os.path.join(out_dir, f"chat_{args.source}_{tag}_{step:06d}{partial}")
        atomic_write(stem + ".json", lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
        title = f"## chat eval of {args.source} {tag} step {step}\n\n"
        atomic_write(stem + ".md", lambda f: f.write((title + markdown).encode("utf-8")))
        print0(f"wrote {stem}.json and {stem}.md")
        update_report(args.source, tag, step, results)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
