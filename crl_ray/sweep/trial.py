"""One trial of a sweep: the Tune function trainable ("driver") that trains, evaluates and reports.

The driver resolves the trial's config (the sweep's config with the sampled values applied, re-validated),
then trains in segments: ``run_training(until_step=b)`` for each evaluation boundary ``b``, evaluates the
adapter (a Ray task with one worker's resources, started after training released its workers), logs to MLflow
and only then calls ``tune.report``. ``tune.report`` blocks until Tune has decided on the result (synchronous
reporting), so a scheduler can stop a trial only at that point, when no Train controller and no placement group
of the trial exist: early stopping cannot leak resources (a trial stopped while its worker group still held
CPUs used to starve the next trial's workers on a 2-core machine).
A small Tune checkpoint ({"step": b}) after each segment lets a restarted or resumed trial skip finished segments;
Ray Train resumes the run itself from its own checkpoint (same run name and storage).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray import tune

from crl_ray.config import SweepConfig, dump_config, parse_config
from crl_ray.storage import Store, fetch, parent
from crl_ray.sweep import tracking
from crl_ray.sweep.search import param_values, segments
from crl_ray.validate import set_path

log = logging.getLogger(__name__)

STATE_FILE = "driver_state.json"


class TrialFailed(RuntimeError):
    """A trial produced something unusable (e.g. a NaN objective); the message says what and where."""


class TrialJob:
    """The work of one trial: crl_ray.training.train.run_training and crl_ray.evaluate.run.evaluate_adapter.

    Tests subclass it with fakes; the sweep and the overhead benchmark use this one.
    """

    def train(self, cfg: SweepConfig, *, run_name: str, storage_path: str | Path, callbacks: list | None = None,
              until_step: int | None = None):
        from crl_ray.training.train import run_training

        return run_training(cfg, run_name=run_name, storage_path=storage_path, callbacks=callbacks,
                            until_step=until_step)

    def evaluate(self, cfg: SweepConfig, adapter_dir: Path | None, *, out_dir: Path):
        from crl_ray.evaluate.run import evaluate_adapter

        return evaluate_adapter(cfg, adapter_dir, out_dir=out_dir)


@dataclass(frozen=True)
class TrialContext:
    """Everything a driver needs besides its sampled values (passed with tune.with_parameters)."""

    base: dict  # the sweep's resolved config (dump_config)
    sweep_dir: str  # absolute; on the head (trial configs, evaluation outputs)
    target: tracking.TrackingTarget
    job: TrialJob = field(default_factory=TrialJob)
    store: str | None = None  # where trials pass files between nodes (crl_ray.storage); None = sweep_dir

    @property
    def trial_store(self) -> str:
        return self.store or self.sweep_dir


def resolve_trial_config(base: dict, sampled: dict[str, Any], source: str = "trial") -> SweepConfig:
    """The sweep config with one trial's sampled values applied, validated again (ConfigError if rejected).

    The cross-field checks ran on the space's extremes before the sweep started (crl_ray.validate.space_problems).
    """
    cfg = parse_config(copy.deepcopy(base), source)
    raw = copy.deepcopy(base)
    for path, value in param_values(cfg.search.space, sampled).items():
        set_path(raw, path, value)
    return parse_config(raw, source)


class StepMetricsCallback(ray.train.UserCallback):
    """Train V2 callback (runs on the Train controller): logs worker 0's reported metrics at their ``step``."""

    def __init__(self, target: tracking.TrackingTarget, run_id: str) -> None:
        self.target = target
        self.run_id = run_id

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        first = dict(metrics[0])
        step = first.pop("step", None)
        try:
            tracking.log_metrics(self.target, self.run_id, first, int(step) if step is not None else 0,
                                 where=f"train step {step}")
        except Exception as exc:  # tracking must never stop training
            log.warning("could not log training metrics to MLflow: %s", exc)


