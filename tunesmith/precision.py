"""Which dtype a host computes in: bf16 only where it is native and measured faster.

Contract:
- `bf16_matmul_units(device)`: whether bf16 matmuls beat fp32 there — CUDA with bf16 support, or
  a CPU whose AMX tiles are advertised, granted to the process, and measured: a bf16 GEMM must run
  at least 1.5× an fp32 one (~40 ms, once per process; some sandboxes advertise AMX and trap it,
  and bf16 without AMX runs at about half fp32's speed). `train.precision=auto` picks bf16 then.
  `TUNESMITH_BF16_UNITS=0|1` overrides the detection (the test suite pins 0, so its fp32
  tolerances hold on any machine).
- `gemm_rows_multiple(dtype, device)`: the row count a training GEMM's M should be a multiple of —
  32 for bf16 on a CPU, else 1. oneDNN's AMX bf16 kernels work on blocks of 32 rows, and every new
  row count builds and caches a new kernel; padding-free rows and the loss's head chunks are
  padded up to it.
- `inference_dtype(precision, device)`: the dtype generation loads weights in — `fp32`, `bf16`, or
  `auto`: bf16 where `bf16_matmul_units`, else fp32 (the same rule as training's `auto`). Decoding
  reads every weight once per token: half the bytes in bf16, and AMX does the matmuls.
- `resolve_precision(train_cfg, method, device)` → `(precision, frozen_dtype)` with `auto` settled:
  precision bf16 where `bf16_matmul_units`, else fp32; frozen weights in bf16 when the run computes
  in bf16 (autocast would cast them to bf16 for every matmul anyway), else fp32.
- `torch_dtype(name)`: "fp32" | "bf16" | "fp16" → the torch dtype.
"""

from __future__ import annotations

import functools
import math
import os
import time

import torch


def bf16_matmul_units(device: torch.device) -> bool:
    forced = os.environ.get("TUNESMITH_BF16_UNITS")
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_pays()
    return False


@functools.lru_cache(maxsize=1)
def _cpu_bf16_pays() -> bool:
    advertised = getattr(torch.cpu, "_is_amx_tile_supported", None)
    grant = getattr(torch.cpu, "_init_amx", None)  # asks the kernel for the AMX tile state
    if not (advertised and advertised() and grant and grant()):
        return False
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    fastest = {}
    for _ in range(5):  # interleaved, fastest of each: a busy machine only ever adds time
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            start = time.perf_counter()
            torch.mm(x, y)
            fastest[dtype] = min(fastest.get(dtype, math.inf), time.perf_counter() - start)
    return fastest[torch.float32] >= 1.5 * fastest[torch.bfloat16]


def gemm_rows_multiple(dtype: torch.dtype, device: torch.device) -> int:
    return 32 if dtype == torch.bfloat16 and device.type == "cpu" else 1


def inference_dtype(precision: str, device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if bf16_matmul_units(torch.device(device)) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def resolve_precision(train_cfg, method: str, device: torch.device) -> tuple[str, str]:
    precision = train_cfg.precision
    if precision == "auto":
        precision = "bf16" if bf16_matmul_units(device) else "fp32"
    frozen = train_cfg.frozen_dtype
    if frozen == "auto":
        frozen = "bf16" if precision == "bf16" and method != "full" else "fp32"
    return precision, frozen


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
