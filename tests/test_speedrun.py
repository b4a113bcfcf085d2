"""speedrun.sh end to end: the CPU profile, offline on the shared datasets, in a throwaway base dir (~6 min, 2 cores).

Setup is skipped (NANOCHAT_SKIP_SETUP=1: CI already ran it). Checks the report card, that the SFT model answers
in the terminal and behind the web server, that a second run skips every stage in a fraction of the time and keeps
the first run's stage times, and that an interrupted stage is resumed from its checkpoint by a third run.
Prints the per-stage wall times of the first run.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import SHARED_DATA, require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [
    "data", "tok_train", "tok_eval", "base_train", "base_loss", "base_eval",
    "mid_train", "chat_eval_mid", "chat_sft", "chat_eval_sft",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def speedrun(env) -> tuple[str, float]:
    start = time.time()
    result = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    assert result.returncode == 0, f"speedrun.sh failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result.stdout, seconds


@pytest.mark.slow
def test_speedrun_cpu_offline(tmp_path):
    require(os.path.join(SHARED_DATA, "pretrain"))
    base = tmp_path / "base"
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "NANOCHAT_DATA_DIR": SHARED_DATA,
        "NANOCHAT_PROFILE": "cpu",
        "NANOCHAT_SKIP_SETUP": "1",
    }
    env.pop("NANOCHAT_RL", None)

    # First run: every stage runs.
    out, first = speedrun(env)
    times = json.loads((base / "report" / "times.json").read_text())
    print(f"\nfirst run: {first:.0f} s")
    for stage, seconds in times.items():
        print(f"  {stage:<16} {seconds:>5.0f} s")
    assert sorted(times) == sorted(STAGES)
    assert "chat_cli" in out and "chat_web" in out  # says how to chat afterwards

    # The report card: every section and the summary table.
    # Sections and plots as nanochat/report.py's docstring lists them (RL is off by default, so absent).
    report = (base / "report" / "report.md").read_text()
    headings = re.findall(r"^#{1,2} .*$", report, re.MULTILINE)
    expected = ["# nanochat report card", "## Environment", "## Tokenizer", "## Base model", "## Midtraining",
                "## SFT", "## Chat evaluation", "## Summary"]  # fmt: skip
    assert [h for h in headings if h in expected] == expected, headings
    for plot in ["base_train", "mid_train", "chat_sft", "chat_eval_mid", "chat_eval_sft"]:
        assert (base / "report" / f"{plot}.png").exists(), f"no {plot}.png"
        assert f"{plot}.png" in report, f"report.md does not show {plot}.png"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every plot it lists exists
        assert (base / "report" / image).exists(), image

    # The SFT model answers in the terminal...
    python = sys.executable
    cli = subprocess.run(
        [python, "-m", "scripts.chat_cli", "-p", "Hello", "--source", "sft", "--device-type", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip()

    # ... and behind the web server.
    port = free_port()
    server = subprocess.Popen(
        [python, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline, ready = time.time() + 90, False
        while time.time() < deadline and not ready and server.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("ready", False)
            except httpx.HTTPError:
                time.sleep(0.5)
        assert ready, f"chat_web never became ready: {server.stderr.read() if server.poll() is not None else ''}"
    finally:
        server.terminate()
        server.wait(timeout=30)

    # Second run: everything is done, so it only checks and skips.
    out, second = speedrun(env)
    print(f"second run: {second:.0f} s")
    for stage in STAGES:
        assert f"speedrun: skip {stage}" in out, f"{stage} was not skipped"
    assert second < 0.25 * first
    assert json.loads((base / "report" / "times.json").read_text()) == times  # skips keep the real times

    # Third run after an interruption: SFT lost its last checkpoint and never wrote its summary; it resumes.
    for path in glob.glob(str(base / "chatsft_checkpoints" / "d4" / "*_000030*")):
        os.remove(path)
    os.remove(base / "report" / "chat_sft.json")
    out, _ = speedrun(env)
    assert re.search(r"speedrun: chat_sft: .* --resume", out), out[-3000:]
    assert json.loads((base / "report" / "chat_sft.json").read_text())["step"] == 30
