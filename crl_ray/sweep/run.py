"""``python -m crl_ray.sweep FILE.yaml [key.path=value ...] [--dry-run] [--resume]``

Validates the sweep file (every problem at once, exit status 2), then either prints the plan (``--dry-run``:
resolved config, search space, resource plan; no Ray, no MLflow, nothing written) or runs the sweep:
a Ray Tune Tuner over the per-trial driver (crl_ray.sweep.trial), OptunaSearch with its study in
``<storage.path>/<name>/optuna.db``, optional ASHA, MLflow parent + nested runs (crl_ray.sweep.tracking).

Layout of ``<storage.path>/<name>/``: ``tune/`` (Tune experiment state), ``train/train-<trial id>/`` (Ray Train
runs and checkpoints), ``trials/<trial id>/`` (resolved config, evaluations), ``optuna.db``, ``mlflow.db`` and
``mlartifacts/`` (default tracking), ``summary/`` (results table, best config, plots), ``sweep_config.yaml``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crl_ray.config import (
    CategoricalParam,
    FloatParam,
    IntParam,
    LayerWindowParam,
    ObjectiveConfig,
    SweepConfig,
    dump_config,
)
from crl_ray.errors import ConfigError, Problem, UserError
from crl_ray.evaluate.objective import constraint_values, unchecked_constraints
from crl_ray.storage import is_uri, join
from crl_ray.sweep.raylogs import RUNTIME_ENV
from crl_ray.sweep.search import segments, study_storage_url
from crl_ray.sweep.tracking import tracking_uri, ui_command

log = logging.getLogger("crl_ray.sweep")

DEFAULT_HEAD_PATH = "crl_runs"  # the sweep's own state when storage.path is an object store
DRIVER_CPUS = 0.01  # the per-trial driver only waits on its TorchTrainer (Tune rejects 0)
HEAD_RESOURCE = "node:__internal_head__"  # drivers (and their Train controllers) run on the head: see tracking
LOCAL_OBJECT_STORE_BYTES = 1 << 30  # a sweep moves no data through the object store
# Ray Train's controller checks on its workers every 2 s by default, so a trial whose training has finished waits
# ~1-2 s more before it can evaluate; at 0.5 s the smoke trial's end of training took 2.1 s instead of 4.7 s
# (docs/LOG.md, 2026-12-04). A value already set in the environment is kept.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"
CONFIG_FILE = "sweep_config.yaml"
EXIT_INTERRUPTED = 130  # like a shell after Ctrl-C
MAX_LISTED = 10  # infeasible trials named in the closing message; the results table has them all


@dataclass(frozen=True)
class ResourcePlan:
    trials: int
    workers_per_trial: int
    cpus_per_trial: float
    gpus_per_trial: float
    cluster: str  # "local (N CPUs, G GPUs)" or the address
    cluster_cpus: float | None  # None when only known at run time
    cluster_gpus: float | None
    concurrency: int | None  # None: a cluster's size is only known at run time
    warnings: tuple[str, ...]
    can_grow: bool = False  # an autoscaling config allows worker nodes beyond the head


def local_gpus() -> int:
    """GPUs visible to this machine, without importing torch (CUDA_VISIBLE_DEVICES or /proc)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


