"""Smoke tests for crl_ray.bench.fsdp (`python -m crl_ray.bench fsdp` (FSDP2 + LoRA benchmark) on CPU / gloo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
    "--kv-heads", "2", "--vocab", "512", "--seq", "32", "--batch", "2",
    "--steps", "2", "--warmup", "1", "--device", "cpu", "--timeout", "120",
]

REQUIRED = [
    "device", "torch", "world_size", "backend", "dtype", "params_total",
    "params_trainable", "seq", "batch", "steps", "s_per_step", "tokens_per_s",
    "peak_mem_gb", "losses", "checks",
]


def _run(extra: list[str], tmp_path: Path, timeout: float = 150):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "crl_ray.bench", "fsdp", *TINY, *extra, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc, out


def _check_result(res: dict, world_size: int, dtype: str) -> None:
    for key in REQUIRED:
        assert key in res, key
    assert res["world_size"] == world_size
    assert res["backend"] == "gloo"
    assert res["dtype"] == dtype
    assert res["seq"] == 32 and res["batch"] == 2 and res["steps"] == 2
    assert 0 < res["params_trainable"] < res["params_total"]
    assert len(res["losses"]) == 3  # warmup + steps
    assert all(math.isfinite(x) for x in res["losses"])
    assert res["s_per_step"] > 0 and res["tokens_per_s"] > 0
    assert res["peak_mem_gb"] > 0
    assert res["checks"] and all(res["checks"].values()), res["checks"]
    for name in ("finite", "lora_moved", "base_frozen"):
        assert res["checks"][name] is True
    assert res["ok"] is True


def test_bench_fsdp_two_ranks_fp32(tmp_path):
    proc, out = _run(["--world-size", "2", "--dtype", "fp32"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    _check_result(res, world_size=2, dtype="fp32")
    # rank 0 prints exactly one JSON line on stdout, identical to --out
    json_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(json_lines) == 1
    assert json.loads(json_lines[0]) == res
    # adapted vs adapter-disabled hidden states diverge once LoRA-B is non-zero
    assert res["adapter_toggle_effective"] is True


def test_bench_fsdp_single_rank_bf16_mixed_precision(tmp_path):
    # bf16 param dtype + fp32 reduce: LoRA grads must come back as fp32
    proc, out = _run(["--world-size", "1", "--dtype", "bf16"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    _check_result(res, world_size=1, dtype="bf16")
    assert res["lora_grad_dtypes"] == ["float32"]


def test_bench_fsdp_fails_fast_on_bad_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("cuda available")
    proc, out = _run(["--world-size", "1", "--device", "cuda"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr
    assert not out.exists()


def test_rep_layer_indices():
    from crl_ray.bench.fsdp import _rep_layer_indices

    assert _rep_layer_indices(24) == [6, 12, 18]
    assert _rep_layer_indices(2) == [1]
    assert _rep_layer_indices(1) == [1]
    for n in range(2, 40):
        idx = _rep_layer_indices(n)
        assert 1 <= len(idx) <= 3 and all(1 <= i <= n - 1 for i in idx)
