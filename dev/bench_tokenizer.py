"""Benchmark of BPE tokenizer training: our rustbpe against the rustbpe 0.1.0 wheel and HF tokenizers.

Answers three questions in one run, for dev/BENCHMARKS.md ("Tokenizer training"):
1. How long does training take, and how much memory, on the whole Wikipedia sample at each vocabulary size,
   for our rustbpe (this venv, built from rustbpe/), the PyPI wheel rustbpe==0.1.0 (the reference) and HF
   `tokenizers`' BpeTrainer given the same split pattern?
2. Are our merges identical, in order, to the reference's? (Exits 1 if not.)
3. How fast does tiktoken encode with the vocabulary we trained (the largest size)?

Contract:
- Every training runs in a fresh child process (this file, with --child). The two rustbpe packages share one
  import name, and a fresh process makes its RSS high-water mark (VmHWM) the peak of that one training. The
  child imports its library, loads every document into a list (not timed), reads the high-water mark ("RSS
  before training"), times only the training call iterating over that list, and reads it again ("peak").
- Trainers get the same pattern (rustbpe.DEFAULT_PATTERN) and their default thread counts (all cores).
- Each (trainer, vocabulary) runs --repeats times; the trainer order rotates every repeat so that none always
  goes first. The table gives the median and minimum time and the median peak RSS.
- The reference is installed once into <system temp dir>/nanochat-bench/ (never into the repo or the venv).
  If it cannot be installed, the script says so, benchmarks the others and reports parity as not checked.
- Data is read where it lies (default $NANOCHAT_DATA_DIR/pretrain/enwiki-sample.jsonl.gz, or --data).

Does not: save a tokenizer, touch <base dir>, cap or split documents (scripts/tok_train.py does both), or time
rustbpe's own encoder (nanochat encodes with tiktoken).

    .venv/bin/python dev/bench_tokenizer.py                              # full run, ~2 min on 2 cores
    .venv/bin/python dev/bench_tokenizer.py --json /tmp/bench_tokenizer.json
    .venv/bin/python dev/bench_tokenizer.py --max-docs 300 --vocab-sizes 512 1024 --repeats 1  # smoke, seconds
"""

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join("pretrain", "enwiki-sample.jsonl.gz")  # the Wikipedia sample, in $NANOCHAT_DATA_DIR
REFERENCE_VERSION = "0.1.0"
TRAINERS = ["ours", "reference", "hf"]
TRAINER_LABELS = {"ours": "rustbpe (ours)", "reference": f"rustbpe {REFERENCE_VERSION}", "hf": "HF tokenizers"}
MB = 1e6  # throughput is in decimal megabytes of UTF-8 text per second; memory is in MiB


# ----------------------------------------------------------------------------- data


def load_texts(path: str, max_docs: int) -> list[str]:
    """The "text" field of every line of a JSON-lines file (gzipped if it ends in .gz), at most max_docs (-1 = all).

    Not nanochat.dataset.iter_file_documents: that module imports pyarrow, which would add ~55 MiB to every
    child's RSS before training (measured) and blur the memory comparison.
    """
    opener = gzip.open if path.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if max_docs >= 0 and len(texts) >= max_docs:
                break
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory since it started (VmHWM), in MiB.

    Not getrusage's ru_maxrss: Linux carries the launching process's peak RSS across fork+exec into the child's
    ru_maxrss (measured: a child of a 311 MiB parent starts at ru_maxrss 311 MiB, VmHWM 9 MiB), which would
    hide every child's real baseline behind this parent's texts and ranks.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


# ----------------------------------------------------------------------------- child: one training


