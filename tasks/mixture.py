"""Chat mixtures: the named components the chat stages train on, how each one loads, and the stages' flags.

Contract: `build_mixture(names, split, sources, recipe)` loads each component (`COMPONENTS`) for `split`
("train" or "val"; some have no held-out split) into one `TaskMixture` (shuffled, seed 42) plus its
[(name, rows)]. Components that cannot load raise one `MixtureError` naming them and the `--mixture` that
leaves them out, or with `drop_failing` (a default mixture from a local data dir) are left out and printed.
`recipe` sizes them: {name: {"epochs": n (listed n times), "size": n (generated spelling examples), "stop": n
(the first n rows)}}. `add_mixture_flags` / `load_stage_mixtures`: what mid_train and chat_sft share.
Your own data (SFT): `--data FILE` alone trains on the file alone; `--mixture default` (the stage's recipe) or
named components with `--data` mix it in, `--data-epochs N` times. Its validation rows are held out of the file
(tasks/customjson.py: 5%, at least 4) unless `--val-data FILE` gives them; `user_validation` returns them.
Not here: batching and losses (nanochat/chat_data.py), the recipes themselves (each stage script).
"""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import get_base_dir, print0
from nanochat.dataset import DatasetError
from tasks.common import Task, TaskMixture, resolve_data_dir


class MixtureError(DatasetError):
    """A mixture component cannot be loaded; the message says which and how to leave it out."""


@dataclass(frozen=True)
class Sources:
    """Where components read from: a local data dir (None = the Hugging Face hub), the identity file, user data
    (and its validation file; None = held out of user_data)."""

    data_dir: str | None = None
    identity_path: str | None = None
    user_data: str | None = None
    user_val_data: str | None = None


# name -> what it teaches; the loading is in component_tasks
COMPONENTS = {
    "smoltalk": "SmolTalk general chat (hub only; val: its test split)",
    "mmlu-aux": "MMLU auxiliary_train multiple choice (hub only; val: MMLU test, first 5,200)",
    "gsm8k": "GSM8K train with calculator tool calls (val: GSM8K test, first 420)",
    "arc": "ARC-Easy and ARC-Challenge train, multiple choice (val: their validation splits)",
    "identity": "identity conversations, CustomJSON (no val split)",
    "simplespelling": "SimpleSpelling: spell a word letter by letter (val: its test split)",
    "spelling": "SpellingBee: count letters, check with the python tool (val: its test split)",
    "data": "your own conversations from --data PATH.jsonl, CustomJSON (val: held out, or --val-data)",
}
VAL_SPELLING_SIZE = 1000  # generated held-out spelling examples; the val loaders only read the first tokens


def component_tasks(name: str, split: str, sources: Sources, size: int = 1000, stop: int | None = None) -> list[Task]:
    """The tasks of one component for `split` ("train" or "val"); [] when it has no held-out split."""
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee

    train, data_dir = split == "train", sources.data_dir
    if name == "smoltalk":
        return [SmolTalk("train" if train else "test", stop=stop if train else None)]
    if name == "mmlu-aux":
        if train:
            return [MMLU("auxiliary_train", "train", data_dir=data_dir, stop=stop)]  # hub only: errors with a data dir
        return [MMLU("all", "test", data_dir=data_dir, stop=5200)]
    if name == "gsm8k":
        return [GSM8K("main", "train" if train else "test", data_dir=data_dir, stop=stop if train else 420)]
    if name == "arc":
        arc_split = "train" if train else "validation"
        return [ARC(subset, arc_split, data_dir=data_dir, stop=stop) for subset in ("ARC-Easy", "ARC-Challenge")]
    if name == "simplespelling":
        return [SimpleSpelling(size if train else VAL_SPELLING_SIZE, "train" if train else "test", data_dir)]
    if name == "spelling":
        return [SpellingBee(size if train else VAL_SPELLING_SIZE, "train" if train else "test", data_dir)]
    if name == "identity":
        if sources.identity_path is None or not os.path.exists(sources.identity_path):
            raise FileNotFoundError(f"no conversations file at {sources.identity_path!r}")
        return [CustomJSON(sources.identity_path, stop=stop)] if train else []
    if name == "data":
        if train:
            return [CustomJSON(sources.user_data, "all" if sources.user_val_data else "train", stop=stop)]
        held_out = CustomJSON(sources.user_val_data or sources.user_data, "all" if sources.user_val_data else "val")
        return [held_out] if len(held_out) else []
    raise ValueError(f"unknown mixture component {name!r}; the components are {', '.join(COMPONENTS)}")


def build_mixture(names, split: str, sources: Sources, recipe: dict, seed: int = 42, drop_failing: bool = False):
    tasks, rows, failures = [], [], []
    for name in names:
        options = recipe.get(name, {})
        try:
            component = component_tasks(name, split, sources, options.get("size", 1000), options.get("stop"))
        except Exception as e:  # hub, file and format errors all mean the same thing here: it cannot be used
            if name == "data":  # but the user's own file is never left out: its bad lines, one per line
                raise MixtureError(str(e)) from e
            failures.append((name, f"  {name} ({COMPONENTS.get(name, '?')}): {type(e).__name__}: {e}"))
            continue
        epochs = options.get("epochs", 1) if split == "train" else 1
        tasks += component * epochs
        rows.append((name, sum(len(task) for task in component) * epochs))
    if failures and drop_failing:
        print0(f"mixture: left out (not available from {sources.data_dir}): {', '.join(n for n, _ in failures)}")
    elif failures:
        kept = ",".join(name for name, _ in rows) or "<components that load>"
        raise MixtureError(
            f"{len(failures)} mixture component(s) cannot be loaded for {split}:\n"
            + "\n".join(line for _, line in failures)
            + f"\nLeave them out with --mixture {kept}, or make their data reachable"
        )
    if not rows:
        raise MixtureError(f"no mixture component could be loaded for {split}; check --data-dir and --mixture")
    return TaskMixture(tasks, seed=seed), rows


