"""The GPU check: one command that measures nanochat on a rented GPU in at most 8 minutes, and a CPU dry run of it.

    python3 dev/gpu_check.py --wheels .whl --out /tmp/gpu_check             # on the GPU machine (torch there)
    .venv/bin/python dev/gpu_check.py --dry-run --out /tmp/gpu_check_dry    # CPU, tiny sizes, <= 90 s (CI)
    .venv/bin/python dev/gpu_check.py --prepare-wheels .whl                 # here, with PyPI: the wheels to carry

Parts, in order, each a set of subprocesses (the project's own command lines) under its own time limit, so a
slow part cannot starve the rest:
- setup: the device (name, measured copy bandwidth and matmul FLOP/s), a data directory ($NANOCHAT_DATA_DIR, or
  a small synthetic one laid out like it), pretraining shards and a tokenizer (65,536 tokens) in a temp base dir;
- train: dev/bench_train_step.py at depth 12 and 20, sequence 2,048, compiled, at the largest device batch an
  eager step fits in (probed here, largest first): tokens/s, MFU against nanochat.common.gpu_peaks, peak memory;
  once per `--recipe NAME=ARGS` (default: today's recipe only);
- engine: dev/infer_bench.py (scripts/ before) on random d20 weights: prefill tok/s, decode tok/s at batch 1, 8
  and 32, eager and the compiled/CUDA-graph path (infer_bench --compile-decode), against the roofline
  = batch / (bytes read per step / measured copy bandwidth);
- server: dev/bench_server.py against scripts.chat_web serving a d20 checkpoint (one step of base_train) with 1,
  16 and 64 concurrent streaming clients: aggregate tok/s, TTFT p50/p95;
- smoke: the GPU path end to end at a tiny size: base_train under torchrun (compiled, evaluation, checkpoints),
  chat_sft for a few steps, chat_eval on a handful of GSM8K problems, one chat_cli answer.
After each part the results so far go to <out>/gpu_check.json and <out>/gpu_check.md (atomic writes), a failed
or timed-out step with the tail of its output. `--dry-run` runs the same parts through the same code paths on
the CPU at tiny sizes (tests/test_gpu_check.py runs it in CI, so the check cannot rot between leases).

The GPU machine has Python 3.12 and torch but no package registry: `--prepare-wheels DIR` (in
dev/gpu_check_setup.py, with the synthetic data and the device probe) builds our rustbpe
abi3 wheel (maturin) and downloads the wheels of the packages the stages import that its image lacks (the
versions installed here); `--wheels DIR` there installs them with `pip --no-index --target` (a venv made from
the image's python, itself a venv, would not see its torch) and puts them on PYTHONPATH for every subprocess.
Not here: correctness (the tests), multi-GPU runs, speedrun.sh's full GPU profile (too long for a lease).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from gpu_check_setup import install_wheels, prepare_wheels, synthetic_data  # beside this file, in dev/

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("setup", "train", "engine", "server", "smoke")
PERCENT_COLUMNS = ("mfu", "of_roofline")

# Sizes: the GPU check (8 minutes in all on one H100/H200) and the dry run (tiny, CPU, seconds per part).
# The dry run compiles nothing (inductor on a CPU takes minutes): train_compile off, and base_train's "auto" is off
# on a CPU. Its limits are caps for a loaded CI machine, not expected times.
SIZES = {
    "gpu": dict(
        limits={"setup": 60, "train": 145, "engine": 95, "server": 105, "smoke": 75},  # 8 minutes
        synthetic_docs=12000, vocab_size=65536, tok_chars=50_000_000,
        train_depths=[12, 20], train_seq=2048, train_vocab=65536, train_compile="on",
        train_steps=["--warmup", "2", "--steps", "3"],
        train_batches={12: [128, 96, 64, 48, 32], 20: [64, 48, 32, 24, 16]},
        engine_depth=20, engine_args=["--sequence-len", "2048", "--prompt-len", "512", "--decode-tokens", "128",
                                      "--batch-sizes", "1", "8", "32", "--repeats", "2"],
        server_depth=20, server_seq=2048, clients=[1, 16, 64], requests_per_client=2, server_tokens=64,
        smoke_depth=4, smoke_seq=256, smoke_batch=16, smoke_steps=20,
    ),
    "dry": dict(
        limits={"setup": 60, "train": 60, "engine": 60, "server": 120, "smoke": 180},
        synthetic_docs=400, vocab_size=512, tok_chars=2_000_000,
        train_depths=[2], train_seq=64, train_vocab=512, train_compile="off",
        train_steps=["--warmup", "1", "--steps", "1"],
        train_batches={2: [4, 2]},
        engine_depth=2, engine_args=["--sequence-len", "128", "--prompt-len", "16", "--decode-tokens", "4",
                                     "--batch-sizes", "1", "2", "--repeats", "1"],
        server_depth=2, server_seq=64, clients=[1, 2, 4], requests_per_client=1, server_tokens=4,
        smoke_depth=2, smoke_seq=64, smoke_batch=4, smoke_steps=4,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------- running the parts


class Check:
    """The run's state: where things go, the environment every subprocess gets, results written as they come."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.size = SIZES["dry" if self.dry else "gpu"]
        self.device_type = "cpu" if self.dry else "cuda"
        self.out = os.path.abspath(args.out)
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.base_dir = os.path.join(self.work, "base")
        self.data_dir = os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(self.work, "data")
        python_path = os.pathsep.join(filter(None, [REPO, args.site]))
        self.env = {**os.environ, "NANOCHAT_BASE_DIR": self.base_dir, "NANOCHAT_DATA_DIR": self.data_dir,
                    "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}  # fmt: skip
        if self.dry:
            self.env["NANOCHAT_DEVICE"] = "cpu"
        self.deadline = time.monotonic() + args.budget_s
        self.results = {"mode": "dry-run" if self.dry else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "commit": git_commit(), "budget_s": args.budget_s, "parts": {}}  # fmt: skip
        self.hardware = None

    def run(self, part: dict, name: str, command: list[str], timeout_at: float) -> str:
        """Run one step in its own process group; its stdout+stderr, or raise StepFailed with their tail."""
        timeout = max(1.0, min(timeout_at, self.deadline) - time.monotonic())
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and chat_web children go too
            output, _ = process.communicate()
            part["steps"].append({"step": name, "seconds": round(time.monotonic() - start, 1), "status": "timeout"})
            raise StepFailed(f"{name}: timed out after {timeout:.0f} s", output) from None
        part["steps"].append({"step": name, "seconds": round(time.monotonic() - start, 1),
                              "status": "ok" if process.returncode == 0 else f"exit {process.returncode}"})  # fmt: skip
        if process.returncode != 0:
            raise StepFailed(f"{name}: exit status {process.returncode}", output)
        return output

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def part(self, name: str, body) -> None:
        limit = self.size["limits"][name]
        part = {"status": "running", "limit_s": limit, "steps": [], "rows": []}
        self.results["parts"][name] = part
        start = time.monotonic()
        if name != "setup" and self.hardware is None:
            part.update(status="skipped", error="setup failed: no device probe")
        elif time.monotonic() >= self.deadline:
            part.update(status="skipped", error="the check's total budget was spent before this part")
        else:
            try:
                body(part, start + limit)
                part["status"] = "ok"
            except StepFailed as failure:
                part.update(status="failed", error=str(failure), output_tail=failure.output[-3000:])
            except Exception as error:  # a bug or an unexpected output format: record it, go on to the next part
                part.update(status="failed", error=f"{type(error).__name__}: {error}")
        part["seconds"] = round(time.monotonic() - start, 1)
        print(f"gpu_check: {name} {part['status']} in {part['seconds']} s" + (f": {part['error']}" if "error" in
              part else ""), flush=True)  # fmt: skip
        self.write()

    def write(self) -> None:
        from nanochat.common import atomic_write

        os.makedirs(self.out, exist_ok=True)
        text = json.dumps(self.results, indent=2).encode()
        atomic_write(os.path.join(self.out, "gpu_check.json"), lambda f: f.write(text))
        markdown = render_markdown(self.results).encode()
        atomic_write(os.path.join(self.out, "gpu_check.md"), lambda f: f.write(markdown))


class StepFailed(Exception):
    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or None


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the parts


def part_setup(check: Check, part: dict, until: float) -> None:
    size = check.size
    depths = size["train_depths"]
    probe_args = ["dev/gpu_check_setup.py", "--device-type", check.device_type, "--seq-len", str(size["train_seq"]),
                  "--vocab-size", str(size["train_vocab"]), "--probe-depths", *map(str, depths),
                  "--probe-batches", *(",".join(map(str, size["train_batches"][d])) for d in depths)]  # fmt: skip
    output = check.run(part, "device probe", check.python(*probe_args), until)
    check.hardware = json.loads(next(line[6:] for line in output.splitlines() if line.startswith("PROBE ")))
    from nanochat.common import gpu_peaks

    peaks = gpu_peaks(check.hardware["device"])
    check.hardware["table_peak_flops_per_s"] = peaks[0] if peaks else None
    check.results["hardware"] = check.hardware
    if not os.environ.get("NANOCHAT_DATA_DIR"):
        synthetic_data(check.data_dir, size["synthetic_docs"])
    shards = os.path.join(check.base_dir, "base_data")
    build = [
        "-m",
        "nanochat.dataset",
        "build",
        "--input",
        os.path.join(check.data_dir, "pretrain"),
        "--out",
        shards,
        "--row-group-docs",
        "64",
    ]
    check.run(part, "dataset build", check.python(*build), until)
    tok = ["-m", "scripts.tok_train", "--vocab-size", str(size["vocab_size"]), "--max-chars", str(size["tok_chars"])]
    check.run(part, "tok_train", check.python(*tok), until)
    tokenizer = read_json(os.path.join(check.base_dir, "report", "tok_train.json"))
    part["rows"].append({
        "device": check.hardware["device"],
        "copy_GB_per_s": check.hardware["copy_bytes_per_s"] / 1e9,
        "matmul_TFLOP_per_s": check.hardware["matmul_flops_per_s"] / 1e12,
        "table_peak_TFLOP_per_s": (peaks[0] / 1e12) if peaks else None,
        "data": "NANOCHAT_DATA_DIR" if os.environ.get("NANOCHAT_DATA_DIR") else "synthetic",
        "vocab_size": tokenizer.get("vocab_size", size["vocab_size"]),
    })  # fmt: skip


def peak_flops(check: Check) -> tuple[float, str]:
    """MFU's denominator: the datasheet's bf16 peak (nanochat.common.gpu_peaks), else the measured matmul rate."""
    table = check.hardware.get("table_peak_flops_per_s")
    return (table, "datasheet") if table else (check.hardware["matmul_flops_per_s"], "measured matmul")


def part_train(check: Check, part: dict, until: float) -> None:
    size = check.size
    depths, batches = size["train_depths"], check.hardware["batches"]
    peak, peak_source = peak_flops(check)
    part["peak_flops_source"] = peak_source
    for recipe in check.args.recipe:
        name, _, extra = recipe.partition("=")
        for depth in depths:
            if str(depth) not in batches:
                raise StepFailed(f"depth {depth}: not even batch {min(size['train_batches'][depth])} fits", "")
            path = os.path.join(check.work, f"train_{name}_d{depth}.json")
            command = ["-m", "dev.bench_train_step", "--depths", str(depth), "--seq-lens", str(size["train_seq"]),
                       "--vocab-size", str(size["train_vocab"]), "--batch-size", str(batches[str(depth)]),
                       "--compile", size["train_compile"], "--device-type", check.device_type,
                       *size["train_steps"], "--json", path, *extra.split()]  # fmt: skip
            check.run(part, f"bench_train_step {name} d{depth}", check.python(*command), until)
            r = read_json(path)["results"][0]
            part["rows"].append({
                "recipe": name, "depth": depth, "params_M": r["params"] / 1e6, "seq_len": r["seq_len"],
                "device_batch": r["batch_size"], "dtype": r["dtype"], "compiled": r["compiled"],
                "step_s": r["step_s_median"], "tokens_per_s": r["tokens_per_s"],
                "mfu": r["flops_per_token"] * r["tokens_per_s"] / peak, "peak_memory_GiB": r.get("peak_memory_gib"),
                "compile_s": r["warmup_and_compile_s"],
            })  # fmt: skip
            check.write()


def part_engine(check: Check, part: dict, until: float) -> None:
    size = check.size
    variants = {"eager": []}
    script = "dev/infer_bench.py"
    if check.dry:
        part["compiled"] = "not run in the dry run: inductor on a CPU takes minutes"
    else:
        variants["compiled"] = ["--compile-decode"]
    bandwidth = check.hardware["copy_bytes_per_s"]
    for variant, extra in variants.items():
        path = os.path.join(check.work, f"engine_{variant}.json")
        command = [script, "--depth", str(size["engine_depth"]), "--vocab-size",
                   str(size["train_vocab"]), "--device-type", check.device_type, *size["engine_args"], "--json", path,
                   *extra]  # fmt: skip
        check.run(part, f"infer_bench {variant}", check.python(*command), until)
        report = read_json(path)
        for r in report["decode"]:
            roofline = r["batch_size"] * bandwidth / r["bytes_per_step"]
            part["rows"].append({
                "path": variant, "depth": size["engine_depth"], "batch": r["batch_size"],
                "prefill_tokens_per_s": report["prefill"]["prefill_tokens_per_s"],
                "decode_tokens_per_s": r["decode_tokens_per_s_aggregate"], "tpot_ms": 1000 * r["tpot_s_median"],
                "MB_per_step": r["bytes_per_step"] / 1e6, "roofline_tokens_per_s": roofline,
                "of_roofline": r["decode_tokens_per_s_aggregate"] / roofline,
            })  # fmt: skip
        check.write()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_server(check: Check, part: dict, until: float) -> None:
    size = check.size
    tag = f"server_d{size['server_depth']}"
    seq = size["server_seq"]  # one optimizer step of base_train: a real checkpoint at this depth, quickly
    train = ["-m", "scripts.base_train", "--depth", str(size["server_depth"]), "--model-tag", tag,
             "--max-seq-len", str(seq), "--device-batch-size", "1", "--total-batch-size", str(seq),
             "--num-iterations", "1", "--eval-every", "-1", "--eval-tokens", str(seq), "--sample-every", "-1",
             "--save-every", "-1", "--compile", "off", "--device-type", check.device_type]  # fmt: skip
    check.run(part, f"base_train d{size['server_depth']} (1 step)", check.python(*train), until)
    path = os.path.join(check.work, "server.json")
    bench = ["dev/bench_server.py", "--source", "base", "--model-tag", tag, "--device-type", check.device_type,
             "--clients", *map(str, size["clients"]), "--requests-per-client", str(size["requests_per_client"]),
             "--max-tokens", str(size["server_tokens"]), "--max-batch", str(max(size["clients"])),
             "--port", str(free_port()), "--json", path]  # fmt: skip
    check.run(part, "bench_server", check.python(*bench), until)
    for level in read_json(path)["levels"]["new"]:
        part["rows"].append({
            "depth": size["server_depth"], "clients": level["clients"], "requests": level["requests"],
            "errors": level["errors"], "tokens": level["tokens"],
            "aggregate_tokens_per_s": level["aggregate_tokens_per_s"],
            "ttft_p50_ms": level["ttft_p50_ms"], "ttft_p95_ms": level["ttft_p95_ms"],
        })  # fmt: skip


def part_smoke(check: Check, part: dict, until: float) -> None:
    size, device = check.size, ["--device-type", check.device_type]
    tag, report = f"d{size['smoke_depth']}", os.path.join(check.base_dir, "report")
    seq, batch, steps = size["smoke_seq"], size["smoke_batch"], size["smoke_steps"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    train = ["-m", "scripts.base_train", "--depth", str(size["smoke_depth"]), "--max-seq-len", str(seq),
             "--device-batch-size", str(batch), "--total-batch-size", str(2 * batch * seq),  # 2 micro-steps
             "--num-iterations", str(steps), "--eval-every", str(steps // 2), "--eval-tokens", str(2 * batch * seq),
             "--sample-every", str(steps), "--save-every", str(steps // 2), *device]  # fmt: skip
    check.run(part, "base_train (torchrun, compile auto)", [*torchrun, *train], until)
    summary = read_json(os.path.join(report, "base_train.json"))
    part["rows"].append({"stage": "base_train", "steps": summary["steps"], "metric": "val_bpb",
                         "value": summary["val_bpb"], "seconds": part["steps"][-1]["seconds"]})  # fmt: skip
    sft = ["-m", "scripts.chat_sft", "--source", "base", "--model-tag", tag, "--mixture", "gsm8k", "--data-dir",
           check.data_dir, "--num-iterations", "2", "--device-batch-size", "2", "--examples-per-step", "4",
           "--eval-every", "-1", "--eval-steps", "2", "--eval-metrics-max-problems", "4", *device]  # fmt: skip
    check.run(part, "chat_sft", check.python(*sft), until)
    summary = read_json(os.path.join(report, "chat_sft.json"))
    value = next((summary[k] for k in ("val_loss", "min_val_loss") if isinstance(summary.get(k), float)), None)
    part["rows"].append({"stage": "chat_sft", "steps": summary.get("step"), "metric": "val_loss", "value": value,
                         "seconds": part["steps"][-1]["seconds"]})  # fmt: skip
    evaluate = ["-m", "scripts.chat_eval", "-i", "sft", "-g", tag, "-a", "GSM8K", "-x", "4", "-m", "16",
                "--data-dir", check.data_dir, *device]  # fmt: skip
    check.run(part, "chat_eval", check.python(*evaluate), until)
    gsm8k = read_json(os.path.join(report, "chat_eval_sft.json"))["tasks"]["GSM8K"]
    part["rows"].append({"stage": "chat_eval GSM8K", "steps": gsm8k["problems"], "metric": "accuracy",
                         "value": gsm8k["accuracy"], "seconds": part["steps"][-1]["seconds"]})  # fmt: skip
    chat = ["-m", "scripts.chat_cli", "--source", "sft", "--model-tag", tag, "--temperature", "0", "--max-tokens",
            "16", "-p", "What is 2 + 3?", *device]  # fmt: skip
    answer = check.run(part, "chat_cli", check.python(*chat), until).strip()
    part["answer"] = answer[-300:]
    part["rows"].append({"stage": "chat_cli", "steps": 1, "metric": "output_chars", "value": len(answer),
                         "seconds": part["steps"][-1]["seconds"]})  # fmt: skip


# ---------------------------------------------------------------------------- markdown


def render_markdown(results: dict) -> str:
    def cell(column: str, value) -> str:
        if isinstance(value, float):
            if column in PERCENT_COLUMNS:
                return f"{value:.1%}"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return "-" if value is None else str(value)

    lines = [f"# gpu_check ({results['mode']}, commit {results['commit']}, {results['started']})", ""]
    hardware = results.get("hardware")
    if hardware:
        lines += [f"Device: {hardware['device']}, torch {hardware['torch']}.", ""]
    for name, part in results["parts"].items():
        lines.append(f"## {name}: {part['status']} in {part.get('seconds', '-')} s (limit {part['limit_s']} s)")
        if "error" in part:
            lines.append(f"\nError: {part['error']}")
        for key in ("compiled", "peak_flops_source", "answer"):
            if key in part:
                lines.append(f"\n{key}: {part[key]!r}")
        if part["rows"]:
            columns = list(part["rows"][0])
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in part["rows"]]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out", help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same parts and code paths")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="setup always runs")
    parser.add_argument("--budget-s", type=float, default=None, help="total seconds (default: the parts' limits)")
    parser.add_argument(
        "--recipe",
        action="append",
        default=None,
        help="NAME=EXTRA_ARGS for bench_train_step, repeatable (default: today=, the current recipe)",
    )
    parser.add_argument("--wheels", default=None, help="install the wheels in this folder first (GPU machine)")
    parser.add_argument("--prepare-wheels", metavar="DIR", default=None, help="build/download the wheels and exit")
    args = parser.parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels)
    if args.recipe is None:
        args.recipe = ["today="]
    if args.budget_s is None:
        args.budget_s = sum(SIZES["dry" if args.dry_run else "gpu"]["limits"].values())
    args.site = install_wheels(args.wheels) if args.wheels else None
    if args.site:
        sys.path.insert(0, args.site)

    check = Check(args)
    print(f"gpu_check: {check.results['mode']}, work dir {check.work}, results in {check.out}", flush=True)
    bodies = {"train": part_train, "engine": part_engine, "server": part_server, "smoke": part_smoke}
    try:
        check.part("setup", lambda part, until: part_setup(check, part, until))
        for name in PARTS[1:]:
            if name in args.parts:
                check.part(name, lambda part, until, body=bodies[name]: body(check, part, until))
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
    print(render_markdown(check.results))
    failed = [name for name, part in check.results["parts"].items() if part["status"] != "ok"]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} did not pass; see {check.out}/gpu_check.md")


if __name__ == "__main__":
    sys.path.insert(0, REPO)  # run as a file (python3 dev/gpu_check.py): the repo's packages come from its root
    main()
