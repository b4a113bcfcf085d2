"""Chat evaluation: a chat checkpoint's accuracy on six tasks, and their summary, ChatCORE.

    python -m scripts.chat_eval -i sft                                               # all six tasks
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft -a "GSM8K|HumanEval" -n 8 -t 0.8
    python -m scripts.chat_eval -i sft --device-type cpu -x 4 -m 64 \\
        --data-dir ../shared/data --arc-split validation                             # tiny, CPU, offline

Tasks and how each is scored:
- ARC-Easy, ARC-Challenge (test split; `--arc-split validation` offline, where the test split is absent),
  MMLU (all subjects, test): categorical. Each batch of `-b` prompts (rendered for completion, right-padded
  with BOS) takes one forward pass; the logits at each prompt's last position, restricted to that question's
  answer letters (each a single token, checked), pick the predicted letter, which `task.evaluate` scores.
- GSM8K (test), HumanEval (164 problems), SpellingBee (256 test examples): generative. Each problem gets `-n`
  samples from `Engine.generate_batch` (at most `-m` new tokens, temperature `-t`, top-k `-k`, seed = the
  problem's index); it passes if any sample passes `task.evaluate` (pass@n). HumanEval runs every candidate
  program in nanochat/execution.py's sandbox.
- ChatCORE = the mean over the six tasks of centered accuracy (acc - baseline) / (1 - baseline), baseline 0.25
  for the three multiple-choice tasks and 0 for the generative ones: 0 is random, 1 perfect. It is reported
  only when all six tasks ran; otherwise the summary says which are missing.

Contract:
- `-x N` evaluates the first N problems of each task (in the task's order), -1 all of them.
- A prompt too long for the model is skipped, never cropped (cropping would cut the question, which comes
  first): a categorical prompt longer than the model's sequence_len, or a generative one that leaves no room
  for a single new token (the engine's ContextFullError). A skipped problem counts as failed, so accuracies
  stay over every problem, and the table's "too long" column says how many there were.
- Distributed: under torchrun rank r takes problems r, r+W, ...; passed / problem / too-long counts are summed
  over ranks (torch.distributed all_reduce), so every rank holds the same totals.
- Rank 0 prints a table and writes `<base dir>/chat_eval/chat_<source>_<tag>_<step>[_<tasks>].json` and `.md`
  atomically (the task names are appended when not all six ran), and the report card's
  `<base dir>/report/chat_eval_<source>.json` (per-task accuracy and ChatCORE; a partial run adds its tasks to
  those of an earlier run of the same checkpoint, so ChatCORE appears once all six have run).

Not here: the tasks themselves (tasks/), generation (nanochat/engine.py), base-model CORE (scripts/base_eval.py).
"""

import argparse
import io
import json
import os
import time
from dataclasses import asdict

from nanochat.common import atomic_write, compute_cleanup, compute_init, describe_environment, get_base_dir, print0
from nanochat.engine import Engine
from nanochat.report import read_stage, report_dir, write_stage_summary
from tasks.common import resolve_data_dir
from tasks.evaluate import ALL_TASKS, TaskResult, chatcore, evaluate_task, load_task

# Re-exported until their importers move to tasks.evaluate: tests/test_report.py, scripts/chat_sft.py.
from tasks.evaluate import BASELINES as BASELINES
from tasks.evaluate import evaluate_categorical as evaluate_categorical

# ---------------------------------------------------------------------------- reporting


def summary_line(results: list[TaskResult]) -> str:
    score = chatcore(results)
    if score is not None:
        return f"ChatCORE {score:.4f} over all {len(ALL_TASKS)} tasks"
    missing = [name for name in ALL_TASKS if name not in {result.name for result in results}]
    return f"ChatCORE not reported: it needs all {len(ALL_TASKS)} tasks; missing: {', '.join(missing)}"


def format_table(results: list[TaskResult], num_samples: int) -> str:
    header = f"{'task':<14} {'type':<12} {'problems':>8} {'passed':>7} {'too long':>8} {'accuracy':>9} {'centered':>9}"
    lines = [header]
    for r in results:
        kind = "categorical" if r.eval_type == "categorical" else f"pass@{num_samples}"
        lines.append(
            f"{r.name:<14} {kind:<12} {r.problems:>8} {r.passed:>7} {r.too_long:>8} {r.accuracy:>9.4f} "
            f"{r.centered:>9.4f}"
        )
    return "\n".join(lines)


def to_markdown(results: list[TaskResult], num_samples: int, title: str) -> str:
    out = io.StringIO()
    out.write(f"## {title}\n\n")
    out.write("| task | scoring | problems | passed | too long | accuracy | baseline | centered |\n")
    out.write("|---|---|---:|---:|---:|---:|---:|---:|\n")
    for r in results:
        kind = "categorical" if r.eval_type == "categorical" else f"pass@{num_samples}"
        out.write(
            f"| {r.name} | {kind} | {r.problems} | {r.passed} | {r.too_long} | {r.accuracy:.4f} | "
            f"{r.baseline:.2f} | {r.centered:.4f} |\n"
        )
    out.write(f"\n{summary_line(results)}\n")
    return out.getvalue()


