"""Shared plumbing for every stage: artifacts directory, device and dtype, torchrun processes, hardware peaks.

Contract:
- No side effects at import: nothing touches devices, process groups or the filesystem until called.
- `get_base_dir()` is the one place that decides the artifacts directory (`$NANOCHAT_BASE_DIR`, default
  `~/.cache/nanochat`).
- `compute_init()` is the one place that reads torchrun's environment, picks the device and the compute
  dtype, seeds, and joins the process group (NCCL on CUDA, gloo on CPU). The model never sees any of it.
- One explicit compute dtype, no autocast: bf16 on CUDA with compute capability >= 8.0, fp16 (with a grad
  scaler, see `needs_grad_scaler`) on older CUDA GPUs, fp32 on CPU and MPS; `NANOCHAT_DTYPE` overrides.

Not here: model code, optimizers, data.
"""

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: the torch-free parts (base dir, atomic writes) serve quick
# commands such as speedrun.sh's stage checks, which must not pay torch's import time (seconds) per stage.
DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes: getattr(torch, name)


def get_base_dir() -> str:
    """The artifacts directory (tokenizer, data shards, checkpoints, reports), created if missing."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


# ---------------------------------------------------------------------------- files


def fsync_directory(directory: str) -> None:
    """Make a rename durable: the new directory entry reaches the disk only when the directory is synced."""
    if not hasattr(os, "O_DIRECTORY"):  # not on Windows, where directories cannot be opened this way
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable, by_path: bool = False) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync it, then rename it over `path`.

    With `by_path`, write receives the temp file's path instead, for libraries that only write to paths
    (safetensors, tokenizers). The temp name starts with a dot and ends in .tmp, so it never matches a real
    file's pattern (checkpoints, shards) and a temp file left by a killed process is ignored by the loaders.
    Every artifact nanochat writes goes through here: a crash never leaves a truncated file under a final name.
    """
    directory, name = os.path.split(path)
    temp_path = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Mode 0o666 minus the umask, like an ordinary file (tempfile.mkstemp would make checkpoints owner-only).
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if not by_path:
                write(f)
                f.flush()
        if by_path:
            write(temp_path)
        with open(temp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:  # also on KeyboardInterrupt: never leave our temp file behind when we can help it
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    fsync_directory(directory)


# ---------------------------------------------------------------------------- device and dtype


def autodetect_device_type() -> str:
    """cuda > mps > cpu, unless NANOCHAT_DEVICE names one."""
    import torch

    forced = os.environ.get("NANOCHAT_DEVICE")
    if forced:
        if forced not in ("cuda", "mps", "cpu"):
            raise ValueError(f"NANOCHAT_DEVICE must be cuda, mps or cpu, got {forced!r}")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autodetect_dtype(device_type: str) -> "torch.dtype":
    """The compute dtype for a device type; NANOCHAT_DTYPE (bfloat16 | float16 | float32) overrides."""
    import torch

    forced = os.environ.get("NANOCHAT_DTYPE")
    if forced:
        if forced not in DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE must be one of {', '.join(DTYPES)}, got {forced!r}")
        return getattr(torch, forced)
    if device_type == "cuda":
        # bf16 needs Ampere (SM 8.0) or newer; older GPUs get fp16 with loss scaling.
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.float32


def needs_grad_scaler(dtype: "torch.dtype") -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range."""
    return str(dtype) == "torch.float16"


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Runtime:
    """What a process knows about where it runs: returned by compute_init, passed to whoever needs it."""

    device: "torch.device"
    dtype: "torch.dtype"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


class DistInfo(NamedTuple):
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The one answer to "am I distributed": the joined process group's rank and size, else torchrun's
    environment (before compute_init joins), else rank 0 of 1."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())
    if all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]))
    return DistInfo(0, 0, 1)


def compute_init(device_type: str | None = None, seed: int = 42) -> Runtime:
    """Pick device and dtype, seed, and join the process group when launched by torchrun."""
    import torch
    import torch.distributed as dist

    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU (check drivers, or pick cpu)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but is not available on this machine")
    rank, local_rank, world_size = dist_info()
    torch.manual_seed(seed)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (if any) may use TF32 tensor cores
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        dist.barrier()
    return Runtime(device, autodetect_dtype(device_type), rank, local_rank, world_size)


def compute_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist_info().rank == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------- hardware peaks (for MFU and MBU)

# Dense (not 2:4 sparse) bf16 tensor-core peak FLOP/s and memory bandwidth in bytes/s, from the vendors'
# datasheets. Matched against torch.cuda.get_device_name() by substring, in order: a name that contains another
# (GH200 / H200, L40S / L40 / L4) must come first.
GPU_PEAKS = [  # (name substring, bf16 dense FLOP/s, bytes/s); one line per family
    ("GB200", 2.5e15, 8.0e12), ("B200", 2.25e15, 8.0e12),
    ("GH200", 989e12, 4.0e12), ("H200", 989e12, 4.8e12), ("H100 NVL", 835e12, 3.9e12), ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12), ("H800", 989e12, 3.35e12),  # H100: SXM
    ("A100-SXM4-40GB", 312e12, 1.555e12), ("A100", 312e12, 2.039e12), ("A800", 312e12, 2.039e12),  # A100: 80 GB SXM
    ("L40S", 362e12, 864e9), ("L40", 181e12, 864e9), ("L4", 121e12, 300e9),
    ("A10G", 70e12, 600e9), ("A10", 125e12, 600e9),
    ("RTX 5090", 209.5e12, 1.792e12), ("RTX 4090", 165.2e12, 1.008e12), ("RTX 3090", 71e12, 936e9),
    ("V100", 125e12, 900e9), ("T4", 65e12, 320e9),  # fp16: no bf16
    ("MI355X", 2.5e15, 8.0e12), ("MI325X", 1.307e15, 6.0e12), ("MI300X", 1.307e15, 5.3e12), ("MI250X", 383e12, 3.2e12),
]  # fmt: skip


def gpu_peaks(device_name: str) -> tuple[float, float] | None:
    """(peak bf16 FLOP/s, peak bytes/s) for a GPU name, or None when the table does not know it."""
    for key, flops, bandwidth in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return flops, bandwidth
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe_environment(runtime: Runtime) -> dict:
    """Versions, git commit and hardware, printed at the start of every run so its log can reproduce it."""
    import platform
    import subprocess

    import torch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    info = {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "world_size": runtime.world_size,
    }
    if runtime.device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(runtime.device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info
