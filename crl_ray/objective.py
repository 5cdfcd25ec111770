"""What a sweep optimises, from an evaluation's flat metrics. Pure functions: no torch, no Ray.

Scalar (``objective.kind: scalar``, maximised)::

    objective = capability - asr_weight * ASR - over_refusal_weight * over_refusal - degeneracy_weight * degeneracy

Vector (``objective.kind: pareto``): ``{"asr": ASR (minimise), "capability": capability (maximise)}``.

- ASR = ``eval/asr/<objective.asr_attack>`` (``max``: the fraction of behaviours broken by at least one attack).
- capability (``objective.capability``): ``mmlu`` = ``eval/mmlu`` (accuracy in [0, 1]);
  ``benign_kl`` = exp(-``eval/kl_benign``) in (0, 1], 1 = the base model's distribution on benign text.
- over_refusal = ``eval/over_refusal``, degeneracy = ``eval/degeneracy`` (both in [0, 1], benign prompts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from crl_ray.config import ObjectiveConfig

__all__ = ["DIRECTIONS", "asr", "capability", "scalar_objective", "vector_objective"]

# Optimisation direction of each entry of the vector objective.
DIRECTIONS: dict[str, str] = {"asr": "min", "capability": "max"}


def _get(metrics: Mapping[str, float], key: str) -> float:
    try:
        return float(metrics[key])
    except KeyError:
        raise KeyError(f"the objective needs metric {key!r}; metrics present: {', '.join(sorted(metrics))}") from None


def asr(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> float:
    """The ASR the objective uses: ``eval/asr/<cfg.asr_attack>``."""
    return _get(metrics, f"eval/asr/{cfg.asr_attack}")


def capability(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> float:
    """Capability as ``cfg.capability`` defines it: MMLU accuracy, or exp(-KL to the base on benign text)."""
    if cfg.capability == "mmlu":
        return _get(metrics, "eval/mmlu")
    return math.exp(-_get(metrics, "eval/kl_benign"))


def scalar_objective(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> float:
    """capability - asr_weight*ASR - over_refusal_weight*over_refusal - degeneracy_weight*degeneracy (maximise)."""
    return (capability(metrics, cfg)
            - cfg.asr_weight * asr(metrics, cfg)
            - cfg.over_refusal_weight * _get(metrics, "eval/over_refusal")
            - cfg.degeneracy_weight * _get(metrics, "eval/degeneracy"))


def vector_objective(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> dict[str, float]:
    """``{"asr": ..., "capability": ...}``; directions in :data:`DIRECTIONS`."""
    return {"asr": asr(metrics, cfg), "capability": capability(metrics, cfg)}
