"""dev/gpu_check.py --dry-run: every part of the GPU check runs on the CPU at tiny sizes through the same code
paths, and the JSON and markdown it writes hold every part with real numbers, so the check cannot rot between
GPU leases. Also: a part that fails is recorded with its output and does not stop the parts after it."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

PART_COLUMNS = {  # part -> the columns that must be positive numbers in every row
    "setup": ["copy_GB_per_s", "matmul_TFLOP_per_s", "vocab_size"],
    "train": ["params_M", "tokens_per_s", "mfu", "step_s"],
    "engine": ["prefill_tokens_per_s", "decode_tokens_per_s", "MB_per_step", "roofline_tokens_per_s", "of_roofline"],
    "server": ["aggregate_tokens_per_s", "tokens", "ttft_p50_ms", "ttft_p95_ms"],
    "smoke": ["seconds"],
}


def run_check(out, *args, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("NANOCHAT_DATA_DIR", None)  # the synthetic data, so the test needs no data directory
    command = [sys.executable, "dev/gpu_check.py", "--dry-run", "--out", str(out), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dry_run_writes_every_part_with_numbers(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["mode"] == "dry-run" and results["hardware"]["device"] == "cpu"
    assert list(results["parts"]) == list(PART_COLUMNS)
    for name, columns in PART_COLUMNS.items():
        part = results["parts"][name]
        assert part["status"] == "ok" and part["seconds"] <= part["limit_s"] + 1, (name, part)
        assert part["rows"], name
        for row in part["rows"]:
            for column in columns:
                value = row[column]
                assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, column, row)
    rows = {name: part["rows"] for name, part in results["parts"].items()}
    assert [r["batch"] for r in rows["engine"]] == [1, 2] and {r["path"] for r in rows["engine"]} == {"eager"}
    assert [r["clients"] for r in rows["server"]] == [1, 2, 4] and all(r["errors"] == 0 for r in rows["server"])
    assert results["parts"]["train"]["peak_flops_source"] == "measured matmul"  # a CPU is not in gpu_peaks
    assert [r["stage"] for r in rows["smoke"]] == ["base_train", "chat_sft", "chat_eval GSM8K", "chat_cli"]
    smoke = {r["stage"]: r for r in rows["smoke"]}
    assert smoke["base_train"]["value"] > 0 and smoke["chat_sft"]["value"] > 0  # val bpb, val loss
    assert 0 <= smoke["chat_eval GSM8K"]["value"] <= 1 and smoke["chat_eval GSM8K"]["steps"] == 4
    assert smoke["chat_cli"]["value"] > 0  # what it printed: header and reply
    markdown = (tmp_path / "gpu_check.md").read_text()
    for name in PART_COLUMNS:
        assert f"## {name}: ok" in markdown
    assert "| eager | 2 | 1 |" in markdown and "| today | 2 |" in markdown


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    """An impossible budget: setup runs out of time, the part asked for after it is recorded as skipped, the
    command exits non-zero naming them, and the JSON and markdown are still written."""
    done = run_check(tmp_path, "--budget-s", "1", "--parts", "engine")
    assert done.returncode != 0 and "did not pass" in done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    setup = results["parts"]["setup"]
    assert setup["status"] == "failed" and "timed out" in setup["error"] and setup["steps"][0]["status"] == "timeout"
    assert results["parts"]["engine"]["status"] == "skipped" and "train" not in results["parts"]
    assert "## setup: failed" in (tmp_path / "gpu_check.md").read_text()
