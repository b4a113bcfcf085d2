"""Ablation of the 2026 recipe's parts on CPU (issue 14): each part alone on today's recipe, the full new recipe,
and the full recipe with each part removed, at the same token budget, several seeds per arm.

Every run is a real `scripts.base_train` process (one torch thread) trained from scratch on the shards and the
tokenizer under $NANOCHAT_BASE_DIR; results go to a JSON file as each run finishes, so an interrupted ablation
resumes where it stopped (finished runs are skipped). Run it from a clean checkout of the commit under test (a
`git worktree`), so edits in progress elsewhere never leak into a run.

    NANOCHAT_BASE_DIR=/tmp/ablate_base python -m dev.ablate --depth 4 --steps 60 --seeds 1 2 3 --jobs 2 \\
        --out dev/ablate_d4.json            # then: python -m dev.ablate --out dev/ablate_d4.json --table

Per arm: final validation bits per byte (mean, min-max over seeds), training tokens per second (wall clock of
the training steps, from base_train's summary), CPU seconds of the whole process and its peak resident memory.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

# Each part as the base_train flags that turn it (on, off): the new recipe is every part on, the classic one every
# part off, whatever base_train's defaults are.
PARTS = {
    "value_embeds": (["--value-embeds"], ["--no-value-embeds"]),
    "resid_scalars": (["--resid-scalars"], ["--no-resid-scalars"]),
    "window": (["--window-pattern", "SSSL"], ["--window-pattern", "L"]),
    "backout": (["--backout"], ["--no-backout"]),
    "tuned_init_qk_rope": (
        ["--init", "tuned", "--qk-scale", "1.2", "--rope-base", "100000"],
        ["--init", "classic", "--qk-scale", "1.0", "--rope-base", "10000"],
    ),
    "momentum": (["--momentum-schedule", "tuned"], ["--momentum-schedule", "classic"]),
    "normuon": (["--muon-extras", "normuon"], []),
    "muoneq_plus": (["--muon-extras", "muoneq,muon_plus"], []),
}


def command_line(on: set[str]) -> list[str]:
    """base_train flags with the parts in `on` turned on and every other part off; Muon extras merge into one flag."""
    flags, extras = [], []
    for part, (on_flags, off_flags) in PARTS.items():
        chosen = on_flags if part in on else off_flags
        if chosen[:1] == ["--muon-extras"]:
            extras.append(chosen[1])
        else:
            flags += chosen
    return flags + ["--muon-extras", ",".join(extras)]


def arms(names: list[str]) -> dict[str, list[str]]:
    """classic, +part for each part, new (all parts), new-part for each part; or just the names asked for."""
    table = {"classic": command_line(set()), "new": command_line(set(PARTS))}
    for part in PARTS:
        table[f"+{part}"] = command_line({part})
        table[f"new-{part}"] = command_line(set(PARTS) - {part})
    if names:
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise SystemExit(f"unknown arms {unknown}; known: {sorted(table)}")
        return {name: table[name] for name in names}
    return table


def run_one(arm: str, flags: list[str], seed: int, args) -> dict:
    tag = f"ablate_d{args.depth}_{arm}_s{seed}".replace("+", "p").replace("-", "m")
    command = [sys.executable, "-m", "scripts.base_train", "--depth", str(args.depth), "--max-seq-len",
               str(args.seq_len), "--device-batch-size", str(args.batch), "--total-batch-size",
               str(args.batch * args.seq_len), "--num-iterations", str(args.steps), "--eval-every", "-1",
               "--eval-tokens", str(args.eval_tokens), "--sample-every", "-1", "--save-every", "-1",
               "--device-type", "cpu", "--seed", str(seed), "--model-tag", tag, *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    done = re.search(r"^done: (\{.*\})$", output, re.M)
    if status != 0 or not done:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{output[-3000:]}")
    summary = json.loads(done.group(1))
    return {"arm": arm, "seed": seed, "flags": flags, "val_bpb": summary["val_bpb"], "tokens": summary["tokens"],
            "tok_per_s": summary["tokens"] / (summary["training_minutes"] * 60), "parameters": summary["parameters"],
            "flops_per_token": summary["flops_per_token"], "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.time() - started}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| arm | seeds | val bpb mean | min-max | vs classic | train tok/s | CPU s | peak RSS MiB | params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    base = statistics.mean(r["val_bpb"] for r in by_arm["classic"]) if "classic" in by_arm else None
    for arm, runs in by_arm.items():
        bpb = [r["val_bpb"] for r in runs]
        mean = statistics.mean(bpb)
        delta = f"{(mean / base - 1) * 100:+.2f}%" if base else "-"
        lines.append(f"| {arm} | {len(runs)} | {mean:.4f} | {min(bpb):.4f}-{max(bpb):.4f} | {delta} | "
                     f"{statistics.mean(r['tok_per_s'] for r in runs):,.0f} | "
                     f"{statistics.mean(r['cpu_s'] for r in runs):,.0f} | "
                     f"{max(r['peak_rss_mib'] for r in runs):,.0f} | {runs[0]['parameters']:,} |")  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (no accumulation)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps: the same token budget for every arm")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored at the end")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="*", default=[], help="default: every arm")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one torch thread each)")
    parser.add_argument("--out", required=True, help="results JSON (read first: finished runs are skipped)")
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    args = parser.parse_args()

    results = json.load(open(args.out)) if os.path.exists(args.out) else []
    if not args.table:
        done = {(r["arm"], r["seed"]) for r in results}
        todo = [(arm, flags, seed) for seed in args.seeds for arm, flags in arms(args.arms).items()
                if (arm, seed) not in done]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in as_completed([pool.submit(run_one, *job, args) for job in todo]):
                result = future.result()
                results.append(result)
                with open(args.out + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
                print(f"{result['arm']} seed {result['seed']}: bpb {result['val_bpb']:.4f}, "
                      f"{result['tok_per_s']:,.0f} tok/s", flush=True)  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
