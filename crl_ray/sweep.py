"""``python -m crl_ray.sweep FILE.yaml [key.path=value ...] [--dry-run] [--resume]``

Validates the sweep file (every problem at once, exit status 2), then either prints the plan (``--dry-run``:
resolved config, search space, resource plan; no Ray, no MLflow, nothing written) or runs the sweep.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import yaml

from crl_ray.config import CategoricalParam, FloatParam, IntParam, LayerWindowParam, SweepConfig, dump_config
from crl_ray.errors import USAGE_EXIT_CODE, UserError

log = logging.getLogger("crl_ray.sweep")

DRIVER_CPUS = 0.01  # the per-trial driver only waits on its TorchTrainer (Tune rejects 0)


@dataclass(frozen=True)
class ResourcePlan:
    trials: int
    workers_per_trial: int
    cpus_per_trial: float
    gpus_per_trial: float
    cluster: str  # "local (N CPUs, G GPUs)" or the address
    cluster_cpus: float | None  # None when only known at run time
    cluster_gpus: float | None
    concurrency: int
    warnings: tuple[str, ...]


def local_gpus() -> int:
    """GPUs visible to this machine, without importing torch (CUDA_VISIBLE_DEVICES or /proc)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


def resource_plan(cfg: SweepConfig) -> ResourcePlan:
    """How many trials run at once, and what each one asks Ray for."""
    res = cfg.resources
    workers = res.num_workers
    units = max(workers, 1)
    cpus = DRIVER_CPUS + units * res.cpus_per_worker
    gpus = units * res.gpus_per_worker if res.use_gpu else 0.0
    address = res.ray_address or os.environ.get("RAY_ADDRESS")
    warnings: list[str] = []
    if address:
        cluster, ccpu, cgpu = f"existing Ray cluster at {address!r} (capacity read at run time)", None, None
    else:
        ccpu, cgpu = float(os.cpu_count() or 1), float(local_gpus())
        cluster = f"local Ray instance ({int(ccpu)} CPUs, {int(cgpu)} GPUs)"
        if cpus - DRIVER_CPUS > ccpu:
            warnings.append(f"one trial needs {cpus - DRIVER_CPUS:g} CPUs but this machine has {ccpu:g}: "
                            "lower resources.num_workers or cpus_per_worker, or run on a cluster")
        if gpus > cgpu:
            warnings.append(f"one trial needs {gpus:g} GPUs but this machine has {cgpu:g}: run on a GPU cluster "
                            "(resources.ray_address: auto on its head node)")
    trials = cfg.search.num_trials
    if res.max_concurrent_trials != "auto":
        concurrency = min(trials, res.max_concurrent_trials)
    elif ccpu is None:
        concurrency = trials
    else:
        fit = math.floor(ccpu / cpus) if cpus else trials
        if gpus:
            fit = min(fit, math.floor((cgpu or 0) / gpus))
        concurrency = max(1, min(trials, fit))
    return ResourcePlan(trials, workers, cpus, gpus, cluster, ccpu, cgpu, concurrency, tuple(warnings))


def describe_param(param) -> str:
    if isinstance(param, FloatParam):
        return f"float in [{param.low:g}, {param.high:g}]" + (" (log)" if param.log else "") + (
            f" step {param.step:g}" if param.step else "")
    if isinstance(param, IntParam):
        return f"int in [{param.low}, {param.high}]" + (" (log)" if param.log else "") + (
            f" step {param.step}" if param.step != 1 else "")
    if isinstance(param, CategoricalParam):
        return "one of " + ", ".join(repr(c) for c in param.choices)
    if isinstance(param, LayerWindowParam):
        return (f"layer window: start in [{param.start[0]}, {param.start[1]}], "
                f"size in [{param.size[0]}, {param.size[1]}]")
    return repr(param)


def render_plan(cfg: SweepConfig, info, plan: ResourcePlan) -> str:
    lines = ["# Resolved config", yaml.safe_dump(dump_config(cfg), sort_keys=False, width=110).rstrip(), ""]
    lines.append(f"# Model: {cfg.model.name}: {info.num_blocks} blocks, hidden {info.hidden_size} ({info.source})")
    n = info.num_blocks
    lines.append(f"#   target layers (hidden_states): {cfg.loss.target_layers.resolve(n)}")
    lines.append("")
    lines.append(f"# Search: {cfg.search.algorithm}, {cfg.search.num_trials} trial(s), objective {cfg.objective.kind}")
    if cfg.search.space:
        width = max(len(k) for k in cfg.search.space)
        for key, param in cfg.search.space.items():
            lines.append(f"#   {key:<{width}}  {describe_param(param)}")
    else:
        lines.append("#   (no search: the config above runs as written)")
    lines.append("")
    lines.append("# Resource plan")
    lines.append(f"#   cluster:             {plan.cluster}")
    lines.append(f"#   trials:              {plan.trials}")
    mode = "in-process (local mode)" if plan.workers_per_trial == 0 else "Ray Train workers (FSDP2)"
    lines.append(f"#   workers per trial:   {plan.workers_per_trial} {mode}")
    lines.append(f"#   per trial:           {plan.cpus_per_trial:g} CPUs, {plan.gpus_per_trial:g} GPUs "
                 f"(driver {DRIVER_CPUS:g} CPU + workers)")
    lines.append(f"#   concurrent trials:   {plan.concurrency}")
    waves = math.ceil(plan.trials / plan.concurrency)
    lines.append(f"#   waves:               {waves}")
    lines.append(f"#   storage:             {cfg.storage.path}/{cfg.name}")
    uri = cfg.mlflow.tracking_uri or f"sqlite:///{cfg.storage.path}/mlflow.db"
    lines.append(f"#   mlflow:              {uri} (experiment {cfg.mlflow.experiment or cfg.name})")
    for w in plan.warnings:
        lines.append(f"# WARNING: {w}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.sweep",
        description="Run a crl_ray sweep (Ray Tune + Optuna over CRL training runs, MLflow for every run).",
        epilog="Example: python -m crl_ray.sweep sweeps/smoke.yaml loss.margin_benign=3 --dry-run",
    )
    parser.add_argument("file", help="sweep file (YAML), e.g. sweeps/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override config values (YAML syntax), e.g. train.steps=10 search.num_trials=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved config, search space and resource plan; "
                        "start nothing, write nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from crl_ray.checks import load_config

    try:
        cfg, info = load_config(args.file, args.overrides)
        plan = resource_plan(cfg)
        if args.dry_run:
            print(render_plan(cfg, info, plan))
            return 0
        raise UserError("running sweeps is not implemented yet (issue 5); use --dry-run to validate and plan")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
