"""The report card: every stage's summary as JSON under <base dir>/report/, assembled into report.md with plots.

    python -m nanochat.report reset                          # at the start of a run: clear, stamp the start time
    python -m nanochat.report generate                       # at the end: report.md + PNGs beside the JSON
    python -m nanochat.report generate --hourly-cost 24      # the node's price in $/h (or NANOCHAT_HOURLY_COST)
    python -m nanochat.report status base_eval --tag d20     # done / resume / run: speedrun.sh's one question
    python -m nanochat.report time base_eval 312             # record a stage's wall time (seconds) for report.md

Contract:
- `write_stage_summary(stage, summary)` writes <base dir>/report/<stage>.json atomically (a crash never leaves
  half a file) and returns its path; values that JSON lacks (paths, dtypes) are written as strings. Stages call
  it from rank 0 only. The stages: tok_train, tok_eval, base_train, base_loss, base_eval, mid_train, chat_sft,
  chat_rl, chat_eval_<source>; `reset` writes header.json (start time and environment).
- A summary key ending in `_curve` holds [[step, value], ...] and is drawn as a line plot; chat_eval_<source>
  holds {"tasks": {name: {"accuracy", "centered", ...}}, "chatcore"} and is drawn as bars.
- report.md has these sections, in this order, with these exact titles (scripts and tests rely on them):
  "# nanochat report card", "## Environment", "## Tokenizer", "## Base model", "## Midtraining", "## SFT",
  "## RL", "## Chat evaluation", "## Summary". A stage section whose stages all did not run is left out (no
  error); Environment and Summary are always there. A JSON file that cannot be read is named as unreadable in
  its section instead of crashing the report. Plots: <stage>.png for every stage with curves (base_train,
  mid_train, chat_sft, chat_rl) and chat_eval_<source>.png for every chat evaluation.
- Chat evaluations show each task's chance level ("baseline") in the tables and as a dashed line on the bars; a
  figure from fewer than FEW_PROBLEMS problems gives its count and 95% margin (in the summary table: `*`).
  Summary ends with "### Sample conversation": the latest chat model (rl > sft > mid) answering SAMPLE_CHAT
  greedily, or why there is none. Paths show relative to the base dir, which Environment names once.
- A stage is done when its summary is there for the model tag and, for an evaluation, for the step its training
  stage ended at (so a retrained model is evaluated again); a training stage that is not done but left a checkpoint
  is to be resumed. Stage summaries carry "model_tag" and "step" for this.
- Cost = the recorded wall times of the stages that ran (times.json; a skipped stage keeps its first time, and idle
  gaps between runs do not count) x hourly cost; the default cost is $3 per GPU-hour (8xH100 node: $24/h, the
  reference's framing) and $0 on a CPU-only machine. No torch import on these paths: they answer in milliseconds.

Not here: running or timing the stages (speedrun.sh), the metrics themselves (core_eval.py, scripts/chat_eval.py).
"""

import argparse
import json
import math
import os
import subprocess
import time

from nanochat.common import atomic_write, get_base_dir

GPU_HOURLY_COST = 3.0  # $/GPU-hour: 8xH100 at $24/h, the cost framing of karpathy/nanochat's speedrun
SECTIONS = [
    ("Tokenizer", ["tok_train", "tok_eval"]),
    ("Base model", ["base_train", "base_loss", "base_eval"]),
    ("Midtraining", ["mid_train"]),
    ("SFT", ["chat_sft"]),
    ("RL", ["chat_rl"]),
    ("Chat evaluation", [f"chat_eval_{source}" for source in ("base", "mid", "sft", "rl")]),
]
SOURCES = ["base", "mid", "sft", "rl"]  # the summary table's columns
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
CHECKPOINT_DIRS = {"base_train": "base_checkpoints", "mid_train": "mid_checkpoints", "chat_sft": "chatsft_checkpoints",
                   "chat_rl": "chatrl_checkpoints"}  # fmt: skip
# evaluation stage -> the stage it evaluates
EVALUATES = {"base_loss": "base_train", "base_eval": "base_train", "chat_eval_mid": "mid_train",
             "chat_eval_sft": "chat_sft", "chat_eval_rl": "chat_rl"}  # fmt: skip
