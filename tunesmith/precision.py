"""Which dtype a host computes in: bf16 only where it is native and measured faster.

Contract:
- `bf16_matmul_units(device)`: whether bf16 matmuls beat fp32 there — CUDA with bf16 support, or
  a CPU with native bf16 (AMX tiles advertised and granted to the process, or AVX512-BF16 dot
  products) where a bf16 GEMM is measured at least 1.5× faster than an fp32 one (~40 ms, once per
  process; some sandboxes advertise AMX and trap it; without either, bf16 is emulated and slow).
  `train.precision=auto` picks bf16 then.
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
- `bf16_emulation(device)`: why bf16 asked for explicitly would run slower than fp32 there, or None —
  a GPU without bf16, `TUNESMITH_BF16_UNITS=0`, or a CPU without bf16 matmul units where a small
  bf16 GEMM is measured slower than fp32 (once per process; a CPU with AVX512-BF16 but no AMX
  can still be faster in bf16). `emulation_warning(setting, device)` is that as one sentence, and
  `warn_if_emulated(setting, device)` prints it to stderr once per process and setting:
  `resolve_precision` for `train.precision=bf16`, `inference_dtype` for bf16 weights. Frozen
  weights in bf16 (`train.frozen_dtype`) are upcast for fp32 matmuls, so they warn of nothing.
"""

from __future__ import annotations

import functools
import math
import os
import sys
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
    if not (_amx_granted() or _avx512_bf16()):
        return False  # bf16 would be emulated: not even worth measuring
    fastest = _fastest_gemms(512, 1024, 1024)
    return fastest[torch.float32] >= 1.5 * fastest[torch.bfloat16]


def _amx_granted() -> bool:
    advertised = getattr(torch.cpu, "_is_amx_tile_supported", None)
    grant = getattr(torch.cpu, "_init_amx", None)  # asks the kernel for the AMX tile state
    return bool(advertised and advertised() and grant and grant())


def _avx512_bf16() -> bool:
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # bf16 dot products (Zen 4, Cooper Lake)
    return bool(native and native())


@functools.lru_cache(maxsize=1)
def _cpu_bf16_time_ratio() -> float:
    # small, since an emulated bf16 GEMM can take hundreds of times fp32's time
    fastest = _fastest_gemms(256, 256, 256, rounds=4)
    return fastest[torch.bfloat16] / fastest[torch.float32]


def _fastest_gemms(m: int, k: int, n: int, rounds: int = 5) -> dict:
    """dtype → the fastest of `rounds` m×k @ k×n GEMMs, fp32 and bf16 interleaved (a busy machine
    only ever adds time)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    fastest = {}
    for _ in range(rounds):
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            start = time.perf_counter()
            torch.mm(x, y)
            fastest[dtype] = min(fastest.get(dtype, math.inf), time.perf_counter() - start)
    return fastest


def bf16_emulation(device: torch.device) -> str | None:
    forced = os.environ.get("TUNESMITH_BF16_UNITS")
    if forced == "1":
        return None
    if forced == "0":
        return "TUNESMITH_BF16_UNITS=0 says this machine has no bf16 matmul units, so bf16 is emulated"
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support, so bf16 is emulated"
    if device.type != "cpu" or _cpu_bf16_pays():
        return None
    ratio = _cpu_bf16_time_ratio()
    if ratio <= 1.0:
        return None
    return (
        f"this CPU has no bf16 matmul units (AMX) and emulates bf16 (a bf16 matmul took {ratio:.1f}× fp32's time here)"
    )


def emulation_warning(setting: str, device) -> str | None:
    why = bf16_emulation(torch.device(device))
    return None if why is None else f"{setting}: {why}; it runs slower than fp32 — use fp32 or auto"


def warn_if_emulated(setting: str, device) -> None:
    line = emulation_warning(setting, device)
    if line is not None:
        _print_once(f"tunesmith: warning: {line}")


@functools.cache
def _print_once(line: str) -> None:
    print(line, file=sys.stderr)


def gemm_rows_multiple(dtype: torch.dtype, device: torch.device) -> int:
    return 32 if dtype == torch.bfloat16 and device.type == "cpu" else 1


def inference_dtype(
    precision: str, device, setting: str = "bf16 weights (--precision / compare.precision)"
) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if bf16_matmul_units(torch.device(device)) else torch.float32
    if precision == "bf16":
        warn_if_emulated(setting, device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def resolve_precision(train_cfg, method: str, device: torch.device) -> tuple[str, str]:
    precision = train_cfg.precision
    if precision == "bf16":
        warn_if_emulated("train.precision=bf16", device)
    if precision == "auto":
        precision = "bf16" if bf16_matmul_units(device) else "fp32"
    frozen = train_cfg.frozen_dtype
    if frozen == "auto":
        frozen = "bf16" if precision == "bf16" and method != "full" else "fp32"
    return precision, frozen


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
