"""`python -m crl_ray.bench step` on a tiny random Llama: the comparison runs, on identical work with --dense, and
its flags (--shape smoke, --precision bf16) reach the step. Numbers only, no timing bars (benchmarks print those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tiny import tiny_llama, tiny_tokenizer

from crl_ray.bench.step import SMOKE_SHAPE, apply_shape, build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_llama(tok, layers=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bench(folder: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "crl_ray.bench", "step", "--model", str(folder), "--steps", "1",
                           "--warmup", "0", "--threads", "1", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_dense_rows_give_both_variants_the_same_real_tokens(tiny_folder):
    got = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense")
    assert got["dense"] is True and got["precision"] == "fp32"
    # three batch kinds x 2 rows x 16 tokens, no padding, for both
    assert got["naive"]["tokens_per_step"] == got["project"]["tokens_per_step"] == 3 * 2 * 16
    assert got["loss_rel_diff"] <= 1e-4
    assert got["targets"] == {"speedup_min": 2.0, "memory_ratio_max": 0.4, "loss_rel_max": 1e-4}
    padded = bench(tiny_folder, "--batch", "2", "--seq", "16")
    assert padded["project"]["tokens_per_step"] < 3 * 2 * 16  # rows 50-100 % full
    assert padded["targets"]["speedup_min"] == 1.5


def test_bf16_autocast_stays_within_its_stated_tolerance(tiny_folder):
    got = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense", "--precision", "bf16")
    assert got["project"]["settings"]["precision"] == "bf16" and got["naive"]["settings"] == {}
    assert 0 < got["loss_rel_diff"] <= got["targets"]["loss_rel_max"] == 1e-2  # not bit-equal: bf16 did run


def test_smoke_shape_sets_the_smoke_sweeps_sizes():
    args = apply_shape(build_parser().parse_args(["--shape", "smoke"]))
    assert (args.batch, args.seq, args.lora_r, args.lora_dropout) == (2, 112, 8, 0.0)
    assert (args.loss, args.threads) == ("smoke", 2)
    given = apply_shape(build_parser().parse_args(["--shape", "smoke", "--batch", "4", "--threads", "1"]))
    assert (given.batch, given.threads, given.seq, given.loss) == (4, 1, 112, "smoke")  # a flag given wins
    plain = apply_shape(build_parser().parse_args([]))
    assert (plain.batch, plain.seq, plain.lora_r, plain.lora_dropout, plain.loss) == (4, 256, 16, 0.0, "paper")
    assert SMOKE_SHAPE["request"] == 64  # sweeps/smoke.yaml: max_request_tokens 64, max_response_tokens 48
    smoke = (REPO / "sweeps" / "smoke.yaml").read_text()
    assert "max_request_tokens: 64" in smoke and "max_response_tokens: 48" in smoke
    # the shape keeps the 2-worker layout's per-worker micro-batch (2 rows; the harder case): smoke.yaml now runs
    # the same 4 rows a step as one 2-core worker at micro-batch 4
    assert "micro_batch_size: 4" in smoke and "num_workers: 1" in smoke and "r: 8" in smoke
    assert "dropout: 0.0" in smoke  # the shape's LoRA dropout is smoke.yaml's


def test_frozen_share_and_profile_are_reported(tiny_folder, tmp_path):
    out = tmp_path / "project.json"
    got = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense", "--variant", "project", "--profile",
                "--out", str(out))
    assert json.loads(out.read_text()) == got  # --out writes a single variant's JSON too
    assert 0 < got["frozen_seconds_per_step"] < got["seconds_per_step"]
    assert 0 < got["frozen_share"] < 1
    ops = got["profile_top_ops"]
    assert ops and all(o["calls"] > 0 and o["self_seconds"] >= 0 for o in ops)
    assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for o in ops)
    assert [o["self_seconds"] for o in ops] == sorted((o["self_seconds"] for o in ops), reverse=True)


def test_frozen_cache_leaves_no_frozen_pass_and_the_same_loss(tiny_folder):
    got = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense", "--frozen-cache")
    assert got["frozen_cache"] is True and got["project"]["settings"]["frozen_cache"] is True
    assert got["project"]["frozen_seconds_per_step"] == 0 and got["project"]["frozen_cache_build_seconds"] > 0
    assert got["loss_rel_diff"] <= 1e-4


def test_lora_dropout_reaches_both_variants_and_drops_the_loss_comparison(tiny_folder):
    got = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense", "--lora-dropout", "0.05")
    assert got["lora_dropout"] == 0.05
    assert got["naive"]["lora_dropout"] == got["project"]["lora_dropout"] == 0.05
    # masks differ between the variants' passes: no loss comparison, so no verdict on the targets
    assert got["loss_rel_diff"] is None and got["targets_met"] is None
    plain = bench(tiny_folder, "--batch", "2", "--seq", "16", "--dense")
    assert plain["project"]["lora_dropout"] == 0.0 and plain["targets_met"] in (True, False)
