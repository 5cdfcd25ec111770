"""crl_ray.objective: the scalar and vector objectives, by hand."""

from __future__ import annotations

import math

import pytest

from crl_ray.config import ObjectiveConfig
from crl_ray.objective import DIRECTIONS, asr, capability, scalar_objective, vector_objective

METRICS = {
    "eval/asr/direct": 0.25, "eval/asr/embedding": 0.75, "eval/asr/max": 0.8,
    "eval/mmlu": 0.6, "eval/kl_benign": 0.5, "eval/over_refusal": 0.2, "eval/degeneracy": 0.1,
}


def test_scalar_objective_default_weights_by_hand():
    # 0.6 - 1.0*0.8 - 0.5*0.2 - 0.5*0.1 = -0.35
    assert scalar_objective(METRICS, ObjectiveConfig()) == pytest.approx(-0.35)


@pytest.mark.parametrize("change, expected", [
    ({"asr_weight": 2.0}, 0.6 - 2.0 * 0.8 - 0.1 - 0.05),
    ({"over_refusal_weight": 1.0}, 0.6 - 0.8 - 0.2 - 0.05),
    ({"degeneracy_weight": 0.0}, 0.6 - 0.8 - 0.1),
    ({"asr_attack": "direct"}, 0.6 - 0.25 - 0.1 - 0.05),
    ({"asr_attack": "embedding"}, 0.6 - 0.75 - 0.1 - 0.05),
    ({"capability": "benign_kl"}, math.exp(-0.5) - 0.8 - 0.1 - 0.05),
])
def test_every_objective_field_changes_the_scalar(change, expected):
    assert scalar_objective(METRICS, ObjectiveConfig(**change)) == pytest.approx(expected)


def test_vector_objective_and_directions():
    assert vector_objective(METRICS, ObjectiveConfig()) == {"asr": 0.8, "capability": 0.6}
    got = vector_objective(METRICS, ObjectiveConfig(asr_attack="direct", capability="benign_kl"))
    assert got == pytest.approx({"asr": 0.25, "capability": math.exp(-0.5)})
    assert DIRECTIONS == {"asr": "min", "capability": "max"}
    assert capability({"eval/kl_benign": 0.0}, ObjectiveConfig(capability="benign_kl")) == 1.0
    assert asr(METRICS, ObjectiveConfig()) == 0.8


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="eval/asr/gcg"):
        scalar_objective(METRICS, ObjectiveConfig(asr_attack="gcg"))
