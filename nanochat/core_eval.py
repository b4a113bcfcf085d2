"""The DCLM CORE metric: in-context-learning accuracy on the eval bundle's tasks, centered and averaged.

CORE (DCLM paper, "DataComp-LM", §3 and appendix) scores a base model on the tasks of the bundle's `core.yaml`
by comparing per-token losses, never by generating text:
- multiple_choice `{"query","choices","gold"}`: the choice whose continuation has the lowest mean loss.
- schema `{"context_options","continuation","gold"}`: the option under which the shared continuation has the
  lowest mean loss.
- language_modeling `{"context","continuation"}`: correct iff greedy argmax reproduces every continuation token.
Per task, centered accuracy = (accuracy - baseline) / (1 - baseline), the random baseline from
`eval_meta_data.csv` (in percent there); CORE = the mean centered accuracy of the tasks evaluated.

Contract:
- Prompts: few-shot examples completed with their gold answers, joined by a blank line, then the question;
  example i takes `random.Random(1234 + i).sample([every index except i], num_fewshot)`, independent of ranks.
- The continuation is the tokens of context + continuation after their common prefix with the context alone (a
  delimiter space merged into the answer's first token is scored with the answer).
- Every sequence starts with BOS; one too long for the model is cropped from the left, keeping the continuation.
  Batch rows are right-padded with BOS, which is never scored.
- `max_per_task` > 0 keeps the first N of the file's indices shuffled by `random.Random(1337)`.
- Rank r scores examples r, r+W, ...; a task whose data file is absent is reported as missing and excluded.
- With a `log`, rank 0 also prints progress lines with an ETA (nanochat.dataset.Progress) every few seconds,
  within the task and over all the tasks' examples.
- The model is anything callable as `model(idx) -> logits (B, T, V)` (GPT, or `HuggingFaceModel`); one whose
  forward takes `logits_to_keep` is asked only for the positions from the first scored one on. The tokenizer
  needs `encode(list of str, prepend=id)` and `get_bos_token_id()`.

Not here: the command line, checkpoint loading and result files (scripts/base_eval.py); the chat-model tasks.
"""

import csv
import inspect
import json
import os
import random
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import atomic_write, dist_info, get_base_dir
from nanochat.dataset import DatasetError, MissingDataError, Progress

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # example i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337  # max_per_task keeps a prefix of the indices shuffled with this seed
EXAMPLE_DELIMITER = "\n\n"  # between few-shot examples and before the question
DEFAULT_CONTINUATION_DELIMITER = " "  # core.yaml's default when a task names none (llm-foundry's default)


@dataclass(frozen=True)
class TaskSpec:
    """One entry of core.yaml, with its random baseline from eval_meta_data.csv (a fraction, not percent)."""

    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    baseline: float
    csv_rows: int | None  # '#datapoints' in the csv, which can disagree with the file (arc_challenge)


def ensure_bundle(bundle_dir: str | None = None, base_dir: str | None = None) -> str:
    """The bundle directory: `bundle_dir` when given, else <base dir>/eval_bundle, downloaded when absent."""
    if bundle_dir is not None:
        if not os.path.exists(os.path.join(bundle_dir, "core.yaml")):
            raise MissingDataError(f"{bundle_dir} has no core.yaml: point --bundle at the unzipped eval_bundle/")
        return bundle_dir
    base_dir = base_dir or get_base_dir()
    target = os.path.join(base_dir, "eval_bundle")
    if os.path.exists(os.path.join(target, "core.yaml")):
        return target
    import requests

    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    try:
        with requests.get(BUNDLE_URL, stream=True, timeout=30) as response:
            response.raise_for_status()
            # ~162 MB; a dropped connection leaves no truncated zip
            atomic_write(zip_path, lambda f: f.writelines(response.iter_content(1 << 20)))
    except requests.RequestException as e:
        raise DatasetError(f"cannot download the CORE eval bundle from {BUNDLE_URL} ({type(e).__name__}: {e}). "
                           "Offline? Pass --bundle PATH (the unzipped eval_bundle/) or set NANOCHAT_DATA_DIR to a data "
                           "directory holding core/eval_bundle") from e  # fmt: skip
    # Unzip beside the target and rename, so an interrupted unzip never looks like a complete bundle.
    staging = f"{target}.{os.getpid()}.tmp"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging)
    inner = os.path.join(staging, "eval_bundle")  # the zip holds one top-level eval_bundle/ folder
    os.replace(inner if os.path.isdir(inner) else staging, target)
    if os.path.isdir(staging):
        os.rmdir(staging)
    os.remove(zip_path)
    return target


