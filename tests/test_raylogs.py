"""The State API noise of Ray Train's placement-group cleaner is dropped in Ray workers; nothing else is."""

from __future__ import annotations

import logging

import pytest

from crl_ray.sweep import raylogs
from crl_ray.sweep import run as sweep


def test_filter_drops_only_the_state_api_message(caplog) -> None:
    logger = logging.getLogger(raylogs.CLEANER_LOGGER)
    raylogs.quiet_workers()
    raylogs.quiet_workers()  # idempotent: one filter
    try:
        assert sum(isinstance(f, raylogs.DropStateApiNoise) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=raylogs.CLEANER_LOGGER):
            logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily "
                           "unavailable. Continuing to monitor.")
            logger.warning("Detected that the Ray Train controller actor (x) is dead. Cleaning up placement group")
        assert [r.getMessage()[:26] for r in caplog.records] == ["Detected that the Ray Trai"]
    finally:
        for f in [f for f in logger.filters if isinstance(f, raylogs.DropStateApiNoise)]:
            logger.removeFilter(f)


def test_sweep_starts_ray_with_the_hook(monkeypatch) -> None:
    import ray

    from crl_ray.validate import load_config

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    cfg, _ = load_config(sweep.Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml",
                         ["resources.ray_address=null"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(sweep.TRAIN_POLL_ENV, raising=False)
    expected = {**raylogs.RUNTIME_ENV, "env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}}
    assert sweep.start_ray(cfg) and seen["runtime_env"] == expected
    seen.clear()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert sweep.start_ray(cfg) and seen["runtime_env"] == expected
    seen.clear()
    monkeypatch.setenv(sweep.TRAIN_POLL_ENV, "3")  # the user's own setting wins
    assert sweep.start_ray(cfg) and seen["runtime_env"]["env_vars"] == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}


@pytest.mark.slow
def test_hook_runs_in_tasks_and_detached_actors() -> None:
    """Ray Train's cleaner is a detached actor: the job's runtime_env hook must reach such processes."""
    import ray

    def installed() -> bool:
        return any(isinstance(f, raylogs.DropStateApiNoise)
                   for f in logging.getLogger(raylogs.CLEANER_LOGGER).filters)

    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, runtime_env=raylogs.RUNTIME_ENV,
             logging_level="WARNING")
    try:
        assert ray.get(ray.remote(num_cpus=0)(installed).remote())
        probe = ray.remote(num_cpus=0)(type("Probe", (), {"check": lambda self: installed()}))
        actor = probe.options(lifetime="detached", name="raylogs-probe").remote()
        assert ray.get(actor.check.remote())
        ray.kill(actor)
    finally:
        ray.shutdown()