class TrialStatusCallback(tune.Callback):
    """Tune callback (sweep process): ends a trial's run when the trial ended without ending it itself."""

    def __init__(self, target: tracking.TrackingTarget) -> None:
        self.target = target

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        stopped = not (trial.last_result or {}).get("final")
        self._finish(trial.trial_id, "FINISHED", "stopped_early" if stopped else "completed")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial.trial_id, "FAILED", "failed", tracking.trial_error(trial))

    def _finish(self, trial_id: str, status: str, state: str, error: str | None = None) -> None:
        try:
            run_id = tracking.find_trial_run(self.target, trial_id)
            if run_id is None and status == "FAILED":  # failed before its driver opened the run
                run_id = tracking.open_trial_run(self.target, trial_id)
            if run_id is None:
                return
            run = self.target.client().get_run(run_id)
            if run.info.status == "RUNNING":
                tracking.end_run(self.target, run_id, status, state, error)
            elif error and tracking.ERROR_TAG not in run.data.tags:
                self.target.client().set_tag(run_id, tracking.ERROR_TAG, error[:5000])
        except Exception as exc:  # tracking must never stop the sweep
            log.warning("could not record the end of trial %s in MLflow: %s", trial_id, exc)


def original_error(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers: task/actor errors (``cause``), Ray Train's WorkerGroupError
    (the lowest rank's failure), ControllerError and UserExceptionWithTraceback."""
    for _ in range(10):  # wrappers nest a few levels at most
        inner = getattr(exc, "cause", None)
        failures = getattr(exc, "worker_failures", None)
        if not isinstance(inner, BaseException) and isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        if not isinstance(inner, BaseException):
            inner = getattr(exc, "controller_failure", None) or getattr(exc, "_base_exc", None)
        if not isinstance(inner, BaseException) or inner is exc:
            return exc
        exc = inner
    return exc


def failure_reason(exc: BaseException) -> str:
    """'Type: message' (first line) of the original error, unwrapping Ray's error wrappers."""
    exc = original_error(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def evaluate_remote(job: TrialJob, cfg: SweepConfig, adapter_dir: str | Path | None, out_dir: Path):
    """Run ``job.evaluate`` as a Ray task with one worker's GPU (or the trial's CPUs), outside the trial's group.

    The driver itself holds only a sliver of CPU; the task starts after training has released its workers, in a
    fresh process (max_calls=1) that frees its memory when done. It may run on any node: it reads the adapter from
    its storage location (a local copy for an object store), writes its outputs to a temporary folder there and
    returns them, and this function writes them into ``out_dir`` (on the driver's node) and points the outcome at
    them.
    """
    from crl_ray.training.train import run_task

    outcome, files = run_task(_evaluate, cfg.resources.evaluation_task(), job, cfg,
                              None if adapter_dir is None else str(adapter_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    outcome.summary_path = out_dir / Path(outcome.summary_path).name
    outcome.records_path = out_dir / Path(outcome.records_path).name
    return outcome


def _evaluate(job: TrialJob, cfg: SweepConfig, adapter_dir: str | None):
    from crl_ray.storage import local_copy
    from crl_ray.training.train import log_to_stderr

    log_to_stderr()  # the evaluation's progress (attack i/N, judge, timings) reaches the sweep's console
    with local_copy(adapter_dir) as adapter, tempfile.TemporaryDirectory(prefix="crl_ray_eval_") as tmp:
        outcome = job.evaluate(cfg, adapter, out_dir=Path(tmp))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return outcome, files


def report_metrics(train_metrics: dict[str, float], evaluation, step: int, final: bool) -> dict[str, Any]:
    """What the driver reports to Tune: evaluation metrics, objective(s), last training metrics, step, final."""
    out: dict[str, Any] = {k: v for k, v in train_metrics.items() if k != "step"}
    out.update(evaluation.metrics)
    out["objective"] = evaluation.objective
    out.update({f"objectives/{k}": v for k, v in evaluation.objectives.items()})
    out["step"] = step
    out["final"] = final
    return out


def _restored_step() -> int:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return int(json.loads((Path(folder) / STATE_FILE).read_text())["step"])


def _report(metrics: dict[str, Any], step: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / STATE_FILE).write_text(json.dumps({"step": step}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def log_data_provenance(target, run_id: str, path: Path) -> None:
    """The training data's provenance as an artifact (data/provenance.json) and one param per source that pins its
    content (data.<group>[i].sha256, or .revision / .resolved_revision for hub datasets)."""
    records = json.loads(path.read_text())
    params = {}
    for record in records:
        for key in ("sha256", "revision", "resolved_revision", "rows"):
            if key in record:
                params[f"{record['path'].replace('[', '.').replace(']', '')}.{key}"] = str(record[key])
    tracking.log_params(target, run_id, params)
    tracking.log_artifacts(target, run_id, [(path, "data")])


def log_trial_datasets(target, run_id: str, cfg: SweepConfig, data_dir: Path) -> None:
    """The encoded training sets (benign, harmful, retain) and the evaluation behaviours as MLflow dataset inputs.
    Best effort: a dataset that cannot be read is a warning, never a failed trial."""
    import datasets

    from crl_ray.evaluate.attacks import load_behaviors

    try:
        train_sets = {name: datasets.load_from_disk(str(data_dir / name)) for name in ("benign", "harmful", "retain")
                      if (data_dir / name).is_dir()}
        tracking.log_datasets(target, run_id, train_sets, "training", str(data_dir))
        behaviors = load_behaviors(cfg.eval.behaviors, limit=cfg.eval.limit)
        eval_set = datasets.Dataset.from_dict({"id": [b.id for b in behaviors], "prompt": [b.prompt for b in behaviors],
                                               "target": [b.target for b in behaviors]})
        tracking.log_datasets(target, run_id, {f"behaviors-{cfg.eval.behaviors.source}": eval_set}, "evaluation",
                              cfg.eval.behaviors.source)
    except Exception as exc:  # bookkeeping only
        log.warning("could not record the datasets of run %s in MLflow: %s", run_id, exc)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: train in segments, evaluate each, log to MLflow, report to Tune."""
    trial_id = tune.get_context().get_trial_id()
    target = ctx.target
    run_id = tracking.open_trial_run(target, trial_id)
    trial_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = resolve_trial_config(ctx.base, config, source=f"trial {trial_id}")
        config_file = trial_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False, width=110))
        tracking.log_params(target, run_id, tracking.flatten_params(
            {k: v for k, v in dump_config(cfg).items() if k != "search"}))
        tracking.log_params(target, run_id, {f"sampled.{k}": str(v) for k, v in config.items()})
        tracking.log_artifacts(target, run_id, [(config_file, None)])
        done = _restored_step()
        store = Store(ctx.trial_store)
        data_logged = False
        for until in segments(cfg):
            if until <= done:
                continue
            outcome = ctx.job.train(cfg, run_name=f"train-{trial_id}", storage_path=store.located("train"),
                                    callbacks=[StepMetricsCallback(target, run_id)], until_step=until)
            if outcome.data_provenance is not None and not data_logged:  # the same data in every segment
                data_dir = fetch(parent(outcome.data_provenance), trial_dir / "data")  # a copy for an object store
                if (data_dir / "provenance.json").is_file():
                    log_data_provenance(target, run_id, data_dir / "provenance.json")
                    if until == next(iter(segments(cfg))):  # a resumed trial logged its datasets already
                        log_trial_datasets(target, run_id, cfg, data_dir)
                data_logged = True
            eval_dir = trial_dir / f"eval-step{until}"
            evaluation = evaluate_remote(ctx.job, cfg, outcome.adapter_dir, eval_dir)
            if store.remote:  # the records beside the checkpoints, as in a folder store
                store.upload(eval_dir, "trials", trial_id, eval_dir.name)
            if not math.isfinite(evaluation.objective):
                raise TrialFailed(f"objective is {evaluation.objective} after step {until} "
                                  f"(evaluation summary: {evaluation.summary_path})")
            final = until == cfg.train.steps
            metrics = report_metrics(outcome.metrics, evaluation, until, final)
            # training metrics reach MLflow per step through StepMetricsCallback
            tracking.log_metrics(target, run_id, {k: v for k, v in metrics.items() if k.startswith(
                ("eval/", "objective", "constraints/", "feasible"))}, until, where=f"trial {trial_id}")
            sample = tracking.sample_records(evaluation.records_path, trial_dir / "generations_sample.jsonl",
                                             cfg.mlflow.sample_generations)
            adapter = fetch(outcome.adapter_dir, trial_dir / "adapter")  # a copy for an object store
            tracking.log_artifacts(target, run_id, [(adapter, "adapter"),
                                                    (evaluation.records_path, "eval"),
                                                    (evaluation.summary_path, "eval")]
                                   + ([(sample, "eval")] if sample else []))
            if final:
                tracking.end_run(target, run_id, "FINISHED", "completed")
            _report(metrics, until)  # the only point where Tune may stop this trial
    except Exception as exc:
        reason = failure_reason(exc)
        log.error("trial %s failed: %s", trial_id, reason)
        try:
            tracking.end_run(target, run_id, "FAILED", "failed", reason)
        except Exception as track_exc:  # the Tune callback will still mark it failed
            log.warning("could not mark trial %s failed in MLflow: %s", trial_id, track_exc)
        raise
