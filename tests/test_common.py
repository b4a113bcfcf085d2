"""nanochat.common: device and dtype choice, torchrun environment, hardware table."""

import pytest
import torch

from nanochat import common


def test_device_and_dtype_overrides(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    assert common.autodetect_device_type() == "cpu"
    monkeypatch.setenv("NANOCHAT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NANOCHAT_DEVICE must be"):
        common.autodetect_device_type()
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert common.autodetect_dtype("cpu") == torch.float32
    assert common.autodetect_dtype("mps") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert common.autodetect_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE must be one of"):
        common.autodetect_dtype("cpu")


def test_cuda_dtype_follows_compute_capability(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert common.autodetect_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # T4: no bf16
    assert common.autodetect_dtype("cuda") == torch.float16
    assert common.needs_grad_scaler(torch.float16) and not common.needs_grad_scaler(torch.bfloat16)


def test_dist_info_reads_torchrun_environment(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert common.dist_info() == (0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert common.dist_info() == (3, 1, 4)


def test_compute_init_on_cpu_single_process(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_DTYPE"):
        monkeypatch.delenv(key, raising=False)
    runtime = common.compute_init("cpu", seed=3)
    assert runtime.device == torch.device("cpu") and runtime.dtype == torch.float32
    assert runtime.is_master and not runtime.is_distributed and runtime.world_size == 1
    first = torch.rand(3)
    common.compute_init("cpu", seed=3)
    assert torch.equal(first, torch.rand(3))  # seeded
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            common.compute_init("cuda")


def test_print0_prints_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    common.print0("shown")
    assert capsys.readouterr().out == "shown\n"


def test_gpu_peaks_match_specific_names_first():
    assert common.gpu_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert common.gpu_peaks("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert common.gpu_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert common.gpu_peaks("NVIDIA GH200 480GB") == (989e12, 4.0e12)
    assert common.gpu_peaks("NVIDIA A100-SXM4-40GB")[1] == 1.555e12
    assert common.gpu_peaks("NVIDIA GeForce RTX 4090")[0] == 165.2e12
    assert common.gpu_peaks("NVIDIA L40S")[0] == 362e12 and common.gpu_peaks("NVIDIA L4")[0] == 121e12
    assert common.gpu_peaks("Some Future Accelerator") is None


def test_base_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "artifacts"))
    assert common.get_base_dir() == str(tmp_path / "artifacts")
    assert (tmp_path / "artifacts").is_dir()
