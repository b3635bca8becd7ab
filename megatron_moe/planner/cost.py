"""What a study costs before it runs: training FLOPs from the ledger, turned into GPU-hours at a stated model FLOPs
utilisation on a named GPU. An estimate: `megatron-moe bench` measures the MFU a model reaches on a device, and
that figure replaces the assumed one."""

from __future__ import annotations

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