def resource_plan(cfg: SweepConfig, capacity=None) -> ResourcePlan:
    """How many trials run at once, and what each one asks Ray for.

    ``capacity`` is a running cluster's size, read once connected: (CPUs, GPUs) or a list of cluster.Node. On a
    cluster, ``max_concurrent_trials: auto`` is what the cluster can grow to (``resources.cluster_config``: the
    autoscaling YAML; ``auto`` = the one ``ray up`` left on the head), or what is up now when no such config is
    known; without either (a dry run against a cluster) it is decided at run time (``concurrency`` None).
    """
    from crl_ray.sweep.cluster import ClusterConfigError, Node, read_shape, trials_fit

    res = cfg.resources
    workers = res.num_workers
    worker_cpus, gpus = res.per_trial()
    cpus = DRIVER_CPUS + worker_cpus
    gpw = res.gpus_per_worker if res.use_gpu else 0.0
    address = res.address()
    warnings: list[str] = []
    trials = cfg.search.num_trials

    def fit(nodes) -> int:
        return trials_fit(nodes, workers, res.cpus_per_worker, gpw, DRIVER_CPUS)

    if capacity is not None and not all(isinstance(n, Node) for n in capacity):
        capacity = [Node(float(capacity[0]), float(capacity[1]))]  # (CPUs, GPUs) totals
    now_nodes = list(capacity) if capacity is not None else None
    ccpu = sum(n.cpus for n in now_nodes) if now_nodes is not None else None
    cgpu = sum(n.gpus for n in now_nodes) if now_nodes is not None else None
    shape = None
    if address:
        try:
            shape = read_shape(res.cluster_config, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=gpw)
        except ClusterConfigError as exc:
            raise ConfigError([Problem("resources.cluster_config", str(exc), res.cluster_config)], cfg.name) from exc
        cluster = f"existing Ray cluster at {address!r}"
        cluster += f" ({ccpu:g} CPUs, {cgpu:g} GPUs now)" if now_nodes is not None else ""
        if shape is not None:
            cluster += f"; autoscaling up to {shape.described} ({shape.source})"
    else:
        ccpu, cgpu = float(os.cpu_count() or 1), float(local_gpus())
        now_nodes = [Node(ccpu, cgpu)]
        cluster = f"local Ray instance ({int(ccpu)} CPUs, {int(cgpu)} GPUs)"
        if cpus - DRIVER_CPUS > ccpu:
            warnings.append(f"one trial needs {cpus - DRIVER_CPUS:g} CPUs but this machine has {ccpu:g}: "
                            "lower resources.num_workers or cpus_per_worker, or run on a cluster")
        if gpus > cgpu:
            warnings.append(f"one trial needs {gpus:g} GPUs but this machine has {cgpu:g}: run on a GPU cluster "
                            "(resources.ray_address: auto on its head node)")
    concurrency: int | None
    if res.max_concurrent_trials != "auto":
        concurrency = min(trials, res.max_concurrent_trials)
    else:
        upper = fit(shape.nodes) if shape is not None else None
        now = fit(now_nodes) if now_nodes is not None else None
        if upper == 0 and not now:
            warnings.append(f"one trial needs {max(workers, 1)} worker(s) x ({res.cpus_per_worker:g} CPU, {gpw:g} GPU) but "
                            f"even the largest cluster {shape.source} allows ({shape.described}) cannot hold it: "
                            "add or enlarge a node type, or lower resources.num_workers")
        if upper is not None:
            concurrency = max(upper, now or 0)
        else:
            concurrency = now
        if concurrency is not None:
            concurrency = max(1, min(trials, concurrency))
    return ResourcePlan(trials, workers, cpus, gpus, cluster, ccpu, cgpu, concurrency, tuple(warnings),
                        can_grow=shape is not None and len(shape.nodes) > 1)


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
    if plan.concurrency is None:
        lines.append("#   concurrent trials:   decided at run time from the nodes up then (no autoscaling config: "
                     "set resources.cluster_config to your cluster YAML to size it by what the cluster can grow to)")
    else:
        lines.append(f"#   concurrent trials:   {plan.concurrency}")
        lines.append(f"#   waves:               {math.ceil(plan.trials / plan.concurrency)}")
    folder = sweep_dir(cfg)
    lines.append(f"#   trial files:         {trial_store(cfg)} (data, checkpoints, adapters, evaluation records)")
    lines.append(f"#   sweep state (head):  {folder} (Tune experiment, trial configs, results)")
    uri = tracking_uri(cfg.mlflow.tracking_uri, folder)
    lines.append(f"#   mlflow:              {uri} (experiment {cfg.mlflow.experiment or cfg.name})")
    if cfg.search.algorithm != "none":
        lines.append(f"#   optuna study:        {study_storage_url(folder)} (study {cfg.name})")
    if cfg.scheduler.kind == "asha":
        lines.append(f"#   early stopping:      ASHA on the objective after steps {segments(cfg)} "
                     "(trials stop only between training segments)")
    from crl_ray.validate import margin_warnings

    for w in (*plan.warnings, *margin_warnings(cfg)):
        lines.append(f"# WARNING: {w}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- running
def sweep_dir(cfg: SweepConfig) -> Path:
    """Absolute folder of one sweep's own state on the head: <storage.head_path or storage.path>/<name> (crl_runs
    when storage.path is an object store)."""
    head = cfg.storage.head_path or (DEFAULT_HEAD_PATH if is_uri(cfg.storage.path) else cfg.storage.path)
    return Path(head).expanduser().resolve() / cfg.name


def trial_store(cfg: SweepConfig) -> str:
    """Where the sweep's trials keep their files (crl_ray.storage): <storage.path>/<name>; the sweep's folder
    itself when that is a folder."""
    return join(cfg.storage.path, cfg.name) if is_uri(cfg.storage.path) else str(sweep_dir(cfg))


@dataclass
class SweepOutcome:
    """What a sweep left behind: where, its trials' results, the best one."""

    name: str
    folder: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    interrupted: bool = False
    wall_s: float = 0.0
    experiment_id: str = ""
    view: str | None = None  # the MLflow UI view saved for this sweep (tracking.save_sweep_view)

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, as 'key: old -> new'."""
    from crl_ray.sweep.tracking import flatten_params

    a, b = flatten_params(old), flatten_params(new)
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def check_storage(cfg: SweepConfig, folder: Path, resume: bool) -> str:
    """What to do with the sweep's folder: "new", "resume" or "restart".

    An existing sweep with the same config is resumed (with or without --resume: finished trials are kept); one
    started with another config is refused (say name=<new name>). A sweep stopped before Tune saved any state
    (Ctrl-C during start, MLflow unreachable) is started again in place ("restart"); --resume on nothing fails.
    """
    from ray.tune import Tuner

    tune_dir = folder / "tune"
    saved = folder / CONFIG_FILE
    restorable = tune_dir.is_dir() and Tuner.can_restore(str(tune_dir))
    leftovers = [p for p in (tune_dir, saved, folder / "optuna.db") if p.exists()]
    if saved.is_file():
        diff = config_differences(yaml.safe_load(saved.read_text()), dump_config(cfg))
        if diff:
            raise UserError(f"sweep {cfg.name!r} in {folder} was started with another config: set name=<new name> "
                            "to start a sweep with this one, use the same file and overrides to continue it, or "
                            "delete that folder. Differences:\n  " + "\n  ".join(diff[:20]))
    if restorable:
        if not resume:
            log.info("sweep %r already exists in %s: resuming it (finished trials are kept; name=<new name> starts "
                     "another)", cfg.name, folder)
        return "resume"
    if leftovers:
        study = folder / "optuna.db"
        if study.exists() and _finished_study_trials(study, cfg.name):
            raise UserError(f"sweep {cfg.name!r} in {folder} has finished Optuna trials but no Tune state to resume "
                            "them from: set name=<new name> to start another sweep, or delete that folder")
        log.info("sweep %r stopped before its first trial (no Tune state in %s): starting it again", cfg.name, folder)
        return "restart"
    if resume:
        raise UserError(f"nothing to resume: no sweep {cfg.name!r} in {folder}; run without --resume to start it")
    return "new"


def _finished_study_trials(path: Path, study_name: str) -> int:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=study_storage_url(path.parent))
    except KeyError:  # no such study in the file
        return 0
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def start_ray(cfg: SweepConfig) -> bool:
    """Connect to resources.ray_address / RAY_ADDRESS, else start a local Ray sized for the sweep.

    Returns whether this call started (and so should shut down) Ray. Locally, logical CPUs may exceed physical
    ones: one trial needs its workers' CPUs plus the driver's sliver (2 x 1 + 0.01 on a 2-core machine).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.resources.address()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env())
        _remove_orphans()
        return True
    plan = resource_plan(cfg)
    num_cpus = max(int(plan.cluster_cpus or 1), math.ceil(plan.concurrency * plan.cpus_per_trial))
    ray.init(num_cpus=num_cpus, num_gpus=int(plan.cluster_gpus or 0), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             runtime_env=runtime_env(),
             include_dashboard=False, logging_level=logging.WARNING)
    return True


