"""CORE score of a base checkpoint (or a Hugging Face causal LM), per task and overall.

    python -m scripts.base_eval                                        # largest depth, last step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval --model-tag d20
    NANOCHAT_DATA_DIR=/path/to/data python -m scripts.base_eval --max-per-task 16   # tiny, CPU, offline
    python -m scripts.base_eval --hf-path openai-community/gpt2 --bundle PATH      # a reference model

The metric: nanochat/core_eval.py. The bundle: --bundle, else $NANOCHAT_DATA_DIR/core/eval_bundle, else
<base dir>/eval_bundle (downloaded once). Examples per task unless --max-per-task: all on a GPU, elsewhere the
first CPU_MAX_PER_TASK of each task's fixed shuffle (a d4 took ~1 s an example on 2 busy CPU cores), printed at the
start; progress lines with an ETA, per task and overall, every few seconds. Rank 0 prints a per-task table and the
CORE line (how many tasks it covers: absent data files are excluded) and writes
<base dir>/base_eval/core_<tag>_<step>.csv and .json; a nanochat checkpoint's scores also go to the report card
(report/base_eval.json, with "model_tag" and "step").
Not here: bits per byte (scripts/base_loss.py); chat evaluations.
"""

import argparse
import csv
import io
import json
import os
import time
from dataclasses import astuple

import torch.distributed as dist

from nanochat.common import atomic_write, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.core_eval import ensure_bundle, evaluate_core
from nanochat.report import write_stage_summary
from nanochat.train import one_line_errors
from tasks.common import resolve_data_dir

CPU_MAX_PER_TASK = 20


def format_table(result) -> str:
    lines = [f"{'task':<34} {'type':<18} {'shots':>5} {'examples':>8} {'accuracy':>9} {'centered':>9}"]
    for t in result.tasks:
        scores = f"{'missing':>8}" if t.missing else f"{t.examples:>8} {t.accuracy:>9.4f} {t.centered:>9.4f}"
        lines.append(f"{t.label:<34} {t.task_type:<18} {t.num_fewshot:>5} {scores}")
    return "\n".join(lines)


# core_eval.TaskResult's fields in order, under the result files' names, then whether the task's file is missing.
ROW_KEYS = ("task", "type", "shots", "baseline", "file_rows", "csv_rows", "examples", "accuracy", "centered", "missing")


def to_csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_KEYS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


@one_line_errors("base_eval")
def main(argv=None):
    usage = "\n\n".join(__doc__.split("\n\n")[:2])  # --help: what it is and how to run it; the contract stays here
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--model-tag", default=None, help="base checkpoint directory (default: largest depth)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--hf-path", default=None, help="evaluate this Hugging Face model (name or dir) instead")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None)
    # Evaluation
    parser.add_argument("--bundle", default=None, help="unzipped eval_bundle/ (default: "
                        "$NANOCHAT_DATA_DIR/core/eval_bundle, else downloaded once)")  # fmt: skip
    parser.add_argument("--max-per-task", type=int, default=None, help="examples per task (-1 = all; default: "
                        f"all on a GPU, else {CPU_MAX_PER_TASK})")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=None, help="only these task labels (default: all)")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(None)
    bundle = args.bundle or (os.path.join(data_dir, "core", "eval_bundle") if data_dir else None)

    # ---------------------------------------------------------------- init
    runtime = compute_init(args.device_type)
    if runtime.is_master:  # one download; the other ranks wait, then find it on disk
        ensure_bundle(bundle)
    if runtime.is_distributed:
        dist.barrier()
    bundle_dir = ensure_bundle(bundle)

    # ---------------------------------------------------------------- model
    if args.hf_path:
        from nanochat.core_eval import HuggingFaceModel, HuggingFaceTokenizer

        model = HuggingFaceModel(args.hf_path, runtime.device, runtime.dtype)
        tokenizer = HuggingFaceTokenizer(args.hf_path)
        tag, step = args.hf_path.strip("/").replace("/", "-"), None
    else:
        from nanochat.checkpoint import load_model
        from nanochat.tokenizer import get_tokenizer

        model, meta = load_model("base", runtime.device, "eval", args.model_tag, args.step, dtype=runtime.dtype)
        tokenizer = get_tokenizer()
        tag, step = args.model_tag or f"d{meta['model_config']['n_layer']}", meta["step"]
    print0(f"CORE of {tag}" + (f" step {step}" if step is not None else "") + f" on {bundle_dir}")

    # ---------------------------------------------------------------- evaluate
    max_per_task = args.max_per_task or (-1 if runtime.device.type == "cuda" else CPU_MAX_PER_TASK)
    chosen = "as given" if args.max_per_task else f"{runtime.device.type.upper()} default"
    examples = "all examples" if max_per_task < 0 else f"at most {max_per_task} examples"
    print0(f"evaluating {examples} per task ({chosen}; --max-per-task to change)")
    start = time.time()
    result = evaluate_core(model, tokenizer, bundle_dir, runtime.device, max_per_task, tasks=args.tasks, log=print0)
    seconds = time.time() - start
    print0(format_table(result))
    print0(f"{result.summary()} ({seconds:.1f} s)")

    # ---------------------------------------------------------------- save
    if runtime.is_master:
        rows = [dict(zip(ROW_KEYS, (*astuple(task), task.missing), strict=True)) for task in result.tasks]
        report = {"model_tag": tag, "step": step, "core": result.core, "tasks_covered": len(result.evaluated),
                  "tasks_defined": len(result.tasks), "max_per_task": max_per_task,
                  "seconds": seconds}  # fmt: skip
        summary = {**report, "missing": result.missing, "summary": result.summary(), "tasks": rows}
        out_dir = os.path.join(get_base_dir(), "base_eval")
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"core_{tag}" + (f"_{step:06d}" if step is not None else ""))
        atomic_write(stem + ".json", lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
        atomic_write(stem + ".csv", lambda f: f.write(to_csv(rows)))
        print0(f"wrote {stem}.json and {stem}.csv")
        if not args.hf_path:
            centered = {row["task"]: row["centered"] for row in rows if not row["missing"]}
            write_stage_summary("base_eval", {**report, "tasks": centered})
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()