FEW_PROBLEMS = 100  # below this many problems an accuracy is noisy: the report says so, with its 95% margin
SAMPLE_CHAT = ["Hello! Who are you?", "What is 7 times 6?"]  # identity and arithmetic: both in SFT's mixture
SAMPLE_TOKENS = 64  # per reply: a few seconds for the tiny CPU model
LANGUAGES = {".py": "Python", ".rs": "Rust", ".sh": "Shell", ".html": "HTML", ".md": "Markdown"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report_dir() -> str:
    return os.path.join(get_base_dir(), "report")


def write_stage_summary(stage: str, summary: dict) -> str:
    os.makedirs(report_dir(), exist_ok=True)
    path = os.path.join(report_dir(), f"{stage}.json")
    text = json.dumps(summary, indent=2, default=str).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
    return path


def read_stage(directory: str, stage: str):
    """(summary, None), (None, None) if the stage did not run, or (None, reason) if its file is unreadable."""
    path = os.path.join(directory, f"{stage}.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(summary, dict):
        return None, f"expected a JSON object, found {type(summary).__name__}"
    return summary, None


def stage_status(stage: str, tag: str) -> str:
    """'done: why', 'resume: <checkpoint dir>' or 'run' for `stage` of model `tag` (rules: the module docstring)."""
    directory = report_dir()
    summary, _ = read_stage(directory, stage)
    if stage == "data":
        shards = os.path.join(get_base_dir(), "base_data")
        found = sorted(n for n in os.listdir(shards) if n.startswith("val")) if os.path.isdir(shards) else []
        return f"done: {shards} has {found[0]}" if found else "run"
    if summary is not None and (stage.startswith("tok_") or summary.get("model_tag") == tag):
        source = EVALUATES.get(stage)
        evaluated, _ = read_stage(directory, source) if source else (None, None)
        if source is None or (evaluated and evaluated.get("step") == summary.get("step")):
            return f"done: report/{stage}.json" + (f" for {tag} step {summary.get('step')}" if source else "")
    checkpoints = os.path.join(get_base_dir(), CHECKPOINT_DIRS.get(stage, "-"), tag)
    if os.path.isdir(checkpoints) and any(n.startswith("meta_") for n in os.listdir(checkpoints)):
        return f"resume: {checkpoints}"
    return "run"


def record_time(stage: str, seconds: float) -> str:
    times, _ = read_stage(report_dir(), "times")
    return write_stage_summary("times", {**(times or {}), stage: seconds})


# ---------------------------------------------------------------------------- reset


def current_environment() -> dict:
    """describe_environment for the device this machine would train on, plus the GPU count."""
    import torch

    from nanochat.common import Runtime, autodetect_device_type, autodetect_dtype, describe_environment

    device_type = autodetect_device_type()
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
    environment = describe_environment(Runtime(device, autodetect_dtype(device_type)))
    environment["gpu_count"] = torch.cuda.device_count() if device_type == "cuda" else 0
    return environment


def reset() -> str:
    directory = report_dir()
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith((".json", ".md", ".png", ".tmp")):
            os.remove(os.path.join(directory, name))
    return write_stage_summary("header", {"started_at": time.time(), "environment": current_environment()})


# ---------------------------------------------------------------------------- pieces of the report


def lines_of_code() -> dict:
    """Lines of the tracked files by language (git ls-files), or {} outside a git checkout."""
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    counts = {}
    for path in result.stdout.splitlines() if result.returncode == 0 else []:
        language = LANGUAGES.get(os.path.splitext(path)[1])
        if language and os.path.isfile(os.path.join(REPO, path)):
            with open(os.path.join(REPO, path), "rb") as f:
                counts[language] = counts.get(language, 0) + f.read().count(b"\n")
    return counts


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def noisy(problems) -> bool:
    return isinstance(problems, int) and 0 < problems < FEW_PROBLEMS


def caveat(counts: dict) -> list[str]:
    """A line naming the figures from fewer than FEW_PROBLEMS problems ({name: problems}) with a 95% margin: 1.96
    binomial standard errors at p = 0.5, where they are largest, so it holds whatever the accuracy (8: ±0.35)."""
    few = [f"{name} {n} problems: ±{1.96 * math.sqrt(0.25 / n):.2f}" for name, n in counts.items() if noisy(n)]
    return ["", f"Noisy, too few problems to compare: {', '.join(few)} (95%, at worst)."] if few else []


def save_png(figure, path: str) -> None:
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def plot_curves(curves: dict, title: str, path: str) -> None:
    # The object-oriented API: no pyplot global state, no display needed; savefig picks the PNG renderer itself.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(curves), 3.5))
    for axes, (name, points) in zip(figure.subplots(1, len(curves), squeeze=False)[0], curves.items()):
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None)
        axes.set(title=f"{title}: {name.replace('_', ' ')}", xlabel="step")
        axes.grid(alpha=0.3)
    save_png(figure, path)


def plot_bars(tasks: dict, title: str, path: str):
    """Accuracy bars labelled with their problem counts, each task's chance level a dashed line across its bar."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5, 1.2 * len(tasks)), 3.5))
    axes = figure.subplots()
    rows = list(tasks.values())
    bars = axes.bar(range(len(rows)), [row.get("accuracy") or 0.0 for row in rows], tick_label=list(tasks))
    axes.bar_label(bars, labels=[f"n={row.get('problems')}" for row in rows], fontsize=8)
    chance = [row["baseline"] if row.get("baseline") is not None else math.nan for row in rows]
    axes.hlines(chance, [i - 0.4 for i in range(len(rows))], [i + 0.4 for i in range(len(rows))], colors="crimson",
                linestyles="--", label="chance")  # fmt: skip
    axes.set(title=title, ylabel="accuracy", ylim=(0, 1))
    axes.legend(loc="upper right", fontsize=8)
    axes.tick_params(axis="x", labelrotation=30)
    axes.grid(axis="y", alpha=0.3)
    save_png(figure, path)
    return figure


def stage_body(stage: str, summary: dict, directory: str) -> list[str]:
    """The markdown of one stage's subsection; draws its plots into `directory`."""
    lines = []  # `- key: value` for the scalars and small flat dicts; lists of strings (samples) as sub-bullets
    for key, value in summary.items():
        if key.endswith("_curve") or key in ("tasks", "results", "config"):
            continue
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            lines.append(f"- {key}: " + ", ".join(f"{k}={fmt(v)}" for k, v in value.items()))
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            lines.append(f"- {key}:")
            lines.extend(f"  - `{v!r}`" for v in value)
        elif not isinstance(value, (dict, list)):
            lines.append(f"- {key}: {fmt(value)}")
    if stage == "tok_eval" and summary.get("results"):
        encoders = summary.get("encoders", ["ours"])
        lines += ["", "| text | bytes | " + " | ".join(f"{e} bytes/token" for e in encoders) + " |"]
        lines.append("|---|---:|" + "---:|" * len(encoders))
        for kind, row in summary["results"].items():
            cells = [fmt(row.get(e, {}).get("bytes_per_token")) if e in row else "-" for e in encoders]
            lines.append(f"| {kind} | {fmt(row.get('bytes'))} | " + " | ".join(cells) + " |")
    if stage == "base_eval" and summary.get("tasks"):
        lines += ["", "| task | centered accuracy |", "|---|---:|"]
        lines += [f"| {task} | {fmt(centered)} |" for task, centered in summary["tasks"].items()]
        lines += caveat({"each CORE task": summary.get("max_per_task")})
    if stage.startswith("chat_eval_") and summary.get("tasks"):
        lines += ["", "| task | problems | accuracy | chance | centered |", "|---|---:|---:|---:|---:|"]
        for task, row in summary["tasks"].items():
            cells = [row.get(key) for key in ("problems", "accuracy", "baseline", "centered")]
            lines.append(f"| {task} | " + " | ".join("-" if c is None else fmt(c) for c in cells) + " |")
        lines += caveat({task: row.get("problems") for task, row in summary["tasks"].items()})
        plot_bars(summary["tasks"], stage.replace("_", " "), os.path.join(directory, f"{stage}.png"))
        lines += ["", f"![{stage}]({stage}.png)"]
    curves = {key.removesuffix("_curve"): value for key, value in summary.items() if key.endswith("_curve") and value}
    if summary.get("mean_reward_by_step"):  # chat_rl's, one a step
        curves["mean_reward"] = [[step + 1, reward] for step, reward in enumerate(summary["mean_reward_by_step"])]
    if curves:
        plot_curves(curves, stage, os.path.join(directory, f"{stage}.png"))
        lines += ["", f"![{stage}]({stage}.png)"]
    train, val = curves.get("train_loss", []), curves.get("val_loss", [])
    if stage == "chat_sft" and len(val) > 1 and train[-1][1] > train[0][1] and val[-1][1] < val[0][1]:
        # Measured on the CPU profile: one fixed model's loss swings 4.9-6.6 across the first 30 steps' batches.
        lines += ["", "Train loss rising is not divergence: each point is (the EMA of) that step's own conversations, "
                  "whose mix (identity, GSM8K, spelling) moves it more than training does; the validation loss, on "
                  "the same conversations each time, is the one to read."]  # fmt: skip
    return lines


def summary_table(summaries: dict) -> list[str]:
    """CORE, each chat task's accuracy and ChatCORE by stage, and chance; '*' on a figure from too few problems."""

    def cell(value, problems=None) -> str:
        return "-" if value is None else fmt(value) + ("*" if noisy(problems) else "")

    base_eval = summaries.get("base_eval") or {}
    rows = {"CORE": {"base": cell(base_eval.get("core"), base_eval.get("max_per_task")), "chance": "0 (centered)"}}
    for source in SOURCES:
        chat = summaries.get(f"chat_eval_{source}") or {}
        tasks = chat.get("tasks") or {}
        for task in CHAT_TASKS:
            row = tasks.get(task) or {}
            rows.setdefault(task, {})[source] = cell(row.get("accuracy"), row.get("problems"))
            if row.get("baseline") is not None:
                rows[task]["chance"] = fmt(row["baseline"])
        few = min([row.get("problems") or FEW_PROBLEMS for row in tasks.values()], default=FEW_PROBLEMS)
        rows.setdefault("ChatCORE", {"chance": "0 (centered)"})[source] = cell(chat.get("chatcore"), few)
    columns = [*SOURCES, "chance"]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells.get(c, "-") for c in columns) + " |" for name, cells in rows.items()]
    if any("*" in line for line in lines):
        lines += ["", f"\\* from fewer than {FEW_PROBLEMS} problems per task: noisy (margins in the sections above)"]
    return lines