def run_child(spec: dict) -> None:
    """Trains once as `spec` says and writes the timing, memory and (for rustbpe) the ranks to files."""
    trainer = spec["trainer"]
    if trainer == "reference":
        sys.path.insert(0, spec["reference_dir"])  # shadows our rustbpe, which lives in the venv's site-packages
    # Import before loading the text so the library's own footprint counts as "before training".
    if trainer in ("ours", "reference"):
        import rustbpe

        module_dir = os.path.dirname(os.path.abspath(rustbpe.__file__))
        from_reference_dir = spec["reference_dir"] is not None and module_dir.startswith(spec["reference_dir"])
        if from_reference_dir != (trainer == "reference"):
            raise RuntimeError(f"{trainer}: imported the wrong rustbpe from {module_dir}")
        library_version = importlib.metadata.version("rustbpe")  # sys.path order decides which dist-info is found
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        library_version = importlib.metadata.version("tokenizers")

    texts = load_texts(spec["data"], spec["max_docs"])
    rss_before_mib = peak_rss_mib()

    if trainer in ("ours", "reference"):
        tokenizer = rustbpe.Tokenizer()
        start = time.perf_counter()
        tokenizer.train_from_iterator(iter(texts), spec["vocab_size"], pattern=spec["pattern"])
        seconds = time.perf_counter() - start
        rss_peak_mib = peak_rss_mib()
        ranks = tokenizer.get_mergeable_ranks()
        with open(spec["ranks_out"], "wb") as f:
            pickle.dump(ranks, f)  # a private temp file read back by the parent only
        vocab_size = len(ranks)
    else:
        # Same pre-tokenization as rustbpe: split with the pattern, then map bytes to ByteLevel's printable
        # alphabet without its own GPT-2 regex; all 256 bytes seeded so the vocabulary counts match.
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        bpe_trainer = trainers.BpeTrainer(
            vocab_size=spec["vocab_size"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        start = time.perf_counter()
        tokenizer.train_from_iterator(texts, trainer=bpe_trainer)
        seconds = time.perf_counter() - start
        rss_peak_mib = peak_rss_mib()
        vocab_size = tokenizer.get_vocab_size()

    result = {
        "trainer": trainer,
        "vocab_size_asked": spec["vocab_size"],
        "vocab_size_learned": vocab_size,
        "seconds": seconds,
        "rss_before_mib": rss_before_mib,
        "peak_rss_mib": rss_peak_mib,
        "library_version": library_version,
    }
    with open(spec["result_out"], "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- parent: setup


def install_reference() -> tuple[str | None, str]:
    """(directory holding rustbpe==0.1.0, how it got there) or (None, why it could not be installed)."""
    # The wheel is built per CPython version (cp311-...), so the directory is keyed by the interpreter.
    base = os.path.join(tempfile.gettempdir(), "nanochat-bench")
    target = os.path.join(base, f"rustbpe-{REFERENCE_VERSION}-{sys.implementation.cache_tag}")
    if os.path.isdir(os.path.join(target, f"rustbpe-{REFERENCE_VERSION}.dist-info")):
        return target, f"cached in {target}"
    staging = target + ".partial"  # renamed only when complete, so an interrupted install is never reused
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(base, exist_ok=True)
    requirement = f"rustbpe=={REFERENCE_VERSION}"
    if shutil.which("uv"):
        command = ["uv", "pip", "install", "--python", sys.executable, "--target", staging, requirement]
    else:
        command = [sys.executable, "-m", "pip", "install", "--target", staging, requirement]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`{' '.join(command)}` failed: {e}"
    if completed.returncode != 0:
        return None, f"`{' '.join(command)}` exited {completed.returncode}: {completed.stderr.strip()[-500:]}"
    # An installed wheel can still fail to load (wrong platform, missing symbols); find out here, not mid-run.
    probe = f"import sys; sys.path.insert(0, {staging!r}); import rustbpe; rustbpe.Tokenizer()"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if loaded.returncode != 0:
        return None, f"installed into {staging} but it does not import: {loaded.stderr.strip()[-500:]}"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target, f"installed into {target} with {command[0]}"


def hardware() -> dict:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_gib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024**2  # kB
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(ram_gib, 1) if ram_gib else None,
        "kernel": platform.release(),
    }


def binary_fingerprint(module_file: str) -> str:
    """sha256 prefix and mtime of our compiled extension: names the build measured, since rustbpe/ may be rebuilt."""
    directory = os.path.dirname(module_file)
    binary = next(os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name.endswith(".so"))
    with open(binary, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(os.path.getmtime(binary)))
    return f"{os.path.basename(binary)} sha256 {digest}, built {built}"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Only tracked files count: this script may itself be new and untracked.
        modified = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (tracked files modified)" if modified else "")


# ----------------------------------------------------------------------------- parent: measurements


def train_in_child(spec: dict, workdir: str, run_index: int) -> tuple[dict, list | None]:
    """Runs one training in a fresh interpreter; returns its result and, for rustbpe, its mergeable ranks."""
    spec = dict(spec)
    spec["result_out"] = os.path.join(workdir, f"run{run_index}.json")
    spec["ranks_out"] = os.path.join(workdir, f"run{run_index}.ranks.pkl")
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{spec['trainer']} at vocab {spec['vocab_size']} failed:\n{completed.stderr}")
    with open(spec["result_out"]) as f:
        result = json.load(f)
    ranks = None
    if os.path.exists(spec["ranks_out"]):
        with open(spec["ranks_out"], "rb") as f:
            ranks = pickle.load(f)
        os.remove(spec["ranks_out"])
    return result, ranks


def first_difference(ours: list, reference: list) -> int | None:
    """Index of the first rank where the two lists differ (a missing entry counts), None if identical."""
    for index, (our_entry, reference_entry) in enumerate(zip(ours, reference)):
        if our_entry != reference_entry:
            return index
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


def describe_parity(ours: list, reference: list) -> dict:
    index = first_difference(ours, reference)
    if index is None:
        return {"identical": True, "first_difference": None, "text": f"identical ({len(ours)} ranks, in order)"}
    our_entry = ours[index] if index < len(ours) else "(missing)"
    reference_entry = reference[index] if index < len(reference) else "(missing)"
    text = f"DIFFERENT from rank {index}: ours {our_entry!r}, reference {reference_entry!r}"
    return {"identical": False, "first_difference": index, "text": text}


def bench_tiktoken(ranks: list, pattern: str, texts: list[str], repeats: int) -> list[dict]:
    """MB/s of tiktoken's encode_ordinary over every document: a 1-thread loop, then the batch API at 1, 2 threads."""
    import tiktoken

    encoding = tiktoken.Encoding(name="bench", pat_str=pattern, mergeable_ranks=dict(ranks), special_tokens={})
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    encoding.encode_ordinary_batch(texts[:200], num_threads=2)  # warm up each worker thread's regex copy

    def loop():
        return sum(len(encoding.encode_ordinary(text)) for text in texts)

    def batch(num_threads):
        return sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=num_threads))

    methods = [
        ("encode_ordinary, loop over docs", 1, loop),
        ("encode_ordinary_batch", 1, lambda: batch(1)),
        ("encode_ordinary_batch", 2, lambda: batch(2)),
    ]
    rows = []
    for name, num_threads, method in methods:
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            num_tokens = method()
            timings.append(time.perf_counter() - start)
        median_seconds = statistics.median(timings)
        rows.append(
            {
                "method": name,
                "threads": num_threads,
                "median_seconds": median_seconds,
                "min_seconds": min(timings),
                "median_mb_per_s": total_bytes / MB / median_seconds,
                "best_mb_per_s": total_bytes / MB / min(timings),
                "tokens": num_tokens,
                "bytes_per_token": total_bytes / num_tokens,
            }
        )
        print(f"  {name} threads={num_threads}: {rows[-1]['median_mb_per_s']:.1f} MB/s (median)", flush=True)
    return rows