def describe_mixture(title: str, rows: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in rows)
    lines = [f"{title}: {total:,} conversations"]
    lines += [f"  {name:<15} {n:>9,} {n / max(1, total):>7.1%}" for name, n in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the chat stages' flags and data


def add_mixture_flags(parser: argparse.ArgumentParser, allowed: list[str], user_data: bool = False) -> None:
    """--mixture (checked as it is parsed), --data-dir, --identity, and with `user_data` SFT's --data flags."""
    allowed = ["default", *allowed, *(["data"] if user_data else [])]

    def names(text: str) -> list[str]:  # comma-separated, in order, each known to the stage and listed once
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not (names or user_data):
            choices = ",".join(allowed)
            raise argparse.ArgumentTypeError(f"unknown mixture component(s) {unknown}; choose among {choices}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a mixture component is listed twice in {text!r}")
        return names

    alone = ", or --data alone" if user_data else ""
    parser.add_argument("--mixture", type=names, default=None, help="components, comma-separated; 'default' = the "
                        f"stage's recipe (default: the recipe{alone})")  # fmt: skip
    if user_data:
        parser.add_argument("--data", default=None, help="your conversations, JSONL (alone unless --mixture)")
        parser.add_argument("--val-data", default=None, help="your validation conversations, JSONL "
                            "(default: held out of --data, 5%% and at least 4)")  # fmt: skip
        parser.add_argument("--data-epochs", type=int, default=1, help="times --data is listed in the mixture")
    parser.add_argument("--data-dir", default=None, help="local data dir (default: $NANOCHAT_DATA_DIR, else hub)")
    parser.add_argument("--identity", default=None, help="identity JSONL (default: <data dir>/chat/ or <base dir>/)")


def user_validation(args) -> Task | None:
    """The validation conversations of --data (held out of it, or --val-data), None without any."""
    if not getattr(args, "data", None):
        return None
    held_out = component_tasks("data", "val", Sources(user_data=args.data, user_val_data=args.val_data))
    return held_out[0] if held_out else None


def load_stage_mixtures(args, recipe: dict) -> tuple[TaskMixture, list, TaskMixture | None, str | None]:
    """(train mixture, its [(name, rows)], validation mixture or None, data dir) from add_mixture_flags' args.

    Checked before a stage's first step: --data must hold conversations; a mixture with no held-out rows at all
    (identity has no validation split) gives None, and the stage skips validation.
    """
    data_dir, user_data = resolve_data_dir(args.data_dir), getattr(args, "data", None)
    val_data, data_epochs = getattr(args, "val_data", None), getattr(args, "data_epochs", 1)
    for flag, path in (("--data", user_data), ("--val-data", val_data)):
        if path and not (os.path.isfile(path) and Path(path).read_bytes().strip()):
            raise MixtureError(f"{flag} {path} holds no conversations: give a JSONL file, one conversation a line")
    if val_data and not user_data:
        raise MixtureError("--val-data is the validation of --data: give --data FILE.jsonl too")
    if data_epochs < 1:
        raise MixtureError(f"--data-epochs must be >= 1, got {data_epochs}")
    # identity: <data dir>/chat/ (the offline layout), else <base dir>/ (the reference layout)
    identity_dir = os.path.join(data_dir, "chat") if data_dir is not None else get_base_dir()
    identity = args.identity or os.path.join(identity_dir, "identity_conversations.jsonl")
    sources = Sources(data_dir, identity, user_data, val_data)
    # --data alone: the file alone; --mixture default (or components) with --data: mixed in
    chosen = args.mixture if args.mixture is not None else ([] if user_data else ["default"])
    names = [part for name in chosen for part in (list(recipe) if name == "default" else [name])]
    names = list(dict.fromkeys(names + (["data"] if user_data else [])))
    if not names or ("data" in names and not user_data):
        raise MixtureError("nothing to train on: --mixture data (or '') needs --data FILE.jsonl")
    drop = "default" in chosen and data_dir is not None  # the default recipe keeps what a local data dir holds
    recipe = {**recipe, "data": {"epochs": data_epochs}}
    train_mixture, train_rows = build_mixture(names, "train", sources, recipe, drop_failing=drop)
    val_mixture, val_rows = build_mixture([name for name, _ in train_rows], "val", sources, recipe)
    print0(describe_mixture("train mixture", train_rows))
    if user_data:
        trained, held_out = dict(train_rows)["data"] // data_epochs, dict(val_rows).get("data", 0)
        where = f"--val-data {val_data}" if val_data else "held out of the file (5%, at least 4; --val-data to choose)"
        print0(f"--data {user_data}: {trained:,} conversations train (x{data_epochs} epochs), "
               f"{held_out:,} validate, {where}")  # fmt: skip
    if len(val_mixture) == 0:
        print0(f"validation mixture: none ({', '.join(names)} have no held-out rows); validation is skipped")
        return train_mixture, train_rows, None, data_dir
    print0(describe_mixture("validation mixture", val_rows))
    return train_mixture, train_rows, val_mixture, data_dir
