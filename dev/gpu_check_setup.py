"""The GPU check's setup helpers (dev/gpu_check.py runs them): a synthetic data directory, the device probe (a
child process: `python dev/gpu_check_setup.py --device-type cuda ...` prints one line `PROBE {json}`), and the
wheels that travel to a GPU machine with no package registry.

Contract: the data directory is laid out like the offline one (NANOCHAT_DATA_DIR), deterministic for a seed;
the probe's batch sizes are the largest whose EAGER training step fits (compiled steps keep fewer activations).
Not here: the parts themselves, results, timeouts (dev/gpu_check.py).
"""

import argparse
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Packages the stages import that the GPU image lacks (it has torch, numpy, tiktoken, pyarrow, httpx, yaml, ...).
CARRIED = ["fastapi", "annotated-doc", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "uvicorn", "typing-extensions"]  # fmt: skip

# ---------------------------------------------------------------------------- synthetic data


def synthetic_data(directory: str, docs: int, seed: int = 0) -> None:
    """A data directory laid out like the offline one (pretrain, gsm8k, mmlu/val, arc, chat), from a seeded
    generator: made-up words with Zipf frequencies (enough distinct ones for 65,536 BPE tokens at 12,000
    documents) and arithmetic word problems. Only speed and code paths matter here, not what a model learns."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["the", "and", "of", "in", "is", "to"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(150_000)]
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))

    def sentence() -> str:
        picked = rng.choices(words, cum_weights=cumulative, k=rng.randint(5, 15))
        return " ".join(picked).capitalize() + rng.choice(".!?") + (f" {rng.randint(0, 9999)}" * (rng.random() < 0.3))

    def problem() -> tuple[str, int, int]:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"Mia has {a} apples and buys {b} more. How many apples does she have?", a, b

    def write(path: str, lines: list[str]) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    pretrain = [json.dumps({"text": " ".join(sentence() for _ in range(rng.randint(5, 20)))}) for _ in range(docs)]
    write(os.path.join(directory, "pretrain", "synthetic.jsonl"), pretrain)
    for split, count in (("train", 200), ("test", 50)):
        rows = []
        for question, a, b in (problem() for _ in range(count)):
            answer = f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
            rows.append(json.dumps({"question": question, "answer": answer}))
        write(os.path.join(directory, "gsm8k", f"{split}.jsonl"), rows)
    mmlu, arc = [], []
    for i, (question, a, b) in enumerate(problem() for _ in range(40)):
        options = [str(a + b + offset) for offset in (0, 1, -1, 2)]
        rng.shuffle(options)
        letter = "ABCD"[options.index(str(a + b))]
        mmlu.append(",".join([f'"{question}"', *options, letter]))
        choices = [{"text": text, "label": label} for text, label in zip(options, "ABCD")]
        arc.append(json.dumps({"id": f"synthetic-{i}", "question": {"stem": question, "choices": choices},
                               "answerKey": letter}))  # fmt: skip
    for split in ("dev", "val", "test"):
        write(os.path.join(directory, "mmlu", split, f"arithmetic_{split}.csv"), mmlu)
    for split in ("Train", "Dev", "Test"):
        write(os.path.join(directory, "arc", "ARC-Easy", f"ARC-Easy-{split}.jsonl"), arc)
    hello = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am nanochat."}]
    write(os.path.join(directory, "chat", "identity_conversations.jsonl"), [json.dumps(hello)] * 20)


# ---------------------------------------------------------------------------- device probe (a child process)


def probe(args) -> None:
    """Child: the device's name, measured copy bandwidth (bytes read + written / s) and bf16 matmul FLOP/s, and
    for each --probe-depth the largest batch in its candidate list whose eager training step fits in memory."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    cuda = args.device_type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU here; run with --dry-run for the CPU version")
    device = torch.device(args.device_type)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best_seconds(fn, repeats: int) -> float:
        fn()  # warmup
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    def copy_seconds(numel: int) -> float:
        source, target = torch.empty(numel, device=device), torch.empty(numel, device=device)
        return best_seconds(lambda: target.copy_(source), 10)

    def matmul_seconds(n: int, dtype) -> float:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return best_seconds(lambda: a @ b, 10)

    def fits(depth: int, batch: int) -> bool:
        """Whether an eager training step fits: eager keeps more activations than compiled, so a batch that fits
        here fits compiled too; two fp32 copies of the weights stand in for the optimizer's states."""
        config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
        try:
            model = GPT.build(config, device)
            model.compute_dtype = torch.bfloat16 if cuda else torch.float32
            states = [torch.empty_like(p) for p in model.parameters() for _ in range(2)]
            idx = torch.randint(0, args.vocab_size, (batch, args.seq_len), device=device)
            model(idx, idx).backward()
            sync()
            del states
            return True
        except torch.OutOfMemoryError:
            return False

    numel = (2**30 if cuda else 2**24) // 4  # 1 GiB on a GPU, 16 MiB on a CPU, as fp32
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "copy_bytes_per_s": 2 * numel * 4 / copy_seconds(numel),  # bytes read + bytes written
        "matmul_flops_per_s": 2 * n**3 / matmul_seconds(n, dtype),
        "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "batches": {},
    }
    for depth, candidates in zip(args.probe_depths, args.probe_batches):
        for batch in sorted((int(c) for c in candidates.split(",")), reverse=True):
            fit = fits(depth, batch)
            if cuda:
                torch.cuda.empty_cache()
            if fit:
                result["batches"][str(depth)] = batch
                break
    print("PROBE " + json.dumps(result))


# ---------------------------------------------------------------------------- wheels


def prepare_wheels(directory: str) -> None:
    """Here (with PyPI): the rustbpe abi3 wheel and CPython 3.12 manylinux wheels of CARRIED, at the versions
    installed in this environment, into `directory`."""
    os.makedirs(directory, exist_ok=True)
    maturin = os.path.join(os.path.dirname(sys.executable), "maturin")
    build = [maturin, "build", "--release", "-m", os.path.join(REPO, "rustbpe", "Cargo.toml"), "-o", directory]
    subprocess.run(build, check=True)
    pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else [shutil.which("pip3") or "pip"]
    platforms = [arg for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014") for arg in
                 ("--platform", f"{tag}_x86_64")]  # fmt: skip
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", directory, *pinned], check=True)  # fmt: skip
    wheels = sorted(name for name in os.listdir(directory) if name.endswith(".whl"))
    total = sum(os.path.getsize(os.path.join(directory, name)) for name in wheels)
    print("\n".join(wheels) + f"\n{len(wheels)} wheels, {total / 2**20:.1f} MiB in {directory}")


def install_wheels(directory: str) -> str:
    """There (no registry): every wheel in `directory` into a --target folder; returns the folder."""
    target = os.path.join(tempfile.gettempdir(), "gpu_check_site")
    wheels = [os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".whl")]
    if not wheels:
        raise SystemExit(f"gpu_check: no .whl files in {directory}; build them with --prepare-wheels {directory}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", target, *wheels], check=True)  # fmt: skip
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-type", default="cuda", help="cuda | cpu")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence of the batch probe")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of the batch probe's models")
    parser.add_argument("--probe-depths", type=int, nargs="*", default=[], help="depths to find a batch for")
    parser.add_argument("--probe-batches", nargs="*", default=[], help="per depth, candidate batches: 64,32,16")
    probe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