def runtime_env() -> dict[str, Any]:
    """The sweep's Ray job environment: the log filter hook (crl_ray.sweep.raylogs) and Ray Train's poll interval."""
    return {**RUNTIME_ENV, "env_vars": {TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)}}


class _InterruptWatch(logging.Handler):
    """Notices Tune's "Experiment has been interrupted" warning (the one trace a Ctrl-C leaves in the result)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if "has been interrupted" in record.getMessage():
            self.seen = True


def _trial_name(trial) -> str:
    return trial.trial_id


def run_sweep(cfg: SweepConfig, *, resume: bool = False, job=None) -> SweepOutcome:
    """Run (or resume) the sweep: Tune + Optuna over the per-trial driver, MLflow parent and nested runs.

    ``job`` (a crl_ray.sweep.trial.TrialJob) defaults to the real training and evaluation; tests pass fakes.
    """
    import ray
    from ray import tune

    from crl_ray.sweep import search, tracking
    from crl_ray.sweep.trial import (
        TrialContext,
        TrialJob,
        TrialStatusCallback,
        run_trial,
    )

    folder = sweep_dir(cfg)
    store = trial_store(cfg)
    mode = check_storage(cfg, folder, resume)
    resume = mode == "resume"
    if mode == "restart":  # nothing had started: clear what the aborted start left (its MLflow run is reopened)
        shutil.rmtree(folder / "tune", ignore_errors=True)
        (folder / "optuna.db").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False, width=110))
    # Synchronous reporting: tune.report blocks until Tune decided, so a trial is only stopped between segments.
    os.environ["TUNE_RESULT_BUFFER_LENGTH"] = "1"
    t0 = time.monotonic()
    started = start_ray(cfg)
    uri = tracking_uri(cfg.mlflow.tracking_uri, folder)
    experiment = cfg.mlflow.experiment or cfg.name
    target = None
    interrupted = True
    try:
        address = cfg.resources.address()
        capacity = None
        if address:
            from crl_ray.sweep.cluster import Node

            capacity = [Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                        for n in ray.nodes() if n.get("Alive")]
        plan = resource_plan(cfg, capacity)
        if address:  # every node must see storage.path: stop here, before any trial, when one does not
            from crl_ray.sweep.cluster import storage_problem

            problem = storage_problem(cfg.storage.path, store, can_grow=plan.can_grow)
            if problem:
                raise UserError(problem)
        from crl_ray.validate import margin_warnings

        for warning in (*plan.warnings, *margin_warnings(cfg)):
            log.warning(warning)
        if job is None:  # the real evaluation judges; a replacement job (tests) brings its own metrics
            prepare_judge(cfg)
            prepare_training_data(cfg, store or str(folder))
        target = tracking.open_sweep_run(uri, experiment, cfg.name, resume=mode != "new", commit=tracking.git_commit(),
                                         artifact_dir=folder / "mlartifacts")
        base = dump_config(cfg)
        if not resume:
            _log_sweep_config(target, base, folder / CONFIG_FILE)
        try:
            view = tracking.save_sweep_view(target, list(cfg.eval.attacks), list(cfg.search.space))
        except Exception as exc:  # a view is a convenience: never stop the sweep for it
            log.warning("could not save the sweep's MLflow view: %s", exc)
            view = None
        ctx = TrialContext(base=base, sweep_dir=str(folder), target=target, job=job or TrialJob(),
                           store=store)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                        {"CPU": DRIVER_CPUS, HEAD_RESOURCE: 0.001})
        if resume:
            tuner = tune.Tuner.restore(str(folder / "tune"), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space={},
                tune_config=tune.TuneConfig(
                    metric=search.METRIC, mode="max", search_alg=search.make_searcher(cfg, folder, plan.concurrency),
                    scheduler=search.make_scheduler(cfg), num_samples=cfg.search.num_trials,
                    # a finished trial's driver process runs the next trial: ~4.5 s of process start, imports
                    # and MLflow set-up saved per trial (docs/LOG.md, 2026-12-04); the drivers hold no state
                    max_concurrent_trials=plan.concurrency, reuse_actors=True,
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(folder), callbacks=[TrialStatusCallback(target)],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1))
        log.info("sweep %s: %d trial(s), %d at a time; storage %s", cfg.name, cfg.search.num_trials,
                 plan.concurrency, folder)
        watch = _InterruptWatch()
        tune_log = logging.getLogger("ray.tune.tune")
        tune_log.addHandler(watch)
        try:
            grid = tuner.fit()
        finally:
            tune_log.removeHandler(watch)
        # Tune reports a trial stopped by Ctrl-C as TERMINATED; only its closing warning tells an interrupt apart
        # when every trial had already been created
        interrupted = (watch.seen or len(grid) < cfg.search.num_trials
                       or grid.num_terminated + grid.num_errors < len(grid))
        outcome = SweepOutcome(cfg.name, folder, uri, experiment, target.parent_run_id, interrupted=interrupted,
                               experiment_id=target.experiment_id, view=view)
        outcome.rows = result_rows(grid, target, interrupted, cfg.objective)
        if not interrupted:
            search.close_orphan_trials(cfg, folder)
            outcome.best = best_row(outcome.rows)
            _write_summary(cfg, base, outcome, target)
        outcome.wall_s = time.monotonic() - t0
        return outcome
    finally:
        if target is not None:
            _close_sweep_run(target, interrupted)
        if started:
            if cfg.resources.address():  # a cluster outlives this sweep: leave none of its reservations behind
                _remove_orphans()
            ray.shutdown()


def _remove_orphans() -> None:
    """Free a shared cluster's resources that a killed run left reserved (crl_ray.sweep.cluster.orphaned)."""
    from crl_ray.sweep.cluster import remove_orphaned_placement_groups

    for line in remove_orphaned_placement_groups():
        log.warning("freed resources an interrupted run left reserved: placement group %s", line)


