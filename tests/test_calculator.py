"""Tests for the calculator in nanochat/execution.py (the engine's `<|python_start|>` tool): valid, malicious and
huge expressions. Apart from tests/test_execution.py because it needs no sandbox: these run on every machine."""

import concurrent.futures
import time

import pytest

from nanochat.execution import use_calculator


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2", 3),
        ("12/60", 0.2),
        ("(3 + 4) * 5 - 1", 34),
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("-3.5 + 1", -2.5),
        ("1,200 * 3", 3600),
        ("1,000,000 / 4", 250000.0),
        ("2 ** -2", 0.25),
        ('"strawberry".count("r")', 3),
        ("'a,b,c'.count(',')", 2),
        ("  42  ", 42),
    ],
)
def test_calculator_valid(expression, expected):
    assert use_calculator(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "(1).__class__",
        "().__class__.__bases__[0].__subclasses__()",
        "'abc'.upper()",
        "'abc'.count('a', 1)",
        "(lambda: 1)()",
        "[x for x in range(10)]",
        "{1: 2}",
        "x + 1",
        "open('/etc/passwd').read()",
        "9**9**9",
        "10**10**10",
        "2**100000",
        "'a' * 10**9",
        "10.0 ** 400",
        "1e308 * 10",
        "(-8) ** 0.5",
        "1 / 0",
        "1 // 0",
        "5 % 0",
        "True + 1",
        "(" * 500 + "1" + ")" * 500,
        "-" * 999 + "1",
        "1 + " * 400 + "1" + " " * 2000,
        "1,2",
        "",
        "1 +",
    ],
)
def test_calculator_refuses_quickly(expression):
    started = time.perf_counter()
    assert use_calculator(expression) is None
    assert time.perf_counter() - started < 0.1


def test_calculator_from_many_threads():
    expressions = [(f"{i} * {i} + {i} // 3", i * i + i // 3) for i in range(2000)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(use_calculator, [expression for expression, _ in expressions]))
    assert answers == [expected for _, expected in expressions]
