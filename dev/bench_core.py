"""Wall time of CORE evaluation (nanochat/core_eval.py) per task, for a small base model on the CPU.

    .venv/bin/python -m dev.bench_core --max-per-task 100                   # <base dir>/base_checkpoints/d4
    .venv/bin/python -m dev.bench_core --checkpoint-dir DIR --json /tmp/bench_core.json
    .venv/bin/python -m dev.bench_core --random --max-per-task 10            # no checkpoint: a random d4 model
    .venv/bin/python -m dev.bench_core --max-per-task 50 --compare-with HEAD  # this core_eval.py vs HEAD's

For each task of the bundle the script times `evaluate_task` (prompt building, tokenization, forward passes,
scoring) on the first `--max-per-task` examples of core_eval's seeded subset, and reports examples, wall
seconds, examples/s and CPU seconds (CPU/wall well under the torch thread count means other jobs took the
cores). Loading the model and the task files is not timed. Because the subset is a seeded random sample, a
task's mean time per example extrapolates to its whole file: the table gives that estimate per task and for the
bundle, labelled as an extrapolation. `--compare-with REV` also loads core_eval.py as of git revision REV and
runs it on the same examples just before or after the working tree's (the order alternates per task, so a
change in the machine's load hits both), then prints both times and checks the accuracies are equal.

Contract: the model is a base checkpoint loaded with nanochat.checkpoint.build_model, or with `--random` a
freshly initialised GPT of `--depth` at the tokenizer's vocabulary and `--sequence-len`; the tokenizer is the
one in <base dir>/tokenizer (NANOCHAT_BASE_DIR), which the checkpoint must have been trained with. Wall time hardly
depends on the weights (every example costs one forward pass over the same tokens whatever the model
predicts), so a random model times the same as a trained one of the same shape; its accuracies mean nothing.
It does depend strongly on the context length: prompts longer than the model's context are cropped to it,
and most of the bundle's few-shot prompts are longer than 256 tokens. Prints the environment (versions, git
commit, CPU, threads, load average before and after) and a table; `--json PATH` writes every figure.

Not here: CORE itself (scripts/base_eval.py reports scores and writes result files); GPU figures
(`--device-type cuda` works, but no figure here was measured on a GPU).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import torch

from nanochat import core_eval
from nanochat.common import compute_init, describe_environment, get_base_dir
from tasks.common import resolve_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- model


def load_benchmark_model(args, device):
    """(model, tokenizer, description) for the checkpoint or, with --random, a fresh GPT of --depth."""
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    if args.random:
        from nanochat.gpt import GPT, GPTConfig

        torch.manual_seed(args.seed)
        vocab_size = tokenizer.get_vocab_size()
        config = GPTConfig.from_depth(args.depth, vocab_size=vocab_size, sequence_len=args.sequence_len)
        model = GPT.build(config, device).eval()
        return model, tokenizer, f"random d{args.depth} (seed {args.seed}, sequence_len {args.sequence_len})"
    from nanochat.checkpoint import build_model

    checkpoint_dir = args.checkpoint_dir or os.path.join(get_base_dir(), "base_checkpoints", f"d{args.depth}")
    model, meta = build_model(checkpoint_dir, args.step, device, phase="eval")
    config = meta["model_config"]
    description = (
        f"{checkpoint_dir} step {meta['step']} (d{config['n_layer']}, sequence_len {config['sequence_len']}"
        + (f", val_bpb {meta['val_bpb']:.4f}" if "val_bpb" in meta else "")
        + ")"
    )
    return model, tokenizer, description


def core_eval_at_revision(revision: str) -> types.ModuleType:
    """nanochat/core_eval.py as committed at `revision`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:nanochat/core_eval.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    module_spec = importlib.util.spec_from_loader(f"core_eval_at_{revision}", loader=None)
    module = importlib.util.module_from_spec(module_spec)
    exec(compile(source, f"{revision}:nanochat/core_eval.py", "exec"), module.__dict__)  # our own code, from git
    return module


# ---------------------------------------------------------------------------- timing


def time_task(module, model, tokenizer, spec, examples, device, max_seq_len, max_per_task) -> dict:
    """Wall and CPU seconds of one task's evaluation by `module` (core_eval or another revision of it)."""
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    result = module.evaluate_task(model, tokenizer, spec, examples, device, max_seq_len, max_per_task)
    wall = time.perf_counter() - wall_start
    return {
        "examples": result.examples,
        "accuracy": result.accuracy,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu_start,
    }


