"""What a sweep optimises, from an evaluation's flat metrics. Pure functions: no torch, no Ray.

Scalar (``objective.kind: scalar``, maximised)::

    objective = capability - asr_weight * ASR - over_refusal_weight * over_refusal - degeneracy_weight * degeneracy

Vector (``objective.kind: pareto``): ``{"asr": ASR (minimise), "capability": capability (maximise)}``.

- ASR = ``eval/asr/<objective.asr_attack>`` (``max``: the fraction of behaviours broken by at least one attack).
- capability (``objective.capability``): ``mmlu`` = ``eval/mmlu`` (accuracy in [0, 1]);
  ``benign_kl`` = exp(-``eval/kl_benign``) in (0, 1], 1 = the base model's distribution on benign text.
- over_refusal = ``eval/over_refusal``, degeneracy = ``eval/degeneracy`` (both in [0, 1], benign prompts).
  Degeneracy on attack prompts (``eval/degeneracy_attacks``) is reported but enters neither objective nor limit:
  a model that loops instead of complying with an attack has not failed.

Constraints (``objective.constraints``), one value per limit, ``measured - limit``; a trial is feasible when every
value is <= 0. Optuna's samplers steer away from infeasible trials, and the best trial and the Pareto front are
taken among feasible ones only. The weights alone cannot do this: a model that refuses or loops on every prompt
has ASR 0 and pays at most over_refusal_weight + degeneracy_weight (1.0 by default), about what the untouched
model pays for its ASR, so it outscores the untouched model while being of no use.

- ``over_refusal`` = ``eval/over_refusal`` - ``max_over_refusal``
- ``benign_degeneracy`` = ``eval/degeneracy`` - ``max_benign_degeneracy``
- ``degeneracy_increase`` = (``eval/degeneracy`` - ``eval/degeneracy_base``) - ``max_degeneracy_increase``
- ``kl_benign`` = ``eval/kl_benign`` - ``max_kl_benign`` (nats per token)
- ``mmlu_drop`` = (``eval/mmlu_base`` - ``eval/mmlu``) - ``max_mmlu_drop``
- ``helpfulness_drop`` = (``eval/helpful_benign_base`` - ``eval/helpful_benign``) - ``max_helpfulness_drop``: the
  share of borderline benign prompts the judge says are carried out, lost against the base model's answers to the
  same prompts. Refusals are only one way to stop helping: a defense that bleeds into risky-sounding requests
  answers them with on-topic-looking wandering text that neither the refusal, degeneracy nor KL limits see
  (docs/LOG.md, session 14).

A limit set to None is not applied; nor is one whose metrics the evaluation did not report
(:func:`unchecked_constraints` names those). A NaN measurement counts as violated (value +inf).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from crl_ray.config import ObjectiveConfig

__all__ = ["CONSTRAINT_METRICS", "DIRECTIONS", "FORMULA", "asr", "capability", "constraint_values", "feasible",
           "scalar_objective", "unchecked_constraints", "vector_objective"]

FORMULA = "capability - asr_weight*ASR - over_refusal_weight*over_refusal - degeneracy_weight*degeneracy"

# Optimisation direction of each entry of the vector objective.
DIRECTIONS: dict[str, str] = {"asr": "min", "capability": "max"}

# Each constraint's name (the Optuna constraint key) -> the metrics it reads; with two, the measurement is the first
# minus the second (an increase over, or a drop from, the base model's figure).
CONSTRAINT_METRICS: dict[str, tuple[str, ...]] = {
    "over_refusal": ("eval/over_refusal",),
    "benign_degeneracy": ("eval/degeneracy",),
    "degeneracy_increase": ("eval/degeneracy", "eval/degeneracy_base"),
    "kl_benign": ("eval/kl_benign",),
    "mmlu_drop": ("eval/mmlu_base", "eval/mmlu"),
    "helpfulness_drop": ("eval/helpful_benign_base", "eval/helpful_benign"),
}


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
    """capability - asr_weight*ASR - over_refusal_weight*over_refusal - degeneracy_weight*degeneracy (maximise).

    Degeneracy is the benign one (``eval/degeneracy``); the limits of ``cfg.constraints`` are not in this number.
    """
    return (capability(metrics, cfg)
            - cfg.asr_weight * asr(metrics, cfg)
            - cfg.over_refusal_weight * _get(metrics, "eval/over_refusal")
            - cfg.degeneracy_weight * _get(metrics, "eval/degeneracy"))


def vector_objective(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> dict[str, float]:
    """``{"asr": ..., "capability": ...}``; directions in :data:`DIRECTIONS`."""
    return {"asr": asr(metrics, cfg), "capability": capability(metrics, cfg)}


def _limits(cfg: ObjectiveConfig) -> dict[str, float | None]:
    c = cfg.constraints
    return {"over_refusal": c.max_over_refusal, "benign_degeneracy": c.max_benign_degeneracy,
            "degeneracy_increase": c.max_degeneracy_increase, "kl_benign": c.max_kl_benign,
            "mmlu_drop": c.max_mmlu_drop, "helpfulness_drop": c.max_helpfulness_drop}


def _measured(name: str, metrics: Mapping[str, float]) -> float:
    """The constraint's metric; for two metrics the first minus the second (see :data:`CONSTRAINT_METRICS`)."""
    first, *rest = (float(metrics[key]) for key in CONSTRAINT_METRICS[name])
    return first - rest[0] if rest else first


def constraint_values(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> dict[str, float]:
    """``measured - limit`` per applied limit (<= 0: within it), keyed by the names of :data:`CONSTRAINT_METRICS`.

    Skips a limit that is None or whose metrics are missing; a NaN measurement gives +inf (violated).
    """
    out: dict[str, float] = {}
    for name, limit in _limits(cfg).items():
        if limit is None or any(key not in metrics for key in CONSTRAINT_METRICS[name]):
            continue
        value = _measured(name, metrics) - limit
        out[name] = math.inf if math.isnan(value) else value
    return out


def unchecked_constraints(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> dict[str, list[str]]:
    """Limits that are set but could not be checked: name -> the metrics the evaluation did not report."""
    out: dict[str, list[str]] = {}
    for name, limit in _limits(cfg).items():
        missing = [key for key in CONSTRAINT_METRICS[name] if key not in metrics]
        if limit is not None and missing:
            out[name] = missing
    return out


def feasible(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> bool:
    """Whether the metrics are within every applied limit of ``cfg.constraints``."""
    return all(v <= 0 for v in constraint_values(metrics, cfg).values())
