"""Measurements: device memory, throughput, FLOPs and MFU. The FLOP formula lives here and only here."""

from __future__ import annotations

import resource
import sys
import time

import torch

_peak_cache: dict[str, float] = {}


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int, method: str,
                          n_trainable: int = 0) -> float:
    """Model FLOPs of one training token (the PaLM appendix B convention, which ignores recomputation).

    Dense matmuls: forward 2N; the backward computes activation gradients (2N) always, and weight gradients (2N)
    only for trained weights, so full fine-tuning costs 6N and LoRA ~4N + 2·N_lora. Attention scores add
    12·L·s·d for full training (forward 4·L·s·d, backward twice that; the causal half is not discounted, as in
    PaLM). Gradient checkpointing repeats the forward, but MFU counts useful work, so recomputation is left out.
    """
    attention = 12 * n_layers * seq_len * hidden
    if method == "full":
        return 6 * n_params + attention
    return 4 * n_params + 2 * n_trainable + attention


def matmul_peak_flops(device: torch.device) -> float:
    """The bf16 matmul rate this device really reaches (FLOP/s), measured once per process: MFU against a
    measured ceiling, not a datasheet one."""
    key = str(device)
    if key in _peak_cache:
        return _peak_cache[key]
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
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


def memory(device: torch.device) -> dict:
    """Peak memory since the last reset: allocated/reserved on a GPU, process RSS everywhere."""
    out = {"peak_rss_gib": round(peak_rss_gib(), 3)}
    if device.type == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return out


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