def load_task_specs(bundle_dir: str) -> list[TaskSpec]:
    """core.yaml's tasks in file order, each joined with its row of eval_meta_data.csv."""
    import yaml

    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
        meta = {row["Eval Task"].strip(): row for row in csv.DictReader(f)}
    specs = []
    for task in config["icl_tasks"]:
        label = task["label"]
        if task["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"task {label}: icl_task_type {task['icl_task_type']!r} is not one of {TASK_TYPES}")
        if label not in meta:
            raise ValueError(f"task {label} has no row in eval_meta_data.csv (needed for its random baseline)")
        shots = task["num_fewshot"]
        if isinstance(shots, list):
            if len(shots) != 1:
                raise ValueError(f"task {label}: CORE uses one few-shot setting per task, got {shots}")
            shots = shots[0]
        rows = meta[label]["#datapoints"].strip()
        delimiter = task.get("continuation_delimiter", DEFAULT_CONTINUATION_DELIMITER)
        baseline = float(meta[label]["Random baseline"]) / 100.0  # the csv stores percent
        specs.append(TaskSpec(label, task["dataset_uri"], task["icl_task_type"], int(shots), delimiter, baseline,
                              int(rows) if rows else None))  # fmt: skip
    return specs


def task_path(bundle_dir: str, spec: TaskSpec) -> str:
    return os.path.join(bundle_dir, "eval_data", spec.dataset_uri)


def load_examples(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fewshot_indices(index: int, num_examples: int, num_fewshot: int) -> list[int]:
    """The few-shot examples of example `index`: a seeded sample of the other examples (see module docstring)."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(num_examples) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, min(num_fewshot, len(others)))


def render_example(task_type: str, example: dict, delimiter: str) -> tuple[list[str], list[str]]:
    """(contexts, full texts), one pair per scored option; full = context + continuation; gold's full text is
    the example as a few-shot example shows it."""
    if task_type == "multiple_choice":
        context = example["query"] + delimiter
        return [context] * len(example["choices"]), [context + choice for choice in example["choices"]]
    if task_type == "schema":
        contexts = [option + delimiter for option in example["context_options"]]
        return contexts, [context + example["continuation"] for context in contexts]
    context = example["context"] + delimiter
    return [context], [context + example["continuation"]]


def build_prompts(spec: TaskSpec, examples: list[dict], index: int) -> tuple[list[str], list[str]]:
    """(contexts, full texts) of example `index`, each prefixed with its few-shot examples."""
    kind, delimiter = spec.task_type, spec.continuation_delimiter
    shots = [examples[i] for i in fewshot_indices(index, len(examples), spec.num_fewshot)]
    solved = [render_example(kind, shot, delimiter)[1][shot.get("gold", 0)] for shot in shots]  # gold's full text
    prefix = "".join(text + EXAMPLE_DELIMITER for text in solved)
    contexts, fulls = render_example(kind, examples[index], delimiter)
    return [prefix + c for c in contexts], [prefix + f for f in fulls]


def tokenize_options(tokenizer, contexts: list[str], fulls: list[str], max_seq_len: int | None):
    """[(tokens, start, end)] per option: continuation = tokens[start:end], left-cropped to max_seq_len."""
    bos = tokenizer.get_bos_token_id()
    context_tokens = tokenizer.encode(contexts, prepend=bos)
    full_tokens = tokenizer.encode(fulls, prepend=bos)
    options = []
    for context, full in zip(context_tokens, full_tokens):
        common = next((i for i, (x, y) in enumerate(zip(context, full)) if x != y), min(len(context), len(full)))
        start = min(common, len(full) - 1)  # at least one token is scored
        end = len(full)
        if max_seq_len is not None and end > max_seq_len:
            crop = end - max_seq_len  # drop the oldest context: the continuation must stay whole
            full, start, end = full[crop:], max(start - crop, 1), max_seq_len
        options.append((full, start, end))
    return options


@torch.no_grad()
def score_options(model, options, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean continuation loss per option, whether argmax reproduces each option's continuation)."""
    longest = max(len(tokens) for tokens, _, _ in options)
    idx = torch.full((len(options), longest), pad_id, dtype=torch.long)  # right padding never reaches the scored
    for row, (tokens, _, _) in enumerate(options):  # positions: attention is causal
        idx[row, : len(tokens)] = torch.tensor(tokens)
    idx = idx.to(device)
    # Position t predicts token t + 1, so continuation tokens [start, end) are scored at [start - 1, end - 1):
    # ~3% of all positions under a 256-token context, while the unembedding over every position took most of a
    # d4 model's CPU forward, so a model that can is asked for logits from there on (dev/bench_core.py, issue 5).
    first_kept = min(start for _, start, _ in options) - 1
    if "logits_to_keep" in inspect.signature(getattr(model, "forward", model)).parameters:
        logits = model(idx, logits_to_keep=longest - first_kept).float()  # (B, longest - first_kept, V)
    else:
        logits = model(idx).float()[:, first_kept:]  # (B, longest - first_kept, V)
    mean_losses, exact = [], []
    for row, (_, start, end) in enumerate(options):
        scored = logits[row, start - 1 - first_kept : end - 1 - first_kept]  # (n, V)
        targets = idx[row, start:end]  # (n,)
        # In the (1, V, n) layout of the former whole-batch loss: equal to float32 rounding, same accuracies.
        losses = F.cross_entropy(scored.T.unsqueeze(0), targets.unsqueeze(0), reduction="none")  # (1, n)
        mean_losses.append(losses[0].mean())
        exact.append(torch.equal(scored.argmax(dim=-1), targets))
    return torch.stack(mean_losses).cpu(), torch.tensor(exact)


def evaluate_example(model, tokenizer, spec: TaskSpec, examples: list[dict], index: int, device, max_seq_len) -> bool:
    """Whether the model answers example `index` of a task correctly."""
    contexts, fulls = build_prompts(spec, examples, index)
    options = tokenize_options(tokenizer, contexts, fulls, max_seq_len)
    mean_losses, exact = score_options(model, options, tokenizer.get_bos_token_id(), device)
    if spec.task_type == "language_modeling":
        return bool(exact[0])
    return int(mean_losses.argmin()) == examples[index]["gold"]  # ties go to the first option


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect; `baseline` is a fraction (0.25 for four choices)."""
    return (accuracy - baseline) / (1.0 - baseline)


@dataclass
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    baseline: float
    file_rows: int | None = None  # None = data file missing
    csv_rows: int | None = None
    examples: int = 0  # evaluated (after max_per_task)
    accuracy: float | None = None
    centered: float | None = None

    @property
    def missing(self) -> bool:
        return self.file_rows is None


@dataclass
class CoreResult:
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def evaluated(self) -> list[TaskResult]:
        return [t for t in self.tasks if not t.missing]

    @property
    def missing(self) -> list[str]:
        return [t.label for t in self.tasks if t.missing]

    @property
    def core(self) -> float | None:
        evaluated = self.evaluated
        return sum(t.centered for t in evaluated) / len(evaluated) if evaluated else None

    def summary(self) -> str:
        core = "n/a" if self.core is None else f"{self.core:.4f}"
        line = f"CORE {core} over {len(self.evaluated)} of {len(self.tasks)} tasks"
        return line + (f"; missing: {', '.join(self.missing)}" if self.missing else "")


def evaluate_task(model, tokenizer, spec: TaskSpec, examples, device, max_seq_len=None, max_per_task=-1, progress=None):
    """TaskResult of one task, its examples split across ranks when a process group is up."""
    indices = list(range(len(examples)))
    if max_per_task > 0:
        random.Random(SUBSET_SEED).shuffle(indices)
        indices = indices[:max_per_task]
    rank, _, world_size = dist_info()
    correct = torch.zeros(len(indices), dtype=torch.float32, device=device)
    mine = range(rank, len(indices), world_size)
    for done, position in enumerate(mine, start=1):
        correct[position] = evaluate_example(model, tokenizer, spec, examples, indices[position], device, max_seq_len)
        if progress is not None and progress.due():
            progress.show(done / len(mine), f"{done}/{len(mine)} examples")
    if world_size > 1:
        dist.all_reduce(correct)  # each position was filled by exactly one rank
    accuracy = correct.mean().item() if len(indices) else 0.0
    return TaskResult(spec.label, spec.task_type, spec.num_fewshot, spec.baseline, len(examples), spec.csv_rows,
                      len(indices), accuracy, centered_accuracy(accuracy, spec.baseline))  # fmt: skip


def model_max_seq_len(model) -> int | None:
    """The longest sequence the model accepts: GPT's sequence_len, an HF config's position count, else None."""
    config = getattr(model, "config", None)
    lengths = [getattr(config, name, None) for name in ("sequence_len", "n_positions", "max_position_embeddings")]
    return next((int(length) for length in lengths if length), None)


def evaluate_core(model, tokenizer, bundle_dir: str, device="cpu", max_per_task=-1, max_seq_len=None, tasks=None,
                  log=None) -> CoreResult:  # fmt: skip
    """CORE over the bundle's tasks (or the labels in `tasks`); missing data files are reported and skipped.
    max_seq_len None = ask the model (model_max_seq_len). `log`, if given, receives one line per task."""
    max_seq_len = max_seq_len or model_max_seq_len(model)
    specs = load_task_specs(bundle_dir)
    unknown = sorted(set(tasks or []) - {spec.label for spec in specs})
    if unknown:
        raise ValueError(f"unknown CORE task labels {unknown}; core.yaml defines {[spec.label for spec in specs]}")
    specs = [spec for spec in specs if tasks is None or spec.label in tasks]
    paths = {spec.label: task_path(bundle_dir, spec) for spec in specs}
    data = {label: load_examples(path) for label, path in paths.items() if os.path.exists(path)}
    total = sum(min(len(examples), max_per_task) if max_per_task > 0 else len(examples) for examples in data.values())
    done = 0
    overall = Progress("CORE") if log and dist_info().rank == 0 else None
    result = CoreResult()
    for spec in specs:
        if spec.label in data:
            progress = Progress(f"CORE {spec.label}") if overall else None
            task = evaluate_task(model, tokenizer, spec, data[spec.label], device, max_seq_len, max_per_task, progress)
            line = f"{task.label}: accuracy {task.accuracy:.4f} centered {task.centered:.4f} ({task.examples} examples)"
            done += task.examples
        else:
            task = TaskResult(spec.label, spec.task_type, spec.num_fewshot, spec.baseline, None, spec.csv_rows)
            line = f"{spec.label}: missing ({spec.dataset_uri} not in the bundle), excluded from CORE"
        result.tasks.append(task)
        if log:
            log(line)
        if overall is not None and overall.due():
            overall.show(done / max(1, total), f"{len(result.tasks)}/{len(specs)} tasks, {done:,}/{total:,} examples")
    return result


class HuggingFaceModel:
    """A transformers causal LM called like nanochat's GPT: model(idx) -> fp32 logits (B, T, V)."""

    def __init__(self, name_or_path: str, device, dtype=None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
        self.config = self.model.config

    def __call__(self, idx):
        return self.model(input_ids=idx).logits.float()


class HuggingFaceTokenizer:
    """A transformers tokenizer with the two methods CORE needs; its BOS (or, like GPT-2, its EOS) opens every row."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None else self.tokenizer.eos_token_id

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def encode(self, text, prepend=None):
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [([prepend] if prepend is not None else []) + row for row in ids]
        return ids[0] if isinstance(text, str) else ids