def prepare_judge(cfg: SweepConfig) -> None:
    """Fit the probe judge before any trial (once; cached), so that trials only load it, and say how good it is."""
    if cfg.eval.judge != "probe":
        return
    from crl_ray.evaluate.judges import check_summary
    from crl_ray.evaluate.run import make_judge

    # the trials' own judge (make_judge), so the probe fitted here is the one they load from the cache
    judge = make_judge(cfg, None, progress=sys.stderr.isatty(), device="cpu")
    log.info("probe judge: fitting it on human labels if it is not cached yet (a few minutes, once)")
    summary = check_summary(judge.calibration())
    log.info("probe judge ready: accuracy %.3f [%.3f, %.3f], ASR bias %+.3f on %d human labels",
             summary["judge/accuracy"], summary["judge/accuracy_low"], summary["judge/accuracy_high"],
             summary["judge/rate_bias"], int(summary["judge/labels"]))


def prepare_training_data(cfg: SweepConfig, trial_root: str) -> None:
    """The trials' training data, prepared before the first trial (where they look for it: ``train`` under
    ``trial_root``) when no value of the search space changes it (crl_ray.training.train.data_key, checked at
    each parameter's extremes), so that no trial pays for it and concurrent first trials do not each prepare a
    copy. A space that changes the data (model, data or loss layers) leaves it to the trials, as before."""
    import copy

    from crl_ray.config import parse_config
    from crl_ray.storage import Store
    from crl_ray.training.train import data_key, shared_data
    from crl_ray.validate import set_path, space_samples

    key, base = data_key(cfg), dump_config(cfg)
    for path, param in cfg.search.space.items():
        for _, value in space_samples(param):
            raw = copy.deepcopy(base)
            set_path(raw, path, value)
            if data_key(parse_config(raw, "search space")) != key:
                log.info("training data: %s changes it, so each trial prepares its own", path)
                return
    started = time.monotonic()
    try:
        shared_data(cfg, Store(Store(trial_root).located("train")), local=cfg.resources.num_workers == 0)
    except Exception as exc:  # a data problem as the user's error (exit 2), not inside Ray's task wrapper
        from crl_ray.sweep.trial import original_error

        raise original_error(exc) from None
    log.info("training data ready for every trial (%.1f s)", time.monotonic() - started)


