"""Quiet one known-harmless Ray warning in every Ray worker process, leaving all others.

Ray Train's PlacementGroupCleaner (a detached actor per training run) asks the State API every few seconds whether
the run's controller is alive; the State API is served by the Ray dashboard, which crl_ray's local Ray instance
does not start (it needs ray[default]'s extra packages and a core's worth of start-up on a 2-core machine). Each
failed query logs "State API may be temporarily unavailable" - hundreds of lines per sweep, burying real warnings.
The filter drops exactly that message (the cleaner keeps monitoring; Tune still removes a finished trial's
placement group); every other record of that logger passes.
"""

from __future__ import annotations

import logging

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
STATE_API_NOISE = "Failed to query Ray Train Controller actor state"


class DropStateApiNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(STATE_API_NOISE)


def quiet_workers() -> None:
    """runtime_env ``worker_process_setup_hook``: runs once in each Ray worker process at start."""
    logger = logging.getLogger(CLEANER_LOGGER)
    if not any(isinstance(f, DropStateApiNoise) for f in logger.filters):
        logger.addFilter(DropStateApiNoise())


RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.quiet_workers"}