def bench_tasks(args, model, tokenizer, device, baseline_module) -> list[dict]:
    max_seq_len = core_eval.model_max_seq_len(model)
    rows = []
    for spec in core_eval.load_task_specs(args.bundle):
        if args.tasks and spec.label not in args.tasks:
            continue
        path = core_eval.task_path(args.bundle, spec)
        if not os.path.exists(path):
            rows.append({"task": spec.label, "type": spec.task_type, "missing": True})
            print(f"{spec.label}: missing ({spec.dataset_uri} not in the bundle)", flush=True)
            continue
        examples = core_eval.load_examples(path)
        modules = {"current": core_eval}
        if baseline_module is not None:
            # Alternate which goes first, so a change in the machine's load between the two hits both equally.
            order = ["baseline", "current"] if len(rows) % 2 == 0 else ["current", "baseline"]
            modules = {name: baseline_module if name == "baseline" else core_eval for name in order}
        timings = {
            name: time_task(module, model, tokenizer, spec, examples, device, max_seq_len, args.max_per_task)
            for name, module in modules.items()
        }
        current = timings["current"]
        row = {
            "task": spec.label,
            "type": spec.task_type,
            "missing": False,
            "shots": spec.num_fewshot,
            "file_rows": len(examples),
            **current,
            "examples_per_s": current["examples"] / current["wall_s"],
            "s_per_example": current["wall_s"] / current["examples"],
            # The subset is a seeded random sample of the file, so its mean time per example stands for the file.
            "extrapolated_full_s": len(examples) * current["wall_s"] / current["examples"],
        }
        if "baseline" in timings:
            baseline = timings["baseline"]
            row["baseline"] = baseline
            row["speedup"] = baseline["wall_s"] / current["wall_s"]
            row["same_accuracy"] = (
                baseline["accuracy"] == current["accuracy"] and baseline["examples"] == current["examples"]
            )
        rows.append(row)
        line = f"{spec.label}: {row['examples']} examples in {row['wall_s']:.1f} s ({row['examples_per_s']:.2f}/s)"
        if "baseline" in row:
            line += f", baseline {row['baseline']['wall_s']:.1f} s, same accuracy: {row['same_accuracy']}"
        print(line, flush=True)
    return rows


# ---------------------------------------------------------------------------- report


def totals(rows: list[dict]) -> dict:
    measured = [r for r in rows if not r["missing"]]
    total = {
        "tasks": len(measured),
        "examples": sum(r["examples"] for r in measured),
        "wall_s": sum(r["wall_s"] for r in measured),
        "cpu_s": sum(r["cpu_s"] for r in measured),
        "file_rows": sum(r["file_rows"] for r in measured),
        "extrapolated_full_s": sum(r["extrapolated_full_s"] for r in measured),
    }
    total["examples_per_s"] = total["examples"] / total["wall_s"] if total["wall_s"] else None
    if measured and all("baseline" in r for r in measured):
        total["baseline_wall_s"] = sum(r["baseline"]["wall_s"] for r in measured)
        total["baseline_extrapolated_full_s"] = sum(
            r["file_rows"] * r["baseline"]["wall_s"] / r["baseline"]["examples"] for r in measured
        )
        total["speedup"] = total["baseline_wall_s"] / total["wall_s"]
        total["all_same_accuracy"] = all(r["same_accuracy"] for r in measured)
    return total