def sample_conversation(summaries: dict) -> list[str]:
    """rl > sft > mid (the tag its summary names, else the largest) answering SAMPLE_CHAT greedily, or why not."""
    from nanochat.checkpoint import checkpoint_dir, load_model  # here: they import torch, `status` and `time` do not
    from nanochat.common import autodetect_device_type, autodetect_dtype
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer

    for source, stage in (("rl", "chat_rl"), ("sft", "chat_sft"), ("mid", "mid_train")):
        try:
            tag = os.path.basename(checkpoint_dir(source, (summaries.get(stage) or {}).get("model_tag")))
            device_type = autodetect_device_type()
            model, meta = load_model(source, device_type, "eval", tag, dtype=autodetect_dtype(device_type))
        except FileNotFoundError:  # no checkpoint of this stage: try the one before it
            continue
        except Exception as e:  # corrupt or incompatible: the report card goes on without its sample
            return [f"No sample conversation: the {source} model did not load ({type(e).__name__}: {e})."]
        try:
            tokenizer = get_tokenizer()
            engine, ids, lines = Engine(model, tokenizer), [tokenizer.get_bos_token_id()], []
            for message in SAMPLE_CHAT:  # the turns as exact ids, the replies never re-encoded (as chat_cli)
                ids += tokenizer.render_for_completion([{"role": "user", "content": message}])[1:]
                reply = engine.generate_batch(ids, max_tokens=SAMPLE_TOKENS, temperature=0.0)[0].tokens
                ids += [*reply, tokenizer.encode_special("<|assistant_end|>")]
                lines += [f"User: {message}", f"Assistant: {tokenizer.decode(reply)}"]
        except Exception as e:  # a tokenizer from another run, a context too short for the turns
            return [f"No sample conversation: the {source} model did not answer ({type(e).__name__}: {e})."]
        return [f"The {source} model {tag} step {meta['step']}, greedy (temperature 0), at most {SAMPLE_TOKENS} "
                "tokens a reply:", "", "```text", *lines, "```"]  # fmt: skip
    return ["No sample conversation: no mid, sft or rl checkpoint in the base dir."]


