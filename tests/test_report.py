"""nanochat/report.py: the report card from every stage's summary, absent and corrupt stages, and a real stage's."""

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_base_dir
from nanochat import report
from nanochat.report import write_stage_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


def curve(n, start, end):
    return [[step, start + (end - start) * step / n] for step in range(0, n + 1, max(1, n // 10))]


def chat_eval(source, offset, with_chatcore=True, problems=100):
    """Accuracy of task i = offset + i / 100, so every cell of the summary table is distinct."""
    tasks = {
        name: {"name": name, "problems": problems, "accuracy": offset + i / 100, "centered": offset + i / 100 - 0.1,
               "baseline": BASELINES[name]}
        for i, name in enumerate(CHAT_TASKS)
    }  # fmt: skip
    return {"source": source, "model": "d4", "step": 7, "chatcore": offset + 0.5 if with_chatcore else None,
            "tasks": tasks}  # fmt: skip


def write_every_stage():
    write_stage_summary("tok_train", {"vocab_size": 65536, "train_chars": 2_000_000_000, "train_seconds": 75.5})
    write_stage_summary(
        "tok_eval",
        {
            "vocab_size": 65536,
            "encoders": ["ours"],
            "results": {"prose": {"bytes": 400, "ours": {"bytes_per_token": 4.83}}},
        },
    )
    write_stage_summary(
        "base_train",
        {
            "val_bpb": 0.8123,
            "min_val_bpb": 0.8101,
            "steps": 100,
            "depth": 4,
            "parameters": 12345678,
            "mfu": 0.45,
            "training_minutes": 3.0,
            "train_loss_curve": curve(100, 9.0, 3.0),
            "val_bpb_curve": curve(100, 2.5, 0.81),
        },
    )
    write_stage_summary("base_loss", {"train_bpb": 0.801, "val_bpb": 0.8123, "samples": ["The sky is blue"]})
    write_stage_summary("base_eval", {"core": 0.2219, "tasks": {"hellaswag_zeroshot": 0.26, "arc_easy": 0.5}})
    write_stage_summary(
        "mid_train",
        {
            "val_bpb": 0.41,
            "steps": 30,
            "training_minutes": 1.0,
            "train_loss_curve": curve(30, 2.0, 1.2),
            "val_bpb_curve": curve(30, 0.6, 0.41),
        },
    )
    write_stage_summary(
        "chat_sft",
        {
            "val_loss": 1.1,
            "steps": 20,
            "training_minutes": 0.5,
            "train_loss_curve": curve(20, 1.5, 1.0),
            "val_loss_curve": curve(20, 1.3, 1.1),
        },
    )
    write_stage_summary(
        "chat_rl",
        {
            "steps": 3,
            "mean_reward_by_step": [0.1, 0.2, 0.3],
            "training_minutes": 0.2,
            "pass_at_k": {"pass@1": 0.3},
            "config": {"lr": 1},
        },
    )
    for source, offset in (("mid", 0.10), ("sft", 0.20), ("rl", 0.30)):
        write_stage_summary(f"chat_eval_{source}", chat_eval(source, offset))


def table_rows(text, heading="## Summary"):
    """{first cell: the other cells} of the first table after `heading`."""
    rows = {}
    for line in text.split(heading, 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] not in ("metric", "task") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_HOURLY_COST", raising=False)
    return tmp_path


def test_full_report_has_every_section_table_and_plot(base_dir):
    report.reset()
    write_every_stage()
    report.record_time("base_train", 6000)
    report.record_time("chat_sft", 1300)  # 2 h in all; the idle time between reset and generate does not count
    text = open(report.generate(cost_per_hour=24.0)).read()

    titles = ["# nanochat report card", "## Environment", "## Tokenizer", "## Base model", "## Midtraining",
              "## SFT", "## RL", "## Chat evaluation", "## Summary"]  # fmt: skip
    positions = [text.index(f"\n{title}\n") if title.startswith("##") else text.index(title) for title in titles]
    assert positions == sorted(positions), "sections out of order"
    for fact in ("git commit:", "lines of code:", "Python", "torch", "$24.00/h", "0.8123", "12,345,678", "4.8300"):
        assert fact in text, fact

    rows = table_rows(text)  # base, mid, sft, rl, chance
    assert rows["CORE"] == ["0.2219", "-", "-", "-", "0 (centered)"]
    assert rows["ARC-Easy"] == ["-", "0.1000", "0.2000", "0.3000", "0.2500"]
    assert rows["GSM8K"] == ["-", "0.1300", "0.2300", "0.3300", "0.0000"]
    assert rows["SpellingBee"] == ["-", "0.1500", "0.2500", "0.3500", "0.0000"]
    assert rows["ChatCORE"] == ["-", "0.6000", "0.7000", "0.8000", "0 (centered)"]
    assert set(rows) == {"CORE", *CHAT_TASKS, "ChatCORE"}
    wall = re.search(r"total wall time: ([\d.]+) min", text)
    assert wall and 119 < float(wall.group(1)) < 125
    cost = re.search(r"estimated cost: \$([\d.]+)", text)
    assert cost and 47.9 < float(cost.group(1)) < 50
    assert "training time: 4.7 min" in text
    assert "wall time by stage: base_train 100.0 min, chat_sft 21.7 min" in text
    assert "No sample conversation: no mid, sft or rl checkpoint in the base dir." in text

    for plot in ("base_train", "mid_train", "chat_sft", "chat_rl", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl"):
        path = base_dir / "report" / f"{plot}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot
        assert f"({plot}.png)" in text, plot
    assert not list((base_dir / "report").glob(".*.tmp"))


def test_chance_levels_and_a_caveat_on_few_problems(base_dir):
    write_stage_summary("base_eval", {"core": 0.1, "max_per_task": 8, "tasks": {"piqa": 0.1}})
    write_stage_summary("chat_eval_mid", chat_eval("mid", 0.1))
    write_stage_summary("chat_eval_sft", chat_eval("sft", 0.2, problems=8))
    text = open(report.generate()).read()

    assert table_rows(text, "### chat_eval_sft")["MMLU"] == ["8", "0.2200", "0.2500", "0.1200"]  # problems .. centered
    assert table_rows(text, "### chat_eval_sft")["GSM8K"][2] == "0.0000"
    assert "ARC-Easy 8 problems: ±0.35" in text.split("### chat_eval_sft")[1]  # 1.96 x the largest binomial SE
    assert "problems: ±" not in text.split("### chat_eval_mid")[1].split("###")[0]  # 100 problems: no caveat
    assert "each CORE task 8 problems: ±0.35" in text.split("### base_eval")[1]
    rows = table_rows(text)
    assert rows["MMLU"] == ["-", "0.1200", "0.2200*", "-", "0.2500"] and rows["CORE"][0] == "0.1000*"
    assert rows["ChatCORE"][1:3] == ["0.6000", "0.7000*"] and "\\* from fewer than 100 problems" in text

    figure = report.plot_bars(chat_eval("sft", 0.2)["tasks"], "t", str(base_dir / "bars.png"))
    (chance,) = figure.axes[0].collections  # one dashed segment across each bar, at the task's chance level
    assert [segment[0][1] for segment in chance.get_segments()] == list(BASELINES.values())
    assert [text.get_text() for text in figure.axes[0].texts] == ["n=100"] * 6


def test_sample_conversation_is_the_latest_chat_models_greedy_replies(base_dir, small_tokenizer):
    import shutil

    from nanochat.checkpoint import build_model

    make_base_dir(base_dir, small_tokenizer)  # a random d1 with a 128-token context
    for stage in ("mid_checkpoints", "chatsft_checkpoints"):
        shutil.copytree(base_dir / "base_checkpoints" / "d1", base_dir / stage / "d1")
    model, _ = build_model(str(base_dir / "chatsft_checkpoints" / "d1"))
    tokenizer, expected = small_tokenizer, []
    end, stops = tokenizer.encode_special("<|assistant_end|>"), {tokenizer.encode_special("<|bos|>")}
    ids = [tokenizer.get_bos_token_id()]
    for message in report.SAMPLE_CHAT:  # the slow reference sampler, greedy, up to the context's end
        ids += tokenizer.render_for_completion([{"role": "user", "content": message}])[1:]
        reply = list(model.generate(ids, min(report.SAMPLE_TOKENS, 128 - len(ids)), temperature=0))
        reply = reply[: min([reply.index(t) for t in {end, *stops} if t in reply], default=len(reply))]
        ids += [*reply, end]
        expected += [f"User: {message}", f"Assistant: {tokenizer.decode(reply)}"]

    sample = open(report.generate()).read().split("### Sample conversation", 1)[1]
    assert f"The sft model d1 step 0, greedy (temperature 0), at most {report.SAMPLE_TOKENS} tokens" in sample
    assert "\n".join(expected) in sample

    rl = base_dir / "chatrl_checkpoints" / "d1"
    shutil.copytree(base_dir / "chatsft_checkpoints" / "d1", rl)
    (rl / "model_000000.pt").write_bytes(b"truncated")
    sample = open(report.generate()).read().split("### Sample conversation", 1)[1]
    assert "No sample conversation: the rl model did not load (" in sample and "is corrupt" in sample


def test_paths_are_relative_and_a_rising_sft_train_loss_is_explained(base_dir):
    rising = {"train_loss_curve": curve(30, 3.86, 4.41), "val_loss_curve": curve(30, 2.9, 2.8)}  # issue 16's run
    write_stage_summary("chat_sft", {"source": str(base_dir / "mid_checkpoints" / "d4"), "step": 3, **rising})
    text = open(report.generate()).read()
    assert text.count(str(base_dir)) == 1 and f"- base dir: {base_dir} (the paths below" in text
    assert "- source: mid_checkpoints/d4\n" in text
    assert "Train loss rising is not divergence" in text.split("(chat_sft.png)")[1]  # beside the curve
    write_stage_summary("chat_sft", {"train_loss_curve": curve(30, 4.41, 3.86), "val_loss_curve": curve(30, 2.9, 2.8)})
    assert "Train loss rising" not in open(report.generate()).read()


def test_absent_stages_are_skipped_and_corrupt_ones_reported(base_dir):
    write_stage_summary("base_train", {"val_bpb": 0.9, "train_loss_curve": curve(10, 5, 4)})
    write_stage_summary("chat_eval_sft", chat_eval("sft", 0.2, with_chatcore=False))
    (base_dir / "report" / "mid_train.json").write_text('{"val_bpb": 0.4, "train_lo')  # killed mid-write
    text = open(report.generate()).read()  # no reset header: no crash either

    for absent in ("## Tokenizer", "## SFT", "## RL", "chat_eval_mid", "chat_rl"):
        assert absent not in text, absent
    assert "## Midtraining" in text and "mid_train.json is unreadable (JSONDecodeError" in text
    assert "## Base model" in text and "## Chat evaluation" in text and "## Summary" in text
    assert not (base_dir / "report" / "mid_train.png").exists()
    assert (base_dir / "report" / "base_train.png").read_bytes().startswith(PNG_MAGIC)
    rows = table_rows(text)
    assert rows["CORE"] == ["-", "-", "-", "-", "0 (centered)"]
    assert rows["ARC-Easy"] == ["-", "-", "0.2000", "-", "0.2500"]
    assert rows["ChatCORE"] == ["-", "-", "-", "-", "0 (centered)"]  # not all six tasks counted: no ChatCORE
    assert "total wall time: unknown" in text and "$0.00/h" in text  # CPU: no GPUs, no cost


def test_reset_clears_the_previous_run(base_dir):
    write_every_stage()
    report.generate()
    report.reset()
    assert sorted(p.name for p in (base_dir / "report").iterdir()) == ["header.json"]
    assert "## Base model" not in open(report.generate()).read()


def test_cli_reset_then_generate(base_dir):
    env_run = [sys.executable, "-m", "nanochat.report"]
    subprocess.run([*env_run, "reset"], cwd=REPO, check=True, capture_output=True)
    write_stage_summary("base_eval", {"core": 0.1234, "tasks": {"piqa": 0.3}})
    result = subprocess.run([*env_run, "generate", "--hourly-cost", "10"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (base_dir / "report" / "report.md").read_text()
    assert table_rows(text)["CORE"] == ["0.1234", "-", "-", "-", "0 (centered)"] and "$10.00/h" in text


def test_stage_status_is_speedruns_one_question(base_dir):
    status = report.stage_status
    assert status("base_train", "d4") == "run"
    checkpoints = base_dir / "base_checkpoints" / "d4"
    checkpoints.mkdir(parents=True)
    (checkpoints / "meta_000040.json").write_text("{}")
    assert status("base_train", "d4").startswith("resume: ")  # interrupted: continue it
    assert status("base_train", "d6") == "run"  # another model's checkpoints are not ours
    write_stage_summary("base_train", {"model_tag": "d4", "step": 80})
    assert status("base_train", "d4").startswith("done: ") and status("base_train", "d6") == "run"
    write_stage_summary("base_eval", {"model_tag": "d4", "step": 80, "core": 0.1})
    assert status("base_eval", "d4") == "done: report/base_eval.json for d4 step 80"
    write_stage_summary("base_train", {"model_tag": "d4", "step": 120})  # trained further: evaluate again
    assert status("base_eval", "d4") == "run"
    assert status("chat_eval_sft", "d4") == "run"  # no summary at all
    write_stage_summary("tok_train", {"vocab_size": 4096})
    assert status("tok_train", "anything").startswith("done: ")
    assert status("data", "d4") == "run"
    (base_dir / "base_data").mkdir()
    (base_dir / "base_data" / "val_00000.parquet").write_bytes(b"")
    assert status("data", "d4").startswith("done: ")


def test_cli_status_and_time_do_not_import_torch(base_dir):
    # speedrun.sh asks before every stage: a torch import would cost seconds each time.
    code = (
        "import sys; from nanochat import report; report.main(['status', 'base_train', '--tag', 'd4']); "
        "report.main(['time', 'base_train', '12.5']); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "run"
    assert json.loads((base_dir / "report" / "times.json").read_text()) == {"base_train": 12.5}


def test_chat_eval_partial_runs_merge_into_chatcore(base_dir):
    from scripts.chat_eval import update_report
    from tasks.evaluate import BASELINES, TaskResult

    def results(names, passed):
        return [TaskResult(name, "generative", 10, passed, 0, BASELINES[name]) for name in names]

    update_report("sft", "d4", 7, results(CHAT_TASKS[:3], 10))
    first = json.loads((base_dir / "report" / "chat_eval_sft.json").read_text())
    assert first["chatcore"] is None and list(first["tasks"]) == CHAT_TASKS[:3]
    update_report("sft", "d4", 7, results(CHAT_TASKS[3:], 5))
    merged = json.loads((base_dir / "report" / "chat_eval_sft.json").read_text())
    assert merged["chatcore"] == pytest.approx((3 * 1.0 + 3 * 0.5) / 6)
    update_report("sft", "d4", 8, results(["GSM8K"], 5))  # another checkpoint: starts afresh
    assert list(json.loads((base_dir / "report" / "chat_eval_sft.json").read_text())["tasks"]) == ["GSM8K"]


def test_real_base_train_writes_its_curves(tmp_path, monkeypatch, wiki_docs):
    from nanochat.tokenizer import Tokenizer
    from scripts import base_train

    Tokenizer.train_from_iterator(wiki_docs[:300], 512).save(str(tmp_path / "tokenizer"))
    (tmp_path / "base_data").mkdir()
    pq.write_table(
        pa.table({"text": wiki_docs[:600]}), tmp_path / "base_data" / "shard_00000.parquet", row_group_size=64
    )
    pq.write_table(
        pa.table({"text": wiki_docs[600:660]}), tmp_path / "base_data" / "val_00000.parquet", row_group_size=16
    )
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    base_train.main(["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
                     "--warmup-steps", "0", "--eval-tokens", "1024", "--sample-every", "-1", "--compile", "off",
                     "--num-iterations", "12", "--eval-every", "5"])  # fmt: skip

    summary = json.loads((tmp_path / "report" / "base_train.json").read_text())
    assert [step for step, _ in summary["train_loss_curve"]] == list(range(1, 13))
    assert [step for step, _ in summary["val_bpb_curve"]] == [0, 5, 10, 12]
    assert summary["val_bpb_curve"][-1][1] == summary["val_bpb"] < summary["val_bpb_curve"][0][1]
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 512 and summary["depth"] == 2
    assert summary["parameters"] > 0 and summary.get("mfu") is None  # CPU: no peak to divide by
    text = open(report.generate()).read()
    assert "## Base model" in text and "(base_train.png)" in text
    assert (tmp_path / "report" / "base_train.png").read_bytes().startswith(PNG_MAGIC)
