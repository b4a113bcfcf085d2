"""The report card's raw material: every stage's summary, as JSON under <base dir>/report/.

Contract: `write_stage_summary(stage, summary)` writes <base dir>/report/<stage>.json atomically (a crash never
leaves half a file) and returns its path; values that JSON lacks (paths, dtypes) are written as strings.
Stages call it from rank 0 only.

Not here yet: assembling report.md with its header, tables and plots from these files (the report card).
"""

import json
import os

from nanochat.common import atomic_write, get_base_dir


def report_dir() -> str:
    return os.path.join(get_base_dir(), "report")


def write_stage_summary(stage: str, summary: dict) -> str:
    os.makedirs(report_dir(), exist_ok=True)
    path = os.path.join(report_dir(), f"{stage}.json")
    text = json.dumps(summary, indent=2, default=str).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
    return path
