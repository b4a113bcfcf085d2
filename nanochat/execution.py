"""Run untrusted, model-written Python (HumanEval completions) in a contained child process, and the
restricted calculator behind the engine's `<|python_start|>` tool.

Contract
- `execute_code(code, ...) -> ExecutionResult`: `code` runs as `__main__` in a fresh interpreter (a new
  process started by `subprocess.Popen`, never a fork of the caller), in a new empty temporary directory that
  is deleted afterwards, with stdin closed, no inherited file descriptors and an environment of just `PATH`
  and `LANG`. `success` is True only when the program exits 0 within every limit; otherwise `error` says why
  (timeout, memory, output limit, exit status, or the last line of the traceback).
- `use_calculator(expression) -> int | float | None`: arithmetic and `"literal".count("literal")`, evaluated
  by walking an `ast` tree ourselves (nothing is `eval`ed), bounded in size and magnitude, thread-safe.
  Anything refused, invalid or undefined (division by zero) gives None.

What the sandbox enforces, and where (Linux)
- Enforced by the kernel in every case: wall-clock limit (the caller SIGKILLs the child's whole process
  group), RLIMIT_CPU, RLIMIT_AS (allocations fail: `MemoryError` -> `memory_exceeded`), RLIMIT_FSIZE,
  RLIMIT_NOFILE, RLIMIT_CORE=0, and an output cap (the caller stops reading and kills the child).
- Enforced when the kernel lets us create namespaces (root, or unprivileged user namespaces enabled): a new
  network namespace (no interfaces up, so no connection anywhere, loopback included) and a new PID namespace
  (the program cannot see or signal the caller or anything else outside; when its init process dies the
  kernel kills every process it spawned, which is how a fork bomb that calls `setsid` is still cleaned up).
- When started as root, the bootstrap drops to user `nobody` before running the program: the program then
  cannot read or write files that `nobody` cannot (e.g. anything under a 0700 root directory such as
  pytest's `tmp_path`), cannot signal root processes, and RLIMIT_NPROC (which the kernel ignores for root)
  caps its process count; that budget is shared by all executions running at once, as all are `nobody`.
  When the interpreter lives where `nobody` cannot read (e.g. a pyenv install under root's home), the bootstrap first
  pre-imports the stdlib modules in `PRELOADED_MODULES` (~50 ms); other imports then fail with
  PermissionError.
- Not root: the program runs as the caller's user, so it can read and write whatever that user can, and
  RLIMIT_NPROC counts all of the user's processes (we set it to the current count plus `max_processes`).
- Fallback when namespaces are unavailable: socket creation is disabled inside the child by replacing the
  `socket` module's constructors. That is NOT a security boundary (ctypes or `_socket` get round it); the
  result's `namespaces` flag tells the caller which case applied.

What it deliberately does not do
- No seccomp, no chroot, no read-only view of the filesystem: world-readable files stay readable.
- No in-process "guard" that deletes `os.kill`, `os.system` and friends: the reference did that and was
  escaped by walking frames back to its saved references (karpathy/nanoGPT#717). Containment here rests on
  the process boundary and the kernel limits above, and the tests attack those directly.
"""

import ast
import dataclasses
import json
import math
import os
import pwd
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
# Sandbox

# Modules the program may import even when the interpreter's files are unreadable to `nobody`: covers every
# import in HumanEval (typing, math, random, copy, string, collections, re, hashlib) and the usual extras,
# plus the system modules a hostile program reaches for, so the tests exercise the kernel's limits rather
# than an accidental PermissionError on import.
PRELOADED_MODULES = (
    "typing collections collections.abc math cmath random copy string re hashlib itertools functools heapq "
    "bisect operator fractions decimal statistics datetime json array dataclasses enum numbers textwrap "
    "unicodedata traceback io struct base64 time socket ctypes subprocess shutil pathlib glob tempfile "
    "encodings.idna encodings.latin_1 encodings.ascii"
).split()

# Runs in the child as `python -I -c BOOTSTRAP <json settings>`, with cwd = the temporary directory.
# Order matters: namespaces need privileges we are about to drop; rlimits go on before anything untrusted runs.
BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
settings = json.loads(sys.argv[1])
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
is_root = os.geteuid() == 0
namespace_flags = CLONE_NEWNET | CLONE_NEWPID | (0 if is_root else CLONE_NEWUSER)
network_isolated = libc.unshare(namespace_flags) == 0
report = os.fdopen(settings["report_fd"], "w")  # to the caller: which walls are up, and the program's pid
report.write(json.dumps({"namespaces": network_isolated}) + "\n")
report.flush()
for name in settings["preload"]:
    try:
        __import__(name)
    except ImportError:
        pass
