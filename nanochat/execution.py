"""Run untrusted, model-written Python (HumanEval completions) in a contained child process, and the
restricted calculator behind the engine's `<|python_start|>` tool.

Contract
- `execute_code(code, ...) -> ExecutionResult`: `code` runs as `__main__` (file `/tmp/program.py`, also the
  working directory) in a fresh interpreter started by `subprocess.Popen`, never a fork of the caller, with
  stdin at /dev/null and an environment of just `PATH` and `LANG`. `success` is True only when the program
  exits 0 within every limit; otherwise `error` says why (timeout, memory, output limit, exit status, the last
  line of the traceback, or "sandbox unavailable: ..." when the walls below could not be built).
- `use_calculator(expression) -> int | float | None`: arithmetic and `"literal".count("literal")`, evaluated
  by walking an `ast` tree ourselves (nothing is `eval`ed), bounded in size and magnitude, thread-safe.
  Anything refused, invalid or undefined (division by zero) gives None.

The walls (Linux; every one is required: if one cannot be built the program does not run, it fails closed)
- Namespaces of its own: PID (it sees and signals only its own processes; killing its init kills them all),
  network (no interface up: no connection anywhere, loopback and abstract Unix sockets included), IPC (System V
  segments die with it), mount, and a user namespace per execution in which it may not create another.
- Its own filesystem: an empty read-only root holding read-only bind mounts of the system's /usr, /bin, /lib*
  and /sbin and of the interpreter's install, a fresh /proc, /dev/{null,zero,full,random,urandom}, and one
  writable tmpfs of `max_file_bytes` at /tmp (/var/tmp and /dev/shm point to it). The repository and its venv,
  the checkpoints, /etc (so: UTC, no user names, no DNS), /home, /run, /sys, /root (but for the interpreter's
  install when it lives there) and the host's /tmp, /dev/shm and path-based sockets are not in it. The tmpfs
  and everything in it vanish with the execution's last process.
- No privileges: a root caller switches to user `nobody` (65534) before the program's user namespace is made;
  every capability is dropped and no_new_privs set (setuid binaries and file capabilities give nothing). A new
  session keyring of its own: the caller's keys are not in reach, and nothing left there reaches the next run.
- Kernel limits: wall clock (the caller SIGKILLs the process group and the namespace's init), RLIMIT_CPU,
  RLIMIT_AS (`MemoryError` -> `memory_exceeded`), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, an output cap,
  and RLIMIT_NPROC, which the kernel counts per user namespace (since Linux 5.14), so each execution has its
  own process budget: a fork bomb in one cannot starve another (older kernels count per uid: one budget).
- Needs: x86_64 or aarch64 (pivot_root), and unprivileged user namespaces, even for a root caller (the
  program's is made as nobody). Off by default under Docker's seccomp profile and Ubuntu >= 24.04's AppArmor
  (sysctl kernel.apparmor_restrict_unprivileged_userns=0); there every execution fails, saying why.

What it deliberately does not do
- No cgroup: memory is bounded per process (RLIMIT_AS) and by the tmpfs size, not per execution: up to
  `max_processes` processes may each use `memory_limit_bytes`, and System V segments are not capped (they
  die with the execution's IPC namespace). CPU time is bounded per process by RLIMIT_CPU.
- No seccomp: the program may make any system call its lack of privileges allows. System files in the read-only
  views stay readable. The program can read its own source (a grader's marker in it is not secret from it).
- No in-process "guard" that deletes `os.kill`, `os.system` and friends: the reference did that and was
  escaped by walking frames back to its saved references (karpathy/nanoGPT#717). Containment here rests on
  the process boundary and the kernel, and the tests attack those directly.
"""

import ast
import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import re
import selectors
import signal
import subprocess
import sys
import time

# ---------------------------------------------------------------------------- sandbox

NOBODY = 65534  # the uid and gid a root caller's programs run as: `nobody` on Debian, Ubuntu and Fedora

