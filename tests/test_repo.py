"""The repository keeps its promises: CI runs exactly the README's test command."""

import os
import re

from conftest import REPO


def readme_commands() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2 and commands[0] == "bash speedrun.sh"
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert commands[1] in ci_lines, f"CI must run the README's test command {commands[1]!r}"