# ---------------------------------------------------------------------------- generate


def generate(cost_per_hour: float | None = None) -> str:
    directory = report_dir()
    os.makedirs(directory, exist_ok=True)
    header, header_error = read_stage(directory, "header")
    environment = (header or {}).get("environment") or current_environment()
    rate = cost_per_hour
    if rate is None:
        rate = float(os.environ.get("NANOCHAT_HOURLY_COST") or GPU_HOURLY_COST * environment.get("gpu_count", 0))
    base_dir = get_base_dir()
    stamp = lambda seconds: time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))
    out = ["# nanochat report card", "", "## Environment", ""]
    out.append(f"- base dir: {base_dir} (the paths below are relative to it)")
    out.append(f"- generated: {stamp(time.time())}")
    if header and isinstance(header.get("started_at"), (int, float)):
        out.append(f"- run started: {stamp(header['started_at'])}")
    elif header_error:
        out.append(f"- header.json is unreadable ({header_error})")
    else:
        out.append("- run started: unknown (no header.json: run `python -m nanochat.report reset` at the start)")
    commit = environment.get("git_commit") or "unknown"
    out.append(f"- git commit: {commit}" + (" (with uncommitted changes)" if environment.get("git_dirty") else ""))
    gpu = environment.get("gpu")
    hardware = f"{environment.get('gpu_count', 1)} x {gpu} ({environment.get('gpu_memory_gib')} GiB)" if gpu else "none"
    out.append(f"- GPUs: {hardware}")
    cpu = f"{environment.get('cpu')} ({environment.get('cpu_count')} cores)"
    out.append(f"- CPU: {cpu}; host {environment.get('host')}")
    versions = {k: environment.get(k) for k in ("python", "torch", "cuda") if environment.get(k)}
    out.append("- software: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.append(f"- hourly cost assumed: ${rate:.2f}/h (--hourly-cost or NANOCHAT_HOURLY_COST)")
    code = lines_of_code()
    if code:
        by_language = ", ".join(f"{lang} {n:,}" for lang, n in sorted(code.items(), key=lambda kv: -kv[1]))
        out.append(f"- lines of code: {sum(code.values()):,} ({by_language})")

    summaries = {}
    for title, stages in SECTIONS:
        parts = []
        for stage in stages:
            summary, error = read_stage(directory, stage)
            if error:
                parts += ["", f"### {stage}", "", f"{stage}.json is unreadable ({error}); this stage is left out."]
            elif summary is not None:
                summaries[stage] = summary
                parts += ["", f"### {stage}", "", *stage_body(stage, summary, directory)]
        if parts:
            out += ["", f"## {title}", *parts]

    out += ["", "## Summary", "", *summary_table(summaries), ""]
    minutes = {s: summaries.get(s, {}).get("training_minutes") for s in CHECKPOINT_DIRS}
    minutes = {s: m for s, m in minutes.items() if isinstance(m, (int, float))}
    if minutes:
        by_stage = ", ".join(f"{s} {m:.1f}" for s, m in minutes.items())
        out.append(f"- training time: {sum(minutes.values()):.1f} min ({by_stage})")
    times, _ = read_stage(directory, "times")
    if times:
        hours = sum(times.values()) / 3600
        by_stage = ", ".join(f"{s} {t:.0f} s" if t < 120 else f"{s} {t / 60:.1f} min" for s, t in times.items())
        out.append(f"- wall time by stage: {by_stage}")
        out.append(f"- total wall time: {hours * 60:.1f} min ({hours:.2f} h); estimated cost: ${hours * rate:,.2f} "
                   f"at ${rate:.2f}/h")  # fmt: skip
    else:
        out.append("- total wall time: unknown (no stage times recorded); estimated cost: unknown")
    out += ["", "### Sample conversation", "", *sample_conversation(summaries)]
    text = "\n".join(out).replace(os.path.join(base_dir, ""), "") + "\n"  # every path relative to the base dir
    path = os.path.join(directory, "report.md")
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["reset", "generate", "status", "time"])
    parser.add_argument("stage", nargs="?", help="status/time: the stage (base_train, chat_eval_sft, ...)")
    parser.add_argument("seconds", nargs="?", type=float, help="time: the stage's wall time in seconds")
    parser.add_argument("--tag", default=None, help="status: the model tag (d20, ...)")
    parser.add_argument("--hourly-cost", type=float, default=None, help="$ per hour of the whole machine "
                        "(default: $NANOCHAT_HOURLY_COST, else $3 per GPU, 0 on CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.command in ("status", "time") and (
        args.stage is None or (args.command == "time") != (args.seconds is not None)
    ):
        parser.error(f"{args.command}: give the stage" + (" and its seconds" if args.command == "time" else ""))
    if args.command == "status":
        print(stage_status(args.stage, args.tag or ""))
        return None
    path = {"reset": reset, "generate": lambda: generate(args.hourly_cost),
            "time": lambda: record_time(args.stage, args.seconds)}[args.command]()  # fmt: skip
    if args.command != "time":
        print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