def _log_sweep_config(target, base: dict, config_file: Path) -> None:
    from crl_ray.sweep import tracking

    params = tracking.flatten_params({k: v for k, v in base.items() if k != "search"})
    search_cfg = base.get("search", {})
    params.update({f"search.{k}": (json.dumps(v) if k == "space" else str(v)) for k, v in search_cfg.items()})
    tracking.log_params(target, target.parent_run_id, params)
    tracking.log_artifacts(target, target.parent_run_id, [(config_file, None)])


def _close_sweep_run(target, interrupted: bool) -> None:
    """End every run of the sweep: open trial runs and the parent (KILLED when interrupted)."""
    from crl_ray.sweep import tracking

    try:
        tracking.close_open_runs(target, interrupted=interrupted)
        if interrupted:
            tracking.end_run(target, target.parent_run_id, "KILLED", "interrupted")
        else:
            tracking.end_run(target, target.parent_run_id, "FINISHED", "completed")
    except Exception as exc:  # never hide the sweep's own error behind a tracking one
        log.warning("could not close the sweep's MLflow runs: %s", exc)


def feasibility_columns(metrics: dict[str, Any], objective: ObjectiveConfig) -> dict[str, Any]:
    """A results row's ``feasible`` flag (None for a trial that never reported an objective), its
    ``constraints/<name>`` values (measured - limit, <= 0 = within the limit) and ``constraints_unchecked`` (limits
    set but not applied because a metric is missing, e.g. ``mmlu_drop (eval/mmlu_base)``; "" when none)."""
    if not _usable(metrics.get("objective")):
        return {"feasible": None}
    values = constraint_values(metrics, objective)
    unchecked = unchecked_constraints(metrics, objective)
    return {"feasible": all(v <= 0 for v in values.values()),
            **{f"constraints/{k}": v for k, v in values.items()},
            "constraints_unchecked": "; ".join(f"{k} ({', '.join(m)})" for k, m in unchecked.items())}


