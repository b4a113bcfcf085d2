"""Run README.md's "Your first hour on a CPU" commands exactly as written, one after another, and time each one.

    NANOCHAT_DATA_DIR=../shared/data python -m dev.readme_first_hour --base-dir /tmp/first_hour

The `export` and `bash setup.sh` lines are the reader's setup: the base dir comes from --base-dir (it must not
exist yet, so nothing of the reader's is touched), the data dir from the environment, and the venv is this one.
Prints a markdown table (command, wall seconds, exit status, whether a progress line with an ETA was shown) for
dev/BENCHMARKS.md; stops at the first failing command and shows its output.
"""

import argparse
import os
import re
import subprocess
import sys
import time

SECTION = "## Your first hour on a CPU"


def readme_commands(path: str) -> list[str]:
    text = open(path).read()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith(("export ", "bash setup.sh"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", required=True, help="a new directory for every artifact of the run")
    args = parser.parse_args()
    if os.path.exists(args.base_dir):
        raise SystemExit(f"--base-dir {args.base_dir} exists; give a new directory")
    if not os.environ.get("NANOCHAT_DATA_DIR"):
        raise SystemExit("set NANOCHAT_DATA_DIR to the offline data directory (README: Offline)")
    env = {**os.environ, "NANOCHAT_BASE_DIR": os.path.abspath(args.base_dir)}
    rows = ["| command | wall s | exit | progress with ETA |", "|---|---:|---:|---|"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for command in readme_commands(os.path.join(repo, "README.md")):
        started = time.time()
        result = subprocess.run(["bash", "-c", command], env=env, cwd=repo, capture_output=True, text=True)
        seconds = time.time() - started
        output = result.stdout + result.stderr
        rows.append(f"| `{command[:90]}{'...' if len(command) > 90 else ''}` | {seconds:,.0f} | {result.returncode} | "
                    f"{'yes' if 'ETA' in output else 'no'} |")  # fmt: skip
        print(rows[-1], flush=True)
        if result.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            break
    print("\n".join(rows))


if __name__ == "__main__":
    main()
