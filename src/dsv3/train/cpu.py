"""Choices for training on a CPU, each made from what this machine does rather than from its name.

Memory. A training step allocates and frees the same few hundred MB every time (activations, their
gradients, the logits). glibc's malloc hands large blocks back to the kernel (blocks of 32 MiB and more
always come from mmap; the heap's top is trimmed once enough of it is free), so the next step faults every
page of them in again, each one zeroed by the kernel. `retain_freed_memory()` has malloc serve every block
from its heap and never trim it: after the first step the process reuses its own pages, at the cost of
keeping its peak footprint, which a training run reaches every step anyway.

Precision. bf16 autocast pays only where the CPU multiplies bf16 matrices much faster than float32 ones
(AMX, AVX512-BF16); on AVX2 bf16 products are slower than float32 ones. `bf16_matmul_speedup()` times
both on a product of a training step's shape; `bf16_autocast_pays()` says whether bf16 is worth turning on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time

import torch

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Make this process's malloc keep freed memory (glibc only). -> whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:  # not glibc: leave it be
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no block from mmap (the heap serves them all); the heap's top trimmed only beyond 2 GiB free
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def bf16_matmul_speedup(m: int = 2048, k: int = 512, n: int = 1024, repeats: int = 5) -> float:
    """float32 time / bf16 time of an (m, k) x (k, n) product on this CPU (the best of `repeats` each): above
    1, bf16 is faster. The default shape is a bench-small step's: tokens x hidden x FFN width."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: kernel selection, first touch
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)
    return best(torch.float32) / best(torch.bfloat16)


def bf16_autocast_pays(min_speedup: float = 2.0) -> tuple[bool, float]:
    """-> (whether bf16 autocast should speed a training step up on this CPU, the measured speedup). Autocast
    moves the matrix products (most of a step) to bf16 and adds casts around them; the rest stays float32.
    A product that is not at least `min_speedup` times faster leaves too little to pay for the casts."""
    speedup = bf16_matmul_speedup()
    return speedup >= min_speedup, speedup