def format_table(rows: list[dict], total: dict, compared: bool) -> str:
    header = (
        "| task | type | examples | wall s | examples/s | ms/example | CPU/wall | accuracy | file rows "
        "| full file s (extrapolated) |"
    )
    rule = "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if compared:
        header += " baseline wall s | speedup | same accuracy |"
        rule += "---:|---:|:---:|"
    lines = [header, rule]
    for r in rows:
        if r["missing"]:
            lines.append(f"| {r['task']} | {r['type']} | missing | | | | | | | |" + (" | | |" if compared else ""))
            continue
        line = (
            f"| {r['task']} | {r['type']} | {r['examples']} | {r['wall_s']:.1f} | {r['examples_per_s']:.2f} | "
            f"{1000 * r['s_per_example']:.0f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['accuracy']:.3f} | "
            f"{r['file_rows']:,} | {r['extrapolated_full_s']:,.0f} |"
        )
        if compared:
            line += f" {r['baseline']['wall_s']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same_accuracy'] else 'NO'} |"
        lines.append(line)
    line = (
        f"| **total ({total['tasks']} tasks)** | | {total['examples']:,} | {total['wall_s']:.1f} | "
        f"{total['examples_per_s']:.2f} | {1000 / total['examples_per_s']:.0f} | "
        f"{total['cpu_s'] / total['wall_s']:.2f} | | "
        f"{total['file_rows']:,} | {total['extrapolated_full_s']:,.0f} |"
    )
    if compared:
        same = "yes" if total["all_same_accuracy"] else "NO"
        line += f" {total['baseline_wall_s']:.1f} | {total['speedup']:.2f}x | {same} |"
    lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument(
        "--checkpoint-dir", default=None, help="base checkpoint dir (default: <base dir>/base_checkpoints/d<depth>)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last complete)")
    parser.add_argument(
        "--random", action="store_true", help="time a randomly initialised model instead of a checkpoint"
    )
    parser.add_argument(
        "--depth", type=int, default=4, help="depth of the random model, or of the default checkpoint dir"
    )
    parser.add_argument(
        "--sequence-len", type=int, default=256, help="random model's context in tokens (the CPU d4 run's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random model's initialisation seed")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default="cpu")
    # Evaluation
    data_dir = resolve_data_dir(None)
    bundle = os.path.join(data_dir, "core", "eval_bundle") if data_dir else None
    parser.add_argument("--bundle", default=bundle, help="unzipped eval_bundle/ (default: $NANOCHAT_DATA_DIR/core/...)")
    parser.add_argument("--max-per-task", type=int, default=100, help="examples per task (-1 = all: hours on 2 cores)")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these task labels (default: all)")
    # Benchmark
    parser.add_argument("--compare-with", default=None, help="also time core_eval.py at this git revision (e.g. HEAD)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if args.bundle is None:
        parser.error("pass --bundle (the unzipped eval_bundle/) or set NANOCHAT_DATA_DIR to a data directory")

    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type)
    environment = describe_environment(runtime)
    environment["torch_threads"] = torch.get_num_threads()
    model, tokenizer, model_description = load_benchmark_model(args, runtime.device)
    baseline_module = core_eval_at_revision(args.compare_with) if args.compare_with else None
    with torch.no_grad():  # the first forward pays one-off allocator and kernel set-up: keep it out of task one
        model(torch.zeros(4, core_eval.model_max_seq_len(model) or 256, dtype=torch.long, device=runtime.device))
    load_before = os.getloadavg()
    print(" ".join(f"{key}={value}" for key, value in environment.items()))
    print(f"model: {model_description}; bundle: {args.bundle}; max_per_task {args.max_per_task}")
    print(
        f"load average before (1, 5, 15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
        flush=True,
    )

    # ---------------------------------------------------------------- measure
    rows = bench_tasks(args, model, tokenizer, runtime.device, baseline_module)
    load_after = os.getloadavg()
    total = totals(rows)

    # ---------------------------------------------------------------- report
    print()
    print(format_table(rows, total, baseline_module is not None))
    print(f"\nload average after (1, 5, 15 min): {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    hours = total["extrapolated_full_s"] / 3600
    print(
        f"extrapolation (not measured): the {total['file_rows']:,} examples of the {total['tasks']} local task files "
        f"would take about {total['extrapolated_full_s']:,.0f} s ({hours:.1f} h) at these per-example times"
    )
    if baseline_module is not None:
        print(
            f"baseline ({args.compare_with}) {total['baseline_wall_s']:.1f} s vs current {total['wall_s']:.1f} s: "
            f"{total['speedup']:.2f}x; accuracies identical on every task: {total['all_same_accuracy']}"
        )
    if args.json:
        report = {
            "environment": environment,
            "command": " ".join([os.path.basename(sys.executable), "-m", "dev.bench_core", *(argv or sys.argv[1:])]),
            "model": model_description,
            "bundle": args.bundle,
            "max_per_task": args.max_per_task,
            "compare_with": args.compare_with,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "tasks": rows,
            "total": total,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if baseline_module is not None and not total["all_same_accuracy"]:
        sys.exit("accuracies differ from the baseline revision: the change is not score-preserving")


if __name__ == "__main__":
    main()