def result_rows(grid, target, interrupted: bool, objective: ObjectiveConfig) -> list[dict[str, Any]]:
    """One row per trial, in creation order: id, status, objective(s), feasibility and constraint values
    (:func:`feasibility_columns`), evaluation metrics, params, MLflow run."""
    from crl_ray.sweep import tracking
    from crl_ray.sweep.trial import failure_reason

    runs = {r.data.tags.get(tracking.TRIAL_TAG): r.info.run_id for r in tracking.trial_runs(target)}
    rows = []
    for i, result in enumerate(grid):
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        if result.error is not None:
            status = "failed"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = "interrupted" if interrupted else "stopped_early"
        row: dict[str, Any] = {"trial_id": trial_id, "trial_index": i, "status": status,
                               "objective": metrics.get("objective"), "step": metrics.get("step"),
                               "error": failure_reason(result.error) if result.error is not None else None,
                               "mlflow_run_id": runs.get(trial_id), "params": dict(result.config or {})}
        row.update(feasibility_columns(metrics, objective))
        row.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "objectives/"))})
        rows.append(row)
    return rows


def _usable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The feasible completed trial with the highest objective (a feasible stopped one only when no completed
    trial is feasible); None when no trial is feasible. An infeasible trial is never best, whatever its objective."""
    candidates = [r for r in rows if r.get("feasible") is True and _usable(r.get("objective"))]
    for pool in ([r for r in candidates if r["status"] == "completed"], candidates):
        if pool:
            return max(pool, key=lambda r: r["objective"])
    return None


def infeasible_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per infeasible trial: the limits it broke and by how much (constraint value = measured - limit)."""
    lines = []
    for r in rows:
        if r.get("feasible") is False:
            over = ", ".join(f"{k.split('/', 1)[1]} +{v:.3g}" for k, v in r.items()
                             if k.startswith("constraints/") and isinstance(v, (int, float)) and v > 0)
            lines.append(f"{r['trial_id']}: objective {r['objective']:.4g}, over the limit: {over}")
    return lines