# Runs in the child as `python -I -S -c BOOTSTRAP <json settings>` with the program's source on stdin. Order
# matters: mounts need privileges the program must not have, and limits go on before anything untrusted runs.
BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
settings = json.loads(sys.argv[1])
source = sys.stdin.buffer.read()
os.umask(0o022)  # the caller's umask (077, say) would make the new root's directories untraversable by nobody
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PIVOT_ROOT, KEYCTL = {"x86_64": (155, 250), "aarch64": (41, 219)}.get(os.uname().machine, (-1, -1))  # no wrappers
uid, gid, is_root = settings["uid"], settings["gid"], os.geteuid() == 0
report = os.fdopen(settings["report_fd"], "w")  # to the caller: the walls are up (or why not), program pid
def check(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
def mount(source, target, fstype, flags, data=None):
    encode = lambda text: text and text.encode()
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")
def enter_user_namespace(extra_flags):  # unprivileged: it may map only our own uid and gid (user_namespaces(7))
    check(libc.unshare(NEWUSER | extra_flags), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
def fail(error):
    report.write(json.dumps({"error": str(error)}) + "\n")
    report.flush()
    os._exit(125)
def build_root():
    mount(None, "/", None, REC | PRIVATE)  # nothing we mount leaks back to the host
    root = "/tmp"  # any directory: in this private mount namespace the new root is mounted over it
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    for path in settings["visible"]:
        if os.path.islink(path):
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        else:
            os.makedirs(root + path)
            mount(path, root + path, None, BIND | REC)
            kept = os.statvfs(path).f_flag & (NOEXEC | 1024 | 2048)  # noexec, noatime, nodiratime: may be locked
            mount(None, root + path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | kept)
    os.makedirs(root + "/dev")
    for device in ("null", "zero", "full", "random", "urandom"):
        open(root + "/dev/" + device, "w").close()
        mount("/dev/" + device, root + "/dev/" + device, None, BIND)
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/shm", "/tmp"), ("/var/tmp", "/tmp")):
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(target, root + link)
    for directory in ("/proc", "/tmp"):
        os.mkdir(root + directory)
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)  # shows only this PID namespace
    mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV, f"size={settings['tmp_bytes']},nr_inodes=4096,mode=1777")
    with open(root + "/tmp/program.py", "wb") as f:
        f.write(source)
    os.chdir(root)
    check(libc.syscall(PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "detach the host's root")  # MNT_DETACH: the host filesystem is gone from view
    mount(None, "/", None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    os.chdir("/tmp")
    with open("/dev/null", "rb") as null:
        os.dup2(null.fileno(), 0)
try:
    # A user namespace's processes also count against its creator's RLIMIT_NPROC as it was at creation.
    resource.setrlimit(resource.RLIMIT_NPROC, (resource.getrlimit(resource.RLIMIT_NPROC)[1],) * 2)
    namespaces = NEWNS | NEWPID | NEWNET | NEWIPC
    if is_root:
        check(libc.unshare(namespaces), "unshare")
    else:  # the user namespace gives the rights to make the others
        enter_user_namespace(namespaces)
except Exception as error:
    fail(error)
# After unshare(CLONE_NEWPID) only our children enter the new namespace; the first one is its init (pid 1).
program_pid = os.fork()
if program_pid == 0:
    try:
        build_root()
        if is_root:  # become nobody, then take a user namespace of our own, counted apart for RLIMIT_NPROC
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            check(libc.prctl(4, 1), "dumpable")  # PR_SET_DUMPABLE: so nobody may write its own uid_map
            enter_user_namespace(0)
        check(libc.syscall(KEYCTL, 1, None), "keyctl")  # JOIN_SESSION_KEYRING: not the caller's, nor shared
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")  # a nested user namespace would give back the power to mount (an unbounded tmpfs)
        for limit, value in settings["rlimits"].items():
            resource.setrlimit(getattr(resource, limit), (value, value))
        check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        check(libc.prctl(1, signal.SIGKILL), "pdeathsig")  # if this bootstrap is killed, so is the program
    except Exception as error:
        fail(error)
    report.write(json.dumps({"namespaces": True}) + "\n")
    report.close()  # before any of the program's code runs
    del settings, libc, ctypes, report, source
    sys.argv = ["program.py"]
    program_globals = {"__name__": "__main__", "__file__": "/tmp/program.py", "__builtins__": __builtins__}
    import traceback
    try:
        with open("program.py", encoding="utf-8") as f:
            code = compile(f.read(), "/tmp/program.py", "exec")
        exec(code, program_globals)
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
report.write(json.dumps({"program_pid": program_pid}) + "\n")
report.close()
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
    namespaces: bool = False  # True when every wall of the module docstring was up for this run


@functools.cache
def _visible_paths() -> tuple[str, ...]:
    """What the program sees of the host, read-only: system directories and the interpreter's install."""
    paths = [path for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") if os.path.lexists(path)]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == path or prefix.startswith(path + "/") for path in paths):
        paths.append(prefix)
    return tuple(paths)


def execute_code(
    code: str,
    timeout: float = 5.0,
    memory_limit_bytes: int = 256 * 2**20,
    max_output_bytes: int = 1 * 2**20,
    max_file_bytes: int = 16 * 2**20,
    max_processes: int = 64,
) -> ExecutionResult:
    """Run `code` in a contained child process; see the module docstring for what is enforced.
    `max_file_bytes` bounds each file and, as the size of /tmp, all of them together."""
    started = time.monotonic()
    report_read, report_write = os.pipe()  # the bootstrap's messages back: walls up or why not, program pid
    settings = {
        "report_fd": report_write,
        "uid": NOBODY if os.geteuid() == 0 else os.getuid(),
        "gid": NOBODY if os.geteuid() == 0 else os.getgid(),
        "visible": list(_visible_paths()),
        "tmp_bytes": max_file_bytes,
        "rlimits": {
            "RLIMIT_AS": memory_limit_bytes,
            "RLIMIT_CPU": max(1, math.ceil(timeout)) + 1,  # backstop; the wall clock usually fires first
            "RLIMIT_FSIZE": max_file_bytes,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_CORE": 0,
            "RLIMIT_NPROC": max_processes + 1,  # counted in this execution's user namespace (+1: the bootstrap)
        },
    }
    process = subprocess.Popen(
        # The real interpreter, not a venv's link to it: the venv lives in the repository, which is hidden.
        [os.path.realpath(sys.executable), "-I", "-S", "-c", BOOTSTRAP, json.dumps(settings)],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True, pass_fds=(report_write,),
        start_new_session=True,  # its own process group, so one killpg reaches everything it forks
    )  # fmt: skip
    os.close(report_write)
    try:
        with contextlib.suppress(BrokenPipeError):  # the bootstrap reads all of stdin first: no deadlock
            process.stdin.write(code.encode("utf-8", errors="surrogatepass"))
            process.stdin.close()
        captured, output_truncated, timed_out = _collect_output(process, started + timeout, max_output_bytes)
        if not timed_out and not output_truncated:
            try:
                process.wait(timeout=max(0.0, started + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # Ask the bootstrap to kill the PID namespace's init (that reaches processes which left our
        # process group), give it a moment, then kill the group anyway. Harmless if all have exited.
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=1.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for stream in (process.stdout, process.stderr):
            stream.close()
        bootstrap_report = _read_report(report_read)
        # The program may have killed the bootstrap itself (kill(0, ...) reaches the whole group) after
        # moving to a new session and clearing its death signal; its namespace's init then still runs.
        _kill_namespace_init(bootstrap_report.get("program_pid"))

    stdout, stderr = (stream.decode("utf-8", errors="replace") for stream in captured)
    exit_code = process.returncode
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    memory_exceeded = exit_code != 0 and last_line.startswith("MemoryError")
    if "error" in bootstrap_report:
        error = f"sandbox unavailable: {bootstrap_report['error']} (needs user namespaces: see nanochat/execution.py)"
    elif timed_out:
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
        success=error is None, stdout=stdout, stderr=stderr, error=error, timed_out=timed_out,
        memory_exceeded=memory_exceeded, output_truncated=output_truncated, exit_code=exit_code,
        duration_s=time.monotonic() - started, namespaces=bootstrap_report.get("namespaces", False),
    )  # fmt: skip


def _read_report(report_read: int) -> dict:
    """The bootstrap's JSON lines, merged; non-blocking, since a stray program could hold the pipe open."""
    os.set_blocking(report_read, False)
    lines = []
    with os.fdopen(report_read, "rb") as report, contextlib.suppress(BlockingIOError):
        lines = (report.read() or b"").splitlines()
    merged = {}
    for line in lines:
        with contextlib.suppress(ValueError):
            merged.update(json.loads(line))
    return merged


def _kill_namespace_init(pid: int | None) -> None:
    """SIGKILL `pid` if it is still a PID namespace's init (its NSpid ends in 1): the kernel then kills every
    process in that namespace. The NSpid check keeps us from killing an unrelated process that reused the pid."""
    if pid is None:
        return
    with contextlib.suppress(OSError):  # gone already, or not ours to kill
        with open(f"/proc/{pid}/status") as f:
            namespace_pids = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
        if len(namespace_pids) > 1 and namespace_pids[-1] == "1":
            os.kill(pid, signal.SIGKILL)


def _collect_output(process: subprocess.Popen, deadline: float, max_output_bytes: int):
    """Read stdout and stderr until both close, the deadline passes, or together they exceed the cap.
    Returns ([stdout_bytes, stderr_bytes], output_truncated, timed_out)."""
    captured = [bytearray(), bytearray()]
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, 0)
        selector.register(process.stderr, selectors.EVENT_READ, 1)
        while selector.get_map():  # until both streams have closed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return captured, False, True
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                captured[key.data] += chunk
                if len(captured[0]) + len(captured[1]) > max_output_bytes:
                    room = max(0, max_output_bytes - len(captured[1 - key.data]))
                    del captured[key.data][room:]
                    return captured, True, False
        return captured, False, False


# ---------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 1000  # also bounds parser recursion: Python's parser refuses >200 nested parentheses
MAX_INTEGER_BITS = 4096  # ~1,233 decimal digits: far beyond GSM8K arithmetic, yet instant to compute
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip


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
    match node:  # "text".count("part"): string literals only
        case ast.Call(
            func=ast.Attribute(value=ast.Constant(value=str() as text), attr="count"),
            args=[ast.Constant(value=str() as part)],
            keywords=[],
        ):
            return text.count(part)
    raise _Refused(f"{type(node).__name__} is not allowed")


def use_calculator(expression: str) -> int | float | None:
    """The value of `expression`, or None if it is refused, malformed or undefined (see the module docstring)."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    # Thousands separators (GSM8K writes "1,200") go; a comma anywhere else is left to make the parse fail.
    without_separators = re.sub(r"(?<=\d),(?=\d{3})", "", expression.strip())
    try:
        return _evaluate(ast.parse(without_separators, mode="eval").body)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        # ArithmeticError covers ZeroDivisionError and OverflowError (10.0**400, a huge int divided to float).
        return None