def summarize(results: list[dict], trainers: list[str], vocab_sizes: list[int]) -> list[dict]:
    """One row per (vocab, trainer): median/min seconds, median peak and before-training RSS, ratios vs reference."""
    rows = []
    for vocab_size in vocab_sizes:
        by_trainer = {}
        for trainer in trainers:
            runs = [r for r in results if r["trainer"] == trainer and r["vocab_size_asked"] == vocab_size]
            by_trainer[trainer] = {
                "trainer": trainer,
                "vocab_size": vocab_size,
                "vocab_size_learned": runs[0]["vocab_size_learned"],
                "repeats": len(runs),
                "median_seconds": statistics.median(r["seconds"] for r in runs),
                "min_seconds": min(r["seconds"] for r in runs),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                "rss_before_mib": statistics.median(r["rss_before_mib"] for r in runs),
                # What training itself added on top of the loaded text, which all trainers share.
                "training_added_mib": statistics.median(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs),
            }
        reference = by_trainer.get("reference")
        for row in by_trainer.values():
            row["time_vs_reference"] = row["median_seconds"] / reference["median_seconds"] if reference else None
            row["peak_rss_vs_reference"] = row["peak_rss_mib"] / reference["peak_rss_mib"] if reference else None
            rows.append(row)
    return rows


def ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'trainer':<16} {'vocab':>6} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13} "
        f"{'RSS before MiB':>15} {'added MiB':>10} {'time vs 0.1.0':>14} {'peak vs 0.1.0':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{TRAINER_LABELS[row['trainer']]:<16} {row['vocab_size']:>6} {row['median_seconds']:>9.2f} "
            f"{row['min_seconds']:>7.2f} {row['peak_rss_mib']:>13.0f} {row['rss_before_mib']:>15.0f} "
            f"{row['training_added_mib']:>10.0f} "
            f"{ratio(row['time_vs_reference']):>14} {ratio(row['peak_rss_vs_reference']):>14}"
        )


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    data_dir = os.environ.get("NANOCHAT_DATA_DIR") or "$NANOCHAT_DATA_DIR"
    parser.add_argument("--data", default=os.path.join(data_dir, SAMPLE), help="JSON-lines file, a 'text' a line")
    parser.add_argument("--max-docs", type=int, default=-1, help="use only the first N documents (-1 = all)")
    # Benchmark
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 65536], help="vocabulary sizes to train")
    parser.add_argument("--repeats", type=int, default=3, help="trainings per (trainer, vocab size) and tiktoken runs")
    parser.add_argument("--json", default=None, help="also write every result to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one training, spec as JSON
    args = parser.parse_args(argv)

    if args.child is not None:
        run_child(json.loads(args.child))
        return 0

    # --------------------------------------------------------------- setup: report what this run is
    import rustbpe  # ours: the venv's build; the children import it again on their own

    pattern = rustbpe.DEFAULT_PATTERN
    data = os.path.abspath(args.data)
    if not os.path.isfile(data):
        print(f"data file not found: {data} (pass --data PATH)", file=sys.stderr)
        return 2
    texts = load_texts(data, args.max_docs)
    data_info = {
        "path": data,
        "documents": len(texts),
        "characters": sum(len(text) for text in texts),
        "utf8_bytes": sum(len(text.encode("utf-8")) for text in texts),
    }
    reference_dir, reference_note = install_reference()
    trainers = TRAINERS if reference_dir else [t for t in TRAINERS if t != "reference"]
    versions = {
        "python": platform.python_version(),
        "rustbpe_ours": importlib.metadata.version("rustbpe"),
        "rustbpe_ours_binary": binary_fingerprint(rustbpe.__file__),
        "rustbpe_reference": None,  # filled in from a reference child, which is what actually imported it
        "tokenizers": importlib.metadata.version("tokenizers"),
        "tiktoken": importlib.metadata.version("tiktoken"),
    }
    machine = hardware()
    commit = git_commit()
    print(f"git commit: {commit}")
    print(
        f"hardware: {machine['cpu_model']}, {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable), {machine['ram_gib']} GiB RAM, Linux {machine['kernel']}"
    )
    print(f"load average at start (1/5/15 min): {os.getloadavg()}")
    print(f"data: {data}: {data_info['documents']:,} documents, {data_info['characters']:,} characters")
    print(f"pattern: {pattern}")
    print(f"reference rustbpe=={REFERENCE_VERSION}: {reference_note}")
    if reference_dir is None:
        print(
            f"WARNING: rustbpe=={REFERENCE_VERSION} could not be installed; benchmarking ours and HF only. "
            "Merge parity is NOT checked.",
            file=sys.stderr,
        )

    # --------------------------------------------------------------- training runs, one child each
    results = []
    ranks = {}  # (trainer, vocab_size) -> ranks of its first repeat
    deterministic = {}  # (trainer, vocab_size) -> every repeat gave the first repeat's ranks
    base_spec = {"data": data, "max_docs": args.max_docs, "pattern": pattern, "reference_dir": reference_dir}
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as workdir:
        run_index = 0
        for repeat in range(args.repeats):
            shift = repeat % len(trainers)
            order = trainers[shift:] + trainers[:shift]
            for vocab_size in args.vocab_sizes:
                for trainer in order:
                    spec = dict(base_spec, trainer=trainer, vocab_size=vocab_size)
                    result, run_ranks = train_in_child(spec, workdir, run_index)
                    run_index += 1
                    result["repeat"] = repeat
                    results.append(result)
                    if trainer == "reference":
                        versions["rustbpe_reference"] = result["library_version"]
                    if run_ranks is not None:
                        key = (trainer, vocab_size)
                        ranks.setdefault(key, run_ranks)
                        deterministic[key] = deterministic.get(key, True) and run_ranks == ranks[key]
                    print(
                        f"[repeat {repeat + 1}/{args.repeats}] {TRAINER_LABELS[trainer]:<16} vocab {vocab_size:>6}: "
                        f"{result['seconds']:6.2f} s, RSS {result['rss_before_mib']:.0f} -> "
                        f"{result['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )

    # --------------------------------------------------------------- merge parity
    parity = {}
    parity_ok = True
    for vocab_size in args.vocab_sizes:
        if reference_dir is None:
            parity[vocab_size] = {"identical": None, "first_difference": None, "text": "NOT CHECKED (no reference)"}
            continue
        parity[vocab_size] = describe_parity(ranks[("ours", vocab_size)], ranks[("reference", vocab_size)])
        parity_ok = parity_ok and parity[vocab_size]["identical"]
    for key, same in deterministic.items():
        if not same and key[0] == "ours":
            parity_ok = False  # our trainer must be deterministic; the reference's behaviour is only reported

    # --------------------------------------------------------------- tiktoken with our largest vocabulary
    tiktoken_vocab = max(args.vocab_sizes)
    print(f"\ntiktoken encode over {data_info['utf8_bytes'] / MB:.1f} MB with our {tiktoken_vocab}-token vocabulary:")
    tiktoken_rows = bench_tiktoken(ranks[("ours", tiktoken_vocab)], pattern, texts, args.repeats)
    print(f"load average at end (1/5/15 min): {os.getloadavg()}")
    binary_changed = binary_fingerprint(rustbpe.__file__) != versions["rustbpe_ours_binary"]
    if binary_changed:
        print("WARNING: our rustbpe binary was rebuilt during the run; the figures mix two builds.", file=sys.stderr)

    # --------------------------------------------------------------- report
    rows = summarize(results, trainers, args.vocab_sizes)
    print(f"\nTraining on {data_info['documents']:,} documents, {args.repeats} repeats, order rotated each repeat:")
    print_table(rows)
    print("\nMerge parity, ours vs rustbpe 0.1.0 (get_mergeable_ranks, in order):")
    for vocab_size, verdict in parity.items():
        print(f"  vocab {vocab_size}: {verdict['text']}")
    for (trainer, vocab_size), same in deterministic.items():
        print(f"  {TRAINER_LABELS[trainer]} vocab {vocab_size}: same merges in every repeat: {same}")
    print("\ntiktoken throughput (MB = 10^6 bytes of UTF-8):")
    for row in tiktoken_rows:
        print(
            f"  {row['method']:<32} threads={row['threads']}: {row['median_mb_per_s']:6.1f} MB/s median, "
            f"{row['best_mb_per_s']:6.1f} best ({row['bytes_per_token']:.2f} bytes/token)"
        )
    print(
        f"\nversions: python {versions['python']}, rustbpe ours {versions['rustbpe_ours']}, "
        f"rustbpe reference {versions['rustbpe_reference']}, tokenizers {versions['tokenizers']}, "
        f"tiktoken {versions['tiktoken']}"
    )
    print(f"our rustbpe binary: {versions['rustbpe_ours_binary']}")

    if args.json:
        report = {
            "command": [sys.executable, *sys.argv],
            "config": {"vocab_sizes": args.vocab_sizes, "repeats": args.repeats, "max_docs": args.max_docs},
            "git_commit": commit,
            "hardware": machine,
            "versions": versions,
            "data": data_info,
            "pattern": pattern,
            "reference": {"dir": reference_dir, "note": reference_note},
            "runs": results,
            "summary": rows,
            "parity": {str(vocab_size): verdict for vocab_size, verdict in parity.items()},
            "deterministic": {f"{trainer}@{vocab_size}": same for (trainer, vocab_size), same in deterministic.items()},
            "tiktoken": {"vocab_size": tiktoken_vocab, "rows": tiktoken_rows},
            "binary_changed_during_run": binary_changed,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")

    if not parity_ok:
        print("FAILED: our merges differ from rustbpe 0.1.0's (or between repeats); see above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