def _write_summary(cfg: SweepConfig, base: dict, outcome: SweepOutcome, target) -> None:
    """Results table (CSV + JSON), best feasible config (or ``no_feasible_trial.txt`` saying why there is none),
    plots: written to <sweep>/summary and logged to the parent run."""
    from crl_ray.sweep import plots, tracking
    from crl_ray.sweep.trial import resolve_trial_config

    out = outcome.folder / "summary"
    out.mkdir(exist_ok=True)
    rows = outcome.rows
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    flat = [{**{k: v for k, v in r.items() if k != "params"}, **{f"param:{k}": v for k, v in r["params"].items()}}
            for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    files = [out / "results.json", out / "results.csv", plots.plot_objective(rows, out / "objective.png"),
             plots.plot_pareto(rows, out / "pareto.png")]
    best = outcome.best
    if best is not None:
        best_cfg = resolve_trial_config(base, best["params"], source=f"trial {best['trial_id']}")
        header = (f"# Best feasible trial of sweep {cfg.name}: {best['trial_id']} (objective {best['objective']:.4g}, "
                  f"MLflow run {best['mlflow_run_id']}).\n# Its resolved config, as trained and evaluated.\n")
        (out / "best_config.yaml").write_text(header + yaml.safe_dump(dump_config(best_cfg), sort_keys=False,
                                                                       width=110))
        files.append(out / "best_config.yaml")
    elif any(r.get("feasible") is False for r in rows):
        text = (f"No trial of sweep {cfg.name} is within objective.constraints, so there is no best config.\n"
                "Each trial's limits broken (constraint value = measured - limit):\n"
                + "".join(f"  {line}\n" for line in infeasible_lines(rows))
                + "Widen a limit (or set it to null) only if the trials above are acceptable models.\n")
        (out / "no_feasible_trial.txt").write_text(text)
        files.append(out / "no_feasible_trial.txt")
    tracking.log_artifacts(target, target.parent_run_id, [(f, "summary") for f in files])
    summary = {"trials/completed": outcome.count("completed"), "trials/stopped_early": outcome.count("stopped_early"),
               "trials/failed": outcome.count("failed"),
               "trials/feasible": sum(1 for r in rows if r.get("feasible") is True),
               "trials/infeasible": sum(1 for r in rows if r.get("feasible") is False)}
    if best is not None:
        summary["best/objective"] = best["objective"]
        summary.update({f"best/{k}": v for k, v in best.items()
                        if k.startswith(("eval/", "objectives/", "constraints/"))})
    tracking.log_metrics(target, target.parent_run_id, summary, 0, where="sweep summary")


def results_table(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """One line per trial: sampled values, ASR per attack, capability, over-refusal, degeneracy, helpfulness on the
    borderline benign prompts, objective, feasibility and status; the best feasible trial marked with *."""
    if not rows:
        return ""
    params = list(dict.fromkeys(k for r in rows for k in r.get("params", {})))
    attacks = list(dict.fromkeys(k.split("/")[-1] for r in rows for k in r if k.startswith("eval/asr/")))
    cols = ([(p.split(".")[-1], lambda r, p=p: r.get("params", {}).get(p)) for p in params]
            + [(f"asr:{a}", lambda r, a=a: r.get(f"eval/asr/{a}")) for a in attacks]
            + [("capab", lambda r: r.get("eval/capability")), ("refuse", lambda r: r.get("eval/over_refusal")),
               ("degen", lambda r: r.get("eval/degeneracy")), ("helpful", lambda r: r.get("eval/helpful_benign")),
               ("objective", lambda r: r.get("objective")),
               ("feasible", lambda r: {True: "yes", False: "NO"}.get(r.get("feasible"), "-")),
               ("status", lambda r: r.get("status"))])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    table = [["", "trial"] + [name for name, _ in cols]]
    for r in rows:
        mark = "*" if best is not None and r["trial_id"] == best["trial_id"] else ""
        table.append([mark, r["trial_id"]] + [cell(get(r)) for _, get in cols])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + (["* = best feasible trial"] if best is not None else []))


def render_outcome(outcome: SweepOutcome, resume_command: str) -> str:
    """The closing message: what ran, the results table, trials outside the limits, the best feasible trial (or
    that there is none), where MLflow is and how to open it."""
    lines = [f"sweep {outcome.name}: {len(outcome.rows)} trial(s) in {outcome.wall_s:.0f} s: "
             f"{outcome.count('completed')} completed, {outcome.count('stopped_early')} stopped early, "
             f"{outcome.count('failed')} failed"
             + (f", {outcome.count('interrupted')} interrupted" if outcome.interrupted else "")]
    table = results_table(outcome.rows, outcome.best)
    if table:
        lines.append(table)
    if outcome.interrupted:
        lines.append(f"interrupted; the state is saved. Resume with:\n  {resume_command}")
    for r in outcome.rows:
        if r["status"] == "failed":
            lines.append(f"  failed: {r['trial_id']}: {r['error']}")
    best = outcome.best
    infeasible = infeasible_lines(outcome.rows)
    if infeasible:
        lines.append(f"{len(infeasible)} trial(s) outside objective.constraints (never best):")
        lines.extend(f"  {line}" for line in infeasible[:MAX_LISTED])
        if len(infeasible) > MAX_LISTED:
            lines.append(f"  ... {len(infeasible) - MAX_LISTED} more in {outcome.folder / 'summary' / 'results.csv'}")
    unchecked = sorted({r["constraints_unchecked"] for r in outcome.rows if r.get("constraints_unchecked")})
    if unchecked:
        lines.append(f"limits not applied (metric not reported): {' | '.join(unchecked)}")
    if best is not None:
        extra = ", ".join(f"{k.split('/', 1)[1]} {best[k]:.4g}" for k in best if k.startswith("objectives/"))
        lines.append(f"best feasible trial: {best['trial_id']}  objective {best['objective']:.4g}"
                     + (f" ({extra})" if extra else ""))
        lines.append(f"  its config: {outcome.folder / 'summary' / 'best_config.yaml'}")
    elif infeasible and not outcome.interrupted:
        lines.append("no feasible trial: every trial that reported is outside objective.constraints, so there is "
                     f"no best config (see {outcome.folder / 'summary' / 'no_feasible_trial.txt'})")
    lines.append(f"MLflow: experiment {outcome.experiment!r}, sweep run {outcome.parent_run_id} at "
                 f"{outcome.tracking_uri}")
    lines.append(f"  open it: {ui_command(outcome.tracking_uri, outcome.experiment_id, outcome.view)}")
    return "\n".join(lines)
