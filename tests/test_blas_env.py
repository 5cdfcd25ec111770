"""crl_ray's import lets MKL use AVX-512 where the CPU has it (crl_ray.use_avx512_blas), keeping a user's value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import crl_ray

REPO = Path(__file__).resolve().parents[1]


def test_set_only_with_avx512_and_only_when_unset(monkeypatch) -> None:
    monkeypatch.delenv(crl_ray.MKL_ISA_ENV, raising=False)
    assert crl_ray.use_avx512_blas({"avx2", "fma"}) is False and crl_ray.MKL_ISA_ENV not in os.environ
    assert crl_ray.use_avx512_blas({"avx2", "avx512f", "avx512_bf16"}) is True
    assert os.environ[crl_ray.MKL_ISA_ENV] == "AVX512"
    monkeypatch.setenv(crl_ray.MKL_ISA_ENV, "AVX2")  # the user's choice wins
    assert crl_ray.use_avx512_blas({"avx512f"}) is False and os.environ[crl_ray.MKL_ISA_ENV] == "AVX2"


def test_a_fresh_process_gets_it_from_the_import_before_torch_calls_mkl() -> None:
    env = {k: v for k, v in os.environ.items() if k != crl_ray.MKL_ISA_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = "import os, crl_ray; print(os.environ.get('MKL_ENABLE_INSTRUCTIONS'), 'avx512f' in crl_ray._cpu_flags())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value, has_avx512 = out.stdout.split()
    assert value == ("AVX512" if has_avx512 == "True" else "None")
