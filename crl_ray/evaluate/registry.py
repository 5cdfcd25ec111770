"""The judges by ``eval.judge`` name: keyword and classifier (crl_ray.evaluate.judges), probe
(crl_ray.evaluate.probe, which builds on judges; hence this module above both)."""

from __future__ import annotations

from typing import Any

from crl_ray.config import JudgeName
from crl_ray.errors import UserError
from crl_ray.evaluate.judges import ClassifierJudge, Judge, KeywordJudge
from crl_ray.evaluate.probe import ProbeJudge

JUDGES: dict[str, type[Judge]] = {"keyword": KeywordJudge, "classifier": ClassifierJudge, "probe": ProbeJudge}


def get_judge(name: JudgeName | str, **kw: Any) -> Judge:
    """The judge called ``name`` (``eval.judge``), built with ``kw``."""
    if name not in JUDGES:
        raise UserError(f"eval.judge: unknown judge {name!r}\n    fix: use one of {', '.join(JUDGES)}")
    return JUDGES[name](**kw)