import traceback
for limit, value in settings["rlimits"].items():
    resource.setrlimit(getattr(resource, limit), (value, value))
if is_root:
    os.setgroups([])
    os.setgid(settings["gid"])
    os.setuid(settings["uid"])
if not network_isolated:
    import socket
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in this sandbox")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
# After unshare(CLONE_NEWPID) only our children enter the new namespace; the first one is its init (pid 1).
program_pid = os.fork()
if program_pid != 0:
    report.write(json.dumps({"program_pid": program_pid}) + "\n")
report.close()  # in the program too, before any of its code runs
if program_pid == 0:
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if this bootstrap is killed, take the program down too
    del settings, libc, ctypes, namespace_flags, network_isolated, report
    source = open("program.py", encoding="utf-8").read()
    sys.argv = ["program.py"]
    program_globals = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), program_globals)
        exit_code = 0
    except SystemExit as exit_request:
        code = exit_request.code
        exit_code = code if isinstance(code, int) else (0 if code is None else 1)
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)
    except BaseException as error:  # print as Python would, minus this bootstrap's own frame
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        exit_code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(exit_code & 0xFF)
def forward_termination(signum, frame):
    os.kill(program_pid, signal.SIGKILL)  # killing the namespace's init kills everything inside it
signal.signal(signal.SIGTERM, forward_termination)
_, status = os.waitpid(program_pid, 0)
os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # why it failed, None on success
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    exit_code: int | None = None
    duration_s: float = 0.0
    namespaces: bool = False  # True when the network and PID namespaces were in force for this run


def _stdlib_readable_by_others() -> bool:
    """Can an unrelated user (here: `nobody`) import the stdlib? Only then can we skip preloading it, which
    costs ~50 ms per run. Checks that every directory above the stdlib is searchable by others."""
    directory = os.path.dirname(os.path.abspath(os.__file__))
    while True:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(directory)
        if parent == directory:
            return True
        directory = parent


