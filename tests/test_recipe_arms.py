"""The ablation's arms and the d24 paper estimate build the models they claim to (dev/ablate.py,
dev/estimate_speedrun.py): no training, configs on the meta device."""

import dataclasses

from dev import ablate, estimate_speedrun
from nanochat.gpt import GPTConfig
from scripts.base_train import model_config, parse_args

PART_FIELDS = ("value_embeds", "resid_scalars", "backout", "window_pattern", "qk_scale", "rope_base", "init")


def parts(flags: list[str]) -> dict:
    args = parse_args(["--depth", "4", "--max-seq-len", "512", *flags])
    config = model_config(args, 4096)
    optimizer = {"muon": args.muon_extras, "momentum": args.momentum_schedule}
    return {**{f: getattr(config, f) for f in PART_FIELDS}, **optimizer}


def test_classic_arm_is_the_classic_model_and_new_arm_is_the_default():
    classic = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in PART_FIELDS}
    assert parts(ablate.arms(["classic"])["classic"]) == {**classic, "muon": "", "momentum": "classic"}
    assert parts(ablate.arms(["new"])["new"]) == parts([])  # base_train's defaults are the full new recipe


def test_each_arm_differs_from_its_base_in_its_own_part_only():
    table, classic, new = ablate.arms([]), parts(ablate.arms(["classic"])["classic"]), parts([])
    for part in ablate.PARTS:
        added, removed = parts(table[f"+{part}"]), parts(table[f"new-{part}"])
        assert added != classic and removed != new, part
        assert {k for k in added if added[k] != classic[k]} == {k for k in removed if removed[k] != new[k]}, part


def test_d24_estimate_matches_the_references_published_step_count(capsys):
    # karpathy/nanochat's d24 speedrun at ratio 8 logs 5,568 steps of 2^20 tokens (PR #853).
    estimate_speedrun.main(["--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16"])
    out = capsys.readouterr().out
    assert "5,568 steps x 1,048,576 tokens = 5.84B tokens" in out and "h on 8xH100 at 50% MFU" in out
