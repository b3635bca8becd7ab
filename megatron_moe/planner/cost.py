"""What a study costs before it runs: training FLOPs from the ledger, turned into GPU-hours at a stated model FLOPs
utilisation on a named GPU, and the memory that GPU has. An estimate: `megatron-moe bench` measures the MFU a model
reaches on a device, and that figure replaces the assumed one."""

from __future__ import annotations

from pathlib import Path

PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,   # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,             # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA B200": 2250e12,
}
"""Dense (not sparse) bf16 tensor-core peaks from NVIDIA's datasheets, by the exact name torch reports: the SXM,
PCIe and NVL parts of one chip differ by up to 25%. FP8 peaks are twice these. A device not listed gets no MFU."""


GPU_MEMORY_GIB = {
    "NVIDIA H100 80GB HBM3": 80,
    "NVIDIA H100 PCIe": 80,
    "NVIDIA H100 NVL": 94,
    "NVIDIA H200": 141,
    "NVIDIA H200 NVL": 141,
    "NVIDIA A100-SXM4-80GB": 80,
    "NVIDIA A100-SXM4-40GB": 40,
    "NVIDIA A100 80GB PCIe": 80,
    "NVIDIA A100-PCIE-40GB": 40,
    "NVIDIA B200": 180,
}
"""Nominal memory of the same devices (datasheets; the CUDA context and allocator take some of it)."""


def peak_flops(name: str, fp8: bool) -> float | None:
    """Peak FLOP/s of the device called `name` (torch's name for it), or None when it is not in the table."""
    peak = PEAK_BF16_FLOPS.get(name.strip())
    return None if peak is None else peak * (2 if fp8 else 1)


ASSUMED_GPU = "NVIDIA H100 80GB HBM3"
ASSUMED_MFU = 0.40
"""The estimate's device and utilisation unless told otherwise: an H100 SXM at 40% MFU, what well-tuned
megatron-core training reaches on it at the 1B scale and above (tiny models reach far less)."""


def gpu_hours(train_flops: float, gpu: str = ASSUMED_GPU, mfu: float = ASSUMED_MFU, fp8: bool = False) -> float:
    """GPU-hours to spend `train_flops` on `gpu` (a name of PEAK_BF16_FLOPS) at utilisation `mfu`."""
    peak = peak_flops(gpu, fp8)
    if peak is None:
        raise ValueError(f"no peak FLOP/s known for {gpu!r}; known: {', '.join(PEAK_BF16_FLOPS)}")
    return train_flops / (peak * mfu) / 3600.0


def local_gpu(proc: Path = Path("/proc/driver/nvidia/gpus")) -> str | None:
    """The name of this machine's first NVIDIA GPU as its driver reports it, or None (read from /proc, so that a dry
    run needs no torch)."""
    try:
        for info in sorted(proc.glob("*/information")):
            for line in info.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    return value.strip()
    except OSError:
        return None
    return None


def memory_limit(given: int | None, gpu: str | None) -> tuple[int | None, str]:
    """The device memory to check a plan against, and where it came from: `given` (--gpu-memory), else the nominal
    memory of device `gpu` when it is a known one; (None, why not) when there is neither."""
    from megatron_moe.text import human_bytes

    if given:
        return given, f"--gpu-memory {human_bytes(given)}"
    if gpu is not None and gpu in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[gpu] << 30, f"the {GPU_MEMORY_GIB[gpu]} GiB of an {gpu} (--gpu-memory to change)"
    return None, "no --gpu-memory given" if gpu is None else f"{gpu!r} is not a known device: give --gpu-memory"