def _count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def _kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(
    code: str,
    timeout: float = 5.0,
    memory_limit_bytes: int = 256 * 2**20,
    max_output_bytes: int = 1 * 2**20,
    max_file_bytes: int = 16 * 2**20,
    max_processes: int = 64,
) -> ExecutionResult:
    """Run `code` in a contained child process; see the module docstring for what is enforced."""
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    is_root = os.geteuid() == 0
    sandbox_user = pwd.getpwnam("nobody") if is_root else None
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if is_root:
            os.chown(workdir, sandbox_user.pw_uid, sandbox_user.pw_gid)
        # Root is exempt from RLIMIT_NPROC; a non-root user's limit counts all its processes, so add ours.
        process_budget = max_processes + (0 if is_root else _count_user_processes(os.getuid()))
        report_read, report_write = os.pipe()  # the bootstrap's one message back: were namespaces created
        settings = {
            "report_fd": report_write,
            "preload": list(PRELOADED_MODULES) if is_root and not _stdlib_readable_by_others() else [],
            "uid": sandbox_user.pw_uid if is_root else -1,
            "gid": sandbox_user.pw_gid if is_root else -1,
            "rlimits": {
                "RLIMIT_AS": memory_limit_bytes,
                "RLIMIT_CPU": max(1, math.ceil(timeout)) + 1,  # backstop; the wall clock usually fires first
                "RLIMIT_FSIZE": max_file_bytes,
                "RLIMIT_NOFILE": 64,
                "RLIMIT_CORE": 0,
                "RLIMIT_NPROC": process_budget,
            },
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOTSTRAP, json.dumps(settings)],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,  # its own process group, so one killpg reaches everything it forks
            pass_fds=(report_write,),
        )
        os.close(report_write)
        try:
            captured, output_truncated, timed_out = _collect_output(process, started + timeout, max_output_bytes)
            if not timed_out and not output_truncated:
                try:
                    process.wait(timeout=max(0.0, started + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            # Ask the bootstrap to kill the PID namespace's init (that reaches processes which left our
            # process group), give it a moment, then kill the group anyway. Harmless if all have exited.
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=1.0)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            _kill_group(process.pid)
            process.wait()
            for stream in (process.stdout, process.stderr):
                stream.close()
            bootstrap_report = _read_report(report_read)
            # The program may have killed the bootstrap itself (kill(0, ...) reaches the whole group) after
            # moving to a new session and clearing its death signal; its namespace's init then still runs.
            _kill_namespace_init(bootstrap_report.get("program_pid"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stdout = captured[0].decode("utf-8", errors="replace")
    stderr = captured[1].decode("utf-8", errors="replace")
    exit_code = process.returncode
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    memory_exceeded = last_line.startswith("MemoryError")
    if timed_out:
        error = f"timed out after {timeout} s"
    elif output_truncated:
        error = f"output exceeded {max_output_bytes} bytes"
    elif memory_exceeded:
        error = f"memory limit of {memory_limit_bytes} bytes exceeded"
    elif exit_code != 0:
        error = f"exit code {exit_code}" + (f": {last_line}" if last_line else "")
    else:
        error = None
    return ExecutionResult(
        success=error is None,
        stdout=stdout,
        stderr=stderr,
        error=error,
        timed_out=timed_out,
        memory_exceeded=memory_exceeded,
        output_truncated=output_truncated,
        exit_code=exit_code,
        duration_s=time.monotonic() - started,
        namespaces=bootstrap_report.get("namespaces", False),
    )


def _read_report(report_read: int) -> dict:
    """The bootstrap's JSON lines, merged; non-blocking, since a stray program could hold the pipe open."""
    os.set_blocking(report_read, False)
    with os.fdopen(report_read, "rb") as report:
        try:
            lines = (report.read() or b"").splitlines()
        except BlockingIOError:
            lines = []
    merged = {}
    for line in lines:
        try:
            merged.update(json.loads(line))
        except ValueError:
            pass
    return merged


def _kill_namespace_init(pid: int | None) -> None:
    """SIGKILL `pid` if it is still a PID namespace's init (its NSpid ends in 1): the kernel then kills every
    process in that namespace. The NSpid check keeps us from killing an unrelated process that reused the pid."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/status") as f:
            namespace_pids = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
        if len(namespace_pids) > 1 and namespace_pids[-1] == "1":
            os.kill(pid, signal.SIGKILL)
    except (OSError, StopIteration):
        pass


def _collect_output(process: subprocess.Popen, deadline: float, max_output_bytes: int):
    """Read stdout and stderr until both close, the deadline passes, or together they exceed the cap.
    Returns ([stdout_bytes, stderr_bytes], output_truncated, timed_out)."""
    captured = [bytearray(), bytearray()]
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, 0)
    selector.register(process.stderr, selectors.EVENT_READ, 1)
    open_streams = 2
    try:
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return captured, False, True
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                captured[key.data] += chunk
                if len(captured[0]) + len(captured[1]) > max_output_bytes:
                    room = max(0, max_output_bytes - len(captured[1 - key.data]))
                    del captured[key.data][room:]
                    return captured, True, False
        return captured, False, False
    finally:
        selector.close()


# -----------------------------------------------------------------------------
# Calculator

MAX_EXPRESSION_CHARS = 1000  # also bounds parser recursion: Python's parser refuses >200 nested parentheses
MAX_INTEGER_BITS = 4096  # ~1,233 decimal digits: far beyond GSM8K arithmetic, yet instant to compute
_ARITHMETIC = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}


class _Refused(Exception):
    pass


def _checked(value):
    """Keep every intermediate bounded, so no later operation can become slow."""
    if type(value) not in (int, float):  # (-8) ** 0.5 is complex in Python 3: not a calculator answer
        raise _Refused("not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise _Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("float overflow")
    return value


def _string_literal(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return node.value
    raise _Refused("only string literals may take part in .count()")


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # `type is` excludes bool
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _evaluate(node.operand)
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            # Decide from the operands' sizes before computing: 9**9**9 must be refused, not attempted.
            if right * math.log2(abs(left)) > MAX_INTEGER_BITS:
                raise _Refused("power too large")
        return _checked(_ARITHMETIC[type(node.op)](left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and len(node.args) == 1
        and not node.keywords
    ):
        return _string_literal(node.func.value).count(_string_literal(node.args[0]))
    raise _Refused(f"{type(node).__name__} is not allowed")


def use_calculator(expression: str) -> int | float | None:
    """Evaluate `expression` (arithmetic, or `"text".count("x")`) and return the number, or None if the
    expression is refused, malformed or undefined. Thread-safe: no signals, no shared state."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    # Thousands separators (GSM8K writes "1,200") go; a comma anywhere else is left to make the parse fail.
    without_separators = re.sub(r"(?<=\d),(?=\d{3})", "", expression.strip())
    try:
        tree = ast.parse(without_separators, mode="eval")
        return _evaluate(tree.body)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        # ArithmeticError covers ZeroDivisionError and OverflowError (10.0**400, a huge int divided to float).
        return None
