"""Sandbox throughput: how many `execute_code` runs per second, one at a time and from a thread pool.

Each run is a fresh interpreter plus namespace setup, so this measures the fixed cost a HumanEval evaluation
pays per sample. It does not measure the programs themselves (the benchmark program is trivial).

    python -m dev.bench_execution                      # defaults: 200 runs, 1 and nproc threads
    python -m dev.bench_execution --runs 50 --threads 1
"""

import argparse
import concurrent.futures
import os
import platform
import sys
import time

from nanochat.execution import execute_code

PROGRAM = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n"


def executions_per_second(runs: int, threads: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda _: execute_code(PROGRAM, timeout=10), range(runs)))
    elapsed = time.perf_counter() - started
    failures = [result.error for result in results if not result.success]
    assert not failures, failures[:3]
    return runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="executions per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()], help="thread pool sizes")
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, {platform.platform()}, {os.cpu_count()} CPUs, euid {os.geteuid()}")
    execute_code(PROGRAM)  # warm the page cache for the interpreter and stdlib
    for threads in args.threads:
        rate = executions_per_second(args.runs, threads)
        print(f"threads={threads:3d}  runs={args.runs}  {rate:7.1f} executions/s  {1000 / rate * threads:6.1f} ms each")


if __name__ == "__main__":
    main()
