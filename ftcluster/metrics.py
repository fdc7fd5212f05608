"""Measurements: device memory, throughput, FLOPs and MFU. The FLOP formula lives here and only here."""

from __future__ import annotations

import re
import resource
import sys
import threading
import time

import torch

_peak_cache: dict[str, float] = {}


FLOP_FORMULA = (
    "Model FLOPs per trained token, PaLM appendix B convention: full fine-tuning 6·N + 6·L·s·d; LoRA and QLoRA "
    "4·N + 2·N_trainable + 6·L·s·d (frozen weights get no weight gradient), with N all parameters (a 4-bit "
    "weight counted as its unpacked values), L layers, s the sequence length, d the hidden size. Attention is "
    "counted causal, as the kernels compute it (half of PaLM's 12·L·s·d); a packed row's examples are counted as "
    "one sequence of s tokens, so where varlen attention keeps each example to itself the kernels do less than "
    "counted. Recomputation by gradient checkpointing is not counted. MFU = tokens/s per device × FLOPs per token "
    "÷ the GPU's dense bf16 datasheet peak (H100 and H200 989 TFLOP/s, as NeMo and Megatron report it); "
    "beside it, the same over the matmul rate measured on that device in the compute dtype at start-up. On CPUs "
    "both are n/a: no datasheet peak, and no single matmul timing stands for the threads a training step gets."
)

DATASHEET_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H800": 989.0, "H200": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0,
}
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by the words of the device
name (torch names an SXM board by its chip and memory alone; the PCIe and NVL boards of a chip are slower)."""


def datasheet_peak_flops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The datasheet's dense bf16/fp16 peak of the GPU named ``device_name`` (FLOP/s), or None for a GPU not in
    ``DATASHEET_TFLOPS`` or a compute dtype it does not give (float32)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    words = set(re.split(r"[\s_-]+", device_name.upper()))
    for key in sorted(DATASHEET_TFLOPS, key=len, reverse=True):  # a board's name before its chip's alone
        if set(key.upper().split()) <= words:
            return DATASHEET_TFLOPS[key] * 1e12
    return None


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int, method: str,
                          n_trainable: int = 0) -> float:
    """Model FLOPs of one training token (the PaLM appendix B convention, which ignores recomputation).

    Dense matmuls: forward 2N; the backward computes activation gradients (2N) always, and weight gradients (2N)
    only for trained weights, so full fine-tuning costs 6N and LoRA ~4N + 2·N_lora. Attention scores and values
    add 12·L·s·d over a full s×s attention (forward 4·L·s·d, backward twice that); causal kernels compute the half
    below the diagonal, so 6·L·s·d. Gradient checkpointing repeats the forward, but MFU counts useful work, so
    recomputation is left out.
    """
    attention = 6 * n_layers * seq_len * hidden
    if method == "full":
        return 6 * n_params + attention
    return 4 * n_params + 2 * n_trainable + attention


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The matmul rate this device really reaches in ``dtype`` (FLOP/s), measured once per process: MFU against
    a measured ceiling, not a datasheet one."""
    key = f"{device}:{dtype}"
    if key in _peak_cache:
        return _peak_cache[key]
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t)
    _peak_cache[key] = rate
    return rate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024**3 if sys.platform == "darwin" else 1024**2)


class DeviceMemorySampler:
    """Samples, in a background thread, the memory in use on one GPU as NVML reports it: what nvidia-smi shows,
    so the CUDA context, NCCL buffers, bitsandbytes' paged buffers and the caching allocator's slack all count.
    It is the whole device's figure; benchmarks run one job per GPU, so it is the job's."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        import pynvml

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        # Ray narrows CUDA_VISIBLE_DEVICES, so torch's index is not NVML's: find the device by its UUID.
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self.peak_bytes = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="nvml-sampler")
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak_bytes = max(self.peak_bytes, self._read())

    def reset(self) -> None:
        self.peak_bytes = self._read()

    def peak_gib(self) -> float:
        self.peak_bytes = max(self.peak_bytes, self._read())
        return self.peak_bytes / 2**30

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_sampler: DeviceMemorySampler | None = None


def start_device_sampler(device: torch.device) -> None:
    """Start sampling ``device``'s memory for :func:`memory` (GPUs only; once per process)."""
    global _sampler
    if device.type == "cuda" and _sampler is None:
        _sampler = DeviceMemorySampler(device)


def memory(device: torch.device) -> dict:
    """Peak memory since the last reset: allocated/reserved on a GPU and the device memory NVML saw in use;
    process RSS (a whole-process peak) everywhere."""
    out = {"peak_rss_gib": round(peak_rss_gib(), 3)}
    if device.type == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        if _sampler is not None:
            out["peak_device_used_gib"] = round(_sampler.peak_gib(), 3)
    return out


def reset_peaks(device: torch.device) -> None:
    """Start the peak window (training, after the model is built): torch's peaks, and NVML's after the caching
    allocator returns what building the model left cached (a random-init QLoRA model passes through 16 bits)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if _sampler is not None:
            _sampler.reset()