def update_report(source: str, tag: str, step: int, results: list[TaskResult]) -> str:
    """Write chat_eval_<source>.json for the report card, keeping the tasks of an earlier run of this checkpoint."""
    stage = f"chat_eval_{source}"
    previous, _ = read_stage(report_dir(), stage)  # absent or unreadable: start afresh
    by_name = {}
    if previous and previous.get("model") == tag and previous.get("step") == step:
        fields = ("name", "eval_type", "problems", "passed", "too_long", "baseline")
        for row in (previous.get("tasks") or {}).values():
            if isinstance(row, dict) and all(key in row for key in fields):
                by_name[row["name"]] = TaskResult(*(row[key] for key in fields))
    by_name.update({result.name: result for result in results})
    merged = [by_name[name] for name in ALL_TASKS if name in by_name]
    tasks = {r.name: {**asdict(r), "accuracy": r.accuracy, "centered": r.centered} for r in merged}
    summary = {"source": source, "model": tag, "step": step, "chatcore": chatcore(merged), "tasks": tasks}
    return write_stage_summary(stage, summary)


# ---------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    # Evaluation
    parser.add_argument(
        "-a", "--task-name", default="|".join(ALL_TASKS), help="one task or several joined by '|' (default: all six)"
    )
    parser.add_argument("-x", "--max-problems", type=int, default=-1, help="first N problems per task (-1 = all)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="categorical prompts per forward pass")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="new tokens per sample, at most")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens (-1 = off)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="local data laid out like ../shared/data/ (default: $NANOCHAT_DATA_DIR, else the hub)",
    )
    parser.add_argument(
        "--arc-split", choices=["test", "validation"], default="test", help="ARC split (the local data has no test)"
    )
    args = parser.parse_args(argv)

    # Derived values
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    unknown = [name for name in task_names if name not in ALL_TASKS]
    if unknown or not task_names:
        parser.error(f"unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)}")
    if len(set(task_names)) != len(task_names):
        parser.error(f"task listed twice in {args.task_name!r}")
    for flag, value in (("-b", args.batch_size), ("-n", args.num_samples), ("-m", args.max_new_tokens)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.top_k == 0 or args.top_k < -1:
        parser.error(f"-k must be >= 1, or -1 for off, got {args.top_k}")
    top_k = None if args.top_k == -1 else args.top_k
    data_dir = resolve_data_dir(args.data_dir)  # None = the Hugging Face hub
    if data_dir is not None and args.arc_split == "test" and {"ARC-Easy", "ARC-Challenge"} & set(task_names):
        parser.error(f"the local data in {data_dir} has no ARC test split: pass --arc-split validation")

    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type)
    resolved = {**vars(args), "tasks": task_names, "data_dir": data_dir}
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
    title = f"chat eval of {args.source} {tag} step {step}"
    print0(title)

    # ---------------------------------------------------------------- evaluate
    results, seconds = [], {}
    for name in task_names:
        start = time.time()
        result = evaluate_task(
            name,
            load_task(name, data_dir, args.arc_split),
            model,
            tokenizer,
            runtime.device,
            max_problems=args.max_problems,
            batch_size=args.batch_size,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=top_k,
            engine=engine,
        )
        seconds[name] = time.time() - start
        results.append(result)
        print0(
            f"{name}: {result.passed}/{result.problems} = {result.accuracy:.4f}"
            + (f" ({result.too_long} too long for the context, counted as failed)" if result.too_long else "")
            + f" in {seconds[name]:.1f} s"
        )
    print0(format_table(results, args.num_samples))
    print0(summary_line(results))

    # ---------------------------------------------------------------- save
    if runtime.is_master:
        summary = {
            "source": args.source,
            "model": tag,
            "step": step,
            "chatcore": chatcore(results),
            "summary": summary_line(results),
            "config": resolved,
            "tasks": [
                {**asdict(r), "accuracy": r.accuracy, "centered": r.centered, "seconds": seconds[r.name]}
                for r in results
            ],
        }
        out_dir = os.path.join(get_base_dir(), "chat_eval")
        os.makedirs(out_dir, exist_ok=True)
        name = f"chat_{args.source}_{tag}_{step:06d}"
        if task_names != list(ALL_TASKS):
            name += "_" + "_".join(task_names)  # a partial run does not overwrite a full one
        stem = os.path.join(out_dir, name)
        markdown = to_markdown(results, args.num_samples, title)
        atomic_write(stem + ".json", lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
        atomic_write(stem + ".md", lambda f: f.write(markdown.encode("utf-8")))
        print0(f"wrote {stem}.json and {stem}.md")
        update_report(args.source, tag, step, results)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
