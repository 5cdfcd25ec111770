"""Defaults and checks that follow the paper / reference code (samuelsimko/crl-llm-defense) where crl_ray deviated.

LoRA blocks (``lora.blocks: auto``), RepBend weights, the paper sweep's embedding attack, and the warning for
margins that cannot change the gradient. Config-level only: no model weights, no Ray.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from crl_ray.config import RepBendConfig, dump_config, parse_config
from crl_ray.training.losses import distance, triplet_terms
from crl_ray.training.model import lora_blocks
from crl_ray.training.step import LossPlan
from crl_ray.validate import DISTANCE_MAX, load_config, margin_warnings

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
BASE = {"name": "t", "data": {"benign": [{"source": "benign_prompts"}], "harmful": [{"source": "advbench"}],
                              "retain": [{"source": "benign_prompts"}]}}


def cfg_with(**sections):
    raw = copy.deepcopy(BASE)
    raw.update(sections)
    return parse_config(raw)


def auto_blocks(cfg, n: int) -> list[int]:
    return lora_blocks(cfg, n, LossPlan.from_config(cfg, n).lora_last_layer)


# --------------------------------------------------------------------------------------------- lora.blocks auto
@pytest.mark.parametrize("loss, n, expected", [
    ({}, 32, list(range(31))),  # paper: S = 20..30, benign all -> blocks 0..30, not all 32
    ({"target_layers": [1, 2]}, 4, [0, 1, 2]),  # benign all (index 4) does not widen it
    ({"target_layers": [1, 2], "benign_layers": [0, 4]}, 4, [0, 1, 2]),
    ({"target_layers": [4]}, 4, [0, 1, 2, 3]),  # max(S) = N (after the final norm): clipped to block N-1
    ({"kind": "circuit_breakers"}, 32, list(range(21))),  # layers 10, 20 -> 0..20 (docs/METHOD.md)
    ({"kind": "circuit_breakers", "circuit_breakers": {"layers": [1, 2]}}, 4, [0, 1, 2]),
    ({"kind": "repbend", "repbend": {"unsafe_layers": [2]}}, 4, [0, 1, 2]),
])
def test_auto_lora_blocks_end_at_max_target_layer(loss, n, expected):
    """Reference: LoRA layers_to_transform = range(max(target_layers) + 1) (code/methods/*/train.py)."""
    assert auto_blocks(cfg_with(loss=loss), n) == expected


def test_explicit_and_all_lora_blocks_are_kept():
    assert auto_blocks(cfg_with(lora={"blocks": "all"}, loss={"target_layers": [1]}), 4) == [0, 1, 2, 3]
    assert auto_blocks(cfg_with(lora={"blocks": [3, 1]}, loss={"target_layers": [1]}), 4) == [1, 3]


# --------------------------------------------------------------------------------------------- RepBend weights
def test_repbend_defaults_are_the_released_repbend_script():
    """code/train_repbend.sh, METHOD=rep_bending: alpha=0.5 beta=0.5 gamma=0.1 epsilon=0.3."""
    rb = RepBendConfig()
    assert (rb.alpha, rb.beta, rb.gamma, rb.epsilon) == (0.5, 0.5, 0.1, 0.3)
    assert "train_repbend.sh" in (RepBendConfig.model_fields["beta"].description or "")


# --------------------------------------------------------------------------------------------- shipped sweeps
def test_paper_sweep_generates_the_papers_answer_length():
    cfg, _ = load_config(SWEEPS / "paper.yaml")
    assert cfg.eval.max_new_tokens == 512
    assert cfg.eval.embedding.steps == 1000
    assert cfg.train.grad_accum == 1  # mining.yaml's period comment relies on it


def test_paper_sweep_runs_the_papers_six_embedding_configurations():
    cfg, _ = load_config(SWEEPS / "paper.yaml")
    emb = cfg.eval.embedding
    assert emb.configs == "paper" and len(emb.runs()) == 6
    assert parse_config(dump_config(cfg)) == cfg  # what the workers re-read


@pytest.mark.parametrize("name", ["paper", "margin", "layers", "mining"])
def test_shipped_cluster_sweeps_search_margins_that_matter(name):
    cfg, _ = load_config(SWEEPS / f"{name}.yaml")
    assert margin_warnings(cfg) == []  # mix distances are unbounded


# --------------------------------------------------------------------------------------------- margin warnings
def test_distance_bounds_are_reached():
    x = torch.tensor([3.0, 4.0])
    assert float(distance("cosine", x, -x)) == pytest.approx(DISTANCE_MAX["cosine"])
    assert float(distance("l2_normalized_sq", x, -x)) == pytest.approx(DISTANCE_MAX["l2_normalized_sq"])


def test_margins_at_or_above_the_distance_bound_do_not_change_the_gradient():
    """The premise of margin_warnings: every hinge active, so L(m) - L(m') is a constant and the gradients agree."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(2)]
    h0 = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    mask = torch.ones(2, 5)

    def grads(m: float, dist: str):
        lb, lh = triplet_terms(h, h0, mask, h, h0, mask, benign_layers=[0, 1], harmful_layers=[1], margin_benign=m,
                               margin_harmful=m, dist_benign_pos=dist, dist_benign_neg=dist, dist_harmful_pos=dist,
                               dist_harmful_neg=dist)
        return torch.autograd.grad(lb + lh, h)

    for dist, bound in DISTANCE_MAX.items():
        for a, b in zip(grads(bound, dist), grads(10 * bound, dist)):
            torch.testing.assert_close(a, b)
        assert any(not torch.allclose(a, b) for a, b in zip(grads(0.1, dist), grads(bound, dist)))


def test_margin_warnings_for_fixed_margins():
    script = cfg_with(loss={"margin_benign": 2.0, "margin_harmful": 3.0, "dist_benign_pos": "l2",
                            "dist_benign_neg": "cosine", "dist_harmful_pos": "cosine", "dist_harmful_neg": "cosine"})
    warnings = margin_warnings(script)  # the released train.sh: both margins inert
    assert len(warnings) == 2
    assert warnings[0].startswith("loss.margin_benign = 2 >= 2")
    assert "Fix: set loss.margin_benign below 2" in warnings[0]
    assert warnings[1].startswith("loss.margin_harmful = 3 >= 2") and "loss.dist_harmful_neg" in warnings[1]
    sq = cfg_with(loss={"margin_harmful": 1.2, "margin_benign": 1.0, "dist_harmful_neg": "l2_normalized_sq",
                        "dist_benign_neg": "l2_normalized_sq"})
    assert [w.split(" ")[0] for w in margin_warnings(sq)] == ["loss.margin_harmful"]
    assert margin_warnings(cfg_with(loss={"margin_benign": 1.5, "margin_harmful": 1.9, "dist_benign_neg": "cosine",
                                          "dist_harmful_neg": "cosine"})) == []
    assert margin_warnings(cfg_with(loss={"margin_benign": 1e4, "dist_benign_neg": "l2"})) == []  # unbounded
    assert margin_warnings(cfg_with()) == []  # paper: mix
    off = cfg_with(loss={"alpha": 0.0, "margin_benign": 5.0, "dist_benign_neg": "cosine"})
    assert margin_warnings(off) == []  # the benign term is off
    assert margin_warnings(cfg_with(loss={"kind": "circuit_breakers"})) == []


def search(space):
    return {"algorithm": "tpe", "num_trials": 4, "space": space}


def test_margin_warnings_for_searched_margins_and_distances():
    loss = {"dist_benign_neg": "cosine", "dist_harmful_neg": "cosine", "margin_benign": 0.5, "margin_harmful": 0.5}
    dead = margin_warnings(cfg_with(loss=loss, search=search(
        {"loss.margin_harmful": {"type": "float", "low": 3, "high": 30, "log": True}})))
    assert len(dead) == 1 and dead[0].startswith("search.space[loss.margin_harmful] searches 3..30, all >= 2")
    assert "high: 2" in dead[0]
    part = margin_warnings(cfg_with(loss=loss, search=search(
        {"loss.margin_benign": {"type": "float", "low": 0.1, "high": 5}})))
    assert len(part) == 1 and "every value from 2 to 5 trains the same model" in part[0]
    assert "Fix: set high: 2" in part[0]
    assert margin_warnings(cfg_with(loss=loss, search=search(
        {"loss.margin_benign": {"type": "float", "low": 0.1, "high": 1.5}}))) == []
    choices = margin_warnings(cfg_with(loss=loss, search=search(
        {"loss.margin_benign": {"type": "categorical", "choices": [0.5, 2, 4]}})))
    assert len(choices) == 1 and "choices [2, 4]" in choices[0]
    by_distance = margin_warnings(cfg_with(loss={"margin_benign": 5.0}, search=search(
        {"loss.dist_benign_neg": {"type": "categorical", "choices": ["mix", "cosine", "l2"]}})))
    assert len(by_distance) == 1 and "when loss.dist_benign_neg is cosine" in by_distance[0]
    assert margin_warnings(cfg_with(search=search(  # mix: unbounded
        {"loss.margin_benign": {"type": "float", "low": 50, "high": 5000}}))) == []


def test_dry_run_prints_margin_warnings_and_shipped_cpu_sweeps_have_none(capsys):
    from crl_ray.sweep import cli as sweep_cli

    overrides = ["loss.dist_harmful_neg=cosine", "loss.dist_benign_neg=cosine", "loss.margin_benign=3"]
    assert sweep_cli.main([str(SWEEPS / "smoke.yaml"), *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# WARNING: loss.margin_benign = 3 >= 2" in out
    assert "search.space[loss.margin_harmful] searches 300..3000" in out
    for name in ("smoke", "demo", "defend"):
        assert sweep_cli.main([str(SWEEPS / f"{name}.yaml"), "--dry-run"]) == 0
        assert "WARNING" not in capsys.readouterr().out, name
