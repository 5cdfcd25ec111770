"""crl_ray: Ray-distributed sweeps for the contrastive representation learning defense (README.md)."""

from __future__ import annotations

import os

MKL_ISA_ENV = "MKL_ENABLE_INSTRUCTIONS"


def _cpu_flags() -> set[str]:
    """The first CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def use_avx512_blas(flags: set[str] | None = None) -> bool:
    """Let MKL (torch's fp32 matmuls on x86) use its AVX-512 kernels where the CPU has AVX-512: on AMD CPUs it does
    not by default (3072x576x1536 fp32 matmul, 2 threads: 65 -> 145 GFLOP/s; docs/LOG.md 2026-12-06). MKL reads
    the variable at its first call, so this runs when crl_ray is imported, in every process that imports it (the
    sweep, Ray Train workers, evaluation tasks). A value the user set is kept. Returns whether it set it."""
    if MKL_ISA_ENV in os.environ or "avx512f" not in (_cpu_flags() if flags is None else flags):
        return False
    os.environ[MKL_ISA_ENV] = "AVX512"
    return True


use_avx512_blas()
